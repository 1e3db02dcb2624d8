"""ONNX Runtime sessions opened one way everywhere: the predictors' and the feature extractor's.

:func:`session_options` is the one place that says how ONNX Runtime runs here: every graph
optimisation, as many compute threads as the cores this process may really use (a container's CPU
quota included: ONNX Runtime itself counts the host's cores and would start threads that take turns
on the same two), one thread between operators (these graphs are a chain of convolutions, with
nothing to run side by side), and the memory arena kept, so that a batch reuses the last one's
buffers. ``bench/speed.py`` measures the choices side by side.
"""

from __future__ import annotations

from pathlib import Path

from imgtune.errors import ImgtuneError, describe
from imgtune.system import usable_cores


def import_ort():
    """``onnxruntime``, or an :class:`ImgtuneError` naming the package to install."""
    try:
        import onnxruntime
    except ImportError:
        raise ImgtuneError("ONNX needs the onnxruntime package (an imgtune dependency): "
                           "pip install onnxruntime") from None
    return onnxruntime


def session_options(*, threads: int | None = None, spinning: bool = True):
    """The ``onnxruntime.SessionOptions`` imgtune opens every session with.

    Args:
        threads: compute threads.  [default: :func:`imgtune.system.usable_cores`]
        spinning: let idle compute threads spin between operators (lower latency; set ``False`` where
            another thread needs the cores meanwhile).

    Returns:
        A ``SessionOptions``: ``ORT_ENABLE_ALL`` graph optimisation, sequential execution with one
        inter-op thread, ``threads`` intra-op threads, the CPU memory arena on.
    """
    ort = import_ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = max(1, threads or usable_cores())
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def open_session(model: str | Path | bytes, *, device: str = "cpu", threads: int | None = None,
                 spinning: bool = True):
    """An ``onnxruntime.InferenceSession`` on ``model`` (a path or the serialised graph).

    Args:
        model: the ONNX file, or its bytes.
        device: ``cpu``, or ``cuda`` (used when ONNX Runtime has the CUDA provider, else the CPU).
        threads, spinning: see :func:`session_options`.

    Raises:
        ImgtuneError: onnxruntime is missing, or the graph cannot be loaded (naming the file).
    """
    ort = import_ort()
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, session_options(threads=threads, spinning=spinning), providers=providers)
    except Exception as error:
        name = "the ONNX graph" if isinstance(model, bytes) else str(model)
        raise ImgtuneError(f"{name}: cannot load ({describe(error)}); export it again with `imgtune export`") from None
