"""The central app answering HTTP itself (``ingress: gateway``).

Through Serve's proxy every HTTP request costs two Ray actor calls (proxy -> replica, and the replica's
watch for the client's disconnect back into the proxy), and on a small machine their CPU is taken from the
training step. Under ``ingress: gateway`` the central replica serves its own Litestar app with uvicorn on
``http_options`` instead, on the same event loop as Serve's handle calls into it, so the state behind both is
one. The replica is pinned to the launcher's machine (``Listen.node_ip``), the one whose address the YAML's
host names; Serve still starts, restarts and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from typing import Any, Iterator

import uvicorn

from twinkle.common.component import Listen

log = logging.getLogger(__name__)

# Serve's proxy keeps idle connections this long unless http_options.keep_alive_timeout_s says otherwise.
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 90
# A replica restarted while its predecessor still drains finds the port taken for a few seconds.
BIND_RETRY_S = 20.0
# The most a request line and headers may take; httptools buffers them without a bound, so a client could
# fill the replica's memory (every tenant's control plane) with one header. h11 refuses more with a 4xx.
MAX_HEADER_BYTES = 64 * 1024


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` as a server binds it (``0.0.0.0``/``::``: every interface).
    Raises ``OSError`` when the address is taken or not this machine's."""
    if host in ("", "0.0.0.0"):
        bind_host, family = None, socket.AF_INET
    elif host == "::":
        bind_host, family = None, socket.AF_INET6
    else:
        bind_host, family = host, socket.AF_UNSPEC
    info = socket.getaddrinfo(bind_host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, kind, proto, _, address = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        # TIME_WAIT sockets of a stopped server's connections must not keep the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the process is a Ray worker, Ray and Serve stop it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayListener:
    """uvicorn over the central app on ``listen``; ``start``/``stop`` are the app's first start-up and
    shutdown hooks (after the control plane has started, before it closes)."""

    def __init__(self, app: Any, listen: Listen) -> None:
        self.options = options = listen.http_options
        asgi = app if options.request_timeout_s is None else _with_request_timeout(app, options.request_timeout_s)
        self._config = uvicorn.Config(
            asgi,
            lifespan="off",  # Serve runs the app's lifespan; this is a second door into the same app
            log_config=None,
            access_log=False,
            proxy_headers=False,  # the client's address is the peer's, not a header it may write
            server_header=False,
            ws="none",
            http="h11",
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            root_path=options.root_path,
            timeout_keep_alive=options.keep_alive_timeout_s or DEFAULT_KEEP_ALIVE_TIMEOUT_S,
            timeout_graceful_shutdown=5,
            ssl_keyfile=options.ssl_keyfile,
            ssl_certfile=options.ssl_certfile,
            ssl_keyfile_password=options.ssl_keyfile_password,
            ssl_ca_certs=options.ssl_ca_certs,
        )
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        sock = await self._bind()
        self._server = _EmbeddedServer(self._config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():  # uvicorn failed to start (e.g. the TLS files): say why, in the replica's log
                self._task.result()
                raise RuntimeError("the HTTP listener stopped while starting")
            await asyncio.sleep(0.01)
        log.info("serving HTTP on %s:%d", self.options.host, self.options.port)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        if not self._task.done():
            self._server.force_exit = True
            self._task.cancel()

    async def _bind(self) -> socket.socket:
        deadline = time.monotonic() + BIND_RETRY_S
        while True:
            try:
                return bind_socket(self.options.host, self.options.port)
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise RuntimeError(f"http_options: cannot serve on {self.options.host}:{self.options.port} "
                                       f"({e.strerror})") from None
            await asyncio.sleep(0.5)


def _with_request_timeout(app: Any, seconds: float) -> Any:
    """``app`` with ``http_options.request_timeout_s`` honoured as Serve's proxy does: a request that has not
    finished in time is answered 408 (or cut, if its response had begun)."""

    async def timed(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(app(scope, receive, tracking_send), seconds)
        except asyncio.TimeoutError:
            if started:
                raise
            body = f"Request timed out after {seconds:g} s.".encode()
            await send({"type": "http.response.start", "status": 408,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

    return timed
