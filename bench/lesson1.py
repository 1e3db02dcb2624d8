"""Accuracy and time of the lesson-1 recipe with imgtune's defaults, on the two offline datasets.

    python bench/lesson1.py pets   # ../shared/data/oxford-pets-sample, 50/50 stratified (185/185)
    python bench/lesson1.py elpv   # the embedded default, as `make demo` runs it (an empty cache)

Prints one line per run and writes bench/results/lesson1-<name>-<date>.json. A benchmark, not a test:
timings depend on the machine and on what else it is doing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from datetime import datetime
from pathlib import Path

import torch

from imgtune.data.sources import PETS_LABEL_RE
from imgtune.train.run import train

HERE = Path(__file__).resolve().parent
PETS_SAMPLE = HERE.parent.parent / "shared" / "data" / "oxford-pets-sample"

RUNS = {
    "pets": dict(data=str(PETS_SAMPLE), label_re=PETS_LABEL_RE, valid_pct=0.5, stratify=True),
    "elpv": dict(data=None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", choices=sorted(RUNS), default=sorted(RUNS))
    parser.add_argument("--arch", default="efficientnet_lite0")
    args = parser.parse_args()
    for name in args.runs:
        options = dict(RUNS[name])
        with tempfile.TemporaryDirectory() as tmp:  # an empty cache: a first run's time
            result = train(options.pop("data"), arch=args.arch, out=Path(tmp) / "run", cache_dir=Path(tmp) / "cache",
                           **options)
        m = result.metrics
        record = dict(
            name=name, arch=args.arch, valid_accuracy=m["valid_accuracy"], seconds=m["seconds"],
            epochs={p: sum(1 for h in m["history"] if h["phase"] == p) for p in ("frozen", "unfrozen")},
            lr=m["lr"]["frozen"], train=m["data"]["train"], valid=m["data"]["valid"],
            machine=dict(cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), processor=platform.processor(),
                         device=m["device"]),
            date=datetime.now().isoformat(timespec="seconds"), versions=m["versions"],
        )
        phases = ", ".join(f"{k} {v:.0f}s" for k, v in m["seconds"].items())
        print(f"{name}: {args.arch} accuracy {100 * m['valid_accuracy']:.1f}% ({record['train']} train /"
              f" {record['valid']} valid), epochs {record['epochs']}, {phases}")
        out = HERE / "results" / f"lesson1-{name}-{datetime.now():%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
