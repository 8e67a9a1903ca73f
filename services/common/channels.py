"""Outgoing gRPC channels: every call carries the API key, and unary calls a default deadline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from services.common import telemetry
from services.common.auth import API_KEY_METADATA

DEFAULT_UNARY_DEADLINE_SECONDS = 5.0


class _CallDefaults:
    """Adds the API key to every call, and a deadline to unary calls that have none.

    Streams are long-lived by design (subscriptions follow a feed for hours), so they get no
    default deadline; their liveness comes from keepalive pings and the peer's health.
    """

    def __init__(self, api_key: str, unary_deadline: float) -> None:
        self._metadata = ((API_KEY_METADATA, api_key),)
        self._unary_deadline = unary_deadline

    def details(self, details: grpc.aio.ClientCallDetails, unary: bool) -> grpc.aio.ClientCallDetails:
        """The call's details with the key added and, for unary calls, a default deadline."""
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        timeout = details.timeout
        if unary and timeout is None:
            timeout = self._unary_deadline
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under exactly one call kind (the first base class it matches),
# so each kind needs its own interceptor object.
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        """Unary call: key and default deadline."""
        return await continuation(self._defaults.details(details, unary=True), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        """Server stream: key only."""
        return await continuation(self._defaults.details(details, unary=False), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        """Client stream: key and default deadline (one answer is awaited)."""
        return await continuation(self._defaults.details(details, unary=True), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        """Bidirectional stream: key only."""
        return await continuation(self._defaults.details(details, unary=False), requests)


def api_key_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the API key, for channels opened without ``open_channel``."""
    return ((API_KEY_METADATA, api_key),)


def open_channel(
    address: str,
    api_key: str,
    *,
    tracing: bool = False,
    max_message_bytes: int = 8 << 20,
    unary_deadline: float = DEFAULT_UNARY_DEADLINE_SECONDS,
) -> grpc.aio.Channel:
    """Open an insecure loopback/cluster channel to a mesh service."""
    defaults = _CallDefaults(api_key, unary_deadline)
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
        ],
        interceptors=[
            *telemetry.client_interceptors(tracing),
            *(kind(defaults) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)),
        ],
    )
