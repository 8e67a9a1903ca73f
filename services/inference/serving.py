"""The served model: hot reload from the registry, and dynamic micro-batching of scoring requests.

``ModelHolder`` watches the registry and swaps in a newer version once it has been verified and
warmed up; a version that is refused (tampered, pickled, malformed) is logged, counted and never
served, and the holder keeps (or falls back to) the newest version that loads. ``MicroBatcher``
gathers rows from every caller — the signal stage across symbols, ``Predict``, ``PredictStream``
and the Open Inference Protocol — into one forward pass, up to a maximum batch size or a maximum
wait after the first row, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import pathlib
import time

import numpy as np
import numpy.typing as npt

from services.inference import metrics
from services.inference.registry import LoadedModel, ModelRefused, ModelRegistry

logger = logging.getLogger(__name__)

NO_MODEL = "no model: run mt5mesh train"


class NoModel(Exception):
    """No verified model version is loaded yet."""

    def __init__(self) -> None:
        super().__init__(NO_MODEL)


def _signature(folder: pathlib.Path) -> tuple[tuple[str, int, int], ...]:
    """What a version folder holds now; a refused version is retried only when this changes."""
    with contextlib.suppress(OSError):
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))
    return ()


class ModelHolder:
    """The model version being served, reloaded without a restart when a newer one appears."""

    def __init__(self, registry: ModelRegistry, name: str) -> None:
        self.registry = registry
        self.name = name
        self.current: LoadedModel | None = None
        self.refused: dict[str, str] = {}  # version → why it cannot be served
        self._refused_at: dict[str, tuple[tuple[str, int, int], ...]] = {}
        self._loaded = asyncio.Event()

    def require(self) -> LoadedModel:
        """The served model, or ``NoModel``."""
        if self.current is None:
            raise NoModel
        return self.current

    async def wait_loaded(self) -> LoadedModel:
        """Wait until some version is served, then return the current one."""
        await self._loaded.wait()
        return self.require()

    def find(self) -> LoadedModel | None:
        """The newest loadable version if it is not the one served (blocking: run in a thread).

        Versions newer than the served one are tried newest first; each refusal is recorded once
        per content of its folder, so a fixed file is picked up and a bad one is not re-read.
        """
        served = self.current.version if self.current is not None else None
        for version in reversed(self.registry.versions(self.name)):
            if version == served:
                return None
            signature = _signature(self.registry.root / self.name / version)
            if self._refused_at.get(version) == signature:
                continue
            try:
                return self.registry.load(self.name, version)
            except ModelRefused as exc:
                self.refused[version] = str(exc)
                self._refused_at[version] = signature
                metrics.MODELS_REFUSED.inc()
                logger.error("%s", exc)
        return None

    def install(self, model: LoadedModel) -> None:
        """Serve ``model`` from now on."""
        previous = self.current
        self.current = model
        self.refused.pop(model.version, None)
        metrics.set_model(self.name, model.version, previous.version if previous else None)
        logger.info(
            "serving model %s %s (threshold %.4f)", self.name, model.version, model.manifest.threshold
        )
        self._loaded.set()

    async def watch(self, interval: float) -> None:
        """Check the registry every ``interval`` seconds, forever."""
        while True:
            model = await asyncio.to_thread(self.find)
            if model is not None:
                self.install(model)
            await asyncio.sleep(interval)


@dataclasses.dataclass(frozen=True, slots=True)
class Scored:
    """Scores of one request's rows, and the version that produced them."""

    probabilities: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int32]
    version: str


@dataclasses.dataclass(slots=True)
class _Request:
    rows: npt.NDArray[np.float64]
    future: asyncio.Future[Scored]
    queued_at: float


class MicroBatcher:
    """Scores rows from many callers together: forward passes of at most ``max_batch`` rows."""

    def __init__(self, holder: ModelHolder, max_batch: int, max_wait_seconds: float, max_queue: int) -> None:
        self._holder = holder
        self.max_batch = max_batch
        self.max_wait = max_wait_seconds
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(max_queue)

    async def submit(
        self, rows: npt.NDArray[np.float64], since: float | None = None
    ) -> asyncio.Future[Scored]:
        """Queue finite rows of the served model's width (waits while the queue is full).

        ``since`` (event-loop time) is when the rows started waiting, if before now: a caller that
        gathered them itself (the signal stage) has already spent part of the wait.
        """
        model = self._holder.require()
        if rows.ndim != 2 or rows.shape[1] != model.manifest.n_inputs:
            raise ValueError(f"rows must have {model.manifest.n_inputs} values each")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Scored] = loop.create_future()
        await self._queue.put(_Request(rows, future, loop.time() if since is None else since))
        return future

    async def score(self, rows: npt.NDArray[np.float64]) -> Scored:
        """Score rows and wait for the result."""
        return await (await self.submit(rows))

    async def run(self) -> None:
        """Form and score batches, forever.

        A batch closes at ``max_batch`` rows or ``max_wait`` after its first row began waiting,
        whichever comes first.
        """
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].rows)
            deadline = batch[0].queued_at + self.max_wait
            while size < self.max_batch:
                try:
                    request = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        request = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                batch.append(request)
                size += len(request.rows)
            self._score(batch, loop.time())

    def _score(self, batch: list[_Request], now: float) -> None:
        live = [r for r in batch if not r.future.done()]  # a caller that went away
        if not live:
            return
        model = self._holder.current
        if model is None:  # cannot happen once a model was served; fail the callers, not the loop
            for request in live:
                request.future.set_exception(NoModel())
            return
        rows = live[0].rows if len(live) == 1 else np.concatenate([r.rows for r in live])
        try:
            probabilities = np.concatenate(
                [
                    self._forward(model, rows[i : i + self.max_batch])
                    for i in range(0, len(rows), self.max_batch)
                ]
            )
        except Exception as exc:  # a broken model fails this batch's callers, not the service
            logger.exception("scoring failed")
            for request in live:
                request.future.set_exception(exc)
            return
        labels = model.scorer.labels(probabilities)
        start = 0
        for request in live:
            end = start + len(request.rows)
            metrics.QUEUE_SECONDS.observe(max(0.0, now - request.queued_at))
            request.future.set_result(Scored(probabilities[start:end], labels[start:end], model.version))
            start = end

    @staticmethod
    def _forward(model: LoadedModel, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """One forward pass, measured."""
        started = time.perf_counter()
        probabilities = model.scorer.probabilities(rows)
        metrics.BATCH_ROWS.observe(len(rows))
        metrics.SCORE_SECONDS.observe(time.perf_counter() - started)
        return probabilities
