"""``python -m commitpoint``: the command-line interface."""

from commitpoint.cli import main

raise SystemExit(main())
