"""Twinkle server: ``launch_server()`` and the central app per ``server_type``."""

from .launcher import LaunchedServer, launch_server

__all__ = ["LaunchedServer", "launch_server"]
