"""``python -m services.mesh`` is the ``mt5mesh`` command."""

from services.mesh.cli import main

raise SystemExit(main())
