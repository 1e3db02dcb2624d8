"""Load on the web demo's API, on loopback: latency and throughput for the PyTorch and ONNX Runtime backends.

    python bench/serve_load.py                 # a fresh EfficientNet-Lite0 bundle (ImageNet weights, new head)
    python bench/serve_load.py runs/my-run     # your own run folder (exported to ONNX if it is not yet)

For each backend it starts `imgtune serve`'s app with uvicorn on 127.0.0.1 (a free port), sends
200 POST /api/predict requests from 8 concurrent clients (cam=false: prediction only, then a second
pass with cam=true), checks every answer is 200, and prints p50/p99 latency and requests/s. Results
go to bench/results/serve-load-<date>.json. A benchmark, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(folder: Path) -> Path:
    """An EfficientNet-Lite0 bundle with its offline ImageNet weights and a 3-class head (untrained)."""
    from imgtune import Learner, load_data

    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (folder / "data" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "data" / name / f"{i}.png")
    learner = Learner.from_data(load_data(folder / "data", valid_pct=0.25), progress=False, num_workers=0)
    learner.save(folder / "run")
    return folder / "run"


def photo_bytes() -> bytes:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def load(url: str, body: bytes, *, requests: int, clients: int, cam: bool) -> dict:
    def one(_):
        with httpx.Client(timeout=60) as client:
            started = time.perf_counter()
            response = client.post(url, params={"cam": str(cam).lower()}, files={"file": ("photo.jpg", body, "image/jpeg")})
            return response.status_code, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = sorted(seconds for _, seconds in results)
    errors = sum(status != 200 for status, _ in results)
    return dict(requests=requests, clients=clients, cam=cam, errors=errors, requests_per_s=requests / wall,
                p50_ms=1000 * statistics.median(latencies), p99_ms=1000 * latencies[int(0.99 * (len(latencies) - 1))])


def serve_and_measure(run_dir: Path, backend: str, body: bytes, args) -> list[dict]:
    from imgtune.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(run_dir, backend=backend), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/api/predict"
        load(url, body, requests=8, clients=2, cam=False)  # warm-up
        rows = []
        for cam in (False, True):
            row = dict(backend=backend, **load(url, body, requests=args.requests, clients=args.clients, cam=cam))
            rows.append(row)
            print(f"{backend:<6} cam={str(cam):<5} {row['requests']} requests, {row['clients']} clients: "
                  f"{row['errors']} errors, p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
                  f"{row['requests_per_s']:.1f} requests/s")
        return rows
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    from imgtune.deploy.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else make_bundle(Path(tmp))
        if not (run_dir / "model.onnx").exists():
            export_onnx(run_dir)
        body = photo_bytes()
        rows = serve_and_measure(run_dir, "torch", body, args) + serve_and_measure(run_dir, "onnx", body, args)
    out = HERE / "results" / f"serve-load-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(dict(rows=rows, date=datetime.now().isoformat(timespec="seconds")), indent=2) + "\n")
    print(f"written to {out}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
