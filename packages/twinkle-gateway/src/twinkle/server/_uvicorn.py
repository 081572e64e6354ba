"""An ASGI app served by uvicorn on ``127.0.0.1:<free port>`` in a background thread with its own event loop,
so a synchronous client (the official ``tinker`` SDK, ``TwinkleClient``) can talk to it from the calling
thread: the common part of ``tinker.testing.LocalTinkerServer`` and ``native.testing.LocalTwinkleStack``.
"""

from __future__ import annotations

import abc

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any, TypeVar

S = TypeVar("S", bound="BackgroundServer")


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer(abc.ABC):
    """Serves ``build_app()`` until ``stop()``; services listed in ``_own`` are closed (``await close()``)
    after the server has stopped, on its loop."""

    #: Names the server in start errors ("the Tinker server did not start …").
    what = "the server"
    thread_name = "twinkle-server"
    start_timeout_s = 60
    stop_timeout_s = 30

    def __init__(self, *, port: int | None = None, log_level: str = "warning") -> None:
        self.port = port or free_port()
        self.log_level = log_level
        self._own: list[Any] = []
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @abc.abstractmethod
    def build_app(self) -> Any:
        """The ASGI app to serve."""

    def start(self: S) -> S:
        import uvicorn

        app = self.app = self.build_app()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=self.log_level, lifespan="on",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._server.serve())
                if self._own:
                    self._loop.run_until_complete(self._close_services())
            except BaseException as e:  # noqa: BLE001 - surfaced to the starting thread
                self._error = e
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name=f"{self.thread_name}-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"{self.what} did not start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.what} did not start within {self.start_timeout_s} s")
            time.sleep(0.02)
        return self

    async def _close_services(self) -> None:
        for service in self._own:
            close = getattr(service, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.stop_timeout_s)
        self._thread = None

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
