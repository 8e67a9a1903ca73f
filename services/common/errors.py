"""Errors as google.rpc.Status: bad input carries google.rpc.BadRequest field violations.

Envoy's ``convert_grpc_status`` turns these into an HTTP 400 JSON body listing the violations.
The status travels in trailers (``grpc-message`` and ``grpc-status-details-bin``), which HTTP/2
and gRPC clients bound (8 KiB soft limit by default): a request with 100,000 bad items, or one
echoing a 20 KB value, must still get its 400 rather than a reset stream. So at most
``MAX_VIOLATIONS`` violations are listed, then one saying how many more there were; every text is
clipped, and the whole stays within ``DETAILS_BUDGET`` bytes (``MESSAGE_BUDGET`` for the message).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common import protoconv
from services.common.validation import FieldViolation, ValidationFailed

MAX_VIOLATIONS = 100  # listed in the details; the rest are counted
MAX_FIELD_CHARS = 120
MAX_DESCRIPTION_CHARS = 240
DETAILS_BUDGET = 3_000  # bytes of the serialized BadRequest (4 KB once base64-encoded)
MESSAGE_BUDGET = 512  # UTF-8 bytes of the message (at most 1.5 KB once percent-encoded)
_MORE_FIELD = "*"  # the field of the closing "and N more" entry: it stands for any field


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis showing that it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clip_bytes(text: str, limit: int) -> str:
    """``text`` cut so that its UTF-8 encoding is at most ``limit`` bytes."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "…"


def reported_violations(violations: Sequence[FieldViolation]) -> list[FieldViolation]:
    """The violations as reported: clipped, the first ones that fit the budget, then how many more."""
    shown: list[FieldViolation] = []
    size = 0
    for v in violations[:MAX_VIOLATIONS]:
        clipped = FieldViolation(clip(v.field, MAX_FIELD_CHARS), clip(v.description, MAX_DESCRIPTION_CHARS))
        # Serialized: two length-prefixed strings inside a length-prefixed entry, 9 bytes at most.
        entry = len(clipped.field.encode("utf-8", "surrogatepass"))
        entry += len(clipped.description.encode("utf-8", "surrogatepass")) + 9
        if size + entry > DETAILS_BUDGET - 64:  # room left for the closing entry
            break
        shown.append(clipped)
        size += entry
    more = len(violations) - len(shown)
    if more:
        shown.append(FieldViolation(_MORE_FIELD, f"and {more} more violation{'s' if more > 1 else ''}"))
    return shown


def bad_request_status(message: str, violations: Sequence[FieldViolation]) -> status_pb2.Status:
    """Build an INVALID_ARGUMENT status whose details list the field violations (bounded)."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in reported_violations(violations)
            ]
        )
    )
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message=_clip_bytes(message, MESSAGE_BUDGET), details=[detail]
    )


def summarize(violations: Sequence[FieldViolation], limit: int = 5) -> str:
    """A one-line message naming the first violations, for clients that only read the message."""
    shown = "; ".join(
        f"{clip(v.field, MAX_FIELD_CHARS)}: {clip(v.description, 80)}" for v in violations[:limit]
    )
    more = len(violations) - limit
    return _clip_bytes(shown + (f"; and {more} more" if more > 0 else ""), MESSAGE_BUDGET)


async def abort_invalid(context: grpc.aio.ServicerContext, violations: Sequence[FieldViolation]) -> NoReturn:
    """Fail the call with INVALID_ARGUMENT and a BadRequest naming the bad fields (bounded)."""
    status = bad_request_status(summarize(violations), violations)
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")  # pragma: no cover - abort always raises


async def abort_if_any(context: grpc.aio.ServicerContext, violations: Sequence[FieldViolation]) -> None:
    """``abort_invalid`` when there are violations; nothing otherwise."""
    if violations:
        await abort_invalid(context, violations)


# --- the guard every service's handlers run behind --------------------------------------------


class _Undecodable:
    """What the guarded deserializer gives for request bytes that do not parse."""

    __slots__ = ("data", "message_type")

    def __init__(self, data: bytes, message_type: Any) -> None:
        self.data = data
        self.message_type = message_type


class BoundedContext:
    """A servicer context whose status messages are clipped to ``MESSAGE_BUDGET`` bytes.

    A message travels in the grpc-message trailer; one that echoes a 20 KB model name (say)
    would exceed the client's metadata limit and the call would be reset instead of answered.
    Everything else is the wrapped context's.
    """

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", *args: Any, **kwargs: Any) -> NoReturn:
        """The wrapped context's ``abort``, with ``details`` clipped."""
        await self._context.abort(code, _clip_bytes(details, MESSAGE_BUDGET), *args, **kwargs)
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises

    def set_details(self, details: str) -> None:
        """The wrapped context's ``set_details``, clipped."""
        self._context.set_details(_clip_bytes(details, MESSAGE_BUDGET))


class RequestDoesNotParse(ValidationFailed):
    """A message of a client stream does not parse; names the damaged field.

    Raised into the servicer where it reads the stream, not aborted there: the reader may run in a
    task of its own while the answers are written, and the status is sent once, by the servicer
    (which handles ValidationFailed) or else by the guard when the exception reaches it.
    """


def _damage(request: _Undecodable) -> FieldViolation:
    return protoconv.damaged_field(getattr(request.message_type, "DESCRIPTOR", None), request.data)


async def _refuse(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
    await abort_invalid(context, [_damage(request)])


def _guarded(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError: bad wire format, or invalid UTF-8 in a string field
            return _Undecodable(data, getattr(deserializer, "__self__", None))

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise RequestDoesNotParse([_damage(request)])
        yield request


async def _outcome(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def _answers(result: Any) -> AsyncIterator[Any]:
    if inspect.isasyncgen(result):
        async for answer in result:
            yield answer
    else:  # a coroutine that writes with context.write()
        await _outcome(result)


def guarded_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` behind the guard: undecodable requests refused, status messages bounded.

    grpc deserializes before the servicer runs, and a DecodeError there is answered UNKNOWN (HTTP
    500 through Envoy). Here the deserializer hands the wrapper a marker instead, which aborts the
    call INVALID_ARGUMENT naming the damaged field; in a client stream the first message that does
    not parse raises ``RequestDoesNotParse`` where the servicer reads it.
    The servicer gets a ``BoundedContext``.
    """
    codecs = {
        "request_deserializer": _guarded(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            return await _outcome(unary(request, BoundedContext(context)))

        return grpc.unary_unary_rpc_method_handler(unary_unary, **codecs)
    if handler.stream_unary:
        stream = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                return await _outcome(stream(_checked(requests), BoundedContext(context)))
            except RequestDoesNotParse as exc:
                await abort_invalid(context, exc.violations)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **codecs)
    if handler.unary_stream:
        unary_stream = handler.unary_stream

        async def unary_streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            async for answer in _answers(unary_stream(request, BoundedContext(context))):
                yield answer

        return grpc.unary_stream_rpc_method_handler(unary_streamed, **codecs)
    stream_stream = handler.stream_stream

    async def stream_streamed(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        try:
            async for answer in _answers(stream_stream(_checked(requests), BoundedContext(context))):
                yield answer
        except RequestDoesNotParse as exc:
            await abort_invalid(context, exc.violations)

    return grpc.stream_stream_rpc_method_handler(stream_streamed, **codecs)


class RequestGuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Puts every method behind ``guarded_handler``.

    Innermost (last) of the interceptors, so the handlers the others build from its answer (the
    API key's denying handler) share its deserializer: a request without the right key is
    refused UNAUTHENTICATED whether or not it parses.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's handler, guarded (None, for an unknown method, stays None)."""
        handler = await continuation(handler_call_details)
        return None if handler is None else guarded_handler(handler)
