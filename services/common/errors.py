"""Errors as google.rpc.Status: bad input carries google.rpc.BadRequest field violations.

Envoy's ``convert_grpc_status`` turns these into an HTTP 400 JSON body listing every violation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.validation import FieldViolation


def bad_request_status(message: str, violations: Sequence[FieldViolation]) -> status_pb2.Status:
    """Build an INVALID_ARGUMENT status whose details list the field violations."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in violations
            ]
        )
    )
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])


def summarize(violations: Sequence[FieldViolation], limit: int = 5) -> str:
    """A one-line message naming the first violations, for clients that only read the message."""
    shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:limit])
    more = len(violations) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


async def abort_invalid(context: grpc.aio.ServicerContext, violations: Sequence[FieldViolation]) -> NoReturn:
    """Fail the call with INVALID_ARGUMENT and a BadRequest naming every bad field."""
    status = bad_request_status(summarize(violations), violations)
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")  # pragma: no cover - abort always raises
