"""The signal network and a loaded, ready-to-score model (the torch adapter).

The network carries its standardization (mean and scale fitted on the training split) as buffers,
so the weights file alone turns raw feature rows into probabilities and nothing else has to be
kept in step with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from services.inference.domain import MAX_STANDARD_DEVIATIONS


class SignalNet(nn.Module):
    """Standardize, then a small MLP; one logit per row (up over the horizon)."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, n_inputs: int, hidden: Sequence[int] = (64, 32), dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_inputs, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(n_inputs, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = n_inputs
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.body = nn.Sequential(*layers)

    def set_standardization(self, mean: npt.NDArray[np.float64], scale: npt.NDArray[np.float64]) -> None:
        """Store the training split's mean and scale (a zero scale becomes 1: a constant feature)."""
        safe = np.where(scale > 0, scale, 1.0)
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.scale.copy_(torch.as_tensor(safe, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw feature rows ``(batch, n_inputs)`` → logits ``(batch,)``."""
        return self.body((x - self.mean) / self.scale).squeeze(-1)  # type: ignore[no-any-return]


class Scorer:
    """A network in inference mode: feature rows in, probabilities out."""

    def __init__(self, net: SignalNet, threshold: float) -> None:
        self._net = net.eval()
        self.threshold = threshold
        self.n_inputs = int(net.mean.shape[0])

    def probabilities(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``(batch, n_inputs)`` finite rows → ``prob_up`` per row."""
        with torch.inference_mode():
            logits = self._net(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))
            return torch.sigmoid(logits).to(torch.float64).numpy()

    def out_of_range(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        """Per value of ``(batch, n_inputs)`` rows: whether the network cannot take it.

        Checked on what the network computes with: the value as float32, standardized in float32 as
        ``SignalNet.forward`` does; NaN, infinities, values beyond float32's range and values more than
        ``MAX_STANDARD_DEVIATIONS`` from the training mean are out of range.
        """
        with np.errstate(over="ignore", invalid="ignore"):
            x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        with torch.inference_mode():
            standardized = (x - self._net.mean) / self._net.scale
            inside = standardized.abs() <= MAX_STANDARD_DEVIATIONS  # False for NaN
        return ~inside.numpy()

    def labels(self, probabilities: npt.NDArray[np.float64]) -> npt.NDArray[np.int32]:
        """1 where the probability reaches the threshold tuned on validation, else 0."""
        return (probabilities >= self.threshold).astype(np.int32)

    def warm_up(self) -> None:
        """Run the network once so the first real call pays no lazy initialization."""
        self.probabilities(np.zeros((1, self.n_inputs)))
