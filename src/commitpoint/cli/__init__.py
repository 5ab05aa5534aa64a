"""The ``commitpoint`` command (ls, latest, verify, gc, rewind) and the demo."""

from commitpoint.cli.commands import CORRUPT, NOT_FOUND, OK, STORAGE, USAGE, build_parser, main

__all__ = ["CORRUPT", "NOT_FOUND", "OK", "STORAGE", "USAGE", "build_parser", "main"]
