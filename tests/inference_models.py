"""Real (untrained, seeded) models in a real registry, for tests of the serving side."""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from services.inference.features import FEATURES
from services.inference.model import SignalNet
from services.inference.registry import LoadedModel, Manifest, ModelRegistry
from services.inference.serving import ModelHolder


def save_model(
    root: pathlib.Path,
    *,
    name: str = "signals",
    window: int = 3,
    timeframe: str = "M1",
    seed: int = 0,
    threshold: float = 0.5,
) -> Manifest:
    """A SignalNet with seeded random weights, standardized for prices near 1.08, saved as a new version."""
    torch.manual_seed(seed)
    n_inputs = window * len(FEATURES)
    net = SignalNet(n_inputs, (16, 8))
    # Scales of the synthetic market (price ~1.08, volume ~1, indicators small): outputs spread out.
    per_feature = np.array([1.08, 1.0, 1e-4, 50.0, 0.0, 0.0, 0.0, 1e-4, 1.08, 0.0])
    spread = np.array([1e-3, 1.0, 1e-4, 15.0, 1e-4, 1e-4, 1e-4, 1e-4, 1e-3, 1e-4])
    net.set_standardization(np.tile(per_feature, window), np.tile(spread, window))
    manifest = Manifest(
        name=name,
        version="",
        created="",
        timeframe=timeframe,
        symbols=("EURUSD",),
        data_from="2025-01-01T00:00:00+00:00",
        data_to="2025-01-02T00:00:00+00:00",
        features=FEATURES,
        window=window,
        horizon=5,
        threshold=threshold,
        hidden=(16, 8),
        seed=seed,
        metrics={"model": {"accuracy": 0.5, "f1": 0.5, "log_loss": 0.69}},
        weights_file="",
        weights_sha256="",
        torch_version="",
    )
    return ModelRegistry(root).save(net, manifest)


def served(root: pathlib.Path, *, window: int = 3) -> tuple[ModelHolder, LoadedModel]:
    """A holder serving a freshly saved model of ``window`` candles, loaded as the service loads it."""
    save_model(root, window=window)
    holder = ModelHolder(ModelRegistry(root), "signals")
    model = holder.find()
    assert model is not None, holder.refused
    holder.install(model)
    return holder, model
