"""The proving ground: the mesh under faults, hostile input, slow subscribers, load and rollouts.

Each module has ``main(argv) -> int`` with ``--quick``; ``python -m bench.proving`` runs them all.
Results go under their own keys of ``bench/results/proving_ground.json`` (``save_results``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
from typing import Any

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "bench" / "results" / "proving_ground.json"


def save_results(key: str, value: Any, path: pathlib.Path = RESULTS) -> None:
    """Replace ``key`` of the results file the parts share, keeping every other key.

    Parts may run at once: each holds a lock on the folder, then on ``.proving_ground.lock``, while
    it reads, modifies and renames the file into place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        with (path.parent / ".proving_ground.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data: dict[str, Any] = {}
            if path.exists():
                with contextlib.suppress(json.JSONDecodeError):
                    data = json.loads(path.read_text())
            data[key] = value
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
            tmp.replace(path)
    finally:
        os.close(folder)
