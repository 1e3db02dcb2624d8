"""Progress: bars where someone watches, whole lines (never a carriage return) in pipes and logs."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from click.testing import CliRunner

from conftest import make_class_folders
from imgtune.cli import cli
from imgtune.progress import PlainProgress, interactive, progress_bar

FAST = ["--arch", "test_efficientnet", "--weights", "none", "--size", "32", "--bs", "6", "--num-workers", "0",
        "--device", "cpu"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_plain_lines_and_a_terminal_a_bar():
    assert not interactive(io.StringIO()) and interactive(_Terminal())
    assert isinstance(progress_bar(10, stream=io.StringIO()), PlainProgress)
    terminal = _Terminal()
    with progress_bar(10, desc="work", stream=terminal) as bar:
        assert not isinstance(bar, PlainProgress)
        bar.update(10)
    assert "\r" in terminal.getvalue() and "10/10" in terminal.getvalue()


def test_plain_progress_prints_whole_lines_periodically_and_once_at_the_end():
    out = io.StringIO()
    bar = PlainProgress(4, desc="features", unit="img", stream=out, interval=0.0)
    for _ in range(4):
        bar.update()
    bar.set_postfix(loss="0.5")
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 5
    assert lines[1].startswith("features: 2/4 img (50%)")
    assert lines[-1].startswith("features: 4/4 img (100%) loss 0.5 in ")

    quiet = io.StringIO()
    with PlainProgress(3, stream=quiet, interval=0.0, disable=True) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_plain_progress_waits_for_the_interval():
    out = io.StringIO()
    bar = PlainProgress(1000, stream=out, interval=3600.0)
    for _ in range(1000):
        bar.update()
    assert out.getvalue() == ""
    bar.close()
    assert out.getvalue().count("\n") == 1


def test_train_through_the_cli_prints_no_carriage_returns(tmp_path):
    data = make_class_folders(tmp_path / "colours")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", str(data), *FAST, "--epochs", "1", "--freeze-epochs", "1", "--lr", "3e-3",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output and "epoch 1/1" in result.output


def test_a_command_with_stdout_and_stderr_to_pipes_prints_no_carriage_returns(tmp_path):
    data = make_class_folders(tmp_path / "colours", n=4)
    # The doctor's mislabel finder computes features with a progress display (it printed tqdm bars before).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: more threads only wait on each other
    done = subprocess.run([sys.executable, "-m", "imgtune", "doctor", str(data), "--arch", "test_efficientnet",
                           "--weights", "none", "--mislabels", "1", "--out", str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr and "features: 12/12 img (100%)" in done.stderr
