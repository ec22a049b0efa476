"""The IDX reader and the data checks, on small synthetic files with each kind of corruption."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from training import data
from training.data import DataError, read_idx


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.fixture
def images() -> np.ndarray:
    return np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)


@pytest.mark.parametrize("compress", [True, False])
def test_reads_gzip_and_plain(tmp_path: Path, images: np.ndarray, compress: bool) -> None:
    raw = idx_bytes(images)
    path = tmp_path / ("x.gz" if compress else "x")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, images)


def test_reads_big_endian_int32(tmp_path: Path) -> None:
    values = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "i").write_bytes(idx_bytes(values, 0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "i"), values)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: b"\x00\x00\x07\x03" + raw[4:], "bad IDX magic"),  # unknown type code
        (lambda raw: b"\x12\x34" + raw[2:], "bad IDX magic"),  # not IDX at all
        (lambda raw: b"\x00\x00\x08\x00" + raw[4:], "bad IDX magic"),  # zero dims
        (lambda raw: raw[:2], "too short"),
        (lambda raw: raw[:9], "truncated IDX header"),
        (lambda raw: raw[:-7], "payload is"),  # truncated payload
        (lambda raw: raw + b"\x00" * 3, "payload is"),  # padded payload
    ],
)
def test_rejects_corrupt_idx_with_file_name(tmp_path: Path, images: np.ndarray, mutate, message: str) -> None:
    path = tmp_path / "broken-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(mutate(idx_bytes(images))))
    with pytest.raises(DataError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_rejects_corrupt_and_truncated_gzip(tmp_path: Path, images: np.ndarray) -> None:
    packed = gzip.compress(idx_bytes(images))
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match="cut.gz: corrupt or truncated gzip"):
        read_idx(tmp_path / "cut.gz")
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flip.gz").write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="flip.gz: corrupt or truncated gzip"):
        read_idx(tmp_path / "flip.gz")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.gz: cannot read"):
        read_idx(tmp_path / "nope.gz")


def test_checksums_are_of_gunzipped_content(tmp_path: Path) -> None:
    """The same bytes gzipped with different headers (upstream vs Debian) hash the same."""
    raw = b"same content"
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw, mtime=0))
    (tmp_path / "b.gz").write_bytes(gzip.compress(raw, mtime=12345))
    assert (tmp_path / "a.gz").read_bytes() != (tmp_path / "b.gz").read_bytes()
    assert data.sha256_of_content(tmp_path / "a.gz") == data.sha256_of_content(tmp_path / "b.gz")


def test_verify_fashion_dir_reports_missing_and_bad_files(tmp_path: Path, fashion_dir: Path) -> None:
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte.gz"):
        data.verify_fashion_dir(tmp_path)
    for stem in data.FASHION_SHA256:
        shutil.copyfile(fashion_dir / f"{stem}.gz", tmp_path / f"{stem}.gz")
    assert set(data.verify_fashion_dir(tmp_path)) == set(data.FASHION_SHA256)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed: a valid file with the wrong content
    labels.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        data.verify_fashion_dir(tmp_path)


def test_real_fashion_files_parse(fashion_dir: Path) -> None:
    test = data.load_fashion(data.verify_fashion_dir(fashion_dir), "test")
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == np.uint8
    assert test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_profit_csv_checksum(tmp_path: Path) -> None:
    table, digest = data.load_csv("ex1data1.txt")
    assert table.shape == (97, 2) and digest == data.PROFIT_SHA256["ex1data1.txt"]
    (tmp_path / "ex1data1.txt").write_text("6.1101,17.592\n")
    with pytest.raises(DataError, match="checksum mismatch"):
        data.load_csv("ex1data1.txt", tmp_path)
