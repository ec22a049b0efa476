"""CLI of the batch job: ``python -m service.jobs {classify,profit} INPUT --output DIR (--server HOST:PORT | --local)``
(also installed as ``model-batch``). See README.md, "Batch inference".

Exit status: 0 done (or already done), 1 the job failed (server, model, retries exhausted, output
directory holds another job), 2 bad input or usage, 130 interrupted (re-run to resume).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ..client import RpcError, ServingClient
from .backends import Backend, BackendError, LocalBackend, RemoteBackend, connect_retry, is_transient
from .inputs import InputError, open_images, open_populations
from .job import Job, JobConfig, JobError

DEFAULT_CHUNK = 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.jobs",
        description="Run a whole input file through a model, resumably, against a server or in-process.",
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="{classify,profit}")
    classify = tasks.add_parser(
        "classify",
        help="classify images",
        description="Classify images: Fashion-MNIST IDX (gzip or not), .npy uint8 [N,28,28] / [N,1,28,28], "
        "or a folder of PNG files. Writes probabilities.npy, predictions.npy, predictions.csv "
        "(+ accuracy and confusion_matrix.csv/.png with --labels).",
    )
    classify.add_argument("input", type=Path, help="IDX file, .npy file, or folder of .png files")
    classify.add_argument(
        "--labels", type=Path, help="true labels (IDX idx1 or 1-D .npy): report accuracy and a confusion matrix"
    )
    profit = tasks.add_parser(
        "profit",
        help="predict food-truck profits",
        description="Profit (US dollars) per city population (people) from a CSV; writes profits.npy and profits.csv.",
    )
    profit.add_argument(
        "input", type=Path, help="CSV: one column of populations, or a header with a 'population' column"
    )
    for sub in (classify, profit):
        add = sub.add_argument
        add("-o", "--output", type=Path, required=True, help="output folder (created; re-running resumes)")
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--server", metavar="HOST:PORT", help="run against this server (typed gRPC API)")
        where.add_argument("--local", action="store_true", help="run in this process with onnxruntime")
        add("--model", help="model name (default: fashion_softmax / profit)")
        add("--version", type=int, default=0, help="model version (default: the latest, pinned for the job)")
        add(
            "--chunk-size",
            type=int,
            default=DEFAULT_CHUNK,
            help=f"rows per request and per commit [default {DEFAULT_CHUNK}]",
        )
        add(
            "--retries",
            type=int,
            default=5,
            help="retries of transient errors (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED) "
            "in a row without progress [default 5]",
        )
        add("--timeout", type=float, default=60.0, help="deadline per chunk in seconds (remote) [default 60]")
        add(
            "--restart",
            action="store_true",
            help="discard earlier (partial or finished) results in --output and start over",
        )
        add(
            "--progress",
            choices=["auto", "bar", "log", "none"],
            default="auto",
            help="progress display: bar on a terminal, periodic lines otherwise [default auto]",
        )
        add(
            "--no-fsync",
            dest="sync",
            action="store_false",
            help="skip fsync after each chunk (faster; a crash of the machine, not of the job, may then lose "
            "the last chunks)",
        )
        remote = sub.add_argument_group("remote (--server) options")
        remote.add_argument("--tls-ca", type=Path, help="PEM CA bundle: connect over TLS")
        remote.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
        remote.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
        remote.add_argument("--server-name", help="name to check the server certificate against")
        remote.add_argument(
            "--token-file", type=Path, help="file holding a bearer token sent as 'authorization' metadata"
        )
        remote.add_argument(
            "--insecure-token",
            action="store_true",
            help="send the token without TLS (refused otherwise: anyone on the path could read it)",
        )
        remote.add_argument(
            "--wait", type=float, default=30.0, help="seconds to wait for an unreachable server at start [default 30]"
        )
        local = sub.add_argument_group("local (--local) options")
        local.add_argument(
            "--model-repository",
            type=Path,
            default=None,
            help="model repository [default: $SERVING_MODEL_REPOSITORY, else the bundled models/]",
        )
        local.add_argument(
            "--provider",
            choices=["auto", "cpu", "cuda"],
            help="onnxruntime execution provider [default: $SERVING_PROVIDER, else auto]",
        )
    return parser


def _backend(args: argparse.Namespace) -> Backend:
    if args.local:
        from ..settings import BUNDLED_MODELS

        repository = args.model_repository or Path(os.environ.get("SERVING_MODEL_REPOSITORY", BUNDLED_MODELS))
        return LocalBackend(repository, args.task, args.model, args.version, args.provider)
    token = args.token_file.read_text().strip() if args.token_file else None
    # UNAVAILABLE retries cover --wait seconds at start (server still coming up) and each unary call.
    try:
        client = _client(args, token)
    except ValueError as exc:  # a token over plaintext without --insecure-token
        raise BackendError(str(exc)) from None
    try:
        return RemoteBackend(
            client, args.task, args.model, args.version, chunk_timeout=args.timeout, connect_timeout=max(args.wait, 1.0)
        )
    except BaseException:
        client.close()
        raise


def _client(args: argparse.Namespace, token: str | None) -> ServingClient:
    return ServingClient(
        args.server,
        root_certificates=args.tls_ca,
        certificate_chain=args.tls_cert,
        private_key=args.tls_key,
        server_name=args.server_name,
        token=token,
        insecure_token=args.insecure_token,
        timeout=args.timeout,
        retry=connect_retry(attempts=max(1, int(args.wait / 2) + 3)),
    )


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)  # stop like Ctrl-C: the journal is always consistent
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    started = time.monotonic()

    def fail(message: str, status: int) -> int:
        print(f"model-batch: error: {message}", file=sys.stderr)
        return status

    backend: Backend | None = None
    try:
        source = open_images(args.input) if args.task == "classify" else open_populations(args.input)
        backend = _backend(args)
        where = f"server {args.server}" if args.server else "local onnxruntime"
        print(
            f"{args.task}: {args.input} -> {args.output} with model '{backend.model.name}' "
            f"version {backend.model.version} ({where})",
            file=sys.stderr,
        )
        config = JobConfig(
            output=args.output,
            chunk_size=args.chunk_size,
            retries=args.retries,
            progress=args.progress,
            sync=args.sync,
            restart=args.restart,
        )
        job = Job(args.task, source, backend, config, labels_path=getattr(args, "labels", None))
        summary = job.run()
    except InputError as exc:
        return fail(f"bad input: {exc}; no finished result was written", 2)
    except (BackendError, JobError) as exc:
        return fail(str(exc), 1)
    except RpcError as exc:
        hint = " (re-run the same command to resume)" if is_transient(exc) else ""
        return fail(f"{exc}{hint}", 1)
    except OSError as exc:
        return fail(str(exc), 1)
    except KeyboardInterrupt:
        print("\ninterrupted; re-run the same command to resume where it stopped", file=sys.stderr)
        return 130
    finally:
        if backend is not None:
            backend.close()
    elapsed = time.monotonic() - started
    rows_now = sum(r["rows"] for r in summary["runs"][-1:]) if summary["runs"] else 0
    if job.rate:
        print(
            f"done: {summary['rows']:,} rows ({rows_now:,} in this run, {job.rate:,.0f} rows/s) in {elapsed:.1f} s; "
            f"results in {args.output}",
            file=sys.stderr,
        )
    else:
        print(f"done: {summary['rows']:,} rows; results in {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
