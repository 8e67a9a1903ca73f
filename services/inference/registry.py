"""The model registry on disk: ``<root>/<name>/<version>/`` with weights and ``manifest.json``.

A version directory is written under a temporary name and renamed into place, so a reader never
sees half a model. Loading trusts nothing: the manifest is validated field by field, the weights'
sha256 must match the manifest, and weights are read with safetensors or with
``torch.load(weights_only=True)``, so a file carrying code is refused, never run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import pathlib
import pickle
import re
import shutil
from collections.abc import Mapping
from typing import Any

import safetensors
import safetensors.torch
import torch

from services.common.market import Timeframe
from services.inference.features import FEATURES
from services.inference.model import Scorer, SignalNet

MANIFEST = "manifest.json"
SAFETENSORS = "weights.safetensors"
_VERSION = re.compile(r"v(\d{4,})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> None:
    """Refuse a model name that is not a plain folder name (it becomes ``<root>/<name>/``)."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"model name {name!r} must be 1-64 letters, digits or ._- (starting with a letter or digit)"
        )


class ModelRefused(Exception):
    """A model version cannot be served; the message says which and why."""


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """What a model version is, what it was trained on, and how well it did."""

    name: str
    version: str
    created: str
    timeframe: str
    symbols: tuple[str, ...]
    data_from: str
    data_to: str
    features: tuple[str, ...]
    window: int
    horizon: int
    threshold: float
    hidden: tuple[int, ...]
    seed: int
    metrics: Mapping[str, Mapping[str, float]]
    weights_file: str
    weights_sha256: str
    torch_version: str

    @property
    def n_inputs(self) -> int:
        """Width of a feature row: every feature of every candle in the window."""
        return self.window * len(self.features)

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to ``manifest.json``."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Validate a parsed ``manifest.json``; a missing or mistyped field is named."""
        if not isinstance(data, dict):
            raise ModelRefused("manifest.json must hold a JSON object")
        types: dict[str, tuple[type, ...]] = {
            "name": (str,),
            "version": (str,),
            "created": (str,),
            "timeframe": (str,),
            "symbols": (list,),
            "data_from": (str,),
            "data_to": (str,),
            "features": (list,),
            "window": (int,),
            "horizon": (int,),
            "threshold": (float, int),
            "hidden": (list,),
            "seed": (int,),
            "metrics": (dict,),
            "weights_file": (str,),
            "weights_sha256": (str,),
            "torch_version": (str,),
        }
        values: dict[str, Any] = {}
        for field, allowed in types.items():
            value = data.get(field)
            if not isinstance(value, allowed) or isinstance(value, bool):
                raise ModelRefused(f"manifest field {field!r} is missing or not a {allowed[0].__name__}")
            values[field] = tuple(value) if isinstance(value, list) else value
        if values["window"] < 1 or values["horizon"] < 1:
            raise ModelRefused("manifest fields 'window' and 'horizon' must be at least 1")
        if not 0.0 <= values["threshold"] <= 1.0:
            raise ModelRefused("manifest field 'threshold' must be between 0 and 1")
        if values["timeframe"] not in Timeframe.__members__:
            raise ModelRefused(f"manifest field 'timeframe' is not a timeframe: {values['timeframe']!r}")
        if values["features"] != FEATURES:
            raise ModelRefused(
                f"manifest field 'features' must be {list(FEATURES)} (what the live path computes)"
            )
        if pathlib.PurePosixPath(values["weights_file"]).name != values["weights_file"]:
            raise ModelRefused("manifest field 'weights_file' must be a file name in the version folder")
        return cls(**values)


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedModel:
    """A verified model version, warmed up and ready to score."""

    manifest: Manifest
    scorer: Scorer

    @property
    def version(self) -> str:
        """The version string signals carry."""
        return self.manifest.version


def sha256_of(path: pathlib.Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelRegistry:
    """Versions of named models under one root folder."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root

    def versions(self, name: str) -> list[str]:
        """Complete versions of a model, oldest first (``v0001``, ``v0002``, …)."""
        folder = self.root / name
        if not _NAME.fullmatch(name) or not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)]
        return sorted(found, key=lambda v: int(v[1:]))

    def latest(self, name: str) -> str | None:
        """The newest complete version, or None when the model has never been trained."""
        versions = self.versions(name)
        return versions[-1] if versions else None

    def save(self, net: SignalNet, manifest: Manifest) -> Manifest:
        """Write a new version (numbered after the newest) and return its final manifest."""
        check_name(manifest.name)
        latest = self.latest(manifest.name)
        version = f"v{(int(latest[1:]) if latest else 0) + 1:04d}"
        staging = self.root / manifest.name / f".staging-{version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        weights = staging / SAFETENSORS
        safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        final = dataclasses.replace(
            manifest,
            version=version,
            created=manifest.created or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            weights_file=SAFETENSORS,
            weights_sha256=sha256_of(weights),
            torch_version=torch.__version__,
        )
        (staging / MANIFEST).write_text(json.dumps(final.to_json(), indent=2) + "\n", encoding="utf-8")
        staging.rename(self.root / manifest.name / version)
        return final

    def load(self, name: str, version: str) -> LoadedModel:
        """Verify and load one version; ``ModelRefused`` says why it cannot be served."""
        try:
            return self._load(self.root / name / version)
        except ModelRefused as exc:
            raise ModelRefused(f"model {name} {version} refused: {exc}") from None

    def _load(self, folder: pathlib.Path) -> LoadedModel:
        try:
            manifest = Manifest.from_json(json.loads((folder / MANIFEST).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ModelRefused("manifest.json is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelRefused(f"manifest.json is not valid JSON ({exc})") from None
        weights = folder / manifest.weights_file
        if not weights.is_file():
            raise ModelRefused(f"weights file {manifest.weights_file} is missing")
        actual = sha256_of(weights)
        if actual != manifest.weights_sha256:
            raise ModelRefused(
                f"sha256 of {manifest.weights_file} is {actual}, the manifest says {manifest.weights_sha256}"
            )
        state = _read_state(weights)
        net = SignalNet(manifest.n_inputs, manifest.hidden)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelRefused(f"weights do not fit the manifest's network: {exc}") from None
        scorer = Scorer(net, manifest.threshold)
        scorer.warm_up()
        return LoadedModel(manifest, scorer)


def _read_state(weights: pathlib.Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or a state_dict through the restricted unpickler."""
    if weights.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(weights))
        except (safetensors.SafetensorError, OSError, ValueError) as exc:
            raise ModelRefused(f"{weights.name} is not a valid safetensors file ({exc})") from None
    if weights.suffix in (".pt", ".pth"):
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelRefused(
                f"{weights.name} is not a plain state_dict (weights_only load refused it: {first})"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelRefused(f"{weights.name} does not hold a state_dict of tensors")
        return state
    raise ModelRefused(f"weights file {weights.name} must be .safetensors, .pt or .pth")
