"""Datasets: the gzip IDX reader, Fashion-MNIST location/fetching/verification, and the course CSVs.

Fashion-MNIST is looked for, in order, in a directory the caller gives, in ``$FASHION_DATA_DIR``,
in the project cache ``data/fashion-mnist``; and only when ``fetch=True`` is it downloaded (the
official upstream URLs first, then Debian's ``dataset-fashion-mnist`` package through
``apt-get download`` + ``dpkg-deb -x``). Every file is checked against the SHA-256 of its
*gunzipped* content, which is the same for both sources (their ``.gz`` headers differ).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFIT_DIR = PROJECT_ROOT / "data" / "profit"
FASHION_CACHE = PROJECT_ROOT / "data" / "fashion-mnist"

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# SHA-256 of the gunzipped content: identical for the upstream files and Debian's package.
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
PROFIT_SHA256 = {
    "ex1data1.txt": "e69559fac1a2f68f704222629e603299bfa8aabfd88e81225e52e125484764a0",
    "ex1data2.txt": "c19f8051a03d4b73be5bb9a60ace1c2f24adba2947cc0028e0f184d5680d4d21",
}
UPSTREAM_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}.gz"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_PATH = "usr/share/datasets/fashion-mnist"

# IDX type codes (third magic byte) → numpy dtype (IDX is big-endian).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(Exception):
    """A data file is missing, corrupt, or fails its checksum. The message names the file."""


def _read_bytes(path: Path) -> bytes:
    """Whole content of ``path``, gunzipped when it is gzip; corruption becomes DataError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc


def parse_idx(content: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes; the magic number, dims and payload length are all checked."""
    if len(content) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(content)} bytes)")
    zero, zero2, type_code, ndim = content[0], content[1], content[2], content[3]
    if zero or zero2 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{name}: bad IDX magic number 0x{content[:4].hex()} "
            "(expected 0x0000TTNN with a known type TT and NN ≥ 1 dims)"
        )
    header = 4 + 4 * ndim
    if len(content) < header:
        raise DataError(f"{name}: truncated IDX header ({len(content)} bytes, need {header})")
    dims = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(content) - header
    if payload != expected:
        raise DataError(
            f"{name}: payload is {payload} bytes but dims {dims} of {dtype.name} "
            f"need {expected} (file truncated or padded)"
        )
    return np.frombuffer(content, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a native-endian numpy array."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def sha256_of_content(path: Path) -> str:
    """SHA-256 of the file's content after gunzip (so both upstream and Debian files agree)."""
    return hashlib.sha256(_read_bytes(path)).hexdigest()


def _fashion_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def verify_fashion_dir(directory: Path) -> dict[str, Path]:
    """Check that ``directory`` holds all four Fashion-MNIST files with the right content."""
    found: dict[str, Path] = {}
    for stem, digest in FASHION_SHA256.items():
        path = _fashion_file(directory, stem)
        if path is None:
            raise DataError(f"{directory}: missing {stem}.gz")
        actual = sha256_of_content(path)
        if actual != digest:
            raise DataError(f"{path}: checksum mismatch (SHA-256 of content {actual}, expected {digest})")
        found[stem] = path
    return found


def _candidate_dirs(data_dir: str | Path | None) -> list[Path]:
    roots = [Path(p) for p in (data_dir, os.environ.get("FASHION_DATA_DIR")) if p]
    dirs: list[Path] = []
    for root in roots:
        dirs += [root / "fashion-mnist", root]
    return [*dirs, FASHION_CACHE]


def locate_fashion(data_dir: str | Path | None = None, *, fetch: bool = False) -> dict[str, Path]:
    """Find verified Fashion-MNIST files; download them into the cache only if ``fetch``.

    A directory the user names explicitly must be valid: a bad file there is an error, not a
    reason to look elsewhere.
    """
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: data directory does not exist")
    for directory in _candidate_dirs(data_dir):
        if any(_fashion_file(directory, stem) for stem in FASHION_SHA256):
            return verify_fashion_dir(directory)
    if not fetch:
        raise DataError(
            "Fashion-MNIST not found (looked in "
            + ", ".join(str(d) for d in _candidate_dirs(data_dir))
            + "); pass --data-dir, set FASHION_DATA_DIR, or run `python -m training fetch`"
        )
    return fetch_fashion(FASHION_CACHE)


def fetch_fashion(dest: Path = FASHION_CACHE) -> dict[str, Path]:
    """Download Fashion-MNIST into ``dest`` (upstream first, then Debian) and verify it."""
    errors = []
    for fetcher in (_fetch_upstream, _fetch_debian):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                fetcher(Path(tmp))
                verify_fashion_dir(Path(tmp))
            except (OSError, DataError, subprocess.SubprocessError) as exc:
                errors.append(f"{fetcher.__name__}: {exc}")
                log.warning("fetch failed: %s: %s", fetcher.__name__, exc)
                continue
            dest.mkdir(parents=True, exist_ok=True)
            for stem in FASHION_SHA256:
                shutil.copyfile(Path(tmp) / f"{stem}.gz", dest / f"{stem}.gz")
            return verify_fashion_dir(dest)
    raise DataError("could not fetch Fashion-MNIST: " + "; ".join(errors))


def _fetch_upstream(tmp: Path) -> None:
    for stem in FASHION_SHA256:
        url = UPSTREAM_URL.format(name=stem)
        log.info("downloading %s", url)
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp / f"{stem}.gz", "wb") as out:
            shutil.copyfileobj(response, out)


def _fetch_debian(tmp: Path) -> None:
    log.info("fetching Debian package %s", DEBIAN_PACKAGE)
    subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, check=True, timeout=600)
    debs = list(tmp.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not debs:
        raise DataError(f"apt-get download produced no {DEBIAN_PACKAGE} .deb")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], check=True, timeout=600)
    for stem in FASHION_SHA256:
        shutil.copyfile(tmp / "root" / DEBIAN_PATH / f"{stem}.gz", tmp / f"{stem}.gz")


@dataclass(frozen=True)
class Split:
    """Images uint8 [N,1,28,28] and labels int64 [N]."""

    images: np.ndarray
    labels: np.ndarray


def load_fashion(files: dict[str, Path], split: str) -> Split:
    """Load ``train`` or ``t10k`` (test) images and labels from verified files."""
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}[split]
    images = read_idx(files[f"{prefix}-images-idx3-ubyte"])
    labels = read_idx(files[f"{prefix}-labels-idx1-ubyte"])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{prefix}: images {images.shape} and labels {labels.shape} do not match")
    return Split(images[:, None, :, :], labels.astype(np.int64))


def load_csv(name: str, data_dir: Path = PROFIT_DIR) -> tuple[np.ndarray, str]:
    """Load a course CSV (checksum-verified) as float64 [rows, cols] and return its SHA-256."""
    path = data_dir / name
    digest = sha256_of_content(path)
    if digest != PROFIT_SHA256[name]:
        raise DataError(f"{path}: checksum mismatch (got {digest}, expected {PROFIT_SHA256[name]})")
    return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2), digest
