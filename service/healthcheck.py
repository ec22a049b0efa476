"""Container health probe through gRPC health: ``python -m service.healthcheck`` (no grpcurl needed).

Asks ``grpc.health.v1.Health/Check`` of the server; exit status 0 when the service reports
SERVING, 1 otherwise (NOT_SERVING, unknown service, unreachable, deadline passed). One line on
stdout says what was seen. The default address is ``127.0.0.1:$SERVING_PORT`` (8001), the port the
server in the same container listens on. No retries: the container runtime re-probes on its own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .client import NO_RETRY, RpcError, ServingClient


def build_parser() -> argparse.ArgumentParser:
    port = os.environ.get("SERVING_PORT", "8001")
    parser = argparse.ArgumentParser(
        prog="python -m service.healthcheck",
        description="Exit 0 when the model server reports SERVING over gRPC health, else 1.",
    )
    parser.add_argument(
        "--address", default=f"127.0.0.1:{port}", help="host:port of the server [default 127.0.0.1:$SERVING_PORT]"
    )
    parser.add_argument("--service", default="", help='health service name: "" = the whole server, or a model name')
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds [default 3]")
    parser.add_argument("--tls-ca", help="PEM CA bundle: check over TLS (the server runs with --tls-cert)")
    parser.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--server-name", help="name to check the server certificate against")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = ServingClient(
            args.address,
            root_certificates=args.tls_ca,
            certificate_chain=args.tls_cert,
            private_key=args.tls_key,
            server_name=args.server_name,
            timeout=args.timeout,
            retry=NO_RETRY,
        )
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}")
        return 1
    with client:
        try:
            status = client.health(args.service)
        except RpcError as exc:
            print(f"unhealthy: {args.address} {exc}")
            return 1
    print(f"{args.address} service {args.service!r}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
