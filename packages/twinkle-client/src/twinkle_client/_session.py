"""The client's session and its heartbeat thread.

A session groups what one client process does (its training runs record it) and tells the server the
client is alive. Each ``TwinkleClient`` has its own session and its own heartbeat thread (a daemon, with its
own small HTTP connection, so a long training request on the main connection never delays a beat); nothing
is process-global, so several clients — to several servers — can live in one process. The thread stops
when the client is closed, or when the server says the session is gone (404/410).
"""

from __future__ import annotations

import logging
import threading

import httpx

log = logging.getLogger("twinkle_client")


class Heartbeat:
    def __init__(self, root: str, path: str, headers: dict[str, str], interval_s: float,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.interval_s = max(0.5, interval_s)
        self._path = path
        # A caller-given transport is shared with the client's main connection: do not close it here.
        self._owns_transport = transport is None
        self._http = httpx.Client(base_url=root, headers=headers, timeout=httpx.Timeout(10.0), transport=transport)
        self._stop = threading.Event()
        self.beats = 0
        self.failures = 0
        self.gone = False
        self._thread = threading.Thread(target=self._run, name="twinkle-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                r = self._http.post(self._path)
            except httpx.HTTPError as e:
                self.failures += 1
                log.debug("heartbeat failed: %r", e)
                continue
            if r.status_code in (404, 410):
                self.gone = True
                log.warning("the server ended this client's session (%s); heartbeats stop", r.status_code)
                return
            if r.status_code >= 400:
                self.failures += 1
                log.debug("heartbeat answered %s: %s", r.status_code, r.text[:200])
                continue
            self.beats += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=15)
        if self._owns_transport:
            self._http.close()
