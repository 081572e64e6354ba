"""The official ``openai`` client, configured for a Twinkle server's OpenAI-compatible surface.

A Twinkle server (either ``server_type``) answers OpenAI's ``/models``, ``/completions`` and
``/chat/completions`` at ``<server root>/oai/api/v1``, with the same keys. ``model`` is a base model, a sampler
checkpoint (``tinker://…/sampler_weights/<name>``, ``twinkle://…``) or ``<base model>;<checkpoint>``::

    from twinkle_client.openai import openai_client

    client, model = openai_client(checkpoint="tinker://sess-…:train:0/sampler_weights/step-10")
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])

Install with ``pip install 'twinkle-client[openai]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._server import api_key as resolve_key
from ._server import server_root

if TYPE_CHECKING:  # pragma: no cover
    import openai

OAI_PATH = "/oai/api/v1"
_PROTOCOL_PATHS = ("/api/v1", "/server")


def openai_client(base_url: str | None = None, api_key: str | None = None, *, checkpoint: str | None = None,
                  **kwargs: Any) -> tuple["openai.OpenAI", str | None]:
    """``(openai.OpenAI(base_url=<root>/oai/api/v1, api_key=...), checkpoint)``: the client, and the ``model`` to
    pass it (``checkpoint`` as given). ``base_url`` is the server's root (a trailing ``/api/v1``, ``/server`` or
    ``/oai/api/v1`` is accepted) and defaults to ``$TWINKLE_SERVER_URL`` (else ``$TINKER_BASE_URL``, else
    ``http://127.0.0.1:8000``); ``api_key`` to ``$TWINKLE_SERVER_TOKEN`` (else ``$TINKER_API_KEY``). Other keyword
    arguments go to ``openai.OpenAI``."""
    try:
        import openai
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the openai package is not installed: pip install 'twinkle-client[openai]'") from e
    root = server_root(base_url, (OAI_PATH, *_PROTOCOL_PATHS))
    key = resolve_key(api_key)
    client = openai.OpenAI(base_url=f"{root}{OAI_PATH}", api_key=key, **kwargs)
    return client, checkpoint
