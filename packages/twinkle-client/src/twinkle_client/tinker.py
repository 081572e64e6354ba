"""The official ``tinker`` SDK, configured for a Twinkle server in ``server_type: tinker`` mode.

Nothing is patched: a Twinkle Tinker-mode server speaks the SDK's own protocol, so all this
helper does is pick the base URL and key the way the rest of this package does and check the two things the
SDK would otherwise fail on obscurely — the key's ``tml-`` prefix (the SDK refuses other keys before sending
anything) and a base URL that already ends with the SDK's ``/api/v1`` (it appends that itself).

Install with ``pip install 'twinkle-client[tinker]'``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # pragma: no cover
    import tinker

TINKER_KEY_PREFIX = "tml-"
_SDK_PATH = "/api/v1"


def service_client(base_url: str | None = None, api_key: str | None = None, **kwargs: Any) -> "tinker.ServiceClient":
    """``tinker.ServiceClient(base_url=..., api_key=...)`` for a Twinkle server.

    ``base_url`` defaults to ``$TWINKLE_SERVER_URL`` (else ``$TINKER_BASE_URL``, else
    ``http://127.0.0.1:8000``); ``api_key`` to ``$TWINKLE_SERVER_TOKEN`` (else ``$TINKER_API_KEY``). Other
    keyword arguments go to ``ServiceClient`` unchanged.
    """
    try:
        import tinker
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the tinker SDK is not installed: pip install 'twinkle-client[tinker]'") from e
    url = (base_url or os.environ.get("TWINKLE_SERVER_URL") or os.environ.get("TINKER_BASE_URL")
           or "http://127.0.0.1:8000").rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must look like http://host:port, got {url!r}")
    path = parts.path.rstrip("/")
    if path.endswith(_SDK_PATH):
        path = path[: -len(_SDK_PATH)]
    root = f"{parts.scheme}://{parts.netloc}{path}"
    key = api_key or os.environ.get("TWINKLE_SERVER_TOKEN") or os.environ.get("TINKER_API_KEY")
    if not key:
        raise ValueError("no API key: pass api_key= or set TWINKLE_SERVER_TOKEN")
    if not key.startswith(TINKER_KEY_PREFIX):
        raise ValueError(f"the tinker SDK only sends API keys starting with {TINKER_KEY_PREFIX!r}; configure the "
                         "server with such a key (e.g. tml-<random>)")
    return tinker.ServiceClient(base_url=root, api_key=key, **kwargs)
