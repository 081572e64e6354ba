"""The central app's own HTTP listener (``ingress: gateway``): it serves the app, honours ``http_options``,
says clearly when it cannot bind, and stops without leaving the port taken."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import pytest
from litestar import Litestar, Request, get

from twinkle.common.component import Listen
from twinkle.common.config import HttpOptions
from twinkle.server import listener as listener_module
from twinkle.server.listener import GatewayListener, bind_socket


@get("/fast")
async def fast(request: Request) -> dict:
    return {"client": request.client.host if request.client else None, "root_path": request.scope["root_path"]}


@get("/slow")
async def slow() -> str:
    await asyncio.sleep(5)
    return "late"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen(port: int, **options) -> Listen:
    return Listen(http_options=HttpOptions(host="127.0.0.1", port=port, **options), node_ip="127.0.0.1")


async def _get(port: int, path: str, **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        return await client.get(path, **kwargs)


async def test_serves_the_app_then_frees_the_port():
    port = _free_port()
    listener = GatewayListener(Litestar([fast]), _listen(port))
    await listener.start()
    try:
        r = await _get(port, "/fast", headers={"X-Forwarded-For": "203.0.113.9"})
        # the peer's address, never a header the client may write
        assert (r.status_code, r.json()) == (200, {"client": "127.0.0.1", "root_path": ""})
        assert "server" not in r.headers
    finally:
        await listener.stop()
    bind_socket("127.0.0.1", port).close()  # free again
    with pytest.raises(httpx.ConnectError):
        await _get(port, "/fast")


async def test_a_taken_port_is_a_clear_error_naming_http_options(monkeypatch):
    monkeypatch.setattr(listener_module, "BIND_RETRY_S", 0.2)
    port = _free_port()
    taken = bind_socket("127.0.0.1", port)
    taken.listen()
    try:
        with pytest.raises(RuntimeError, match=rf"http_options: cannot serve on 127.0.0.1:{port} \("):
            await GatewayListener(Litestar([fast]), _listen(port)).start()
    finally:
        taken.close()


async def test_a_port_freed_while_waiting_is_taken(monkeypatch):
    """A restarted replica whose predecessor still holds the port waits for it."""
    port = _free_port()
    taken = bind_socket("127.0.0.1", port)
    taken.listen()
    listener = GatewayListener(Litestar([fast]), _listen(port))
    starting = asyncio.ensure_future(listener.start())
    await asyncio.sleep(0.3)
    assert not starting.done()
    taken.close()
    await asyncio.wait_for(starting, 10)
    try:
        assert (await _get(port, "/fast")).status_code == 200
    finally:
        await listener.stop()


async def test_request_timeout_s_is_honoured_as_serves_proxy_does():
    port = _free_port()
    listener = GatewayListener(Litestar([fast, slow]), _listen(port, request_timeout_s=0.5))
    await listener.start()
    try:
        assert (await _get(port, "/fast")).status_code == 200
        r = await _get(port, "/slow")
        assert (r.status_code, r.text) == (408, "Request timed out after 0.5 s.")
    finally:
        await listener.stop()


async def test_root_path_is_honoured_as_serves_proxy_does():
    """The prefix a reverse proxy in front strips: the app is reached at its own paths and knows its mount."""
    port = _free_port()
    listener = GatewayListener(Litestar([fast]), _listen(port, root_path="/behind"))
    await listener.start()
    try:
        r = await _get(port, "/fast")
        assert (r.status_code, r.json()["root_path"]) == (200, "/behind")
    finally:
        await listener.stop()


def _self_signed(tmp_path) -> tuple[str, str]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .add_extension(san, critical=False)
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    keyfile, certfile = tmp_path / "key.pem", tmp_path / "cert.pem"
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(keyfile), str(certfile)


async def test_tls_options_are_honoured(tmp_path):
    pytest.importorskip("cryptography", reason="makes the test's self-signed certificate")
    keyfile, certfile = _self_signed(tmp_path)
    port = _free_port()
    listener = GatewayListener(Litestar([fast]), _listen(port, ssl_keyfile=keyfile, ssl_certfile=certfile))
    await listener.start()
    try:
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=certfile, timeout=10) as c:
            assert (await c.get("/fast")).status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            await _get(port, "/fast")
    finally:
        await listener.stop()


async def test_stalled_and_malformed_clients_do_not_hold_up_others():
    """What a hostile client can do to the listener's other users: connections that never finish their
    headers, and a header far over the parser's limit, leave a well-formed request answered at once."""
    port = _free_port()
    listener = GatewayListener(Litestar([fast]), _listen(port))
    await listener.start()
    stalled = []
    try:
        for _ in range(50):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
            await writer.drain()
            stalled.append(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4_000_000 + b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(200), 10)
        except ConnectionResetError:
            answer = b""
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer  # refused or cut, never served
        writer.close()
        r = await asyncio.wait_for(_get(port, "/fast"), 5)
        assert r.status_code == 200
    finally:
        for writer in stalled:
            writer.close()
        await listener.stop()
