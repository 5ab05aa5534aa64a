"""The S3 backend's options, validated once: sizes, retries and timeouts, and s3fs's own.

Unknown options (not commitpoint's, not an :class:`s3fs.S3FileSystem` keyword) raise
:class:`~commitpoint.errors.InvalidArgument`, as does a wrongly typed or out-of-range value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from commitpoint.core.retry import RetryPolicy
from commitpoint.errors import InvalidArgument
from commitpoint.storage.options import Timeouts, accepted_names, integer, refuse_unknown

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_SIZE = 5 * 1024**3
DEFAULT_PART_SIZE = 8 * 1024 * 1024  # boto3's; parts double after every 1,000 (see multipart)
DEFAULT_MAX_CONCURRENCY = 10
DEFAULT_RETRIES = 5
OWN_OPTIONS = ("part_size", "max_concurrency", "retries", *Timeouts.OPTION_NAMES)


@dataclass(frozen=True)
class S3Options:
    """What the S3 backend itself reads from the storage options (see :class:`S3Backend`)."""

    part_size: int = DEFAULT_PART_SIZE
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    retries: int = DEFAULT_RETRIES
    timeouts: Timeouts = field(default_factory=Timeouts)

    @classmethod
    def parse(cls, options: dict[str, Any]) -> tuple[S3Options, dict[str, Any]]:
        """The backend's options and the rest (for s3fs); refuses unknown names."""
        import s3fs

        rest = dict(options)
        parsed = cls(
            part_size=integer(
                "S3",
                "part_size",
                rest.pop("part_size", DEFAULT_PART_SIZE),
                MIN_PART_SIZE,
                MAX_PART_SIZE,
            ),
            max_concurrency=integer(
                "S3", "max_concurrency", rest.pop("max_concurrency", DEFAULT_MAX_CONCURRENCY)
            ),
            retries=integer("S3", "retries", rest.pop("retries", DEFAULT_RETRIES)),
            timeouts=Timeouts.parse("S3", rest),
        )
        known = accepted_names(s3fs.S3FileSystem)
        refuse_unknown("S3", rest, known - {"max_concurrency"}, OWN_OPTIONS)
        for name in ("config_kwargs", "client_kwargs", "s3_additional_kwargs"):
            if rest.get(name) is not None and not isinstance(rest[name], dict):
                raise InvalidArgument(f"S3 option {name} must be a dict, got {rest[name]!r}")
        return parsed, rest

    @property
    def retry_policy(self) -> RetryPolicy:
        """How every request commitpoint makes is retried: ``retries`` tries, backoff with jitter
        from 50 ms to 2 s, the whole within the deadline."""
        return RetryPolicy(
            attempts=self.retries, base_delay=0.05, max_delay=2.0, deadline=self.timeouts.deadline
        )

    def botocore_config(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """``config_kwargs`` for botocore: the timeouts, one attempt per call (commitpoint
        retries), enough pooled connections; what the caller set there wins."""
        config = dict(given or {})
        config.setdefault("connect_timeout", self.timeouts.connect)
        # botocore's own default; s3fs's 15 s can expire while S3 assembles a multi-GiB object.
        config.setdefault("read_timeout", self.timeouts.read)
        config.setdefault("retries", {"total_max_attempts": 1})
        # Enough pooled connections for every part in flight plus pointer and listing calls.
        config.setdefault("max_pool_connections", max(10, self.max_concurrency + 2))
        return config
