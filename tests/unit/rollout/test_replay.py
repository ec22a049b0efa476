"""The replay command's input handling, in process (the end-to-end runs are in
tests/e2e/test_rollout.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.onnx_models import linear, save

from service.rollout.replay import main


def record(status: str = "OK", redacted: bool = False, outputs: bool = True) -> dict:
    x = np.array([[1.0], [2.0]], np.float32)
    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 1]}
    tensor.update({"redacted": True} if redacted else {"data": base64.b64encode(x.tobytes()).decode()})
    entry = {"request_id": "r", "model": "m", "version": "1", "status": status, "inputs": [tensor]}
    if outputs:
        y = 3 * x + 1
        entry["outputs"] = [
            {"name": "y", "datatype": "FP32", "shape": [2, 1], "data": base64.b64encode(y.tobytes()).decode()}
        ]
    return entry


def test_replay_in_process_counts_what_it_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save(linear(1, [3.0], 1.0), tmp_path / "models", "m", 1)
    capture = tmp_path / "capture-1.jsonl"
    entries = [record(), record(status="INTERNAL"), record(redacted=True), record(outputs=False), record()]
    capture.write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"model": "m", "status": "OK"')  # torn
    code = main([str(capture), "--local", "--model-repository", str(tmp_path / "models"), "--provider", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["records"] == 5 and report["replayed"] == report["bit_identical"] == 2
    assert report["skipped"] == {"failed": 1, "no_outputs": 1, "redacted": 1, "other_model": 0}
    assert report["agreement"][0]["kind"] == "regression" and report["agreement"][0]["max_abs_diff"] == 0.0


def test_replay_refuses_missing_files_and_bad_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.jsonl"), "--local"]) == 2
    assert "no such capture file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    save(linear(1, [3.0], 1.0), tmp_path / "models", "m", 1)
    assert main([str(bad), "--local", "--model-repository", str(tmp_path / "models"), "--provider", "cpu"]) == 2
    assert "bad.jsonl:1: not a JSON record" in capsys.readouterr().err
