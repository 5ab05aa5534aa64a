"""S3 error classification and the retry loop every direct client call goes through.

Calls made straight to the aiobotocore client (pointers, multipart parts) keep S3's own error codes,
so they are classified here: throttling, 5xx, dropped connections and timeouts are transient and
retried with exponential backoff and full jitter; everything else is raised at once. Credentials
never reach a log line or a message: only the S3 error code and the exception's type are logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

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


def backoff_delay(attempt: int, base: float = 0.05, cap: float = 2.0) -> float:
    """Exponential backoff with jitter: about ``base * 2**attempt``, at most ``cap`` seconds."""
    return min(cap, base * 2.0**attempt) * (0.5 + random.random())


async def call_with_retries(
    operation: str, attempts: int, call: Callable[[], Awaitable[T]], *, where: str = ""
) -> T:
    """Await ``call()`` up to ``attempts`` times, sleeping between transient failures."""
    for attempt in range(attempts):
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            delay = backoff_delay(attempt)
            code, _ = error_code(exc)
            logger.warning(
                "S3 %s %s failed (%s); retrying in %.2f s (attempt %d of %d)",
                operation,
                where,
                code or type(exc).__name__,
                delay,
                attempt + 2,
                attempts,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def client_call(client: Any, method: str, **kwargs: Any) -> Callable[[], Awaitable[Any]]:
    """A zero-argument coroutine factory for ``client.<method>(**kwargs)`` (one per attempt)."""

    async def call() -> Any:
        return await getattr(client, method)(**kwargs)

    return call
