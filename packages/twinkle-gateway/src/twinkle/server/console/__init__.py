"""The web console (``/console``): a small server-rendered view of a user's runs with live loss curves,
checkpoints (download, publish), sessions, usage, and for an admin every key and service. It works offline
(its CSS and script are packaged here) and signs users in with their API key (``session.py``)."""

from .pages import PREFIX, console_router
from .session import ConsoleSessions

__all__ = ["PREFIX", "ConsoleSessions", "console_router"]
