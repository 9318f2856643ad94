"""End to end per image: DICOM file -> display PNG on disk, naive vs the importer, and the PNG encoders.

    nice .venv/bin/python benchmarks/bench_png.py [--repeats 5]

On one pinned core, CPU seconds per image (median of --repeats), for a synthetic full-field
mammogram (4096 x 3328, 12 bits in 16, uncompressed; benchmarks/bench_normalize.py's phantom):

- naive end to end: the prototype chain (bench_normalize.naive) + Pillow PNG at its default level (6);
- importer before: ``load_display_frames`` + Pillow PNG at level 1;
- importer with OpenCV's PNG (level 1, RLE strategy, SUB filter; the encoder before ISA-L);
- importer now: ``load_display_frames`` + ``importers.png.encode_png`` (SUB-filtered rows, ISA-L deflate level 1);
and checks every PNG decodes to exactly the same pixels. Writes the run into benchmarks/results/png.json
(earlier runs kept under their own keys) with the load.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_normalize import naive, phantom, pin_to_one_core, timed, write_case  # noqa: E402


def main() -> int:
    import warnings

    from PIL import Image

    from importers.png import encode_png
    from mammoflag.dicom.normalize import load_display_frames
    from mammoflag.dicom.types import NormalizeOptions

    warnings.simplefilter("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "png.json")
    a = ap.parse_args()
    core = pin_to_one_core()
    load_before = open("/proc/loadavg").read().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_case(tmp / "full.dcm", phantom())
        out = tmp / "out.png"

        def pil(pixels, level):
            Image.fromarray(pixels).save(out, format="PNG", compress_level=level)

        def cv(pixels):
            out.write_bytes(encode_png(pixels, use_isal=False))

        def now(pixels):
            out.write_bytes(encode_png(pixels))

        opts = NormalizeOptions(long_side=1024)
        display = load_display_frames(path, opts).frames[0].pixels
        t_naive, _ = timed(lambda: pil(naive(path), 6), a.repeats)
        t_before, _ = timed(lambda: pil(load_display_frames(path, opts).frames[0].pixels, 1), a.repeats)
        t_cv_e2e, _ = timed(lambda: cv(load_display_frames(path, opts).frames[0].pixels), a.repeats)
        t_now, _ = timed(lambda: now(load_display_frames(path, opts).frames[0].pixels), a.repeats)
        t_decode, _ = timed(lambda: load_display_frames(path, opts), a.repeats)
        t_pil1, _ = timed(lambda: pil(display, 1), a.repeats * 4)
        size_pil1 = out.stat().st_size
        t_cv, _ = timed(lambda: cv(display), a.repeats * 4)
        size_cv = out.stat().st_size
        t_isal, _ = timed(lambda: now(display), a.repeats * 4)
        size_isal = out.stat().st_size
        same = all(bool((np.asarray(Image.open(io.BytesIO(encode_png(display, use_isal=u)))) == display).all())
                   for u in (True, False))
    result = {
        "image": "4096x3328, 12 bits in 16, uncompressed -> 1024x832 display", "core": core,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": load_before,
        "load_after": open("/proc/loadavg").read().split()[:3], "cpu_s_per_image": {
            "naive_end_to_end (prototype chain + Pillow PNG level 6)": round(t_naive, 4),
            "importer_before (load_display_frames + Pillow PNG level 1)": round(t_before, 4),
            "importer_opencv_png (load_display_frames + OpenCV PNG level 1 RLE SUB)": round(t_cv_e2e, 4),
            "importer_now (load_display_frames + SUB rows + ISA-L deflate level 1)": round(t_now, 4),
            "load_display_frames only": round(t_decode, 4),
            "png Pillow level 1": round(t_pil1, 4), "png OpenCV level 1 RLE": round(t_cv, 4),
            "png ISA-L level 1": round(t_isal, 4)},
        "speedup_end_to_end_before": round(t_naive / t_before, 2),
        "speedup_end_to_end_opencv_png": round(t_naive / t_cv_e2e, 2),
        "speedup_end_to_end_now": round(t_naive / t_now, 2),
        "png_bytes": {"pillow_level1": size_pil1, "opencv_rle": size_cv, "isal_level1": size_isal},
        "pixels_identical": same}
    print(json.dumps(result, indent=2))
    kept = json.loads(a.out.read_text()) if a.out.exists() else {}
    if "cpu_s_per_image" in kept:  # the file held one run: keep it under its own key
        kept = {f"OpenCV PNG (run of {kept.get('when')})": kept}
    kept[f"ISA-L PNG (run of {result['when']})"] = result
    a.out.write_text(json.dumps(kept, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
