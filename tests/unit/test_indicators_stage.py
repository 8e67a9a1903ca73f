"""The indicators stage retrying its reads from the aggregator (the warm-up waits for a restarted one)."""

from __future__ import annotations

import grpc
import pytest

from services.indicators.stage import call_retrying


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="from the fake")


class FlakyCall:
    """Fails with the given codes, one per call, then answers."""

    def __init__(self, *codes: grpc.StatusCode) -> None:
        self.codes = list(codes)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.codes:
            raise rpc_error(self.codes.pop(0))
        return "bars"


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def test_call_retrying_aggregator_away_backs_off_up_to_the_cap_then_answers() -> None:
    call = FlakyCall(*[grpc.StatusCode.UNAVAILABLE] * 8, grpc.StatusCode.DEADLINE_EXCEEDED)
    sleeps = Sleeps()
    assert await call_retrying(call, "warm-up", sleep=sleeps) == "bars"
    assert call.calls == 10
    assert sleeps.delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED],
)
async def test_call_retrying_error_retrying_cannot_fix_is_raised_at_once(code: grpc.StatusCode) -> None:
    call = FlakyCall(code)
    sleeps = Sleeps()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_retrying(call, "warm-up", sleep=sleeps)
    assert info.value.code() == code
    assert (call.calls, sleeps.delays) == (1, [])
