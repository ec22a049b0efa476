"""Input files of a batch job, read in chunks (never whole) after a full integrity check.

Each source has ``rows``, a ``sha256`` of its content, :meth:`Source.verify` (one streaming pass
that checks the whole file — gzip CRC, sizes, every PNG, every CSV value — before any output
exists) and :meth:`Source.chunks` (rows from ``start`` on, ``size`` at a time).

* images: Fashion-MNIST IDX (``*-idx3-ubyte``, gzip or not), ``.npy`` uint8 [N, 28, 28] or
  [N, 1, 28, 28], or a folder of PNG files (sorted by name; needs Pillow);
* populations: CSV, one column of people per city, or a header with a ``population`` column;
* labels (optional, for accuracy): IDX ``*-idx1-ubyte`` (gzip or not) or ``.npy``, N integers.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
NPY_MAGIC = b"\x93NUMPY"
_IDX_INT_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4"}


class InputError(Exception):
    """An input file is missing, malformed, truncated or corrupt; the message names the file."""


class Source:
    """Rows of one input file (see the module docstring)."""

    kind: str
    path: Path
    rows: int
    item_shape: tuple[int, ...]
    dtype: np.dtype
    sha256: str = ""

    def verify(self) -> None:
        """Read everything once; raise InputError on any defect; set :attr:`sha256`."""
        raise NotImplementedError

    def chunks(self, start: int, size: int) -> Iterator[np.ndarray]:
        """Arrays of ``size`` rows (the last one shorter) from row ``start`` to the end."""
        raise NotImplementedError

    def names(self, start: int, stop: int) -> list[str] | None:
        """Per-row names for the output CSV (file names of a PNG folder), else None."""
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "rows": self.rows,
            "item_shape": list(self.item_shape),
            "sha256": self.sha256,
        }


# -- IDX ---------------------------------------------------------------------------------------


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _gzip_errors(path: Path, exc: Exception) -> InputError:
    return InputError(f"{path}: corrupt or truncated gzip stream ({exc})")


class IdxImages(Source):
    """An IDX file of uint8 images [N, H, W] (or [N, C, H, W]), gzip-compressed or not."""

    kind = "idx"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.gzip = _is_gzip(path)
        try:
            with self._open() as f:
                head = f.read(4)
                if len(head) < 4 or head[0] or head[1] or head[2] != 0x08 or head[3] not in (3, 4):
                    raise InputError(
                        f"{path}: not an IDX file of uint8 images (magic 0x{head.hex() or 'empty'}; "
                        "expected 0x00000803 for [N, H, W] or 0x00000804 for [N, C, H, W])"
                    )
                raw_dims = f.read(4 * head[3])
        except (OSError, EOFError, zlib.error) as exc:
            raise _gzip_errors(path, exc) if self.gzip else InputError(f"{path}: cannot read ({exc})") from exc
        if len(raw_dims) < 4 * head[3]:
            raise InputError(f"{path}: truncated IDX header")
        dims = [int.from_bytes(raw_dims[i : i + 4], "big") for i in range(0, len(raw_dims), 4)]
        self.rows = dims[0]
        self.item_shape = tuple(dims[1:]) if len(dims) == 4 else (1, *dims[1:])
        self.dtype = np.dtype(np.uint8)
        self.header = 4 + 4 * head[3]
        self.item_bytes = math.prod(self.item_shape)

    def _open(self) -> Any:
        return gzip.open(self.path, "rb") if self.gzip else open(self.path, "rb")

    def verify(self) -> None:
        expected = self.rows * self.item_bytes
        digest = hashlib.sha256()
        total = 0
        try:
            with self._open() as f:
                while block := f.read(BLOCK):
                    digest.update(block)
                    total += len(block)
        except (OSError, EOFError, zlib.error) as exc:
            raise (
                _gzip_errors(self.path, exc) if self.gzip else InputError(f"{self.path}: cannot read ({exc})")
            ) from exc
        payload = total - self.header
        if payload != expected:
            what = "truncated" if payload < expected else "has trailing bytes"
            raise InputError(
                f"{self.path}: {what}: the IDX header declares {self.rows} images of "
                f"{'x'.join(map(str, self.item_shape))} ({expected} bytes) but the payload is {payload} bytes"
            )
        self.sha256 = digest.hexdigest()

    def chunks(self, start: int, size: int) -> Iterator[np.ndarray]:
        try:
            with self._open() as f:
                f.seek(self.header + start * self.item_bytes)
                row = start
                while row < self.rows:
                    n = min(size, self.rows - row)
                    data = f.read(n * self.item_bytes)
                    if len(data) != n * self.item_bytes:
                        raise InputError(
                            f"{self.path}: ended early at image {row} (file changed since it was checked?)"
                        )
                    yield np.frombuffer(data, np.uint8).reshape(n, *self.item_shape)
                    row += n
        except (OSError, EOFError, zlib.error) as exc:
            raise _gzip_errors(self.path, exc) from exc


# -- .npy --------------------------------------------------------------------------------------


class NpyImages(Source):
    """A ``.npy`` array of uint8 images [N, H, W] or [N, C, H, W], memory-mapped."""

    kind = "npy"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise InputError(
                f"{path}: expected uint8 images of shape [N, 28, 28] or [N, 1, 28, 28], "
                f"got {array.dtype} {list(array.shape)}"
            )
        size = path.stat().st_size
        if size != array.offset + array.nbytes:
            raise InputError(
                f"{path}: file is {size} bytes but its header declares {list(array.shape)} "
                f"({array.offset + array.nbytes} bytes with the header); truncated or padded"
            )
        self.array = array if array.ndim == 4 else array[:, None]
        self.rows = int(array.shape[0])
        self.item_shape = tuple(self.array.shape[1:])
        self.dtype = np.dtype(np.uint8)

    def verify(self) -> None:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(BLOCK):
                digest.update(block)
        self.sha256 = digest.hexdigest()

    def chunks(self, start: int, size: int) -> Iterator[np.ndarray]:
        for row in range(start, self.rows, size):
            yield np.ascontiguousarray(self.array[row : row + size])


# -- PNG folder --------------------------------------------------------------------------------


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading a folder of PNG images needs Pillow: pip install 'onnx-v2-serving[batch]'") from None
    return Image


_PNG_MODES = {"L", "LA", "P", "RGB", "RGBA", "1"}


class PngFolder(Source):
    """A folder of PNG images, one row per ``*.png`` file in name order; colour → grayscale."""

    kind = "png"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = sorted(
            (p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file()), key=lambda p: p.name
        )
        if not self.files:
            raise InputError(f"{path}: folder holds no .png files")
        self.rows = len(self.files)
        self.dtype = np.dtype(np.uint8)
        first = self._load(self.files[0])
        self.item_shape = (1, *first.shape)

    def _load(self, file: Path) -> np.ndarray:
        image_module = _pillow()
        try:
            with image_module.open(file) as image:
                if image.format != "PNG":
                    raise InputError(f"{file}: not a PNG file ({image.format})")
                if image.mode not in _PNG_MODES:
                    raise InputError(f"{file}: unsupported PNG mode {image.mode}; expected 8-bit grayscale or colour")
                image.load()
                return np.asarray(image.convert("L"), dtype=np.uint8)
        except InputError:
            raise
        except Exception as exc:  # Pillow raises many types for broken files
            raise InputError(f"{file}: corrupt or unreadable PNG ({exc})") from exc

    def verify(self) -> None:
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
            pixels = self._load(file)
            if (1, *pixels.shape) != self.item_shape:
                raise InputError(
                    f"{file}: image is {pixels.shape[1]}x{pixels.shape[0]} pixels but "
                    f"{self.files[0].name} is {self.item_shape[2]}x{self.item_shape[1]}; all must match"
                )
        self.sha256 = digest.hexdigest()

    def chunks(self, start: int, size: int) -> Iterator[np.ndarray]:
        for row in range(start, self.rows, size):
            yield np.stack([self._load(f) for f in self.files[row : row + size]])[:, None]

    def names(self, start: int, stop: int) -> list[str]:
        return [f.name for f in self.files[start:stop]]


def open_images(path: str | Path) -> Source:
    """The image source for ``path``: a folder → PNG files; ``.npy`` → numpy; else IDX."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return PngFolder(path)
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
    if magic == NPY_MAGIC:
        return NpyImages(path)
    if path.suffix.lower() == ".npy":
        raise InputError(f"{path}: not a .npy file (bad magic {magic!r})")
    return IdxImages(path)


# -- CSV populations ---------------------------------------------------------------------------


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class CsvPopulations(Source):
    """City populations (people) from a CSV: one column, or a header naming ``population``."""

    kind = "csv"

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        self.dtype = np.dtype(np.float32)
        self.item_shape = ()
        self.rows = 0
        with self._rows() as rows:
            first = next(rows, None)
        if first is None:
            raise InputError(f"{path}: empty CSV file")
        cells = [c.strip() for c in first[1]]
        if all(_float(c) is not None for c in cells):  # no header
            if len(cells) != 1:
                raise InputError(
                    f"{path}: line {first[0]} has {len(cells)} columns and no header; give one column of "
                    "populations (people), or a header with a 'population' column"
                )
            self.header, self.column = False, 0
            return
        lowered = [c.lower() for c in cells]
        if "population" in lowered:
            self.column = lowered.index("population")
        elif len(cells) == 1:
            self.column = 0
        else:
            raise InputError(f"{path}: header {cells} has no 'population' column")
        self.header = True

    @contextlib.contextmanager
    def _rows(self) -> Iterator[Iterator[tuple[int, list[str]]]]:
        """(line number, cells) of every non-blank CSV row."""
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            try:
                yield ((reader.line_num, row) for row in reader if any(c.strip() for c in row))
            except (UnicodeDecodeError, csv.Error) as exc:
                raise InputError(f"{self.path}: unreadable CSV near line {reader.line_num} ({exc})") from exc

    def _values(self) -> Iterator[float]:
        """Every population, checked."""
        with self._rows() as rows:
            if self.header:
                next(rows, None)
            for line, row in rows:
                text = row[self.column].strip() if self.column < len(row) else ""
                value = _float(text)
                if value is None or not math.isfinite(value):
                    raise InputError(f"{self.path}: line {line}: population must be a finite number, got {text!r}")
                yield value

    def verify(self) -> None:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(BLOCK):
                digest.update(block)
        self.rows = sum(1 for _ in self._values())
        if self.rows == 0:
            raise InputError(f"{self.path}: no populations (only a header)")
        self.sha256 = digest.hexdigest()

    def chunks(self, start: int, size: int) -> Iterator[np.ndarray]:
        buffer: list[float] = []
        for index, value in enumerate(self._values()):
            if index < start:
                continue
            buffer.append(value)
            if len(buffer) == size:
                yield np.array(buffer, dtype=np.float32)
                buffer = []
        if buffer:
            yield np.array(buffer, dtype=np.float32)


def open_populations(path: str | Path) -> Source:
    return CsvPopulations(Path(path))


# -- labels ------------------------------------------------------------------------------------


def read_labels(path: str | Path, rows: int) -> tuple[np.ndarray, str]:
    """True labels (int64 [rows]) from an IDX ``*-idx1-ubyte`` (gzip or not) or a 1-D ``.npy``;
    and the SHA-256 of the file. Labels are small (1 byte a row in IDX), so they are read whole."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read labels ({exc.strerror or exc})") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if raw[: len(NPY_MAGIC)] == NPY_MAGIC:
        try:
            labels = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise InputError(f"{path}: labels must be a 1-D integer array, got {labels.dtype} {list(labels.shape)}")
    else:
        if raw[:2] == GZIP_MAGIC:
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as exc:
                raise _gzip_errors(path, exc) from exc
        if len(raw) < 8 or raw[0] or raw[1] or raw[2] not in _IDX_INT_TYPES or raw[3] != 1:
            raise InputError(f"{path}: not a 1-D IDX label file (magic 0x{raw[:4].hex()}, expected 0x00000801)")
        count = int.from_bytes(raw[4:8], "big")
        dtype = np.dtype(_IDX_INT_TYPES[raw[2]])
        if len(raw) - 8 != count * dtype.itemsize:
            raise InputError(f"{path}: header declares {count} labels but the payload is {len(raw) - 8} bytes")
        labels = np.frombuffer(raw, dtype, offset=8)
    if len(labels) != rows:
        raise InputError(f"{path}: {len(labels)} labels for {rows} input rows")
    return labels.astype(np.int64), digest
