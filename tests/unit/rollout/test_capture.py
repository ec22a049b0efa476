"""Payload capture in process: the bounded queue (drops counted), redaction, rotation and pruning."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.core.context import RequestContext
from service.rollout.capture import ENCODE_SLICE, Capture
from service.settings import Settings


def answered(status: str = "OK") -> RequestContext:
    context = RequestContext("v2", "ModelInfer", inference=True)
    context.version = "3"
    context.status = status
    context.end = context.start + 0.002
    return context


def lines(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("capture-*.jsonl")) for line in f.read_text().splitlines()]


def test_queue_full_drops_and_counts_then_writes_the_rest(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, capture_dir=tmp_path / "cap", capture_queue_capacity=2)
    capture = Capture(settings, start=False)  # the writer starts after the offers: nothing drains meanwhile
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    offered = [capture.offer(answered(), "m", {"x": x}, {"y": x * 2}) for _ in range(5)]
    assert offered == [True, True, False, False, False]
    assert capture.dropped == {"queue_full": 3, "queue_bytes": 0}
    capture.start()
    capture.close()
    assert capture.written == 2 and capture.depth == 0
    records = lines(tmp_path / "cap")
    assert len(records) == 2
    first = records[0]
    assert first["model"] == "m" and first["version"] == "3" and first["status"] == "OK"
    assert first["latency_ms"] == 2.0 and first["protocol"] == "v2" and "request_id" in first
    (tensor,) = first["inputs"]
    assert tensor["name"] == "x" and tensor["datatype"] == "FP32" and tensor["shape"] == [1, 4]
    assert base64.b64decode(tensor["data"]) == x.tobytes()


def test_redaction_keeps_name_datatype_and_shape_only(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, capture_dir=tmp_path, capture_redact="secret,m/y")
    capture = Capture(settings, start=False)
    x = np.ones((2, 3), np.float32)
    capture.offer(answered(), "m", {"secret": x, "x": x}, {"y": x})
    capture.offer(answered(), "other", {"x": x}, {"y": x})  # m/y is m's only
    capture.start()
    capture.close()
    first, second = lines(tmp_path)
    assert first["inputs"][0] == {"name": "secret", "datatype": "FP32", "shape": [2, 3], "redacted": True}
    assert "data" in first["inputs"][1]
    assert first["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 3], "redacted": True}]
    assert "data" in second["outputs"][0]


def test_files_rotate_past_their_size_and_the_oldest_are_pruned(tmp_path: Path) -> None:
    settings = Settings(
        model_repository=tmp_path, capture_dir=tmp_path, capture_max_file_bytes=4096, capture_max_files=2
    )
    capture = Capture(settings, start=False)
    x = np.zeros((1, 2048), np.uint8)  # ~2.8 kB a record once base64-encoded
    for _ in range(4):
        capture.offer(answered(), "m", {"x": x}, {"y": x})
        capture._drain()  # one write each (what the writer thread does every 50 ms)
    capture.close()
    assert capture.files_opened == 4  # a file takes one more record once over 4096 bytes
    files = sorted(tmp_path.glob("capture-*.jsonl"))
    assert len(files) == 2 and files[-1].name.endswith("-00004.jsonl")
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)


def test_sampling_and_models(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, capture_dir=tmp_path, capture_models="m")
    capture = Capture(settings, start=False)
    x = np.zeros((1, 1), np.float32)
    assert not capture.offer(answered(), "other", {"x": x}, {"y": x})
    assert capture.offer(answered(), "m", {"x": x}, None)  # a failed request: inputs, no outputs
    capture.start()
    capture.close()
    (record,) = lines(tmp_path)
    assert "outputs" not in record


def test_files_rotate_after_their_age(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, capture_dir=tmp_path, capture_max_file_seconds=60)
    capture = Capture(settings, start=False)
    x = np.zeros((1, 1), np.float32)
    capture.offer(answered(), "m", {"x": x}, {"y": x})
    capture._drain()
    capture._file_opened -= 61  # the file is a minute old (no waiting in a test)
    capture._drain()  # nothing to write: the old file is closed all the same
    assert capture._file is None
    capture.offer(answered(), "m", {"x": x}, {"y": x})
    capture._drain()
    capture.close()
    assert capture.files_opened == 2 and len(list(tmp_path.glob("capture-*.jsonl"))) == 2


def test_tensor_bytes_are_little_endian_c_order_whatever_the_array(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, capture_dir=tmp_path)
    capture = Capture(settings, start=False)
    grid = np.arange(12, dtype=np.float32).reshape(3, 4)
    arrays = {
        "transposed": grid.T,  # not C-contiguous
        "big_endian": grid.astype(">f4"),
        "scalar": np.array(7, np.int64),  # 0-d
        "empty": np.zeros((0, 4), np.uint8),
    }
    capture.offer(answered(), "m", arrays, None)
    capture.start()
    capture.close()
    (record,) = lines(tmp_path)
    got = {t["name"]: t for t in record["inputs"]}
    for name, array in arrays.items():
        expected = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        assert base64.b64decode(got[name]["data"]) == expected, name
        assert got[name]["shape"] == list(array.shape)
    assert got["big_endian"]["datatype"] == "FP32" and got["scalar"]["datatype"] == "INT64"


def test_time_is_rfc3339_utc_with_microseconds(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, capture_dir=tmp_path)
    capture = Capture(settings, start=False)
    before = datetime.now(UTC)
    capture.offer(answered(), "m", {"x": np.zeros(1, np.float32)}, None)
    after = datetime.now(UTC)
    capture.start()
    capture.close()
    (record,) = lines(tmp_path)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", record["time"])
    assert before <= datetime.fromisoformat(record["time"]) <= after


def test_queue_bytes_drop_before_encoding_and_unencodable_records_are_counted(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, capture_dir=tmp_path, capture_queue_bytes=2**20)
    capture = Capture(settings, start=False)
    big = np.zeros((1, 2**20), np.uint8)  # its base64 alone is past the limit
    assert not capture.offer(answered(), "m", {"x": big}, None)
    assert capture.dropped["queue_bytes"] == 1 and capture.queued_bytes == 0
    odd = np.zeros(2, np.complex64)  # no V2 datatype: queued, but cannot be encoded
    capture.offer(answered(), "m", {"x": odd}, None)
    assert capture.failed == 1  # (no event loop here: encoded at once)
    small = np.zeros((1, 16), np.uint8)
    assert capture.offer(answered(), "m", {"x": small}, None)
    assert 0 < capture.queued_bytes - capture.failed_bytes < 1024  # about its line
    capture.start()
    capture.close()
    assert capture.written == 1 and len(lines(tmp_path)) == 1
    assert capture.queued_bytes == capture.written_bytes + capture.failed_bytes  # nothing waits


def test_on_an_event_loop_records_are_encoded_later_in_slices(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, capture_dir=tmp_path)
    capture = Capture(settings, start=False)
    x = np.arange(3, dtype=np.int32)
    total = ENCODE_SLICE * 2 + 5

    async def offer_all() -> tuple[int, int]:
        for i in range(total):
            context = answered()
            context.request_id = f"r{i}"
            capture.offer(context, "m", {"x": x + i}, None)
        encoded_at_once = len(capture._queue)  # nothing: the answer path only queues
        while capture.depth > len(capture._queue):  # the loop encodes them, a slice per turn
            await asyncio.sleep(0.01)
        return encoded_at_once, len(capture._queue)

    assert asyncio.run(asyncio.wait_for(offer_all(), 60)) == (0, total)
    capture.start()
    capture.close()
    records = lines(tmp_path)
    assert [r["request_id"] for r in records] == [f"r{i}" for i in range(total)]
    assert np.frombuffer(base64.b64decode(records[-1]["inputs"][0]["data"]), np.int32).tolist() == [
        v + total - 1 for v in (0, 1, 2)
    ]
