"""The proving ground: the mesh under slow and vanishing subscribers, deadlines, load and rollouts.

Each module has ``main(argv) -> int`` with ``--quick``; ``python -m bench.proving`` runs them all.
Results go under their own keys of ``bench/results/proving_ground.json``.
"""
