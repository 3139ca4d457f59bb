"""Readers for the data sets in ``../shared/data`` (IDX files, npz archives).

Every reader takes a local path: nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {np.prod(dims)} elements, found {data.size}")
    return data.reshape(dims)


def load_idx_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-layout split ('train' or 't10k') as float32 [N, 1, 28, 28] in [0, 1] and int64 labels."""
    data_dir = Path(data_dir)
    images = read_idx(_find(data_dir, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_find(data_dir, f"{split}-labels-idx1-ubyte"))
    x = images.astype(np.float32)[:, None] / 255.0
    return x, labels.astype(np.int64)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(f"neither {stem}.gz nor {stem} found in {data_dir}")


def load_cifar_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR npz (x uint8 NHWC RGB, y uint8) as float32 [N, 3, 32, 32] in [0, 1] and int64 labels."""
    with np.load(path, allow_pickle=False) as npz:
        x = npz["x"].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        y = npz["y"].astype(np.int64)
    return np.ascontiguousarray(x), y


def sha256_files(paths: list[Path]) -> dict[str, str]:
    """sha256 of each file's bytes, keyed by file name."""
    return {Path(p).name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}
