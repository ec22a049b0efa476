"""``python -m service.rollout.replay``: send captured requests (service/rollout/capture.py) to a
server (V2 gRPC) or run them in this process, and report how the answers agree with the captured
ones (docs/rollout.md#replay).

In process (``--local``) each record runs through the batch job's machinery
(:class:`service.core.local.LocalModel`: the server's session options, admission and checks), in
chunks of the model's ``max_batch_rows`` as the server's batcher splits them; against the same
version on the CPU provider, a request that ran alone on the server is reproduced bit for bit.
Records that failed, have no outputs, or whose inputs were redacted are skipped (counted).

Exit status: 0 replayed (1 with ``--require-identical`` when an output differs), 2 bad usage or
input, 1 the model or server cannot be used.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from ..core.datatypes import dtype_of
from ..core.tensors import from_bytes, to_bytes
from .capture import PATTERN
from .compare import Agreement, compare
from .state import SUCCESS

Arrays = dict[str, np.ndarray]


class ReplayError(Exception):
    """The capture, the model or the server cannot be used."""


def records(paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """Every record of ``paths`` (capture files, or folders of them, oldest file first) as they
    were when called: a file the server is still appending to is read up to its size then."""
    files = [f for path in paths for f in (sorted(path.glob(PATTERN)) if path.is_dir() else [path])]
    sizes = [f.stat().st_size for f in files]
    for file, size in zip(files, sizes):
        with open(file, "rb") as stream:
            data = stream.read(size)
        data = data[: data.rfind(b"\n") + 1]  # a line still being written is not a record yet
        for number, line in enumerate(data.splitlines(), 1):
            if line.strip():
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise ReplayError(f"{file}:{number}: not a JSON record: {exc}") from None


def tensors(entries: list[dict[str, Any]]) -> Arrays | None:
    """Captured tensors as arrays; None when one is redacted."""
    arrays: Arrays = {}
    for entry in entries:
        if entry.get("redacted") or "data" not in entry:
            return None
        raw = base64.b64decode(entry["data"])
        arrays[entry["name"]] = from_bytes(raw, dtype_of(entry["datatype"]), tuple(entry["shape"]), entry["name"])
    return arrays


class Target(Protocol):
    def run(self, model: str, version: int, inputs: Arrays, outputs: list[str]) -> Arrays: ...

    def close(self) -> None: ...


class Local:
    """Versions loaded in this process, one :class:`~service.core.local.LocalModel` each."""

    def __init__(self, repository: Path, provider: str | None) -> None:
        from ..settings import Settings

        extra: dict[str, Any] = {"provider": provider} if provider else {}
        self.settings = Settings(model_repository=repository, **extra)
        self.models: dict[tuple[str, int], Any] = {}
        self.rows: dict[str, int | None] = {}

    def _open(self, model: str, version: int) -> Any:
        from ..core.batching import BatchingConfig
        from ..core.local import LocalModel, resolve_version

        key = (model, version)
        if key not in self.models:
            try:
                found, path = resolve_version(self.settings.model_repository, model, version)
                self.models[key] = LocalModel.open(path, found, self.settings)
                batching = BatchingConfig.resolve(self.settings, model, self.settings.model_repository / model)
            except Exception as exc:  # NotFound, onnxruntime's errors, a bad config.json
                raise ReplayError(f"cannot load {model} version {version or 'latest'}: {exc}") from exc
            self.rows[model] = batching.max_batch_rows if batching.enabled else None
        return self.models[key]

    def run(self, model: str, version: int, inputs: Arrays, outputs: list[str]) -> Arrays:
        from ..core.dataplane import predict

        loaded = self._open(model, version)
        total = len(next(iter(inputs.values())))
        step = self.rows[model] or total
        parts = [
            predict(loaded.spec, loaded.runner, {n: a[s : s + step] for n, a in inputs.items()}, outputs)
            for s in range(0, total, step)
        ]
        return parts[0] if len(parts) == 1 else {n: np.concatenate([p[n] for p in parts]) for n in outputs}

    def close(self) -> None:
        for loaded in self.models.values():
            loaded.close()


class Remote:
    """A server's V2 gRPC ``ModelInfer``: the captured bytes sent as raw tensors."""

    def __init__(self, address: str, token: str | None, timeout: float) -> None:
        import grpc

        from ..generated.inference import grpc_service_pb2 as pb
        from ..generated.inference import grpc_service_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20)])
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        self.timeout = timeout

    def run(self, model: str, version: int, inputs: Arrays, outputs: list[str]) -> Arrays:
        import grpc

        from ..core.datatypes import datatype_of

        pb = self.pb
        request = pb.ModelInferRequest(model_name=model, model_version=str(version) if version else "")
        for name, array in inputs.items():
            request.inputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
            request.raw_input_contents.append(to_bytes(array))
        for name in outputs:
            request.outputs.add(name=name)
        try:
            response = self.stub.ModelInfer(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise ReplayError(f"{model}: {exc.code().name}: {exc.details()}") from None
        return {
            o.name: from_bytes(raw, dtype_of(o.datatype), tuple(o.shape), o.name)
            for o, raw in zip(response.outputs, response.raw_output_contents)
        }

    def close(self) -> None:
        self.channel.close()


class Report:
    """What a replay found, per model (see :meth:`as_dict`)."""

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.records = 0
        self.replayed = 0
        self.identical = 0
        self.skipped: dict[str, int] = {"failed": 0, "no_outputs": 0, "redacted": 0, "other_model": 0}
        self.errors: list[str] = []
        self.pairs: dict[tuple[str, str, str], Agreement] = {}

    def add(self, record: dict[str, Any], version: int, captured: Arrays, got: Arrays) -> None:
        self.replayed += 1
        same = all(name in got and to_bytes(got[name]) == to_bytes(a) for name, a in captured.items())
        self.identical += same
        name, first = next(iter(captured.items()))
        key = (record["model"], str(record["version"]), str(version or "latest"))
        pair = self.pairs.get(key)
        if pair is None:
            pair = self.pairs[key] = Agreement(record["model"], 0, 0)  # versions: the key's
        if name in got and got[name].shape == first.shape:
            pair.add(compare(first, got[name], self.tolerance))

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "replayed": self.replayed,
            "bit_identical": self.identical,
            "differing": self.replayed - self.identical,
            "skipped": self.skipped,
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "agreement": [self._pair(key, pair) for key, pair in self.pairs.items()],
        }

    @staticmethod
    def _pair(key: tuple[str, str, str], pair: Agreement) -> dict[str, Any]:
        figures = pair.as_dict()
        del figures["primary"]
        model, captured, version = key
        return {"model": model, "captured_version": captured, **figures, "version": version}


def replay(
    target: Target, paths: Sequence[Path], model: str | None = None, version: int | None = None, tolerance: float = 0.05
) -> Report:
    """Run every usable record of ``paths`` on ``target``: the captured version (``version``
    None), the latest (0) or ``version``; only ``model``'s records when given."""
    report = Report(tolerance)
    for record in records(paths):
        report.records += 1
        if model is not None and record.get("model") != model:
            report.skipped["other_model"] += 1
            continue
        if record.get("status") not in SUCCESS:
            report.skipped["failed"] += 1
            continue
        if "outputs" not in record:
            report.skipped["no_outputs"] += 1
            continue
        inputs, captured = tensors(record["inputs"]), tensors(record["outputs"])
        if inputs is None or captured is None or not captured:
            report.skipped["redacted"] += 1
            continue
        wanted = int(record["version"]) if version is None else version
        try:
            got = target.run(record["model"], wanted, inputs, list(captured))
        except ReplayError as exc:
            report.errors.append(f"{record.get('request_id', '')}: {exc}")
            continue
        except Exception as exc:  # a request the model refuses now (ServingError & co)
            report.errors.append(f"{record.get('request_id', '')}: {type(exc).__name__}: {exc}")
            continue
        report.add(record, wanted, captured, got)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.rollout.replay",
        description="Replay captured requests on a server or in process; report agreement with the captured outputs.",
    )
    parser.add_argument("capture", type=Path, nargs="+", help="capture files (.jsonl) or folders of them")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", metavar="HOST:PORT", help="send them to this server (V2 gRPC)")
    where.add_argument("--local", action="store_true", help="run them in this process with onnxruntime")
    parser.add_argument("--model-repository", type=Path, default=Path("models"), help="for --local (default: models)")
    parser.add_argument("--provider", help="for --local: cpu, cuda or auto (default: SERVING_PROVIDER, else auto)")
    parser.add_argument("--model", help="replay only this model's records")
    parser.add_argument("--version", type=int, help="run on this version (0: the latest; default: the captured one)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="regression agreement tolerance (relative)")
    parser.add_argument("--token", help="bearer token for --server (prefer SERVING_REPLAY_TOKEN: flags show in ps)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request for --server")
    parser.add_argument("--require-identical", action="store_true", help="exit 1 unless every output is bit-identical")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    missing = [str(p) for p in args.capture if not p.exists()]
    if missing:
        print(f"replay: no such capture file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        target: Target = (
            Local(args.model_repository, args.provider)
            if args.local
            else Remote(args.server, args.token or os.environ.get("SERVING_REPLAY_TOKEN"), args.timeout)
        )
    except Exception as exc:  # pydantic's ValidationError (a bad provider), grpc's
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    try:
        report = replay(target, args.capture, args.model, args.version, args.tolerance)
    except ReplayError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    finally:
        target.close()
    figures = report.as_dict()
    sys.stdout.write(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode() + "\n")
    if report.errors and not report.replayed:
        return 1
    return 1 if args.require_identical and figures["differing"] else 0


if __name__ == "__main__":
    sys.exit(main())
