"""Environment settings read once per process.

``TWINKLE_TRUST_REMOTE_CODE`` is a deploy-time decision: off unless set to a true value, never per request.
The launcher forwards it to every Ray worker so that all processes agree (upstream Twinkle read it with
``bool(os.environ.get(...))`` in places, where ``bool("0")`` is True).
"""

from __future__ import annotations

import functools
import os

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"", "0", "false", "no", "off", "n", "f"}

TRUST_REMOTE_CODE_ENV = "TWINKLE_TRUST_REMOTE_CODE"
CACHE_DIR_ENV = "TWINKLE_CACHE_DIR"


def parse_bool(value: str | None, *, name: str) -> bool:
    """Parse an environment flag strictly: a typo must not silently turn a security switch on."""
    if value is None:
        return False
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


@functools.cache
def trust_remote_code() -> bool:
    return parse_bool(os.environ.get(TRUST_REMOTE_CODE_ENV), name=TRUST_REMOTE_CODE_ENV)


def cache_dir() -> str:
    """Where Twinkle keeps built artifacts (the offline tiny model). Shared by every process on a machine."""
    base = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "twinkle"
    )
    return os.path.abspath(base)
