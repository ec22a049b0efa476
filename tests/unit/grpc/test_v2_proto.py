"""Wire compatibility: proto/inference/*.proto against the descriptors tritonclient ships.

Our protos are compiled to a FileDescriptorSet with protoc (no import of the generated modules,
which would clash with tritonclient's in the default descriptor pool) and compared field by
field: every Triton message and RPC of grpc_service.proto exists here identically; every message,
field and enum value of our model_config.proto subset exists in Triton's with the same number
and type.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

pytest.importorskip("grpc_tools")
from fixtures.servers import REPO_ROOT
from grpc_tools import protoc
from tritonclient.grpc import model_config_pb2, service_pb2

PROTO_DIR = REPO_ROOT / "proto"
Msg = descriptor_pb2.DescriptorProto
Enum = descriptor_pb2.EnumDescriptorProto


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    out = tmp_path_factory.mktemp("v2proto") / "set.pb"
    files = sorted(str(p) for p in (PROTO_DIR / "inference").glob("*.proto"))
    assert protoc.main(["protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={out}", *files]) == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {Path(f.name).name: f for f in fds.file}


def _triton(module: object) -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fd)  # type: ignore[attr-defined]
    return fd


def _flatten(fd: descriptor_pb2.FileDescriptorProto) -> tuple[dict[str, Msg], dict[str, Enum]]:
    """Every message and enum in a file, nested ones included, by full name."""
    messages: dict[str, Msg] = {}
    enums: dict[str, Enum] = {f".{fd.package}.{e.name}": e for e in fd.enum_type}

    def walk(prefix: str, msg: Msg) -> None:
        name = f"{prefix}.{msg.name}"
        messages[name] = msg
        enums.update({f"{name}.{e.name}": e for e in msg.enum_type})
        for nested in msg.nested_type:
            walk(name, nested)

    for msg in fd.message_type:
        walk(f".{fd.package}", msg)
    return messages, enums


def _field(msg: Msg, f: descriptor_pb2.FieldDescriptorProto) -> tuple[object, ...]:
    oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
    return (f.name, f.number, f.type, f.label, f.type_name, oneof)


def _assert_subset(mine: descriptor_pb2.FileDescriptorProto, theirs: descriptor_pb2.FileDescriptorProto) -> int:
    """Every message/field/enum value in ``mine`` is in ``theirs`` identically; returns the
    number of fields checked."""
    my_msgs, my_enums = _flatten(mine)
    their_msgs, their_enums = _flatten(theirs)
    checked = 0
    for name, msg in my_msgs.items():
        assert name in their_msgs, f"{name} is not a Triton message"
        their_fields = {f.number: _field(their_msgs[name], f) for f in their_msgs[name].field}
        for f in msg.field:
            assert _field(msg, f) == their_fields.get(f.number), f"{name}.{f.name} differs"
            checked += 1
        assert msg.options.map_entry == their_msgs[name].options.map_entry, name
    for name, enum in my_enums.items():
        assert name in their_enums, f"{name} is not a Triton enum"
        values = {v.name: v.number for v in their_enums[name].value}
        assert {v.name: v.number for v in enum.value}.items() <= values.items(), name
    return checked


def test_grpc_service_matches_triton(ours: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    mine, theirs = ours["grpc_service.proto"], _triton(service_pb2)
    assert mine.package == theirs.package == "inference"
    assert _assert_subset(mine, theirs) > 100
    # ... and nothing of Triton's is missing: same messages, same fields.
    assert _flatten(mine)[0].keys() == _flatten(theirs)[0].keys()
    assert _assert_subset(theirs, mine) == _assert_subset(mine, theirs)


def test_service_methods_match_triton(ours: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    def methods(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, tuple[object, ...]]:
        (service,) = fd.service
        assert service.name == "GRPCInferenceService"
        return {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in service.method}

    assert methods(ours["grpc_service.proto"]) == methods(_triton(service_pb2))


def test_model_config_is_a_wire_compatible_subset(
    ours: dict[str, descriptor_pb2.FileDescriptorProto],
) -> None:
    mine = ours["model_config.proto"]
    assert mine.package == "inference"
    assert _assert_subset(mine, _triton(model_config_pb2)) >= 10
    config = _flatten(mine)[0][".inference.ModelConfig"]
    numbers = {f.name: f.number for f in config.field}
    assert numbers | {"name": 1, "platform": 2, "max_batch_size": 4, "input": 5, "output": 6, "backend": 17} == numbers


def test_server_and_tritonclient_import_in_one_process() -> None:
    """A process may hold both our V2 code and Triton's client (tests, proxies, benchmarks)."""
    code = "import tritonclient.grpc, service.grpc.server; import service.grpc.v2"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROTO_DIR.parent, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
