"""API-key auth: startup checks, hashed storage, open mode on loopback, 401s, principals."""

from __future__ import annotations

import logging

import pytest
from litestar.testing import TestClient

from twinkle.server.auth import (
    AuthConfigError,
    KeyRing,
    check_auth_settings,
    is_loopback,
    principal_id,
)
from twinkle.server.core.state import Store
from twinkle.server.tinker import TinkerSettings, create_tinker_app

KEY_A = "tml-alice-0123456789abcdef"
KEY_B = "tml-bob-fedcba9876543210"


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("myhost", False), ("", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_check_auth_settings(monkeypatch):
    monkeypatch.delenv("TWINKLE_API_KEYS", raising=False)
    assert check_auth_settings("127.0.0.1", []) == []
    with pytest.raises(AuthConfigError, match="refusing to start.*0.0.0.0.*TWINKLE_API_KEYS"):
        check_auth_settings("0.0.0.0", [])
    assert check_auth_settings("0.0.0.0", [KEY_A]) == [KEY_A]
    monkeypatch.setenv("TWINKLE_API_KEYS", f" {KEY_B} ,{KEY_A},")
    assert check_auth_settings("0.0.0.0", [KEY_A]) == [KEY_A, KEY_B]
    with pytest.raises(AuthConfigError, match=r"api_keys\[0\]"):
        check_auth_settings("127.0.0.1", ["has space"])


def test_app_refuses_an_open_network_bind(tmp_path, monkeypatch):
    monkeypatch.delenv("TWINKLE_API_KEYS", raising=False)
    with pytest.raises(AuthConfigError):
        create_tinker_app(TinkerSettings(checkpoint_dir=str(tmp_path), host="0.0.0.0"), {}, {})


def test_principal_ids_are_short_stable_and_distinct():
    assert principal_id(KEY_A) == principal_id(KEY_A)
    assert principal_id(KEY_A) != principal_id(KEY_B)
    assert principal_id(KEY_A).startswith("p-") and len(principal_id(KEY_A)) == 18
    assert KEY_A not in principal_id(KEY_A)


async def test_keyring_with_keys_stores_only_hashes(tmp_path, monkeypatch):
    monkeypatch.delenv("TWINKLE_API_KEYS", raising=False)
    path = tmp_path / "s.sqlite"
    store = await Store.open(str(path))
    ring = await KeyRing.load(store, [KEY_A, KEY_B], host="0.0.0.0")
    assert not ring.open_mode
    assert ring.authenticate(KEY_A).id == principal_id(KEY_A)
    assert ring.authenticate(KEY_B).id == principal_id(KEY_B)
    from litestar.exceptions import NotAuthorizedException

    with pytest.raises(NotAuthorizedException, match="not one of this server's keys"):
        ring.authenticate("tml-someone-else")
    with pytest.raises(NotAuthorizedException, match="missing API key"):
        ring.authenticate(None)
    # the same salt after a restart: keys still match
    ring2 = await KeyRing.load(store, [KEY_A], host="0.0.0.0")
    assert ring2.authenticate(KEY_A).id == principal_id(KEY_A)
    with pytest.raises(NotAuthorizedException):
        ring2.authenticate(KEY_B)  # removed from the config: no longer accepted
    await store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert KEY_A.encode() not in raw and KEY_B.encode() not in raw


async def test_open_mode_on_loopback(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("TWINKLE_API_KEYS", raising=False)
    store = await Store.open(str(tmp_path / "s.sqlite"))
    with caplog.at_level(logging.WARNING, logger="twinkle.server.auth"):
        ring = await KeyRing.load(store, [], host="127.0.0.1")
    assert ring.open_mode
    assert sum("open mode" in r.message for r in caplog.records) == 1
    assert ring.authenticate("tml-anything").id == principal_id("tml-anything")
    assert ring.authenticate("tml-x").id != ring.authenticate("tml-y").id
    from litestar.exceptions import NotAuthorizedException

    with pytest.raises(NotAuthorizedException, match="starting with 'tml-'"):
        ring.authenticate("nope")
    await store.close()


def test_http_401_and_open_health(tmp_path, monkeypatch):
    monkeypatch.delenv("TWINKLE_API_KEYS", raising=False)
    settings = TinkerSettings(checkpoint_dir=str(tmp_path), api_keys=[KEY_A])
    with TestClient(create_tinker_app(settings, {}, {}, path_prefix="/api/v1")) as client:
        assert client.get("/api/v1/healthz").json() == {"status": "ok"}
        r = client.post("/api/v1/client/config", json={"sdk_version": "0.38.0"})
        assert r.status_code == 401 and "missing API key" in r.json()["detail"]
        r = client.post("/api/v1/create_session", json={}, headers={"X-API-Key": "tml-wrong"})
        assert r.status_code == 401 and "not one of this server's keys" in r.json()["detail"]
        r = client.post("/api/v1/client/config", json={}, headers={"x-api-key": KEY_A})
        assert r.status_code == 200 and r.json()["pjwt_auth_enabled"] is False
