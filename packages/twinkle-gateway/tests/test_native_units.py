"""Pure pieces of the native protocol: the components' principal cache, body decoding, sampling params,
the launcher's wiring of components to the central server, the native concurrency default."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from twinkle.common.authority import CachingAuthority, central_authority
from twinkle.common.component import ComponentSpec, PeerApp
from twinkle.common.native import (
    SampleParamsIn,
    TrainRequest,
    decode,
    peek_seq_id,
)
from twinkle.common.wire import NotFoundError, UserError, unwrap_user_error


class _Counting:
    def __init__(self):
        self.calls = 0

    async def authenticate(self, api_key):
        self.calls += 1
        if api_key != "tml-good":
            raise UserError("invalid API key", status=401)
        return "p-1"


def test_principals_are_cached_failures_are_not():
    inner = _Counting()
    auth = CachingAuthority(inner, ttl_s=60)

    async def go():
        assert await auth.authenticate("tml-good") == "p-1"
        assert await auth.authenticate("tml-good") == "p-1"
        for _ in range(2):
            with pytest.raises(UserError) as e:
                await auth.authenticate("tml-bad")
            assert e.value.status == 401
        assert "tml-good" not in repr(auth._cache)  # digests, not raw keys

    asyncio.run(go())
    assert inner.calls == 3


def test_cache_expires():
    inner = _Counting()
    auth = CachingAuthority(inner, ttl_s=0.0)
    asyncio.run(auth.authenticate("tml-good"))
    asyncio.run(auth.authenticate("tml-good"))
    assert inner.calls == 2


def test_decode_names_the_field():
    with pytest.raises(UserError) as e:
        decode(b'{"data": [{"model_input": [1, "x"]}]}', TrainRequest)
    assert e.value.field == "data[0].model_input[1]"
    with pytest.raises(UserError) as e:
        decode(b'{"data": [], "bogus": 1}', TrainRequest)
    assert "bogus" in e.value.message
    with pytest.raises(UserError, match="empty"):
        decode(b"  ", TrainRequest)
    with pytest.raises(UserError, match="not valid JSON"):
        decode(b"{", TrainRequest)


def test_strict_decode_refuses_unknown_keys_of_lenient_structs():
    class Lenient(msgspec.Struct):
        a: int = 0

    assert decode(b'{"a": 1, "b": 2}', Lenient).a == 1
    with pytest.raises(UserError) as e:
        decode(b'{"a": 1, "b": 2}', Lenient, strict=True)
    assert e.value.field == "b"


def test_peek_seq_id():
    assert peek_seq_id(b'{"seq_id": 4, "data": "garbage"}') == 4
    assert peek_seq_id(b'{"seq_id": -1}') is None
    assert peek_seq_id(b"not json") is None


def test_sampling_params():
    assert SampleParamsIn(stop=[1, 2]).to_wire().stop == [1, 2]
    assert SampleParamsIn(stop=["a"]).to_wire().stop == ["a"]
    for bad, field in ((dict(stop=["a", 1]), "stop"), (dict(max_tokens=0), "max_tokens"),
                       (dict(temperature=float("nan")), "temperature"), (dict(top_k=0), "top_k")):
        with pytest.raises(UserError) as e:
            SampleParamsIn(**bad).to_wire()
        assert e.value.field == f"sampling_params.{field}"


def test_unwrap_finds_the_service_error_inside_a_wrapper():
    inner = NotFoundError("training run 'x' not found", field="run_id")

    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last): ...")
            self.cause = cause

    assert unwrap_user_error(Wrapper(inner)) is inner
    assert unwrap_user_error(RuntimeError("x")) is None


def test_deployments_admit_many_concurrent_requests_unless_the_yaml_says_otherwise():
    from twinkle.common.config.schema import Deployment
    from twinkle.common.binding import DEFAULT_MAX_ONGOING_REQUESTS, deployment_options

    assert deployment_options(None, "X") == ("X", deployment_options(Deployment(name="X"), "X")[1])
    assert deployment_options(None, "X")[1]["max_ongoing_requests"] == DEFAULT_MAX_ONGOING_REQUESTS
    name, options = deployment_options(Deployment(name="Y", max_ongoing_requests=3), "X")
    assert (name, options["max_ongoing_requests"]) == ("Y", 3)
    assert options["ray_actor_options"]["num_cpus"] == 0.1


def test_components_know_the_central_server(tmp_path):
    from twinkle.common.config import load_config
    from twinkle.server import launcher

    config = load_config(str(launcher.Path(__file__).resolve().parents[3] / "deploy" / "local.yaml"))

    class _Plan:  # no workers planned: only the wiring between applications is looked at
        apps: dict = {}

    specs = launcher.component_specs(config, _Plan(), {"checkpoint_dir": str(tmp_path), "state_db": ""})
    by_kind = {s.import_path: s for s in specs}
    assert by_kind["server"].central is None
    for kind in ("model", "sampler", "processor"):
        central = by_kind[kind].central
        assert (central.app_name, central.deployment_name) == ("server", "TwinkleServer")
        assert central.route_prefix == "/server"
    assert central_authority(by_kind["model"]) is not None
    tinker = ComponentSpec(app_name="m", route_prefix="/m", import_path="model", server_type="tinker", args={},
                           central=PeerApp(app_name="s", deployment_name="d", import_path="server", route_prefix="/"))
    assert central_authority(tinker) is None


def test_keys_given_to_the_launcher_travel_in_the_central_spec(tmp_path, monkeypatch):
    """A ``ray start`` cluster's replicas do not have the launcher's environment: the keys must reach the
    central app through its spec, or it would run open."""
    from twinkle.common.config import load_config
    from twinkle.server import launcher

    config = load_config(str(launcher.Path(__file__).resolve().parents[3] / "deploy" / "local.yaml"))

    class _Plan:
        apps: dict = {}

    monkeypatch.setenv("TWINKLE_API_KEYS", "tml-from-env, tml-other")
    specs = launcher.component_specs(config, _Plan(), {"checkpoint_dir": str(tmp_path), "state_db": ""})
    server = next(s for s in specs if s.import_path == "server")
    assert server.args["api_keys"] == ["tml-from-env", "tml-other"]
    assert all("api_keys" not in s.args for s in specs if s.import_path != "server")


def test_reports_of_the_component_apps_are_counted_once_for_the_runs_owner_with_its_session():
    """``NativeAuthority.report``: a report about a run its owner does not have (deleted meanwhile) is dropped;
    a seq_id reported again (a retried request, answered from its first execution) is not counted twice; each
    outcome gets its run's session."""
    from types import SimpleNamespace

    from twinkle.common.outcomes import Outcome
    from twinkle.server.native.authority import NativeAuthority

    seen: list[Outcome] = []
    runs = {"run-a": SimpleNamespace(owner="p-alice", session_id="sess-1")}

    async def ready() -> None:
        pass

    async def get_run(run_id: str):
        return runs.get(run_id)

    plane = SimpleNamespace(ready=ready, store=SimpleNamespace(get_run=get_run), observe=seen.append)

    def outcome(owner: str, seq_id: int | None, run_id: str | None = "run-a", kind: str = "forward_backward"):
        return Outcome(owner=owner, kind=kind, run_id=run_id, seq_id=seq_id, created=1.0, finished=2.0,
                       trained_tokens=10)

    authority = NativeAuthority(plane)
    asyncio.run(authority.report([outcome("p-bob", 1), outcome("p-alice", 1), outcome("p-alice", 1),
                                  outcome("p-alice", 2), outcome("p-alice", 3, "run-gone"),
                                  outcome("p-bob", None, None, "sample")]))
    asyncio.run(authority.report([outcome("p-alice", 2), outcome("p-alice", 3)]))
    assert [(o.owner, o.seq_id, o.session_id) for o in seen] == [
        ("p-alice", 1, "sess-1"), ("p-alice", 2, "sess-1"), ("p-bob", None, None), ("p-alice", 3, "sess-1")]
