"""API-key authentication for every gRPC method except health checks and reflection."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

API_KEY_METADATA = "x-api-key"

# Health and reflection must answer probes and tools that carry no key.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def key_matches(provided: str | bytes | None, keys: Iterable[bytes]) -> bool:
    """Compare the provided key with every configured key in constant time."""
    if provided is None:
        return False
    candidate = provided.encode() if isinstance(provided, str) else provided
    matched = False
    for key in keys:
        # No early exit: the time taken does not reveal which key, if any, matched.
        matched |= hmac.compare_digest(candidate, key)
    return matched


def _denying_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that fails every call with UNAUTHENTICATED."""

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator; abort always raises

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny_unary, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **codecs)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **codecs)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Rejects calls whose ``x-api-key`` metadata matches none of the configured keys."""

    def __init__(self, keys: Iterable[str], open_methods: Iterable[str] = ()) -> None:
        self._keys = tuple(k.encode() for k in keys)
        if not self._keys:
            raise ValueError("ApiKeyInterceptor needs at least one key")
        self._open_methods = frozenset(open_methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass authorised and open calls through; swap in a denying handler for the rest."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in self._open_methods or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        provided = next(
            (v for k, v in handler_call_details.invocation_metadata or () if k == API_KEY_METADATA), None
        )
        if key_matches(provided, self._keys):
            return handler
        reason = "missing x-api-key" if provided is None else "invalid x-api-key"
        return _denying_handler(handler, reason)
