"""KServe V2 over a real server process, spoken by Triton's own client (tritonclient[grpc]).

Two servers: one over a tiny made-up repository (versions, a two-output model, a broken model,
``--max-request-rows 8``) for protocol behaviour and errors, and the session ``server`` over the
bundled models/ for results that must equal in-process onnxruntime and the typed API.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from fixtures.onnx_models import OPSET, save, tiny_repository
from fixtures.providers import close_to_cpu
from fixtures.servers import MODELS, ServerProcess, start_server
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

MAX_BATCH = 8
CLASSIFIERS = ("fashion_softmax", "fashion_cnn")
BUNDLED = ("profit", "house_price", *CLASSIFIERS)
INVALID, NOT_FOUND, UNIMPLEMENTED = (f"StatusCode.{c}" for c in ("INVALID_ARGUMENT", "NOT_FOUND", "UNIMPLEMENTED"))


def _two_outputs() -> object:
    """float32 [N, 2] → ``total`` [N, 1] (row sum) and ``double`` [N, 2] (x * 2)."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1),
            helper.make_node("Mul", ["x", "two"], ["double"]),
        ],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("double", TensorProto.FLOAT, ["N", 2]),
        ],
        [two, axes],
    )
    return helper.make_model(graph, opset_imports=OPSET)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tiny_repository(tmp_path_factory.mktemp("v2repo"))
    save(_two_outputs(), root, "two_outputs")  # type: ignore[arg-type]
    return root


@pytest.fixture(scope="module")
def tiny(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ("--model-repository", str(repo), "--max-request-rows", str(MAX_BATCH), "--provider", "cpu")
    with start_server(tmp_path_factory.mktemp("v2server"), *args) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(tiny: ServerProcess) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(tiny.address) as triton:
        yield triton


def _input(name: str, array: np.ndarray, datatype: str | None = None) -> tc.InferInput:
    datatype = datatype or tc.np_to_triton_dtype(array.dtype)
    return tc.InferInput(name, list(array.shape), datatype).set_data_from_numpy(array)


def _onnxruntime(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


# --- health and metadata -----------------------------------------------------------------------


def test_health(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("profit")
    assert client.is_model_ready("fashion_softmax", "1")
    assert client.is_model_ready("fashion_softmax", "2")
    assert not client.is_model_ready("fashion_softmax", "3")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("broken")  # present on disk, failed to load


def test_server_metadata(client: tc.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "model-serving" and meta.version
    assert list(meta.extensions) == ["model_configuration", "model_repository", "statistics"]


@pytest.mark.parametrize("name", ["profit", "house_price", "fashion_softmax", "two_outputs"])
def test_model_metadata_matches_the_onnx_model(client: tc.InferenceServerClient, repo: Path, name: str) -> None:
    meta = client.get_model_metadata(name)
    versions = sorted(int(p.name) for p in (repo / name).iterdir() if p.is_dir())
    assert meta.name == name and meta.platform == "onnxruntime_onnx"
    assert list(meta.versions) == [str(v) for v in versions]
    session = ort.InferenceSession(str(repo / name / str(versions[-1]) / "model.onnx"))
    _assert_tensors_match(meta, session)


def _assert_tensors_match(meta: object, session: ort.InferenceSession) -> None:
    v2_types = {"tensor(float)": "FP32", "tensor(uint8)": "UINT8"}
    for ours, theirs in ((meta.inputs, session.get_inputs()), (meta.outputs, session.get_outputs())):  # type: ignore[attr-defined]
        assert [(t.name, t.datatype, list(t.shape)) for t in ours] == [
            (t.name, v2_types[t.type], [d if isinstance(d, int) else -1 for d in t.shape]) for t in theirs
        ]


def test_model_metadata_of_a_version(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("fashion_softmax", "1", as_json=True)
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": ["-1", "1", "28", "28"]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}]


def test_model_config(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("fashion_softmax").config
    assert (config.name, config.platform, config.backend) == ("fashion_softmax", "onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == MAX_BATCH
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("image", tc.model_config_pb2.TYPE_UINT8, [1, 28, 28])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("probabilities", tc.model_config_pb2.TYPE_FP32, [10])
    ]
    assert config.instance_group[0].kind == tc.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.version_policy.HasField("all")
    as_json = client.get_model_config("two_outputs", "1", as_json=True)["config"]
    assert [(o["name"], o["data_type"], o["dims"]) for o in as_json["output"]] == [
        ("total", "TYPE_FP32", ["1"]),
        ("double", "TYPE_FP32", ["2"]),
    ]


def test_repository_index(client: tc.InferenceServerClient) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    listed = [(m["name"], m["version"], m["state"]) for m in index]
    assert ("fashion_softmax", "1", "READY") in listed and ("fashion_softmax", "2", "READY") in listed
    # As in Triton, a model that failed to load is listed, UNAVAILABLE with the reason.
    broken = [m for m in index if m["name"] == "broken"]
    assert [(m["version"], m["state"]) for m in broken] == [("1", "UNAVAILABLE")]
    assert "Protobuf parsing failed" in broken[0]["reason"]


def test_repository_index_ready_only(tiny: ServerProcess) -> None:
    """``ready`` (not a tritonclient argument): the READY versions only."""
    from service.generated.inference import grpc_service_pb2 as v2
    from service.generated.inference import grpc_service_pb2_grpc as v2_grpc

    with tiny.channel() as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.RepositoryIndex(v2.RepositoryIndexRequest(ready=True), timeout=10).models
        everything = stub.RepositoryIndex(v2.RepositoryIndexRequest(), timeout=10).models
    assert {m.state for m in ready} == {"READY"} and "broken" not in {m.name for m in ready}
    assert [m for m in everything if m.state == "READY"] == list(ready)


# --- inference ---------------------------------------------------------------------------------


def test_infer_versions_and_id(client: tc.InferenceServerClient, repo: Path) -> None:
    images = _images(3)
    for version, expect in (("", "2"), ("2", "2"), ("1", "1")):
        result = client.infer(
            "fashion_softmax", [_input("image", images)], model_version=version, request_id=f"r{version}"
        )
        response = result.get_response()
        assert (response.model_name, response.model_version, response.id) == ("fashion_softmax", expect, f"r{version}")
        expected = _onnxruntime(repo / "fashion_softmax" / expect / "model.onnx", {"image": images})
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-5, atol=1e-7)


def test_requested_outputs_are_honoured(client: tc.InferenceServerClient) -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.5]], np.float32)
    everything = client.infer("two_outputs", [_input("x", x)])
    assert [o.name for o in everything.get_response().outputs] == ["total", "double"]
    only = client.infer("two_outputs", [_input("x", x)], outputs=[tc.InferRequestedOutput("double")])
    assert [o.name for o in only.get_response().outputs] == ["double"]
    assert only.as_numpy("total") is None
    np.testing.assert_array_equal(only.as_numpy("double"), x * 2)
    both = client.infer(
        "two_outputs", [_input("x", x)], outputs=[tc.InferRequestedOutput("double"), tc.InferRequestedOutput("total")]
    )
    assert [o.name for o in both.get_response().outputs] == ["double", "total"]
    np.testing.assert_array_equal(both.as_numpy("total"), x.sum(axis=1, keepdims=True))


def test_typed_contents_equal_raw(client: tc.InferenceServerClient) -> None:
    """The same request in typed ``contents`` (no raw_input_contents) gives the same answer."""
    images = _images(2, seed=1)
    typed = tc.InferInput("image", list(images.shape), "UINT8")
    typed._get_tensor().contents.uint_contents.extend(images.ravel().tolist())
    from_typed = client.infer("fashion_softmax", [typed])
    from_raw = client.infer("fashion_softmax", [_input("image", images)])
    np.testing.assert_array_equal(from_typed.as_numpy("probabilities"), from_raw.as_numpy("probabilities"))
    x = np.array([[1000.0, 3.0]], np.float32)
    features = tc.InferInput("x", [1, 2], "FP32")
    features._get_tensor().contents.fp32_contents.extend(x.ravel().tolist())
    np.testing.assert_array_equal(
        client.infer("house_price", [features]).as_numpy("y"),
        client.infer("house_price", [_input("x", x)]).as_numpy("y"),
    )


def test_async_infer(tiny: ServerProcess, repo: Path) -> None:
    population = np.array([[3.5], [7.25]], np.float32)

    async def run() -> list[np.ndarray]:
        triton = tc_aio.InferenceServerClient(tiny.address)
        try:
            assert await triton.is_server_ready()
            assert (await triton.get_model_metadata("profit")).name == "profit"
            results = await asyncio.gather(
                *(triton.infer("profit", [_input("population", population * k)]) for k in (1, 2, 3))
            )
            return [r.as_numpy("profit") for r in results]
        finally:
            await triton.close()

    outputs = asyncio.run(run())
    for k, output in zip((1, 2, 3), outputs):
        expected = _onnxruntime(repo / "profit" / "1" / "model.onnx", {"population": population * k})
        np.testing.assert_allclose(output, expected["profit"], rtol=1e-6)


def test_stream_infer(client: tc.InferenceServerClient) -> None:
    """Triton's bidirectional stream: answers in order, a bad request does not end the stream."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        x = np.array([[1.0, 2.0]], np.float32)
        client.async_stream_infer("two_outputs", [_input("x", x)], request_id="a")
        client.async_stream_infer("no_such_model", [_input("x", x)], request_id="b")
        client.async_stream_infer("two_outputs", [_input("x", x * 3)], request_id="c")
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    (first, e1), (failed, e2), (third, e3) = got
    assert e1 is None and first.get_response().id == "a"
    np.testing.assert_array_equal(first.as_numpy("total"), [[3.0]])
    assert failed is None and "no_such_model" in e2.message()
    assert e3 is None and third.get_response().id == "c"
    np.testing.assert_array_equal(third.as_numpy("double"), x * 6)


# --- errors --------------------------------------------------------------------------------------

Call = Callable[[tc.InferenceServerClient], object]
IMAGE = _images(2)


def _infer(model: str, *inputs: tc.InferInput, **kwargs: object) -> Call:
    return lambda triton: triton.infer(model, list(inputs), **kwargs)


def _byte_mismatch() -> tc.InferInput:
    return _input("image", IMAGE).set_shape([3, 1, 28, 28])


def _raw_and_typed() -> tc.InferInput:
    inp = _input("population", np.ones((1, 1), np.float32))
    inp._get_tensor().contents.fp32_contents.append(1.0)
    return inp


ERRORS: dict[str, tuple[Call, str, str]] = {
    "wrong datatype": (
        _infer("fashion_softmax", _input("image", IMAGE.astype(np.float32))),
        INVALID,
        "datatype UINT8, got FP32",
    ),
    "wrong shape": (_infer("fashion_softmax", _input("image", IMAGE.reshape(2, 784))), INVALID, "expects shape"),
    "byte length": (_infer("fashion_softmax", _byte_mismatch()), INVALID, "needs 2352 bytes"),
    "raw and typed": (_infer("profit", _raw_and_typed()), INVALID, "one or the other"),
    "unknown input": (_infer("fashion_softmax", _input("img", IMAGE)), INVALID, "no input 'img'"),
    "unknown output": (
        _infer("profit", _input("population", np.ones((1, 1), np.float32)), outputs=[tc.InferRequestedOutput("nope")]),
        INVALID,
        "nope",
    ),
    "not finite": (_infer("profit", _input("population", np.array([[np.nan]], np.float32))), INVALID, "NaN"),
    "empty batch": (_infer("profit", _input("population", np.ones((0, 1), np.float32))), INVALID, "empty"),
    "over max batch": (
        _infer("profit", _input("population", np.ones((MAX_BATCH + 1, 1), np.float32))),
        INVALID,
        "maximum",
    ),
    "unknown model": (_infer("no_such_model", _input("x", IMAGE)), NOT_FOUND, "no_such_model"),
    "unknown version": (_infer("fashion_softmax", _input("image", IMAGE), model_version="9"), NOT_FOUND, "version 9"),
    "bad version": (_infer("fashion_softmax", _input("image", IMAGE), model_version="latest"), INVALID, "integer"),
    "metadata, unknown model": (lambda t: t.get_model_metadata("no_such_model"), NOT_FOUND, "no_such_model"),
    "metadata, unknown version": (lambda t: t.get_model_metadata("profit", "9"), NOT_FOUND, "version 9"),
    "config, unknown model": (lambda t: t.get_model_config("no_such_model"), NOT_FOUND, "no_such_model"),
    "ready, bad version": (lambda t: t.is_model_ready("profit", "x"), INVALID, "integer"),
    "statistics, unknown model": (lambda t: t.get_inference_statistics("no_such_model"), NOT_FOUND, "no_such_model"),
    "statistics, unknown version": (lambda t: t.get_inference_statistics("profit", "9"), NOT_FOUND, "version 9"),
    # Model control is off unless --allow-model-control (tests/e2e/test_reload.py turns it on).
    "load": (lambda t: t.load_model("profit"), "StatusCode.FAILED_PRECONDITION", "--allow-model-control"),
    "unload": (lambda t: t.unload_model("profit"), "StatusCode.FAILED_PRECONDITION", "--allow-model-control"),
    "system shared memory": (lambda t: t.get_system_shared_memory_status(), UNIMPLEMENTED, "SystemSharedMemoryStatus"),
    "cuda shared memory": (lambda t: t.get_cuda_shared_memory_status(), UNIMPLEMENTED, "CudaSharedMemoryStatus"),
    "trace": (lambda t: t.get_trace_settings(), UNIMPLEMENTED, "TraceSetting"),
    "log": (lambda t: t.get_log_settings(), UNIMPLEMENTED, "LogSettings"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_requests(client: tc.InferenceServerClient, case: str) -> None:
    """Each bad request gets its status and message, and the server still serves afterwards (each
    case checks that itself: the order the cases run in is random)."""
    call, status, message = ERRORS[case]
    with pytest.raises(InferenceServerException) as info:
        call(client)
    assert info.value.status() == status, info.value.message()
    assert message in info.value.message()
    assert client.is_server_ready()
    answer = client.infer("profit", [_input("population", np.full((1, 1), 1000.0, np.float32))]).as_numpy("profit")
    assert answer.tolist() == [[pytest.approx(1.193 * 1000 - 38958.0, rel=1e-6)]]  # tiny_repository's profit


# --- the bundled models: V2 == onnxruntime in-process == typed API ----------------------------


def _sample(name: str, request: pytest.FixtureRequest) -> np.ndarray:
    if name in CLASSIFIERS:
        images, _ = request.getfixturevalue("fashion_test_set")
        return np.ascontiguousarray(images[:64])
    if name == "profit":
        return np.array([[3.5], [7.0], [13.1], [20.27]], np.float32)
    return np.array([[2104.0, 3.0], [1600.0, 3.0], [2400.0, 3.0], [1416.0, 2.0], [3000.0, 4.0]], np.float32)


def _typed_api(address: str, name: str, x: np.ndarray) -> np.ndarray:
    """The same inputs through the typed API (serving.v1.ModelService)."""
    from service.generated.serving.v1 import serving_pb2 as pb
    from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        ref = pb.ModelRef(name=name)
        if name in CLASSIFIERS:
            images = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=x.shape, data=x.tobytes())
            response = stub.Classify(pb.ClassifyRequest(model=ref, images=images), timeout=30)
            return np.array([list(r.probabilities) for r in response.results], np.float32)
        if name == "profit":
            response = stub.PredictProfit(pb.PredictProfitRequest(model=ref, population=x[:, 0]), timeout=30)
            return np.array(response.profit_usd, np.float32).reshape(-1, 1)
        houses = [pb.House(size_sqft=s, bedrooms=b) for s, b in x]
        response = stub.PredictHousePrice(pb.PredictHousePriceRequest(model=ref, houses=houses), timeout=30)
        return np.array(response.price_usd, np.float32).reshape(-1, 1)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_v2_equals_onnxruntime_and_typed_api(request: pytest.FixtureRequest, name: str) -> None:
    assert (MODELS / name).is_dir(), f"the bundled model models/{name} is missing"
    bundled: ServerProcess = request.getfixturevalue("server")
    x = _sample(name, request)
    with tc.InferenceServerClient(bundled.address) as triton:
        meta = triton.get_model_metadata(name)
        path = MODELS / name / meta.versions[-1] / "model.onnx"
        _assert_tensors_match(meta, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
        (inp,), (out,) = meta.inputs, meta.outputs
        result = triton.infer(name, [_input(inp.name, x)], outputs=[tc.InferRequestedOutput(out.name)])
        config = triton.get_model_config(name).config
    v2 = result.as_numpy(out.name)
    assert result.get_response().model_version == meta.versions[-1]
    assert config.max_batch_size > 0 and [list(i.dims) for i in config.input] == [list(inp.shape[1:])]
    # The session server runs on --provider auto (CUDA on a GPU host); _onnxruntime on the CPU.
    np.testing.assert_allclose(v2, _onnxruntime(path, {inp.name: x})[out.name], **close_to_cpu())
    np.testing.assert_allclose(v2, _typed_api(bundled.address, name, x), rtol=1e-6, atol=0)
    if name in CLASSIFIERS:
        np.testing.assert_allclose(v2.sum(axis=1), 1.0, rtol=1e-5)
