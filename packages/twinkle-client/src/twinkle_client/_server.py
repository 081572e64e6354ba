"""Where the server is and which key to use, as both SDK helpers (``tinker``, ``openai``) read them."""

from __future__ import annotations

import os
from urllib.parse import urlsplit


def server_root(base_url: str | None, strip: tuple[str, ...]) -> str:
    """``scheme://host[:port][/path]`` of the server: ``base_url`` or ``$TWINKLE_SERVER_URL`` (else
    ``$TINKER_BASE_URL``, else ``http://127.0.0.1:8000``), less the first of ``strip`` it ends with."""
    url = (base_url or os.environ.get("TWINKLE_SERVER_URL") or os.environ.get("TINKER_BASE_URL")
           or "http://127.0.0.1:8000").rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must look like http://host:port, got {url!r}")
    path = parts.path.rstrip("/")
    for suffix in strip:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return f"{parts.scheme}://{parts.netloc}{path}"


def api_key(key: str | None) -> str:
    """``key`` or ``$TWINKLE_SERVER_TOKEN`` (else ``$TINKER_API_KEY``)."""
    key = key or os.environ.get("TWINKLE_SERVER_TOKEN") or os.environ.get("TINKER_API_KEY")
    if not key:
        raise ValueError("no API key: pass api_key= or set TWINKLE_SERVER_TOKEN")
    return key
