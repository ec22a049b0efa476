"""Triton's model configuration (service.core.model_config) and the version policy in the registry,
in process: config.pbtxt parsed with protobuf's text format, what it applies (batching, request
rows, instances, warm-up), the load errors for unknown or contradictory fields, and the policy
choosing the served versions at start-up and in later rounds, with the repository index."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from fixtures.inprocess import ainfer, open_registry
from fixtures.onnx_models import image_classifier, linear, save

from service.core.batching import BatchingConfig
from service.core.model_config import DEFAULT_POLICY, VersionPolicy, load_model_settings, parse_pbtxt
from service.core.registry import READY, UNAVAILABLE, IndexEntry, ModelRegistry
from service.core.spec import ModelKey
from service.settings import Settings
from service.v2_common import model_config

SETTINGS = Settings(provider="cpu")


def model(weight: float = 1.0) -> onnx.ModelProto:
    return linear(1, [weight], 0.0, "x", "y")


def repo_with(tmp_path: Path, pbtxt: str | None, versions: tuple[int, ...] = (1,), name: str = "m") -> Path:
    for version in versions:
        save(model(float(version)), tmp_path, name, version)
    if pbtxt is not None:
        (tmp_path / name / "config.pbtxt").write_text(pbtxt)
    return tmp_path


def settings_of(tmp_path: Path, pbtxt: str | None, **kw: object) -> object:
    repo_with(tmp_path, pbtxt)
    return load_model_settings(Settings(provider="cpu", **kw), tmp_path / "m")  # type: ignore[arg-type]


# -- parsing and what is applied --------------------------------------------------------------------

TRITON_STYLE = """
# A config.pbtxt as Triton users write them.
name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "x", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 1 ] } ]
version_policy: { latest: { num_versions: 2 } }
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 500 }
instance_group [ { count: 2, kind: KIND_CPU } ]
model_warmup [
  { name: "zeros", batch_size: 4, inputs { key: "x" value: { data_type: TYPE_FP32, dims: [ 1 ], zero_data: true } } },
  { name: "random", batch_size: 1, count: 3,
    inputs { key: "x" value: { data_type: TYPE_FP32, dims: [ 1 ], random_data: true } } }
]
"""


def test_a_triton_config_is_applied(tmp_path: Path) -> None:
    repo_with(tmp_path, TRITON_STYLE, versions=(1, 2, 3))
    registry = open_registry(tmp_path, Settings(provider="cpu", inference_workers=1))
    try:
        assert registry.versions("m") == [2, 3]  # latest 2
        served = registry.get("m")
        assert served.batcher.config == BatchingConfig(True, 16, 500, 512, (4, 8))
        assert served.spec.max_rows == 16  # max_batch_size caps a request's rows too
        assert served.batcher.max_in_flight == 2 and served.provider == "CPUExecutionProvider"
        out = asyncio.run(ainfer(registry, served, {"x": np.full((3, 1), 2.0, np.float32)}))
        np.testing.assert_array_equal(out["y"], np.full((3, 1), 6.0, np.float32))
        config = model_config(served)  # what ModelConfig reports: what was applied
        assert config.max_batch_size == 16 and config.version_policy.latest.num_versions == 2
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert [(g.count, g.kind) for g in config.instance_group] == [(2, 2)]  # KIND_CPU
        assert [w.name for w in config.model_warmup] == ["zeros", "random"]
        assert [list(i.dims) for i in config.input] == [[1]]
    finally:
        registry.close()


def test_defaults_without_config_pbtxt(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, None)
    assert settings.version_policy == DEFAULT_POLICY == VersionPolicy("latest", 1)  # type: ignore[attr-defined]
    assert settings.max_batch_size is None and settings.instances is None  # type: ignore[attr-defined]
    assert settings.batching == BatchingConfig(True, 64, 0, 512)  # type: ignore[attr-defined]


def test_max_batch_size_zero_turns_batching_off(tmp_path: Path) -> None:
    repo_with(tmp_path, "max_batch_size: 0\n")
    registry = open_registry(tmp_path, SETTINGS)
    try:
        served = registry.get("m")
        assert not served.batcher.batching and served.spec.max_rows == SETTINGS.max_request_rows
        config = model_config(served)
        assert config.max_batch_size == 0 and [list(i.dims) for i in config.input] == [[-1, 1]]  # batch axis in dims
        assert not config.HasField("dynamic_batching")
    finally:
        registry.close()


def test_only_top_level_fields_that_are_written_count() -> None:
    _config, present = parse_pbtxt('name: "m" # max_batch_size: 3\nversion_policy { all {} }\ninput [ { dims: [1] } ]')
    assert present == {"name", "version_policy", "input"}


BAD = {
    "unknown field": ("optimization { }", "line 1: field 'optimization' of ModelConfig is not supported"),
    "typo in a nested field": (
        "version_policy { latest { num_version: 2 } }",
        "field 'num_version' of ModelVersionPolicy.Latest is not supported by this server (it reads num_versions)",
    ),
    "twice the same field": ("max_batch_size: 4\nmax_batch_size: 8", 'should not have multiple "max_batch_size"'),
    "two policies": ("version_policy { all {} latest {} }", "policy_choice"),
    "not text format": ("max_batch_size = 4", "line 1"),
    "bad enum": ("instance_group [ { kind: KIND_TPU } ]", "KIND_TPU"),
    "other name": ('name: "other"', "name 'other' differs from the model's directory name 'm'"),
    "other platform": ('platform: "tensorrt_plan"', "platform 'tensorrt_plan' / backend '' is not served here"),
    "other file name": ('default_model_filename: "net.onnx"', "default_model_filename 'net.onnx' is not supported"),
    "latest 0": ("version_policy { latest { num_versions: 0 } }", "num_versions of at least 1"),
    "specific nothing": ("version_policy { specific { } }", "version_policy specific needs versions"),
    "dynamic batching without batches": ("max_batch_size: 0\ndynamic_batching { }", "dynamic_batching needs"),
    "preferred over the maximum": (
        "max_batch_size: 4\ndynamic_batching { preferred_batch_size: [8] }",
        "preferred_batch_size [8] must be between 1 and max_batch_size (4)",
    ),
    "gpus": ("instance_group [ { count: 1, gpus: [0] } ]", "instance_group gpus is not supported"),
    "gpu on a cpu server": ("instance_group [ { kind: KIND_GPU } ]", "kind KIND_GPU, but this server runs on"),
    "two kinds": ("instance_group [ { kind: KIND_GPU }, { kind: KIND_CPU } ]", "mixes KIND_CPU and KIND_GPU"),
    "kind model": ("instance_group [ { kind: KIND_MODEL } ]", "KIND_MODEL does not apply"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unknown_and_contradictory_fields_are_load_errors(tmp_path: Path, case: str) -> None:
    pbtxt, message = BAD[case]
    with pytest.raises(ValueError, match="m/config.pbtxt") as info:
        settings_of(tmp_path, pbtxt)
    assert message in str(info.value)


CONTRADICTIONS = {
    "batching off vs dynamic_batching": (
        {"enabled": False},
        "dynamic_batching { }",
        "batching.enabled = false, which contradicts m/config.pbtxt (dynamic_batching { })",
    ),
    "batching on vs max_batch_size 0": ({"enabled": True}, "max_batch_size: 0", "(max_batch_size: 0)"),
    "bigger batches than max_batch_size": (
        {"max_batch_rows": 64},
        "max_batch_size: 8",
        "batching.max_batch_rows = 64, which contradicts m/config.pbtxt (max_batch_size: 8)",
    ),
    "delay": (
        {"max_queue_delay_us": 100},
        "dynamic_batching { max_queue_delay_microseconds: 200 }",
        "max_queue_delay_microseconds: 200",
    ),
}


@pytest.mark.parametrize("case", list(CONTRADICTIONS))
def test_config_json_and_config_pbtxt_must_agree(tmp_path: Path, case: str) -> None:
    batching, pbtxt, message = CONTRADICTIONS[case]
    repo_with(tmp_path, pbtxt)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"batching": batching}))
    with pytest.raises(ValueError, match="m/config.json sets") as info:
        load_model_settings(SETTINGS, tmp_path / "m")
    assert message in str(info.value)


def test_config_json_may_refine_and_the_setting_wins(tmp_path: Path) -> None:
    repo_with(tmp_path, "max_batch_size: 32\ndynamic_batching { max_queue_delay_microseconds: 100 }")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"batching": {"max_batch_rows": 8, "queue_capacity": 9}}))
    assert load_model_settings(SETTINGS, tmp_path / "m").batching == BatchingConfig(True, 8, 100, 9)
    overridden = Settings(provider="cpu", batching={"m": {"max_queue_delay_us": 7}})
    assert load_model_settings(overridden, tmp_path / "m").batching == BatchingConfig(True, 8, 7, 9)


GRAPH_ERRORS = {
    "input dims": (
        'input [ { name: "x", data_type: TYPE_FP32, dims: [ 2 ] } ]',
        "input 'x' is declared TYPE_FP32 dims",
    ),
    "input type": ('input [ { name: "x", data_type: TYPE_INT64, dims: [ 1 ] } ]', "declared TYPE_INT64"),
    "input names": ('input [ { name: "z", data_type: TYPE_FP32, dims: [ 1 ] } ]', "declares inputs ['z']"),
    "output names": ('output [ { name: "x", data_type: TYPE_FP32, dims: [ 1 ] } ]', "declares outputs ['x']"),
    "warm-up input": (
        'model_warmup [ { inputs { key: "z" value: { data_type: TYPE_FP32, dims: [1], zero_data: true } } } ]',
        "has inputs ['z'], the model takes ['x']",
    ),
    "warm-up dims": (
        'model_warmup [ { inputs { key: "x" value: { data_type: TYPE_FP32, dims: [3], zero_data: true } } } ]',
        "input 'x' is TYPE_FP32 dims [3]",
    ),
    "warm-up data": (
        'model_warmup [ { inputs { key: "x" value: { data_type: TYPE_FP32, dims: [1] } } } ]',
        "needs zero_data: true or random_data: true",
    ),
    "warm-up file": (
        'model_warmup [ { inputs { key: "x" value: { data_type: TYPE_FP32, dims: [1], input_data_file: "x" } } } ]',
        "input_data_file is not supported",
    ),
    "warm-up batch": (
        'max_batch_size: 2\nmodel_warmup [ { batch_size: 3, inputs { key: "x" value: '
        "{ data_type: TYPE_FP32, dims: [1], zero_data: true } } } ]",
        "batch_size 3 is over the model's maximum of 2",
    ),
}


@pytest.mark.parametrize("case", list(GRAPH_ERRORS))
def test_config_that_disagrees_with_the_graph_rejects_the_version(tmp_path: Path, case: str) -> None:
    pbtxt, message = GRAPH_ERRORS[case]
    repo_with(tmp_path, pbtxt)
    registry = open_registry(tmp_path, SETTINGS)
    registry.close()
    assert not registry.ready and message in registry.failed["m/1"], registry.failed


def test_a_failing_warm_up_sample_rejects_the_version(tmp_path: Path) -> None:
    """A graph that fails on 3 rows (a Reshape to [2, 1]) passes the load-time runs of 1 row, but
    not the config's warm-up sample of 3."""
    from onnx import TensorProto, helper

    shape = onnx.numpy_helper.from_array(np.array([2, 1], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "picky",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [shape],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path, "m")
    (tmp_path / "m" / "config.pbtxt").write_text(
        'model_warmup [ { name: "three", batch_size: 3, inputs { key: "x" value: '
        "{ data_type: TYPE_FP32, dims: [1], random_data: true } } } ]"
    )
    registry = open_registry(tmp_path, SETTINGS)
    registry.close()
    assert "model_warmup sample 'three' failed" in registry.failed["m/1"]


# -- version policy in the registry and the repository index ------------------------------------------


def index(registry: ModelRegistry) -> list[tuple[str, str, str]]:
    return [(e.name, e.version, e.state) for e in registry.index()]


def test_policies_at_start_up(tmp_path: Path) -> None:
    for name, pbtxt in (
        ("default", None),
        ("latest2", "version_policy: { latest: { num_versions: 2 } }"),
        ("all", "version_policy: { all: {} }"),
        ("specific", "version_policy: { specific: { versions: [1, 3, 7] } }"),
    ):
        repo_with(tmp_path, pbtxt, versions=(1, 2, 3), name=name)
    registry = open_registry(tmp_path, SETTINGS)
    try:
        served = {n: registry.versions(n) for n in registry.names()}
        assert served == {"default": [3], "latest2": [2, 3], "all": [1, 2, 3], "specific": [1, 3]}
        assert registry.failed == {
            "specific/7": "version_policy specific { versions: [1, 3, 7] } names version 7, which is not in the "
            "repository"
        }
        entries = {(e.name, e.version): e for e in registry.index()}
        assert entries[("default", "1")] == IndexEntry(
            "default", "1", UNAVAILABLE, "not served: outside the version policy latest { num_versions: 1 }"
        )
        assert (
            entries[("specific", "7")].state == UNAVAILABLE
            and "not in the repository" in entries["specific", "7"].reason
        )
        assert entries[("latest2", "3")] == IndexEntry("latest2", "3", READY)
        assert [(e.name, e.version) for e in registry.index(ready_only=True)] == [
            ("all", "1"),
            ("all", "2"),
            ("all", "3"),
            ("default", "3"),
            ("latest2", "2"),
            ("latest2", "3"),
            ("specific", "1"),
            ("specific", "3"),
        ]
    finally:
        registry.close()


def _publish(repo: Path, name: str, version: int, proto: onnx.ModelProto) -> None:
    staging = repo / ".staging"
    save(proto, staging, name, version)
    os.rename(staging / name / str(version), repo / name / str(version))


def test_reload_follows_the_policy(tmp_path: Path) -> None:
    """latest 2: a new version appears, the oldest beyond the policy drains and unloads; a broken
    newest version is passed over (the one below serves on) and listed as failed."""
    repo_with(tmp_path, "version_policy: { latest: { num_versions: 2 } }", versions=(1, 2))

    async def scenario() -> list:
        registry = ModelRegistry(tmp_path, SETTINGS)
        await registry.start()
        steps = [registry.versions("m")]
        _publish(tmp_path, "m", 3, model(3.0))
        report = await registry.reload()
        steps += [registry.versions("m"), report.loaded, report.unloaded, index(registry)]
        (tmp_path / "m" / "4").mkdir()
        (tmp_path / "m" / "4" / "model.onnx").write_bytes(b"broken")
        report = await registry.reload()
        steps += [registry.versions("m"), list(report.rejected), index(registry)]
        # The policy changes to all: every version on disk serves (the config change reloads them).
        (tmp_path / "m" / "config.pbtxt").write_text("version_policy: { all: {} }")
        report = await registry.reload()
        steps += [registry.versions("m"), sorted(report.loaded)]
        await registry.stop()
        return steps

    start, after_new, loaded, unloaded, listed, after_broken, rejected, listed_broken, all_versions, reloaded = (
        asyncio.run(scenario())
    )
    assert start == [1, 2]
    assert after_new == [2, 3] and loaded == [ModelKey("m", 3)] and unloaded == [ModelKey("m", 1)]
    assert ("m", "1", UNAVAILABLE) in listed and ("m", "3", READY) in listed
    assert after_broken == [2, 3] and rejected == [ModelKey("m", 4)]
    assert ("m", "4", UNAVAILABLE) in listed_broken
    assert all_versions == [1, 2, 3]
    assert reloaded == [ModelKey("m", v) for v in (1, 2, 3)]  # new configuration: every version reloaded


def test_unload_reasons_in_the_index(tmp_path: Path) -> None:
    repo_with(tmp_path, None, versions=(1, 2))

    async def scenario() -> list[IndexEntry]:
        registry = ModelRegistry(tmp_path, SETTINGS)
        await registry.start()
        await registry.unload("m")
        entries = registry.index()
        await registry.stop()
        return entries

    entries = asyncio.run(scenario())
    assert entries == [
        IndexEntry("m", "1", UNAVAILABLE, "unloaded: unload requested"),
        IndexEntry("m", "2", UNAVAILABLE, "unloaded: unload requested"),
    ]


def test_a_broken_config_keeps_what_serves(tmp_path: Path) -> None:
    repo_with(tmp_path, None, versions=(1,))
    save(image_classifier(), tmp_path, "other")

    async def scenario() -> tuple:
        registry = ModelRegistry(tmp_path, SETTINGS)
        await registry.start()
        (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: lots")
        _publish(tmp_path, "m", 2, model(2.0))
        await registry.reload()
        result = registry.versions("m"), dict(registry.failed), registry.index()
        await registry.stop()
        return result

    versions, failed, entries = asyncio.run(scenario())
    assert versions == [1]  # the new version is not loaded, the served one serves on
    assert list(failed) == ["m"] and "m/config.pbtxt line 1" in failed["m"]
    assert IndexEntry("m", "", UNAVAILABLE, failed["m"]) in entries
    assert IndexEntry("m", "1", READY) in entries
