"""API-key auth: startup checks, hashed storage, open mode on loopback, 401s, principals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
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


async def test_a_console_sign_in_ends_with_its_key_and_follows_its_admin_role(tmp_path, monkeypatch):
    """The console's cookie outlives a restart (its secret is stored), but each request looks its principal up
    in the key ring of now: a key removed from the config signs out; an admin made a plain user loses the admin
    view; a forged or expired cookie is nobody."""
    from types import SimpleNamespace

    from twinkle.server.console import ConsoleSessions

    monkeypatch.delenv("TWINKLE_API_KEYS", raising=False)
    store = await Store.open(str(tmp_path / "s.sqlite"))
    plane = SimpleNamespace(store=store, keyring=await KeyRing.load(store, [KEY_A, KEY_B], host="0.0.0.0",
                                                                   admin_keys=[KEY_A]))
    sessions = ConsoleSessions(plane)
    alice = await sessions.issue(plane.keyring.authenticate(KEY_A))
    bob = await sessions.issue(plane.keyring.authenticate(KEY_B))
    assert await sessions.check(alice) == plane.keyring.authenticate(KEY_A) and (await sessions.check(alice)).admin
    plane.keyring = await KeyRing.load(store, [KEY_A], host="0.0.0.0")  # restarted: bob removed, alice no admin
    later = ConsoleSessions(plane)
    assert await later.check(bob) is None
    assert (await later.check(alice)).id == principal_id(KEY_A) and not (await later.check(alice)).admin
    assert await later.check(alice.replace(principal_id(KEY_A), principal_id(KEY_B))) is None  # signed for alice
    assert await later.check(alice, now=time.time() + 13 * 3600) is None
    await store.close()

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


KEY_ADMIN = "tml-operator-00112233445566"


def test_admin_routes_need_an_admin_key_and_show_every_tenant(tmp_path, monkeypatch):
    """Usage of all tenants and the services' internals are for admin keys only; a tenant gets 403."""
    from twinkle.common.models import TINY_MODEL_ID, served_model_name
    from twinkle.model.service import ModelService
    from twinkle.server.core.ports import LocalPort
    from twinkle.server.native import NativeService, NativeSettings, create_twinkle_app

    monkeypatch.delenv("TWINKLE_API_KEYS", raising=False)
    monkeypatch.delenv("TWINKLE_ADMIN_KEYS", raising=False)
    model = ModelService(TINY_MODEL_ID, adapter_timeout_s=None)
    name = served_model_name(TINY_MODEL_ID)
    settings = TinkerSettings(checkpoint_dir=str(tmp_path / "t"), api_keys=[KEY_A, KEY_B], admin_keys=[KEY_ADMIN])
    with TestClient(create_tinker_app(settings, {name: LocalPort(model)}, {}, path_prefix="/api/v1")) as client:
        for key, status in ((KEY_A, 403), (KEY_ADMIN, 200)):
            assert client.get("/api/v1/admin/usage", headers={"X-API-Key": key}).status_code == status
            assert client.get("/api/v1/admin/services", headers={"X-API-Key": key}).status_code == status
        assert client.get("/api/v1/admin/usage").status_code == 401
        r = client.post("/api/v1/create_session", json={"tags": [], "sdk_version": "0.38.0"},
                        headers={"X-API-Key": KEY_B})
        assert r.status_code == 200
        usage = client.get("/api/v1/admin/usage", headers={"X-API-Key": KEY_ADMIN}).json()["principals"]
        assert usage[principal_id(KEY_B)]["open_sessions"] == 1
        services = client.get("/api/v1/admin/services", headers={"X-API-Key": KEY_ADMIN}).json()["services"]
        assert services[0]["kind"] == "model" and services[0]["info"]["model_name"] == name
        assert "queued" in services[0]["health"]
    with contextlib.suppress(Exception):
        asyncio.run(model.close())
    native = NativeSettings(checkpoint_dir=str(tmp_path / "n"), api_keys=[KEY_A], admin_keys=[KEY_ADMIN])
    with TestClient(create_twinkle_app(NativeService(native, models={}, samplers={}), path_prefix="/server")) as client:
        assert client.get("/server/admin/usage", headers={"X-API-Key": KEY_A}).status_code == 403
        assert client.get("/server/admin/usage", headers={"X-API-Key": KEY_ADMIN}).status_code == 200


def test_yaml_role_admin_keys_become_admin_keys():
    from twinkle.common.config.schema import ServerArgs

    args = msgspec.convert({"api_keys": ["tml-user", {"key": "tml-ops", "role": "admin"}],
                            "admin_keys": ["tml-ops2"]}, ServerArgs)
    assert args.api_keys == ["tml-user"] and args.admin_keys == ["tml-ops2", "tml-ops"]


def test_component_info_and_health_are_public_views():
    from twinkle.common.wire import ServiceHealth, ServiceInfo, WorkerInfo

    info = ServiceInfo(kind="model", model_name="m", model_id="builtin://m", app="models-m", runs=7,
                       workers=[WorkerInfo(rank=0, pid=123, hostname="node-1")], settings={"engine_args": "secret"})
    public = info.public()
    assert (public.workers, public.runs, public.settings, public.app) == ([], None, {}, None)
    assert public.model_name == "m"
    health = ServiceHealth(kind="model", queued=5, busy_for_s=2.0, runs=3, resident_runs=1).public()
    assert (health.queued, health.busy_for_s, health.runs, health.resident_runs) == (None, None, None, None)
