"""Peak memory of decoding one large high-bit-depth image, as the web demo does for an upload.

    python bench/decode_memory.py                 # this checkout's imgtune.data.images
    python bench/decode_memory.py --rev b7bb0eb   # also the images.py of that commit, for before/after

Writes a 6300 x 6300 16-bit grey PNG (39.7 megapixels, just under `imgtune serve`'s 40 megapixel
limit; a smooth gradient, so the file is small, as an attacker's would be), a float32 TIFF of the
same size and, for comparison, an RGBA PNG and an RGB JPEG; then decodes each with `decode_image`
in a fresh Python process and reports that process's peak resident memory above what it held
before decoding (Linux: VmHWM, reset through /proc/self/clear_refs), beside the size of the RGB
picture that comes out (Pillow keeps RGB in 4 bytes a pixel). tracemalloc would miss Pillow's
buffers, which are not allocated through Python. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

MEASURE = r"""
import importlib.util, json, sys, time
from pathlib import Path

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

module_file, image_file = sys.argv[1], sys.argv[2]
if module_file == "-":
    from imgtune.data import images
else:
    spec = importlib.util.spec_from_file_location("images_under_test", module_file)
    images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(images)
data = Path(image_file).read_bytes()
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current size
before = status("VmRSS")
started = time.perf_counter()
picture = images.decode_image(data, max_pixels=40_000_000)
seconds = time.perf_counter() - started
print(json.dumps(dict(extra_bytes=status("VmHWM") - before, seconds=seconds, output_bytes=4 * picture.width * picture.height)))
"""


def make_images(folder: Path) -> dict[str, Path]:
    """The 16-bit PNG and the float TIFF, written once into ``folder``."""
    side = 6300
    ramp = np.linspace(0, 65535, side, dtype=np.float64).astype(np.uint16)
    png = folder / "deep.png"
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(png, compress_level=1)
    tiff = folder / "float.tif"
    floats = (ramp / np.float32(65535)).astype(np.float32)
    Image.fromarray(np.broadcast_to(floats, (side, side)).copy()).save(tiff, compression="tiff_adobe_deflate")
    # For comparison: the same number of pixels in 8-bit RGBA (the alpha composite) and RGB JPEG.
    rgba = folder / "alpha.png"
    channel = (ramp >> 8).astype(np.uint8)
    Image.fromarray(np.broadcast_to(channel[:, None], (side, side, 4)).copy()).save(rgba, compress_level=1)
    jpeg = folder / "photo.jpg"
    Image.fromarray(np.broadcast_to(channel[:, None], (side, side, 3)).copy()).save(jpeg, quality=90)
    return {"png-16-bit 6300x6300": png, "tiff-float32 6300x6300": tiff, "png-rgba 6300x6300": rgba,
            "jpeg-rgb 6300x6300": jpeg}


def measure(module_file: str, image: Path) -> dict:
    """Decode ``image`` in a fresh process with the images module at ``module_file`` (``-``: installed)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, module_file, str(image)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="also measure imgtune/data/images.py as of this git revision")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"this checkout": "-"}
        if args.rev:
            old = Path(tmp) / "images_old.py"
            old.write_text(subprocess.run(["git", "show", f"{args.rev}:imgtune/data/images.py"], cwd=ROOT,
                                          capture_output=True, text=True, check=True).stdout)
            versions = {args.rev: str(old), **versions}
        rows = []
        for name, path in make_images(Path(tmp)).items():
            for version, module_file in versions.items():
                row = dict(image=name, version=version, file_bytes=path.stat().st_size, **measure(module_file, path))
                rows.append(row)
                print(f"{name:<24} {version:<14} file {row['file_bytes'] / 1e3:8.0f} kB  peak extra "
                      f"{row['extra_bytes'] / 1e6:6.0f} MB  (RGB output {row['output_bytes'] / 1e6:4.0f} MB)  "
                      f"{row['seconds']:.2f} s")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
