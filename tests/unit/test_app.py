"""The assembled serving process (service.app.build_app) in process: a real grpc.aio server on a
free port and a real client, with model loading driven step by step."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from fixtures.onnx_models import linear, save
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app import build_app
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc
from service.settings import Settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_not_serving_until_models_are_loaded(tmp_path: Path) -> None:
    save(linear(1, [2.0], 1.0, "population", "profit"), tmp_path / "good", "profit")
    (tmp_path / "bad" / "broken" / "1").mkdir(parents=True)

    async def scenario(repo: Path) -> tuple[int, grpc.StatusCode, int, int]:
        settings = Settings(model_repository=repo, host="127.0.0.1", port=0, http_port=0, provider="cpu")
        app = await build_app(settings)
        await app.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                check = health_pb2.HealthCheckRequest(service="")
                before = (await health.Check(check)).status
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.ModelServiceStub(channel).PredictProfit(pb.PredictProfitRequest(population=[1]))
                await app.load_models()
                after = (await health.Check(check)).status
                typed = (await health.Check(health_pb2.HealthCheckRequest(service="serving.v1.ModelService"))).status
                return before, info.value.code(), after, typed
        finally:
            await app.stop(0)

    assert asyncio.run(scenario(tmp_path / "good")) == (NOT_SERVING, grpc.StatusCode.UNAVAILABLE, SERVING, SERVING)
    # Nothing loadable: it keeps answering, but never reports SERVING.
    before, _, after, typed = asyncio.run(scenario(tmp_path / "bad"))
    assert (before, after, typed) == (NOT_SERVING, NOT_SERVING, NOT_SERVING)


def test_the_wiring(tmp_path: Path) -> None:
    """One registry, data plane and call gate shared by the front end; health per model."""
    save(linear(1, [2.0], 1.0, "population", "profit"), tmp_path, "profit")

    async def scenario() -> tuple:
        settings = Settings(
            model_repository=tmp_path, host="127.0.0.1", port=0, http_port=0, provider="cpu", max_concurrent_requests=3
        )
        app = await build_app(settings)
        await app.start()
        try:
            await app.load_models()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                answer = await pb_grpc.ModelServiceStub(channel).PredictProfit(pb.PredictProfitRequest(population=[3]))
                health = health_pb2_grpc.HealthStub(channel)
                model = (await health.Check(health_pb2.HealthCheckRequest(service="profit"))).status
            return (
                list(answer.profit_usd),
                model,
                app.plane.registry is app.registry,
                app.gate.limit,
                app.grpc.services,
                app.port > 0,
            )
        finally:
            await app.stop(0)

    profit, model, shared, limit, services, bound = asyncio.run(scenario())
    assert profit == [7.0] and model == SERVING and shared and limit == 3 and bound
    assert services == ["serving.v1.ModelService", "inference.GRPCInferenceService"]
