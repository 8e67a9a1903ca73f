"""The Open Inference Protocol servicer on a real grpc.aio server, with a real model from the registry."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import pathlib
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import prometheus_client
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc

from services.inference.features import FEATURES
from services.inference.model import SignalNet
from services.inference.oip import OpenInferenceServicer
from services.inference.registry import SAFETENSORS, LoadedModel, Manifest, ModelRegistry
from services.inference.serving import MicroBatcher, ModelHolder

NAME = "signals"
WINDOW = 2
N_INPUTS = WINDOW * len(FEATURES)
SERVER_VERSION = "9.9.9-test"


def save_model(registry: ModelRegistry, seed: int) -> Manifest:
    torch.manual_seed(seed)
    net = SignalNet(N_INPUTS, (16, 8))
    rng = np.random.default_rng(seed)
    net.set_standardization(rng.normal(0.0, 1.0, N_INPUTS), rng.uniform(0.5, 2.0, N_INPUTS))
    manifest = Manifest(
        name=NAME,
        version="",
        created="",
        timeframe="M1",
        symbols=("EURUSD",),
        data_from="2025-01-01T00:00:00+00:00",
        data_to="2025-02-01T00:00:00+00:00",
        features=FEATURES,
        window=WINDOW,
        horizon=1,
        threshold=0.5,
        hidden=(16, 8),
        seed=seed,
        metrics={},
        weights_file="",
        weights_sha256="",
        torch_version="",
    )
    return registry.save(net, manifest)


@dataclasses.dataclass
class Oip:
    stub: pb_grpc.GRPCInferenceServiceStub
    holder: ModelHolder
    registry: ModelRegistry
    port: int
    service_ready: list[bool]

    @property
    def model(self) -> LoadedModel:
        return self.holder.require()


@contextlib.asynccontextmanager
async def serving(holder: ModelHolder) -> AsyncIterator[Oip]:
    service_ready = [True]
    batcher = MicroBatcher(holder, max_batch=512, max_wait_seconds=0.002, max_queue=1024)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        OpenInferenceServicer(holder, batcher, SERVER_VERSION, lambda: service_ready[0]), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    batching = asyncio.create_task(batcher.run())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Oip(pb_grpc.GRPCInferenceServiceStub(channel), holder, holder.registry, port, service_ready)
    finally:
        batching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await batching
        await server.stop(None)


@pytest.fixture
async def oip(tmp_path: pathlib.Path) -> AsyncIterator[Oip]:
    registry = ModelRegistry(tmp_path / "models")
    save_model(registry, seed=1)
    holder = ModelHolder(registry, NAME)
    model = holder.find()
    assert model is not None
    holder.install(model)
    async with serving(holder) as running:
        yield running


@pytest.fixture
async def no_model(tmp_path: pathlib.Path) -> AsyncIterator[Oip]:
    async with serving(ModelHolder(ModelRegistry(tmp_path / "models"), NAME)) as running:
        yield running


def feature_rows(batch: int, seed: int = 3) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).normal(0.0, 2.0, (batch, N_INPUTS)).astype(np.float32)


def typed_request(rows: npt.NDArray[np.floating], **fields: Any) -> pb.ModelInferRequest:
    datatype = "FP32" if rows.dtype == np.float32 else "FP64"
    contents = pb.InferTensorContents()
    getattr(contents, f"{datatype.lower()}_contents").extend(rows.ravel().tolist())
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="features", datatype=datatype, shape=list(rows.shape), contents=contents
    )
    return pb.ModelInferRequest(model_name=NAME, inputs=[tensor], **fields)


def raw_request(rows: npt.NDArray[np.floating], **fields: Any) -> pb.ModelInferRequest:
    datatype = "FP32" if rows.dtype == np.float32 else "FP64"
    tensor = pb.ModelInferRequest.InferInputTensor(name="features", datatype=datatype, shape=list(rows.shape))
    data = rows.astype(rows.dtype.newbyteorder("<")).tobytes()
    return pb.ModelInferRequest(model_name=NAME, inputs=[tensor], raw_input_contents=[data], **fields)


def outputs_of(response: pb.ModelInferResponse) -> dict[str, npt.NDArray[Any]]:
    found: dict[str, npt.NDArray[Any]] = {}
    for i, tensor in enumerate(response.outputs):
        if response.raw_output_contents:
            dtype = {"FP64": "<f8", "INT32": "<i4"}[tensor.datatype]
            found[tensor.name] = np.frombuffer(response.raw_output_contents[i], dtype=dtype)
        elif tensor.datatype == "FP64":
            found[tensor.name] = np.array(tensor.contents.fp64_contents)
        else:
            found[tensor.name] = np.array(tensor.contents.int_contents, dtype=np.int32)
        assert list(tensor.shape) == [len(found[tensor.name])]
    return found


def assert_scored_like_model(
    outputs: dict[str, npt.NDArray[Any]], model: LoadedModel, rows: npt.NDArray[np.floating]
) -> None:
    expected = model.scorer.probabilities(rows.astype(np.float64))
    np.testing.assert_allclose(outputs["prob_up"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(outputs["label"], model.scorer.labels(expected))


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = status_pb2.Status.FromString(dict(error.trailing_metadata() or ())["grpc-status-details-bin"])
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return [v.field for v in bad_request.field_violations]


async def infer_error(oip: Oip, request: pb.ModelInferRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await oip.stub.ModelInfer(request, timeout=10)
    return raised.value


def rejected_non_finite() -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "mt5_inference_rows_rejected_total", {"reason": "non_finite"}
    )
    return value or 0.0


async def test_server_live_always_live(oip: Oip) -> None:
    assert (await oip.stub.ServerLive(pb.ServerLiveRequest())).live


async def test_server_ready_model_loaded_follows_service_readiness(oip: Oip) -> None:
    assert (await oip.stub.ServerReady(pb.ServerReadyRequest())).ready
    oip.service_ready[0] = False
    assert not (await oip.stub.ServerReady(pb.ServerReadyRequest())).ready


async def test_server_metadata_any_names_server_version_and_no_extensions(oip: Oip) -> None:
    answer = await oip.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (answer.name, answer.version, list(answer.extensions)) == (
        "mt5-mesh-inference",
        SERVER_VERSION,
        [],
    )


@pytest.mark.parametrize(
    ("name", "version", "ready"),
    [(NAME, "", True), (NAME, "v0001", True), (NAME, "v0002", False), ("other", "", False), ("", "", False)],
)
async def test_model_ready_name_and_version_ready_only_for_served(
    oip: Oip, name: str, version: str, ready: bool
) -> None:
    assert (await oip.stub.ModelReady(pb.ModelReadyRequest(name=name, version=version))).ready is ready


async def test_model_metadata_served_model_describes_tensors(oip: Oip) -> None:
    answer = await oip.stub.ModelMetadata(pb.ModelMetadataRequest(name=NAME))
    assert (answer.name, list(answer.versions), answer.platform) == (NAME, ["v0001"], "pytorch")
    assert [(t.name, t.datatype, list(t.shape)) for t in answer.inputs] == [
        ("features", "FP32", [-1, N_INPUTS])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in answer.outputs] == [
        ("prob_up", "FP64", [-1]),
        ("label", "INT32", [-1]),
    ]


@pytest.mark.parametrize(("name", "version"), [("other", ""), (NAME, "v0042")])
async def test_model_metadata_unknown_model_or_version_not_found(oip: Oip, name: str, version: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await oip.stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_model_infer_fp32_contents_scores_like_model(oip: Oip) -> None:
    rows = feature_rows(7)
    response = await oip.stub.ModelInfer(typed_request(rows, id="req-1"), timeout=10)
    assert (response.model_name, response.model_version, response.id) == (NAME, "v0001", "req-1")
    assert not response.raw_output_contents
    assert [t.name for t in response.outputs] == ["prob_up", "label"]
    assert [t.datatype for t in response.outputs] == ["FP64", "INT32"]
    assert_scored_like_model(outputs_of(response), oip.model, rows)


async def test_model_infer_raw_contents_answers_raw_like_model(oip: Oip) -> None:
    rows = feature_rows(64, seed=4)
    response = await oip.stub.ModelInfer(raw_request(rows), timeout=10)
    assert len(response.raw_output_contents) == 2
    assert all(not t.HasField("contents") for t in response.outputs)
    assert_scored_like_model(outputs_of(response), oip.model, rows)


async def test_model_infer_fp64_raw_and_typed_scores_like_model(oip: Oip) -> None:
    rows = feature_rows(5, seed=5).astype(np.float64) * 1.000001
    for request in (typed_request(rows), raw_request(rows)):
        assert_scored_like_model(outputs_of(await oip.stub.ModelInfer(request, timeout=10)), oip.model, rows)


async def test_model_infer_requested_label_only_returns_label(oip: Oip) -> None:
    rows = feature_rows(3)
    request = typed_request(
        rows, model_version="v0001", outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="label")]
    )
    response = await oip.stub.ModelInfer(request, timeout=10)
    assert [t.name for t in response.outputs] == ["label"]
    expected = oip.model.scorer.labels(oip.model.scorer.probabilities(rows.astype(np.float64)))
    np.testing.assert_array_equal(outputs_of(response)["label"], expected)


async def test_model_infer_concurrent_callers_each_get_their_rows(oip: Oip) -> None:
    batches = [feature_rows(n, seed=n) for n in (1, 2, 3, 50, 7)]
    responses = await asyncio.gather(*(oip.stub.ModelInfer(raw_request(b), timeout=10) for b in batches))
    for rows, response in zip(batches, responses, strict=True):
        assert_scored_like_model(outputs_of(response), oip.model, rows)


def _with(
    request: pb.ModelInferRequest, change: Callable[[pb.ModelInferRequest], object]
) -> pb.ModelInferRequest:
    change(request)
    return request


def _two_inputs(r: pb.ModelInferRequest) -> None:
    r.inputs.append(r.inputs[0])


def _set_shape(*shape: int) -> Callable[[pb.ModelInferRequest], None]:
    def change(r: pb.ModelInferRequest) -> None:
        del r.inputs[0].shape[:]
        r.inputs[0].shape.extend(shape)

    return change


def _set_value(value: float) -> Callable[[pb.ModelInferRequest], None]:
    def change(r: pb.ModelInferRequest) -> None:
        r.inputs[0].contents.fp32_contents[5] = value

    return change


BAD_TYPED: list[tuple[str, Callable[[pb.ModelInferRequest], object], str]] = [
    ("no input", lambda r: r.ClearField("inputs"), "inputs"),
    ("two inputs", _two_inputs, "inputs"),
    ("unknown input name", lambda r: setattr(r.inputs[0], "name", "x"), "inputs[0].name"),
    ("unknown datatype", lambda r: setattr(r.inputs[0], "datatype", "FP16"), "inputs[0].datatype"),
    ("wrong rank", _set_shape(2 * N_INPUTS), "inputs[0].shape"),
    ("wrong width", _set_shape(2, N_INPUTS - 1), "inputs[0].shape"),
    ("batch 0", _set_shape(0, N_INPUTS), "inputs[0].shape"),
    ("batch over 10000", _set_shape(10_001, N_INPUTS), "inputs[0].shape"),
    (
        "too few values",
        lambda r: r.inputs[0].contents.fp32_contents.pop(),
        "inputs[0].contents.fp32_contents",
    ),
    (
        "too many values",
        lambda r: r.inputs[0].contents.fp32_contents.append(1.0),
        "inputs[0].contents.fp32_contents",
    ),
    ("wrong contents field", lambda r: r.inputs[0].contents.fp64_contents.append(1.0), "inputs[0].contents"),
    ("NaN", _set_value(float("nan")), "inputs[0].contents.fp32_contents"),
    ("Infinity", _set_value(float("inf")), "inputs[0].contents.fp32_contents"),
    ("-Infinity", _set_value(float("-inf")), "inputs[0].contents.fp32_contents"),
    ("both kinds", lambda r: r.raw_input_contents.append(b"\0" * 8), "raw_input_contents"),
    ("unknown output", lambda r: r.outputs.add(name="prob_down"), "outputs[0].name"),
    ("output twice", lambda r: [r.outputs.add(name="label") for _ in range(2)], "outputs[1].name"),
    ("no model name", lambda r: setattr(r, "model_name", ""), "model_name"),
]


@pytest.mark.parametrize(("change", "field"), [c[1:] for c in BAD_TYPED], ids=[c[0] for c in BAD_TYPED])
async def test_model_infer_bad_typed_request_invalid_argument_naming_field(
    oip: Oip, change: Callable[[pb.ModelInferRequest], object], field: str
) -> None:
    error = await infer_error(oip, _with(typed_request(feature_rows(2)), change))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in violations(error)
    assert field in (error.details() or "")


def _raw_bytes(transform: Callable[[bytes], bytes]) -> Callable[[pb.ModelInferRequest], None]:
    def change(r: pb.ModelInferRequest) -> None:
        r.raw_input_contents[0] = transform(r.raw_input_contents[0])

    return change


def _raw_value(value: float) -> Callable[[pb.ModelInferRequest], None]:
    def change(r: pb.ModelInferRequest) -> None:
        rows = np.frombuffer(r.raw_input_contents[0], dtype="<f4").copy()
        rows[N_INPUTS + 3] = value
        r.raw_input_contents[0] = rows.tobytes()

    return change


BAD_RAW: list[tuple[str, Callable[[pb.ModelInferRequest], object], str]] = [
    (
        "short",
        _raw_bytes(lambda data: data[:-4]),
        "raw_input_contents[0]",
    ),
    (
        "long",
        _raw_bytes(lambda data: data + b"\0" * 4),
        "raw_input_contents[0]",
    ),
    ("FP64 declared", lambda r: setattr(r.inputs[0], "datatype", "FP64"), "raw_input_contents[0]"),
    ("two entries", lambda r: r.raw_input_contents.append(r.raw_input_contents[0]), "raw_input_contents"),
    ("both kinds", lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "raw_input_contents"),
    ("NaN", _raw_value(float("nan")), "raw_input_contents[0]"),
    ("Infinity", _raw_value(float("inf")), "raw_input_contents[0]"),
]


@pytest.mark.parametrize(("change", "field"), [c[1:] for c in BAD_RAW], ids=[c[0] for c in BAD_RAW])
async def test_model_infer_bad_raw_request_invalid_argument_naming_field(
    oip: Oip, change: Callable[[pb.ModelInferRequest], object], field: str
) -> None:
    error = await infer_error(oip, _with(raw_request(feature_rows(3)), change))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in violations(error)


async def test_model_infer_fp64_beyond_fp32_range_invalid_argument(oip: Oip) -> None:
    rows = feature_rows(2).astype(np.float64)
    rows[1, 4] = 1e300
    error = await infer_error(oip, typed_request(rows))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error) == ["inputs[0].contents.fp64_contents"]


async def test_model_infer_finite_but_huge_after_standardization_invalid_argument(oip: Oip) -> None:
    rows = feature_rows(2).astype(np.float64)
    rows[1, 2] = 1e35  # finite in FP32; standardized, beyond what the network computes with
    error = await infer_error(oip, typed_request(rows))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error) == ["inputs[0].contents.fp64_contents"]
    assert "row 1, column 2 (spread)" in (error.details() or "")


async def test_model_infer_non_finite_rows_counted_and_never_scored(oip: Oip) -> None:
    rows = feature_rows(4)
    rows[1, 0] = np.nan
    rows[3, 7] = np.inf
    before = rejected_non_finite()
    error = await infer_error(oip, raw_request(rows))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 1, column 0 (close)" in (error.details() or "")
    assert rejected_non_finite() - before == 2


@pytest.mark.parametrize(
    ("fields", "mentions"),
    [({"model_name": "other"}, "model_name"), ({"model_version": "v0042"}, "model_version")],
    ids=["unknown model", "unknown version"],
)
async def test_model_infer_unknown_model_or_version_not_found(
    oip: Oip, fields: dict[str, str], mentions: str
) -> None:
    request = typed_request(feature_rows(2))
    for key, value in fields.items():
        setattr(request, key, value)
    error = await infer_error(oip, request)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert mentions in (error.details() or "")


async def test_oip_no_model_unavailable_and_not_ready(no_model: Oip) -> None:
    assert (await no_model.stub.ServerLive(pb.ServerLiveRequest())).live
    assert not (await no_model.stub.ServerReady(pb.ServerReadyRequest())).ready
    assert not (await no_model.stub.ModelReady(pb.ModelReadyRequest(name=NAME))).ready
    error = await infer_error(no_model, typed_request(feature_rows(2)))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, "no model: run mt5mesh train")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await no_model.stub.ModelMetadata(pb.ModelMetadataRequest(name=NAME))
    assert (raised.value.code(), raised.value.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "no model: run mt5mesh train",
    )


async def test_oip_tampered_version_not_ready_and_not_listed(oip: Oip) -> None:
    tampered = save_model(oip.registry, seed=2)
    (oip.registry.root / NAME / tampered.version / SAFETENSORS).write_bytes(b"not the weights")
    assert oip.holder.find() is None  # refused; v0001 stays served
    assert tampered.version in oip.holder.refused
    assert not (await oip.stub.ModelReady(pb.ModelReadyRequest(name=NAME, version=tampered.version))).ready
    assert (await oip.stub.ModelReady(pb.ModelReadyRequest(name=NAME))).ready
    answer = await oip.stub.ModelMetadata(pb.ModelMetadataRequest(name=NAME))
    assert list(answer.versions) == ["v0001"]
    error = await infer_error(oip, typed_request(feature_rows(2), model_version=tampered.version))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "sha256" in (error.details() or "")


# Runs in its own interpreter: tritonclient registers the same "inference.*" protobuf names as our
# generated module, and one process's descriptor pool cannot hold both.
TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton

url, name, rows = sys.argv[1], sys.argv[2], np.array(json.loads(sys.stdin.read()), dtype=np.float32)
client = triton.InferenceServerClient(url=url)
features = triton.InferInput("features", list(rows.shape), "FP32")
features.set_data_from_numpy(rows)
result = client.infer(
    name, [features], outputs=[triton.InferRequestedOutput("prob_up"), triton.InferRequestedOutput("label")],
    request_id="triton-1",
)
metadata = client.get_model_metadata(name)
print(json.dumps({
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(name),
    "server": client.get_server_metadata().name,
    "inputs": [[t.name, t.datatype, list(t.shape)] for t in metadata.inputs],
    "version": result.get_response().model_version,
    "id": result.get_response().id,
    "prob_up": result.as_numpy("prob_up").tolist(),
    "label": result.as_numpy("label").tolist(),
}))
"""


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient is not installed")
async def test_oip_tritonclient_standard_client_scores_like_model(oip: Oip) -> None:
    rows = feature_rows(6, seed=9)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        TRITON_CLIENT,
        f"127.0.0.1:{oip.port}",
        NAME,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(json.dumps(rows.tolist()).encode()), 60)
    assert process.returncode == 0, err.decode()
    answer = json.loads(out)
    assert (answer["live"], answer["ready"], answer["model_ready"]) == (True, True, True)
    assert answer["server"] == "mt5-mesh-inference"
    assert answer["inputs"] == [["features", "FP32", [-1, N_INPUTS]]]
    assert (answer["version"], answer["id"]) == ("v0001", "triton-1")
    outputs = {"prob_up": np.array(answer["prob_up"]), "label": np.array(answer["label"])}
    assert_scored_like_model(outputs, oip.model, rows)
