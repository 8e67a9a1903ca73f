"""What ComputeIndicator answers when the aggregator failed the read of its bars."""

from __future__ import annotations

import grpc
import pytest

from services.indicators.convert import upstream_failure


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ],
)
def test_upstream_failure_about_the_request_passes_through_with_its_message(code: grpc.StatusCode) -> None:
    assert upstream_failure(code, "to: must be after from") == (code, "to: must be after from")


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAUTHENTICATED,
    ],
)
def test_upstream_failure_of_the_aggregator_itself_is_unavailable_without_its_message(
    code: grpc.StatusCode,
) -> None:
    answer, message = upstream_failure(code, "Exception calling application: connection refused")
    assert answer == grpc.StatusCode.UNAVAILABLE
    assert code.name in message
    assert "connection refused" not in message
