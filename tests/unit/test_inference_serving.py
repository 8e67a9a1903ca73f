"""The registry's checks, hot reload and micro-batching, on real models and real torch."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from services.inference.registry import ModelRefused, ModelRegistry, sha256_of
from services.inference.serving import MicroBatcher, ModelHolder, NoModel
from tests.inference_models import save_model, served


def _rows(n: int, width: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n, width)) * 1e-3 + 1.08


def _rewrite_manifest(folder: pathlib.Path, **changes: object) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


class _Evil:
    """A pickle that would run a command when unpickled by a plain pickle.load."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_registry_saved_version_loads_with_matching_sha256(tmp_path: pathlib.Path) -> None:
    manifest = save_model(tmp_path)
    folder = tmp_path / "signals" / "v0001"
    assert manifest.version == "v0001"
    assert manifest.weights_sha256 == sha256_of(folder / "weights.safetensors")
    assert json.loads((folder / "manifest.json").read_text())["torch_version"] == torch.__version__
    loaded = ModelRegistry(tmp_path).load("signals", "v0001")
    assert loaded.manifest == manifest
    assert save_model(tmp_path).version == "v0002"


def test_registry_tampered_weights_are_refused_naming_the_sha256(tmp_path: pathlib.Path) -> None:
    save_model(tmp_path)
    weights = tmp_path / "signals" / "v0001" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(
        ModelRefused, match=r"sha256 of weights.safetensors is [0-9a-f]{64}, the manifest says"
    ):
        ModelRegistry(tmp_path).load("signals", "v0001")


def test_registry_pickle_carrying_code_is_refused_and_never_run(tmp_path: pathlib.Path) -> None:
    save_model(tmp_path)
    folder = tmp_path / "signals" / "v0001"
    marker = tmp_path / "code-ran"
    (folder / "weights.pt").write_bytes(pickle.dumps(_Evil(marker)))
    # Even with a manifest that vouches for the file, the restricted unpickler refuses it.
    _rewrite_manifest(folder, weights_file="weights.pt", weights_sha256=sha256_of(folder / "weights.pt"))
    with pytest.raises(ModelRefused, match="not a plain state_dict"):
        ModelRegistry(tmp_path).load("signals", "v0001")
    assert not marker.exists()


def test_registry_pickle_renamed_safetensors_is_refused(tmp_path: pathlib.Path) -> None:
    save_model(tmp_path)
    folder = tmp_path / "signals" / "v0001"
    marker = tmp_path / "code-ran"
    (folder / "weights.safetensors").write_bytes(pickle.dumps(_Evil(marker)))
    _rewrite_manifest(folder, weights_sha256=sha256_of(folder / "weights.safetensors"))
    with pytest.raises(ModelRefused, match="not a valid safetensors file"):
        ModelRegistry(tmp_path).load("signals", "v0001")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"window": "3"}, "'window'"),
        ({"threshold": 1.5}, "'threshold'"),
        ({"timeframe": "M2"}, "'timeframe'"),
        ({"features": ["close"]}, "'features'"),
        ({"weights_file": "../../etc/passwd"}, "'weights_file'"),
        ({"hidden": [4]}, "do not fit the manifest's network"),
    ],
)
def test_registry_bad_manifest_field_is_refused_naming_it(
    tmp_path: pathlib.Path, changes: dict[str, object], named: str
) -> None:
    save_model(tmp_path)
    _rewrite_manifest(tmp_path / "signals" / "v0001", **changes)
    with pytest.raises(ModelRefused, match=named):
        ModelRegistry(tmp_path).load("signals", "v0001")


async def test_holder_newer_version_is_picked_up_and_bad_one_skipped(tmp_path: pathlib.Path) -> None:
    holder = ModelHolder(ModelRegistry(tmp_path), "signals")
    assert holder.find() is None
    with pytest.raises(NoModel, match="no model: run mt5mesh train"):
        holder.require()
    save_model(tmp_path)
    first = holder.find()
    assert first is not None
    holder.install(first)
    assert holder.find() is None  # nothing newer
    save_model(tmp_path, seed=1)
    bad = tmp_path / "signals" / "v0002" / "weights.safetensors"
    bad.write_bytes(b"not weights")
    assert holder.find() is None  # v0002 refused, v0001 is already served
    assert "v0002" in holder.refused
    assert "sha256" in holder.refused["v0002"]
    assert holder.require().version == "v0001"
    save_model(tmp_path, seed=2)
    newest = holder.find()
    assert newest is not None
    assert newest.version == "v0003"
    holder.install(newest)
    assert holder.require().version == "v0003"


async def test_holder_only_tampered_version_serves_nothing(tmp_path: pathlib.Path) -> None:
    save_model(tmp_path)
    (tmp_path / "signals" / "v0001" / "weights.safetensors").write_bytes(b"tampered")
    holder = ModelHolder(ModelRegistry(tmp_path), "signals")
    assert holder.find() is None
    assert holder.current is None
    assert "v0001" in holder.refused


async def test_batcher_batched_scores_equal_one_row_at_a_time(tmp_path: pathlib.Path) -> None:
    holder, model = served(tmp_path, window=3)
    width = model.manifest.n_inputs
    rows = _rows(300, width)
    batcher = MicroBatcher(holder, max_batch=128, max_wait_seconds=0.05, max_queue=1000)
    runner = asyncio.create_task(batcher.run())
    try:
        futures = [await batcher.submit(rows[i : i + 1]) for i in range(len(rows))]
        batched = [await f for f in futures]
    finally:
        runner.cancel()
    single = [model.scorer.probabilities(rows[i : i + 1])[0] for i in range(len(rows))]
    got = np.array([s.probabilities[0] for s in batched])
    # float32 matrix products may round differently by batch size: equal to float32 precision.
    np.testing.assert_allclose(got, single, rtol=0, atol=1e-6)
    assert {s.version for s in batched} == {"v0001"}
    away = np.abs(got - model.manifest.threshold) > 1e-6
    assert np.array_equal(
        np.array([s.labels[0] for s in batched])[away], model.scorer.labels(np.array(single))[away]
    )


async def test_batcher_rows_of_wrong_width_are_refused(tmp_path: pathlib.Path) -> None:
    holder, model = served(tmp_path)
    batcher = MicroBatcher(holder, max_batch=8, max_wait_seconds=0.001, max_queue=8)
    with pytest.raises(ValueError, match=f"{model.manifest.n_inputs} values"):
        await batcher.submit(np.zeros((1, 5)))


async def test_batcher_forms_batches_no_larger_than_max_batch(tmp_path: pathlib.Path) -> None:
    from services.inference import metrics

    holder, model = served(tmp_path)
    before = next(iter(metrics.BATCH_ROWS.collect())).samples
    count_before = next(s.value for s in before if s.name.endswith("_count"))
    batcher = MicroBatcher(holder, max_batch=32, max_wait_seconds=0.05, max_queue=1000)
    runner = asyncio.create_task(batcher.run())
    try:
        futures = [await batcher.submit(_rows(1, model.manifest.n_inputs, i)) for i in range(100)]
        await asyncio.gather(*futures)
    finally:
        runner.cancel()
    after = next(iter(metrics.BATCH_ROWS.collect())).samples
    batches = next(s.value for s in after if s.name.endswith("_count")) - count_before
    assert batches == 4  # 32 + 32 + 32 + 4: queued together, scored in full batches


async def test_batcher_request_larger_than_max_batch_scored_in_passes_of_max_batch(
    tmp_path: pathlib.Path,
) -> None:
    holder, model = served(tmp_path)
    rows = _rows(100, model.manifest.n_inputs)
    count_before = REGISTRY.get_sample_value("mt5_inference_batch_size_count") or 0.0
    batcher = MicroBatcher(holder, max_batch=32, max_wait_seconds=0.001, max_queue=10)
    runner = asyncio.create_task(batcher.run())
    try:
        scored = await batcher.score(rows)
    finally:
        runner.cancel()
    after = REGISTRY.get_sample_value("mt5_inference_batch_size_count") or 0.0
    assert after - count_before == 4  # 32 + 32 + 32 + 4
    np.testing.assert_allclose(scored.probabilities, model.scorer.probabilities(rows), rtol=0, atol=1e-6)


async def test_batcher_rows_waiting_since_earlier_are_not_held_a_full_wait_again(
    tmp_path: pathlib.Path,
) -> None:
    holder, model = served(tmp_path)
    # A wait of 30 s: rows that began waiting 30 s ago are scored at once, fresh ones are not.
    batcher = MicroBatcher(holder, max_batch=512, max_wait_seconds=30.0, max_queue=10)
    runner = asyncio.create_task(batcher.run())
    loop = asyncio.get_running_loop()
    try:
        earlier = await batcher.submit(_rows(3, model.manifest.n_inputs), since=loop.time() - 30.0)
        scored = await asyncio.wait_for(earlier, 5)
        fresh = await batcher.submit(_rows(3, model.manifest.n_inputs))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fresh), 0.2)
    finally:
        runner.cancel()
    assert len(scored.probabilities) == 3
