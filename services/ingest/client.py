"""A resumable StreamTicks client.

Batches carry a source id and sequence; unacknowledged batches are re-sent after a reconnect, and
the server's deduplication makes the re-send harmless.

Used by ``mt5mesh send-ticks``, the tests and the benchmarks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterable, Sequence

import grpc
from mt5.ingest.v1 import ingest_service_pb2 as pb
from mt5.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from mt5.market.v1 import market_pb2

from services.common.channels import api_key_metadata

logger = logging.getLogger(__name__)

# Codes after which re-sending is safe (the server deduplicates) and may succeed. INTERNAL is in:
# grpc.aio reports a send on a connection that broke mid-stream (server killed) as INTERNAL
# "Failed execute_batch"; consecutive failed reconnects are bounded, so a server bug still surfaces.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
    }
)


@dataclasses.dataclass(slots=True)
class StreamReport:
    """What a streaming session achieved."""

    batches_acked: int = 0
    ticks_stored: int = 0
    ticks_duplicate: int = 0
    batches_replayed: int = 0
    reconnects: int = 0


class TickStreamer:
    """Streams tick batches with at-least-once sending and exactly-once effect."""

    def __init__(
        self,
        target: str,
        api_key: str,
        source_id: str,
        *,
        window: int = 8,
        max_reconnects: int = 20,
        backoff_seconds: float = 0.2,
    ) -> None:
        self._target = target
        self._metadata = api_key_metadata(api_key)
        self._source_id = source_id
        self._window = window
        self._max_reconnects = max_reconnects
        self._backoff = backoff_seconds

    async def send(
        self, batches: Iterable[Sequence[market_pb2.Tick]], first_sequence: int = 1
    ) -> StreamReport:
        """Send every batch and return once all are acknowledged."""
        report = StreamReport()
        source = iter(batches)
        unacked: collections.OrderedDict[int, pb.StreamTicksRequest] = collections.OrderedDict()
        next_sequence = first_sequence
        exhausted = False
        current = [0]  # the number of the call in progress (a cell: request generators read it)
        failures = 0  # consecutive: reset by any acknowledgement
        while True:
            current[0] += 1
            # One event per call: a request generator left over from a broken call must never wake
            # up, take the next batch and write it to the dead call (it would arrive only at the
            # next reconnect, out of order).
            window_open = asyncio.Event()
            window_open.set()

            async def requests(
                mine: int = current[0], window_open: asyncio.Event = window_open
            ) -> AsyncIterator[pb.StreamTicksRequest]:
                nonlocal next_sequence, exhausted
                for request in list(unacked.values()):  # re-send what was never acknowledged
                    yield request
                while not exhausted:
                    while len(unacked) >= self._window:
                        window_open.clear()
                        await window_open.wait()
                    if mine != current[0]:
                        return
                    ticks = next(source, None)
                    if ticks is None:
                        exhausted = True
                        break
                    request = pb.StreamTicksRequest(
                        source_id=self._source_id, sequence=next_sequence, ticks=ticks
                    )
                    unacked[next_sequence] = request
                    next_sequence += 1
                    yield request

            try:
                async with grpc.aio.insecure_channel(self._target) as channel:
                    call = pb_grpc.IngestServiceStub(channel).StreamTicks(requests(), metadata=self._metadata)
                    async for ack in call:
                        unacked.pop(ack.sequence, None)
                        failures = 0
                        window_open.set()
                        report.batches_acked += 1
                        report.ticks_stored += ack.stored
                        report.ticks_duplicate += ack.duplicates
                        report.batches_replayed += int(ack.replayed)
                if exhausted and not unacked:
                    return report
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or failures >= self._max_reconnects:
                    raise
                failures += 1
                report.reconnects += 1
                logger.warning(
                    "stream broke (%s); re-sending %d unacknowledged batches", exc.code().name, len(unacked)
                )
                await asyncio.sleep(min(self._backoff * 2 ** min(failures, 6), 5.0))
