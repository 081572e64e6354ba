"""The official ``tinker`` SDK, configured for a Twinkle server in ``server_type: tinker`` mode.

Nothing is patched: a Twinkle Tinker-mode server speaks the SDK's own protocol, so all this
helper does is pick the base URL and key the way the rest of this package does and check the two things the
SDK would otherwise fail on obscurely — the key's ``tml-`` prefix (the SDK refuses other keys before sending
anything) and a base URL that already ends with the SDK's ``/api/v1`` (it appends that itself).

Install with ``pip install 'twinkle-client[tinker]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._server import api_key as resolve_key
from ._server import server_root

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
    root = server_root(base_url, (_SDK_PATH,))
    key = resolve_key(api_key)
    if not key.startswith(TINKER_KEY_PREFIX):
        raise ValueError(f"the tinker SDK only sends API keys starting with {TINKER_KEY_PREFIX!r}; configure the "
                         "server with such a key (e.g. tml-<random>)")
    return tinker.ServiceClient(base_url=root, api_key=key, **kwargs)
