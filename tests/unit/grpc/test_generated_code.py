"""The checked-in generated gRPC code must be what scripts/gen_proto.py produces now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from fixtures.servers import REPO_ROOT as ROOT


def load_gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh() -> None:
    problems = load_gen_proto().check()
    assert not problems, "service/generated is stale; run .venv/bin/python scripts/gen_proto.py:\n" + "\n".join(
        problems
    )


def test_generated_imports_are_package_relative() -> None:
    from service.generated.serving.v1 import serving_pb2, serving_pb2_grpc

    assert serving_pb2.DESCRIPTOR.package == "serving.v1"
    assert serving_pb2_grpc.serving_dot_v1_dot_serving__pb2 is serving_pb2


def test_check_detects_stale_code(tmp_path: Path) -> None:
    gen = load_gen_proto()
    out = tmp_path / "generated"
    gen.generate(out)
    assert gen.check(out) == []  # a fresh tree passes (compared with another fresh one)...
    assert gen.diff_trees(out, ROOT / "service" / "generated") == []  # ...and is what is checked in
    (out / "serving" / "v1" / "serving_pb2.py").write_text("# edited by hand\n")
    (out / "serving" / "v1" / "extra.py").write_text("")
    (out / "serving" / "v1" / "serving_pb2_grpc.py").unlink()
    assert gen.check(out) == [
        "missing: serving/v1/serving_pb2_grpc.py",
        "extra: serving/v1/extra.py",
        "stale: serving/v1/serving_pb2.py",
    ]


def test_private_pool_takes_well_known_types(tmp_path: Path, monkeypatch) -> None:
    """Generated code registers in its own pool, well-known-type imports included."""
    import importlib

    from google.protobuf import descriptor_pool

    proto_dir = tmp_path / "proto" / "demo" / "v1"
    proto_dir.mkdir(parents=True)
    (proto_dir / "demo.proto").write_text(
        'syntax = "proto3";\npackage demo.v1;\nimport "google/protobuf/timestamp.proto";\n'
        "message Event { google.protobuf.Timestamp at = 1; string what = 2; }\n"
    )
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    load_gen_proto().generate(tmp_path / "pkg" / "generated", tmp_path / "proto")
    monkeypatch.syspath_prepend(str(tmp_path))
    demo = importlib.import_module("pkg.generated.demo.v1.demo_pb2")
    pool = importlib.import_module("pkg.generated._pool").POOL
    assert demo.DESCRIPTOR.pool is pool
    assert pool.FindMessageTypeByName("google.protobuf.Timestamp")
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("demo.v1.Event")
    event = demo.Event(what="x")
    event.at.FromSeconds(5)
    assert demo.Event.FromString(event.SerializeToString()).at.seconds == 5
