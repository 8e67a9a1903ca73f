"""``python -m bench.proving [--quick]``: every part of the proving ground, one after the other.

A part is a module of this package with a ``main(argv) -> int`` function; each runs with the
arguments given here (``--quick`` for the short forms) and writes its own key of
``bench/results/proving_ground.json``. A failing part does not stop the others; the exit status is
1 when any part failed.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
import time
from collections.abc import Callable, Sequence

import bench.proving

logger = logging.getLogger("bench.proving")

Main = Callable[[Sequence[str]], int]


def part_names() -> list[str]:
    """The package's public modules, in name order (the runner itself is private)."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(bench.proving.__path__)
        if not info.ispkg and not info.name.startswith("_")
    )


def load(name: str) -> Main | None:
    """The module's ``main`` function, or None when it has none (a helper module)."""
    main = getattr(importlib.import_module(f"bench.proving.{name}"), "main", None)
    return main if callable(main) else None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    outcomes: dict[str, str] = {}
    for name in part_names():
        started = time.monotonic()
        try:
            run = load(name)
            if run is None:
                continue
            logger.info("=== proving ground: %s %s", name, " ".join(args))
            status = run(args)
        except SystemExit as exc:  # argparse refusing an argument, say
            status = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # one broken part must not hide the others' results
            logger.exception("%s raised", name)
            status = 1
        outcomes[name] = f"{'ok' if status == 0 else 'FAILED'} ({time.monotonic() - started:.0f}s)"
    for name, outcome in outcomes.items():
        logger.info("%-12s %s", name, outcome)
    if not outcomes:
        logger.warning("no part found in bench/proving")
    return 0 if all(o.startswith("ok") for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
