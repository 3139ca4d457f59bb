"""The same MNIST test digits sent to a real service as PNG images and as an array: identical answers?

    python -m benchmarks.image_vs_array [--n 1000] [--batch 50] [--data ../shared/data]

Starts ``gga-serve`` (bundled model and detector), sends the first ``n`` test digits as multipart PNG
bodies (``batch`` files per request) and as ``.npy`` bodies (``batch`` rows per request), and prints
how many labels, trust values and flags agree (exactly), plus the wall time of each pass.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.serverproc import ROOT, start_server, stop_server
from detectors.datasets import read_idx


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = p.parse_args(argv)
    pixels = read_idx(args.data / "mnist" / "t10k-images-idx3-ubyte.gz")[:args.n]
    labels = read_idx(args.data / "mnist" / "t10k-labels-idx1-ubyte.gz")[:args.n].astype(np.int64)
    x = pixels[:, None].astype(np.float32) / 255.0
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_server(dict(GGA_ARTIFACT_DIR=str(Path(tmp) / "a"), GGA_LOG_LEVEL="warning",
                                       GGA_STRATEGY="device"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            with httpx.Client(base_url=base, timeout=120) as c:
                t0 = time.perf_counter()
                by_image = []
                for s in range(0, args.n, args.batch):
                    files = [("file", (f"{i}.png", png(pixels[i]), "image/png")) for i in range(s, min(s + args.batch,
                                                                                                       args.n))]
                    r = c.post("/predict", files=files)
                    r.raise_for_status()
                    by_image += r.json()["predictions"]
                t_image = time.perf_counter() - t0
                t0 = time.perf_counter()
                by_array = []
                for s in range(0, args.n, args.batch):
                    r = c.post("/predict", content=npy(x[s:s + args.batch]),
                               headers={"content-type": "application/x-npy"})
                    r.raise_for_status()
                    by_array += r.json()["predictions"]
                t_array = time.perf_counter() - t0
        finally:
            stop_server(proc)
    same = {k: sum(a[k] == b[k] for a, b in zip(by_image, by_array, strict=True)) for k in ("label", "trust",
                                                                                          "flagged")}
    out = {"n": args.n, "same": same, "accuracy": float(np.mean([r["label"] for r in by_image] == labels)),
           "flagged": sum(r["flagged"] for r in by_image), "image_s": t_image, "array_s": t_array}
    print(f"{args.n} MNIST test digits, PNG (multipart, {args.batch} per request) vs .npy bodies:")
    n = args.n
    print(f"  identical label {same['label']}/{n}, trust {same['trust']}/{n}, flag {same['flagged']}/{n}")
    print(f"  accuracy {out['accuracy']:.2%}, flagged {out['flagged']}; wall time PNG {t_image:.1f} s, "
          f"npy {t_array:.1f} s")
    return out


if __name__ == "__main__":
    main()
