"""S3 error classification: which failures are worth another try.

Calls made straight to the aiobotocore client (pointers, multipart parts) keep S3's own error
codes, so they are classified here: throttling, 5xx, dropped connections and timeouts are
transient and retried by :func:`commitpoint.core.retry.aretry` (``retries`` tries with backoff,
within the deadline); everything else is raised at once. botocore's own retries are off (one
attempt per call), so one logical call makes at most ``retries`` HTTP attempts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from commitpoint.core.retry import RetryPolicy, aretry

T = TypeVar("T")

TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "500",
        "502",
        "503",
        "504",
    }
)
TRANSIENT_TYPES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientPayloadError",
        "ResponseStreamingError",
        "IncompleteReadError",
    }
)
AUTH_CODES = {
    "AccessDenied": "access denied",
    "AllAccessDisabled": "access to the bucket is disabled",
    "AccountProblem": "the account cannot be used (account problem)",
    "InvalidAccessKeyId": "the access key is not valid (bad credentials)",
    "SignatureDoesNotMatch": "the secret key does not match (bad credentials)",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is not valid",
    "TokenRefreshRequired": "the session token must be refreshed",
    "Unauthorized": "not authenticated",
    "401": "not authenticated",
    "403": "access denied",
}


def error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status of a botocore ``ClientError`` (``(None, None)`` else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), status


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` after a pause can succeed (throttling, 5xx, connection, timeout)."""
    code, status = error_code(exc)
    if code in TRANSIENT_CODES or (status is not None and status >= 500):
        return True
    if code is not None or status is not None:
        return False  # S3 answered with a definite client error
    if type(exc).__name__ in TRANSIENT_TYPES:
        return True
    return isinstance(exc, ConnectionError | TimeoutError | asyncio.TimeoutError)


def answered_transient(exc: BaseException) -> bool:
    """Whether S3 answered ``exc`` (or the error it wraps) with a retryable code or a 5xx.

    s3fs retries dropped connections, timeouts and ``SlowDown`` itself but raises other 5xx
    answers at once: commitpoint retries those (and only those) around s3fs's calls, so each
    kind of failure has one retry layer.
    """
    for candidate in (exc, exc.__cause__):
        if candidate is None:
            continue
        code, status = error_code(candidate)
        if code == "SlowDown":
            return False
        if code in TRANSIENT_CODES or (status is not None and status >= 500):
            return True
    return False


async def call_with_retries(
    what: str, policy: RetryPolicy, call: Callable[[], Awaitable[T]]
) -> T:
    """Await ``call()`` under ``policy``, retrying what :func:`is_transient` accepts; a try still
    running at the policy's deadline is cancelled (:class:`DeadlineExceeded`)."""
    return await aretry(call, policy, retry_on=is_transient, what=f"S3 {what}")


def client_call(client: Any, method: str, **kwargs: Any) -> Callable[[], Awaitable[Any]]:
    """A zero-argument coroutine factory for ``client.<method>(**kwargs)`` (one per attempt)."""

    async def call() -> Any:
        return await getattr(client, method)(**kwargs)

    return call
