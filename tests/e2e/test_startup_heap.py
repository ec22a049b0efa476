"""A server process freezes the heap it built at start-up out of the cyclic garbage collector
(``gc_freeze``, on by default; service.app.freeze_startup_heap), and says how much in its start-up
line; ``--gc-freeze false`` leaves the collector as Python has it. (Workers: test_workers.)"""

from __future__ import annotations

from pathlib import Path

import tritonclient.grpc as triton_grpc
from fixtures.servers import MODELS, start_server

#: Far fewer objects than importing the server makes (about 58,000).
MANY = 10_000


def test_the_start_up_heap_is_frozen_and_the_server_serves(tmp_path: Path) -> None:
    with start_server(tmp_path, "--model-repository", str(MODELS)) as proc:
        (started,) = proc.log_lines("server started")
        assert triton_grpc.InferenceServerClient(proc.address).is_model_ready("fashion_cnn")
    assert started["gc_frozen_objects"] > MANY


def test_gc_freeze_false_freezes_nothing(tmp_path: Path) -> None:
    with start_server(tmp_path, "--model-repository", str(MODELS), "--gc-freeze", "false") as proc:
        (started,) = proc.log_lines("server started")
    assert started["gc_frozen_objects"] == 0
