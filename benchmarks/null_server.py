"""The transport ceiling: a grpc.aio server that parses the same V2 (or typed) request and
returns an empty response, doing nothing else. Same server options as the real server.

``python benchmarks/null_server.py PORT``
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.generated.inference import grpc_service_pb2 as v2
from service.generated.serving.v1 import serving_pb2 as typed

MAX_MESSAGE = 64 * 1024 * 1024


async def _nothing(request: object, context: object) -> bytes:
    return b""  # an empty ModelInferResponse / ClassifyResponse


async def main(port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ]
    )
    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            _nothing, request_deserializer=v2.ModelInferRequest.FromString
        )
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers)])
    typed_handlers = {
        "Classify": grpc.unary_unary_rpc_method_handler(_nothing, request_deserializer=typed.ClassifyRequest.FromString)
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("serving.v1.ModelService", typed_handlers)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
