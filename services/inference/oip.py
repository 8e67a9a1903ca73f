"""KServe's Open Inference Protocol v2 over gRPC for the served model, so standard clients can score.

Thin glue over ``ModelHolder`` and ``MicroBatcher``: the model takes one input tensor, ``features``
(``[batch, n_inputs]``, FP32 or FP64, typed or raw little-endian contents), and returns ``prob_up``
(FP64) and ``label`` (INT32), both ``[batch]``. Rows are scored through the micro-batcher, so protocol
calls share forward passes with every other caller. Everything in a request is checked before a row
reaches the model; a non-finite value never does.
"""

# ruff: noqa: N802  (RPC method names are fixed by the protocol)

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import NoReturn

import grpc
import numpy as np
import numpy.typing as npt
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc

from services.common.errors import abort_invalid
from services.common.validation import FieldViolation, ValidationFailed
from services.inference import metrics
from services.inference.domain import MAX_STANDARD_DEVIATIONS
from services.inference.registry import LoadedModel
from services.inference.serving import NO_MODEL, MicroBatcher, ModelHolder, NoModel

SERVER_NAME = "mt5-mesh-inference"
PLATFORM = "pytorch"
INPUT = "features"
PROB_UP = "prob_up"
LABEL = "label"
OUTPUTS = (PROB_UP, LABEL)
MAX_BATCH = 10_000

# Element types the ``features`` tensor may use: little-endian dtype and typed contents field.
_INPUT_TYPES: dict[str, tuple[np.dtype[np.floating], str]] = {
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
}
_CONTENT_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)


@dataclasses.dataclass(frozen=True, slots=True)
class InferInput:
    """A validated request: the feature rows, the outputs wanted, and how to send them back."""

    rows: npt.NDArray[np.float64]
    outputs: tuple[str, ...]
    raw: bool


def _header_violations(request: pb.ModelInferRequest, n_inputs: int) -> list[FieldViolation]:
    """Everything about the request except its values; the values are read only when this is empty."""
    found: list[FieldViolation] = []
    if len(request.inputs) != 1:
        found.append(
            FieldViolation("inputs", f"must hold exactly one tensor, {INPUT!r}; got {len(request.inputs)}")
        )
    else:
        tensor = request.inputs[0]
        if tensor.name != INPUT:
            found.append(FieldViolation("inputs[0].name", f"must be {INPUT!r}, not {tensor.name!r}"))
        if tensor.datatype not in _INPUT_TYPES:
            found.append(
                FieldViolation("inputs[0].datatype", f"must be FP32 or FP64, not {tensor.datatype!r}")
            )
        shape = list(tensor.shape)
        if len(shape) != 2 or shape[1] != n_inputs:
            found.append(FieldViolation("inputs[0].shape", f"must be [batch, {n_inputs}], not {shape}"))
        elif not 1 <= shape[0] <= MAX_BATCH:
            found.append(FieldViolation("inputs[0].shape", f"batch must be 1 to {MAX_BATCH}, not {shape[0]}"))
        typed = [f for f in _CONTENT_FIELDS if len(getattr(tensor.contents, f))]
        if request.raw_input_contents and typed:
            found.append(
                FieldViolation("raw_input_contents", "must not be set when inputs[0].contents is set")
            )
        elif request.raw_input_contents and len(request.raw_input_contents) != 1:
            found.append(
                FieldViolation(
                    "raw_input_contents",
                    f"must hold one entry per input (1); got {len(request.raw_input_contents)}",
                )
            )
        elif not request.raw_input_contents and tensor.datatype in _INPUT_TYPES:
            expected = _INPUT_TYPES[tensor.datatype][1]
            if typed and typed != [expected]:
                found.append(
                    FieldViolation(
                        "inputs[0].contents", f"a {tensor.datatype} tensor must use {expected} only"
                    )
                )
    seen: set[str] = set()
    for i, wanted in enumerate(request.outputs):
        if wanted.name not in OUTPUTS:
            found.append(FieldViolation(f"outputs[{i}].name", f"must be one of {list(OUTPUTS)}"))
        elif wanted.name in seen:
            found.append(FieldViolation(f"outputs[{i}].name", f"{wanted.name!r} is requested twice"))
        seen.add(wanted.name)
    return found


def read_request(request: pb.ModelInferRequest, model: LoadedModel) -> InferInput:
    """The feature rows and wanted outputs of a ModelInfer request, or ``ValidationFailed``."""
    n_inputs = model.manifest.n_inputs
    violations = _header_violations(request, n_inputs)
    if violations:
        raise ValidationFailed(violations)
    tensor = request.inputs[0]
    batch = int(tensor.shape[0])
    dtype, typed_field = _INPUT_TYPES[tensor.datatype]
    count = batch * n_inputs
    if request.raw_input_contents:
        field = "raw_input_contents[0]"
        data = request.raw_input_contents[0]
        if len(data) != count * dtype.itemsize:
            raise ValidationFailed(
                [
                    FieldViolation(
                        field,
                        f"holds {len(data)} bytes; shape [{batch}, {n_inputs}] of {tensor.datatype} "
                        f"needs {count * dtype.itemsize}",
                    )
                ]
            )
        values = np.frombuffer(data, dtype=dtype)
    else:
        field = f"inputs[0].contents.{typed_field}"
        contents = getattr(tensor.contents, typed_field)
        if len(contents) != count:
            raise ValidationFailed(
                [
                    FieldViolation(
                        field, f"holds {len(contents)} values; shape [{batch}, {n_inputs}] needs {count}"
                    )
                ]
            )
        values = np.array(contents, dtype=dtype)
    rows = values.astype(np.float64).reshape(batch, n_inputs)
    _reject_out_of_range(rows, field, model)
    outputs = tuple(o.name for o in request.outputs) or OUTPUTS
    return InferInput(rows, outputs, bool(request.raw_input_contents))


def _reject_out_of_range(rows: npt.NDArray[np.float64], field: str, model: LoadedModel) -> None:
    """Refuse the request if any value is one the network cannot take.

    Checked where the model computes: in float32, before and after standardization
    (``Scorer.out_of_range``).
    """
    bad = model.scorer.out_of_range(rows)
    if not bad.any():
        return
    bad_rows = int(bad.any(axis=1).sum())
    metrics.ROWS_REJECTED.labels(reason="non_finite").inc(bad_rows)
    row, column = (int(i) for i in np.argwhere(bad)[0])
    name = model.manifest.features[column % len(model.manifest.features)]
    raise ValidationFailed(
        [
            FieldViolation(
                field,
                f"row {row}, column {column} ({name}) = {rows[row, column]} is out of range for the model "
                f"(NaN, ±Infinity, beyond FP32's range, or more than {MAX_STANDARD_DEVIATIONS:g} standard "
                f"deviations from its training mean); {bad_rows} row(s) hold such values",
            )
        ]
    )


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


def _tensor_metadata(
    name: str, datatype: str, shape: Sequence[int]
) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)


def _output_tensors(
    scored_probabilities: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int32],
    wanted: Sequence[str],
    raw: bool,
) -> tuple[list[pb.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """The requested outputs, typed or (when the request was raw) as raw little-endian bytes."""
    tensors: list[pb.ModelInferResponse.InferOutputTensor] = []
    raw_contents: list[bytes] = []
    shape = [len(scored_probabilities)]
    for name in wanted:
        if name == PROB_UP:
            tensor = pb.ModelInferResponse.InferOutputTensor(name=name, datatype="FP64", shape=shape)
            if raw:
                raw_contents.append(scored_probabilities.astype("<f8").tobytes())
            else:
                tensor.contents.fp64_contents.extend(scored_probabilities.tolist())
        else:
            tensor = pb.ModelInferResponse.InferOutputTensor(name=name, datatype="INT32", shape=shape)
            if raw:
                raw_contents.append(labels.astype("<i4").tobytes())
            else:
                tensor.contents.int_contents.extend(labels.tolist())
        tensors.append(tensor)
    return tensors, raw_contents


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol for the one model the holder serves."""

    def __init__(
        self, holder: ModelHolder, batcher: MicroBatcher, server_version: str, ready: Callable[[], bool]
    ) -> None:
        self._holder = holder
        self._batcher = batcher
        self._server_version = server_version
        self._ready = ready

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """Live whenever the process answers."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Ready when the service is and a model is loaded."""
        return pb.ServerReadyResponse(ready=self._holder.current is not None and self._ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Ready for the served model at its served version (or no version); a refused one never is."""
        model = self._holder.current
        ready = (
            model is not None
            and request.name == self._holder.name
            and request.version in ("", model.version)
            and request.version not in self._holder.refused
        )
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """The server's name and version; it implements no protocol extensions."""
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._server_version, extensions=[])

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """The served model's versions and tensors."""
        model = await self._resolve(request.name, request.version, "name", "version", context)
        versions = await asyncio.to_thread(self._holder.registry.versions, self._holder.name)
        refused = set(self._holder.refused)
        return pb.ModelMetadataResponse(
            name=self._holder.name,
            versions=[v for v in versions if v not in refused],
            platform=PLATFORM,
            inputs=[_tensor_metadata(INPUT, "FP32", [-1, model.manifest.n_inputs])],
            outputs=[_tensor_metadata(PROB_UP, "FP64", [-1]), _tensor_metadata(LABEL, "INT32", [-1])],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """Validate, score through the micro-batcher, and answer in the request's content style."""
        model = await self._resolve(
            request.model_name, request.model_version, "model_name", "model_version", context
        )
        try:
            wanted = read_request(request, model)
        except ValidationFailed as exc:
            await abort_invalid(context, exc.violations)
        try:
            scored = await self._batcher.score(wanted.rows)
        except NoModel:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, NO_MODEL)
        except ValueError:  # a reload to a model of another width since the request was read
            await _abort(context, grpc.StatusCode.ABORTED, "the served model changed during the call; retry")
        if request.model_version and scored.version != request.model_version:
            await _abort(
                context,
                grpc.StatusCode.ABORTED,
                f"model {self._holder.name} was reloaded to {scored.version} during the call; retry",
            )
        outputs, raw = _output_tensors(scored.probabilities, scored.labels, wanted.outputs, wanted.raw)
        return pb.ModelInferResponse(
            model_name=self._holder.name,
            model_version=scored.version,
            id=request.id,
            outputs=outputs,
            raw_output_contents=raw,
        )

    async def _resolve(
        self, name: str, version: str, name_field: str, version_field: str, context: grpc.aio.ServicerContext
    ) -> LoadedModel:
        """The served model if the request names it (and its version, when one is given)."""
        if not name:
            await abort_invalid(context, [FieldViolation(name_field, "is required")])
        if name != self._holder.name:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"{name_field}: unknown model {name!r}; this server serves {self._holder.name!r}",
            )
        model = self._holder.current
        if model is None:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, NO_MODEL)
        if version and version != model.version:
            why = self._holder.refused.get(version)
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"{version_field}: model {name} has no servable version {version!r} "
                f"({why if why else 'serving ' + model.version})",
            )
        return model
