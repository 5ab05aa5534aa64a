"""The ``commitpoint`` command: inspect, verify, clean up and rewind a checkpoint root.

Subcommands: ``ls``, ``latest``, ``verify``, ``gc``, ``rewind``, ``demo``. Every command takes
``--option KEY=VALUE`` (storage options, repeatable), ``--json`` (machine-readable output on stdout)
and ``--debug`` (tracebacks and debug logs). Errors print one line on stderr. A reader that stops
early (``commitpoint ls URL | head -1``) is not an error: the rest of the output is dropped and the
exit code is the command's own.

Exit codes (scripts can rely on them):

==== =========================================================
0    success
1    verification failed / corruption found
2    usage error (bad arguments, invalid step, unknown URL scheme)
3    not found / nothing committed
4    storage error, a pointer changed concurrently, or any unexpected error
==== =========================================================
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from commitpoint.core.layout import Kind, parse_step_dir, step_dir
from commitpoint.core.manifest import read_manifest
from commitpoint.errors import (
    BackendNotFound,
    CommitConflict,
    CommitpointError,
    CorruptCheckpoint,
    InvalidArgument,
    NotFound,
    RedactingFilter,
    StorageError,
    describe_exception,
    redact,
)
from commitpoint.maintenance.retention import DEFAULT_ORPHAN_MIN_AGE_S, RetentionPolicy
from commitpoint.maintenance.rewind import BOTH, rewind
from commitpoint.read.verify import VerifyReport, verify_step
from commitpoint.replication.status import compare_tiers
from commitpoint.storage.protocol import FileRecord, StorageBackend
from commitpoint.storage.registry import open_storage

OK = 0
CORRUPT = 1
USAGE = 2
NOT_FOUND = 3
STORAGE = 4


@dataclass
class _Out:
    """Where a command writes: stdout for results, stderr for progress and errors."""

    stdout: TextIO
    stderr: TextIO
    json: bool
    closed_early: bool = False
    """The reader of stdout went away (``| head``); nothing more is written to it."""

    def emit(self, data: Any, text: str) -> None:
        if self.closed_early:
            return
        try:
            self.stdout.write(json.dumps(data, indent=1, sort_keys=True) if self.json else text)
            self.stdout.write("\n")
            self.stdout.flush()
        except BrokenPipeError:
            self.closed_early = True
            _drop_output(self.stdout)


def _drop_output(stream: TextIO) -> None:
    """Send whatever is still buffered for a closed pipe to /dev/null, so that neither this
    command nor the interpreter's exit reports a BrokenPipeError."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


class _Progress:
    """A one-line text progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, stream: TextIO, total_bytes: int, label: str) -> None:
        self._stream = stream
        self._total = max(total_bytes, 1)
        self._done = 0
        self._label = label
        self._active = bool(getattr(stream, "isatty", lambda: False)())

    def advance(self, record: FileRecord) -> None:
        self._done += record.size
        if not self._active:
            return
        width = 30
        filled = int(width * min(self._done, self._total) / self._total)
        percent = 100 * min(self._done, self._total) / self._total
        bar = "#" * filled + "-" * (width - filled)
        self._stream.write(f"\r{self._label} [{bar}] {percent:5.1f}% {_size(self._done)}")
        self._stream.flush()

    def close(self) -> None:
        if self._active:
            self._stream.write("\r" + " " * 70 + "\r")
            self._stream.flush()


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text, aligned columns (numbers right-aligned)."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], int) for row in rows) and rows for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--option needs KEY=VALUE, got {pair!r}")
        options[key] = _option_value(key, value)
    return options


def _option_value(key: str, value: str) -> Any:
    """A JSON object or list stays structured (``client_kwargs={"region_name": "eu-west-1"}``);
    anything else is the string as given."""
    if not value.startswith(("{", "[")):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise InvalidArgument(f"--option {key}: value is not valid JSON: {exc}") from None


def _open(args: argparse.Namespace) -> StorageBackend:
    return open_storage(args.url, **_options(args.option))


def _verify(storage: StorageBackend, step: int, kind: Kind, out: _Out) -> VerifyReport:
    manifest = read_manifest(storage, step, kind)
    if manifest is None and kind is Kind.STATE_DICT:
        manifest = read_manifest(storage, step, Kind.CHECKPOINT)
    progress = _Progress(out.stderr, manifest.total_bytes if manifest else 0, f"step {step}")
    try:
        return verify_step(storage, step, kind, progress=progress.advance)
    finally:
        progress.close()


# -- commands ------------------------------------------------------------------------------------
def _cmd_ls(args: argparse.Namespace, out: _Out) -> int:
    storage = _open(args)
    replica = open_storage(args.replica, **_options(args.replica_option)) if args.replica else None
    pointers = {k: storage.read_pointer(k.pointer).value for k in Kind}
    steps = sorted(s for n in storage.list_dirs("") if (s := parse_step_dir(n)) is not None)
    tiers = compare_tiers(storage, replica) if replica is not None else None
    if tiers is not None:  # steps only the replica still holds are listed too
        steps = sorted({*steps, *(s.step for s in tiers.steps)})
    rows: list[dict[str, Any]] = []
    failed = False
    for step in steps:
        manifests = {k: read_manifest(storage, step, k) for k in Kind}
        # A full checkpoint's manifest also covers the step's state dict.
        kinds = [k for k in (Kind.STATE_DICT, Kind.CHECKPOINT) if manifests[k] is not None]
        if manifests[Kind.CHECKPOINT] is not None and Kind.STATE_DICT not in kinds:
            kinds.insert(0, Kind.STATE_DICT)
        main = manifests[Kind.CHECKPOINT] or manifests[Kind.STATE_DICT]
        if main is not None:
            files, size = len(main.files), main.total_bytes
        else:
            listed = storage.list_files(step_dir(step))
            files, size = len(listed), sum(i.size for i in listed)
        verified: bool | None = None
        problems: list[str] = []
        if main is not None and not args.no_verify:
            report = _verify(storage, step, main.kind, out)
            verified = report.ok
            problems = [str(p) for p in report.problems]
            failed = failed or not report.ok
        row: dict[str, Any] = {
            "step": step,
            "kinds": [k.value for k in kinds],
            "files": files,
            "bytes": size,
            "verified": verified,
            "problems": problems,
            "latest": [k.value for k in Kind if pointers[k] == step],
        }
        if tiers is not None:
            there = next((s for s in tiers.steps if s.step == step), None)
            held = there.replica if there is not None else frozenset()
            if Kind.CHECKPOINT in held:  # as locally: the checkpoint covers its state dict
                held = held | {Kind.STATE_DICT}
            order = (Kind.STATE_DICT, Kind.CHECKPOINT)
            row["replica_kinds"] = [k.value for k in order if k in held]
            row["replica_latest"] = [k.value for k in Kind if tiers.replica[k] == step]
        rows.append(row)
    headers = ["STEP", "KINDS", "FILES", "BYTES", "VERIFIED", "LATEST"]
    if tiers is not None:
        headers += ["REPLICA", "REPLICA LATEST"]
    text = _table(
        headers,
        [
            (
                r["step"],
                ",".join(r["kinds"]) or ("-" if r.get("replica_kinds") else "(uncommitted)"),
                r["files"],
                r["bytes"],
                "-" if r["verified"] is None else ("ok" if r["verified"] else "FAILED"),
                ",".join(r["latest"]),
                *(
                    (",".join(r["replica_kinds"]) or "-", ",".join(r["replica_latest"]))
                    if tiers is not None
                    else ()
                ),
            )
            for r in rows
        ],
    )
    if not rows:
        text = f"no steps under {storage.url}"
    body: dict[str, Any] = {
        "url": storage.url,
        "latest": {k.value: v for k, v in pointers.items()},
        "steps": rows,
    }
    if tiers is not None:
        missing = [s.step for s in tiers.unreplicated]
        body["replica"] = {
            "url": tiers.replica_url,
            "latest": {k.value: v for k, v in tiers.replica.items()},
            "lag_steps": tiers.lag_steps,
            "lag_bytes": tiers.lag_bytes,
            "unreplicated": missing,
        }
        text += (
            f"\nreplica {tiers.replica_url}: "
            + ", ".join(f"{k.value} {tiers.replica[k]} (local {pointers[k]})" for k in Kind)
            + f"; lag {tiers.lag_steps} steps, {_size(tiers.lag_bytes)} in steps {missing}"
        )
    out.emit(body, text)
    if failed:
        return CORRUPT
    return OK if rows else NOT_FOUND


def _cmd_latest(args: argparse.Namespace, out: _Out) -> int:
    storage = _open(args)
    kinds = [Kind(args.kind)] if args.kind else list(Kind)
    latest = {k.value: storage.read_pointer(k.pointer).value for k in kinds}
    if args.kind:
        text = "" if latest[args.kind] is None else str(latest[args.kind])
    else:
        text = _table(("KIND", "STEP"), [(k, "-" if v is None else v) for k, v in latest.items()])
    if all(v is None for v in latest.values()):
        raise NotFound(f"nothing is committed under {storage.url}")
    out.emit({"url": storage.url, "latest": latest}, text)
    return OK


def _cmd_verify(args: argparse.Namespace, out: _Out) -> int:
    storage = _open(args)
    kind = Kind(args.kind)
    step = args.step
    if step is None:
        step = storage.read_pointer(kind.pointer).value
        if step is None:
            raise NotFound(f"nothing is committed as {kind.value} under {storage.url}")
    elif not storage.list_files(step_dir(step)):
        raise NotFound(f"step {step} does not exist under {storage.url}")
    report = _verify(storage, step, kind, out)
    data = {
        "url": storage.url,
        "step": step,
        "kind": kind.value,
        "files": report.files,
        "bytes": report.bytes,
        "ok": report.ok,
        "problems": [{"path": p.path, "reason": p.reason} for p in report.problems],
    }
    if report.ok:
        text = f"step {step} ({kind.value}): {report.files} files, {report.bytes} bytes, ok"
    else:
        text = "\n".join(
            [
                f"step {step} ({kind.value}): {len(report.problems)} of {report.files} files "
                "FAILED verification",
                *(f"  {p}" for p in report.problems),
            ]
        )
    out.emit(data, text)
    return OK if report.ok else CORRUPT


def _cmd_gc(args: argparse.Namespace, out: _Out) -> int:
    storage = _open(args)
    policy = RetentionPolicy(
        keep_last=args.keep_last,
        keep_every=args.keep_every,
        gc_orphans=not args.no_orphans,
        orphan_min_age_s=args.orphan_min_age,
        gc_foreign=args.foreign,
    )
    result = policy.apply(storage, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    orphans = " ".join(step_dir(s) for s in result.orphans)
    lines = [
        f"{verb} steps: {' '.join(map(str, result.deleted)) or '(none)'}",
        f"{verb} uncommitted folders: {orphans or '(none)'}",
        f"kept steps: {' '.join(map(str, result.kept)) or '(none)'}",
    ]
    if result.protected:
        shown = " ".join(map(str, result.protected))
        lines.append(f"protected (pointer, rewind or in flight): {shown}")
    lines.extend(f"error: {e}" for e in result.errors)
    out.emit(
        {
            "url": storage.url,
            "dry_run": result.dry_run,
            "deleted": list(result.deleted),
            "orphans": list(result.orphans),
            "kept": list(result.kept),
            "protected": list(result.protected),
            "errors": list(result.errors),
        },
        "\n".join(lines),
    )
    return STORAGE if result.errors else OK


def _cmd_rewind(args: argparse.Namespace, out: _Out) -> int:
    storage = _open(args)
    kinds = list(Kind) if args.kind == BOTH else [Kind(args.kind)]
    if all(storage.read_pointer(k.pointer).value is None for k in kinds):
        raise NotFound(f"nothing is committed under {storage.url}")
    records = rewind(storage, args.kind, args.to, expected_current=args.expect)
    out.emit(
        {
            "url": storage.url,
            "rewound": [
                {"kind": r.kind.value, "from": r.from_step, "to": r.to_step} for r in records
            ],
        },
        "\n".join(
            f"rewound {r.kind.value} pointer from step {r.from_step} to step {r.to_step}"
            for r in records
        ),
    )
    return OK


def _cmd_demo(argv: list[str]) -> int:
    from commitpoint.cli.demo import main as demo_main

    return int(demo_main(argv))


# -- parsing -------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` can return exit code 2."""

    def error(self, message: str) -> Any:
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a step: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a step is non-negative, got {value}")
    return value


def _positive(text: str) -> int:
    value = _step(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("url", help="checkpoint root (path, file://, memory://, s3://, gs://)")
    common.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="storage option, repeatable (e.g. endpoint_url=http://127.0.0.1:9000)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")

    parser = _Parser(
        prog="commitpoint", description="Inspect, verify, clean up and rewind checkpoints."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    kinds = [k.value for k in Kind]

    ls = sub.add_parser("ls", parents=[common], help="list steps (verifies them unless told not)")
    ls.add_argument("--no-verify", action="store_true", help="skip re-reading the files")
    ls.add_argument("--replica", metavar="URL", help="also show this replica tier and the lag")
    ls.add_argument(
        "--replica-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="storage option of the replica, repeatable",
    )
    ls.set_defaults(run=_cmd_ls)

    latest = sub.add_parser("latest", parents=[common], help="the latest committed steps")
    latest.add_argument("--kind", choices=kinds, help="print only this kind's step")
    latest.set_defaults(run=_cmd_latest)

    verify = sub.add_parser("verify", parents=[common], help="check a step against its manifest")
    verify.add_argument("--step", type=_step, help="step to verify (default: the latest)")
    verify.add_argument("--kind", choices=kinds, default=Kind.STATE_DICT.value)
    verify.set_defaults(run=_cmd_verify)

    gc = sub.add_parser("gc", parents=[common], help="apply retention and collect orphans")
    gc.add_argument("--keep-last", type=_positive, help="keep the newest N committed steps")
    gc.add_argument("--keep-every", type=_positive, help="keep every step divisible by K")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    gc.add_argument("--no-orphans", action="store_true", help="do not collect orphaned folders")
    gc.add_argument(
        "--foreign",
        action="store_true",
        help="also collect step folders commitpoint did not write (another tool's checkpoints)",
    )
    gc.add_argument(
        "--orphan-min-age",
        type=float,
        default=DEFAULT_ORPHAN_MIN_AGE_S,
        metavar="SECONDS",
        help="only collect orphans untouched for this long (default %(default)s)",
    )
    gc.set_defaults(run=_cmd_gc)

    rw = sub.add_parser("rewind", parents=[common], help="move pointer(s) back to a step")
    rw.add_argument("--to", type=_step, required=True, help="step to rewind to (must verify)")
    rw.add_argument("--kind", choices=[*kinds, BOTH], default=BOTH)
    rw.add_argument("--expect", type=_step, help="only if the pointer(s) name this step now")
    rw.set_defaults(run=_cmd_rewind)

    sub.add_parser("demo", help="train a small model with background checkpoints (see --help)")
    return parser


_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (NotFound, NOT_FOUND),
    (CorruptCheckpoint, CORRUPT),
    (InvalidArgument, USAGE),
    (BackendNotFound, USAGE),
    (StorageError, STORAGE),
    (CommitConflict, STORAGE),
    (CommitpointError, STORAGE),
    (OSError, STORAGE),
)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if argv and argv[0] == "demo":
        try:
            return _cmd_demo(argv[1:])
        except SystemExit as exc:  # the demo's own argument errors and --help
            return exc.code if isinstance(exc.code, int) else USAGE
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        stderr.write(f"{exc}\n")
        return USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if isinstance(exc.code, int | None) else USAGE
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())  # no credential in any library's log line either
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, handlers=[handler])
    out = _Out(stdout, stderr, args.json)
    run: Callable[[argparse.Namespace, _Out], int] = args.run
    try:
        return run(args, out)
    except Exception as exc:
        code = next((c for t, c in _EXIT_CODES if isinstance(exc, t)), STORAGE)
        if args.debug:
            stderr.write(redact(traceback.format_exc()))
        message = str(exc) if isinstance(exc, CommitpointError) else describe_exception(exc)
        message = " ".join(message.split())  # one line
        stderr.write(f"commitpoint {args.command}: {message}\n")
        if out.json:
            out.emit({"error": message, "exit_code": code}, "")
        return code


__all__ = ["CORRUPT", "NOT_FOUND", "OK", "STORAGE", "USAGE", "build_parser", "main"]
