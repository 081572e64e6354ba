"""Exceptions of the Twinkle client.

The split that matters to a caller: a ``TwinkleUserError`` means the request was wrong (fix it; retrying
the same request will fail the same way) and carries the server's ``status``, ``detail`` and the
``field`` it blames (``data[3].loss_fn_inputs.weights``, ``line 17`` of a dataset…). Everything transient
(connection errors, 502/503/504, 429) is retried by the client before anything is raised; what is left is a
``TwinkleConnectionError`` or ``TwinkleServerError``.
"""

from __future__ import annotations


class TwinkleError(Exception):
    """Base class of every error raised by ``twinkle_client``."""


class TwinkleUserError(TwinkleError):
    """The server refused the request (HTTP 4xx, or a long operation that failed for a user reason)."""

    def __init__(self, detail: str, *, status: int = 400, field: str | None = None,
                 request_id: str | None = None) -> None:
        self.detail = detail
        self.status = status
        self.field = field
        self.request_id = request_id
        super().__init__(f"[{status}] {detail}")


class TwinkleAuthError(TwinkleUserError):
    """401/403: the API key is missing or not one of the server's keys."""


class TwinkleNotFoundError(TwinkleUserError):
    """404: no such run, checkpoint, session or request — or it belongs to another API key."""


class TwinkleServerError(TwinkleError):
    """The server failed (HTTP 5xx after retries, or a long operation that failed on the server side).
    ``detail`` carries the server's correlation id when it gave one."""

    def __init__(self, detail: str, *, status: int = 500, request_id: str | None = None) -> None:
        self.detail = detail
        self.status = status
        self.request_id = request_id
        super().__init__(f"[{status}] {detail}")


class TwinkleConnectionError(TwinkleError):
    """The server could not be reached (after retries)."""


class TwinkleTimeoutError(TwinkleError):
    """A long operation did not finish within the caller's timeout. It keeps running on the server: wait
    for it again with ``client.wait(request_id)``."""

    def __init__(self, message: str, *, request_id: str) -> None:
        self.request_id = request_id
        super().__init__(message)
