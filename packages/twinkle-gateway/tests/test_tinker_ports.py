"""Ports to the services, settings, and checkpoint URIs."""

from __future__ import annotations

import pytest

from twinkle.common.wire import AdamParams, NotFoundError, UserError
from twinkle.server.core.ports import HandlePort, LocalPort, ModelPort, SamplerPort
from twinkle.server.core.checkpoints import CheckpointLayout, parse_checkpoint_id, parse_uri
from twinkle.server.tinker import TinkerSettings


class _Service:
    """A stand-in service object: records calls (the port's forwarding is what is tested here)."""

    def __init__(self):
        self.calls = []

    async def optim_step(self, run_id, owner, seq_id, params):
        self.calls.append(("optim_step", run_id, owner, seq_id, params))
        return "stepped"

    def info(self):  # sync, like SamplerService.info
        return {"model_name": "m"}

    async def load_state(self, run_id, owner, seq_id, path, include_optimizer, create=False):
        self.calls.append(("load_state", run_id, owner, seq_id, path, include_optimizer, create))
        raise NotFoundError("no such checkpoint", field="path")


async def test_local_port_forwards_sync_and_async():
    svc = _Service()
    port = LocalPort(svc)
    assert isinstance(port, ModelPort) and isinstance(port, SamplerPort)
    assert await port.optim_step("r", "o", 3, AdamParams()) == "stepped"
    assert await port.info() == {"model_name": "m"}
    with pytest.raises(NotFoundError) as e:
        await port.load_state("r", "o", 0, "/x", True, create=True)
    assert e.value.field == "path"
    assert svc.calls[-1] == ("load_state", "r", "o", 0, "/x", True, True)


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class _Handle:
    """Shaped like a Ray Serve DeploymentHandle: ``handle.method.remote(...)`` returns an awaitable."""

    def __init__(self, error=None):
        self.error = error
        self.routed: list[str] = []

    def options(self, *, multiplexed_model_id: str):
        self.routed.append(multiplexed_model_id)
        return self

    def __getattr__(self, name):
        async def call(*args, **kwargs):
            if self.error is not None:
                raise self.error
            return (name, args, kwargs)

        return _Method(call)


async def test_handle_port_calls_remote_and_resolves_lazily():
    made = []

    def factory():
        made.append(1)
        return _Handle()

    port = HandlePort(factory)
    assert made == []
    assert await port.save_state("r", "o", 5, "/p", include_optimizer=False) == (
        "save_state", ("r", "o", 5, "/p"), {"include_optimizer": False})
    assert await port.sample("req") == ("sample", ("req",), {})
    assert await port.list_runs("o") == ("list_runs", ("o",), {})
    assert made == [1]
    assert port.handle.routed == ["r"]  # a call about a run goes to the run's replica; the others do not name one


async def test_handle_port_sends_a_call_again_while_its_run_moves_between_replicas():
    from twinkle.common.wire import RunMoved

    class Moving(_Handle):
        attempts = 0

        def __getattr__(self, name):
            async def call(*args, **kwargs):
                self.attempts += 1
                if self.attempts < 3:
                    raise RunMoved("training run 'r' is now served by another replica")
                return (name, args)

            return _Method(call)

    handle = Moving()
    port = HandlePort(lambda: handle)
    assert await port.optim_step("r", "o", 4, None) == ("optim_step", ("r", "o", 4, None))
    assert handle.routed == ["r"] and handle.attempts == 3  # routed once, sent until it reached the run
    with pytest.raises(TypeError):
        HandlePort(42)


async def test_handle_port_unwraps_ray_task_errors():
    ray_exceptions = pytest.importorskip("ray.exceptions")
    cause = UserError("expected length 7", field="data[0].loss_fn_inputs.weights")
    wrapped = ray_exceptions.RayTaskError("forward_backward", "Traceback ...", cause)
    port = HandlePort(lambda: _Handle(error=wrapped.as_instanceof_cause()))
    with pytest.raises(UserError) as e:
        await port.forward_backward("r", "o", 1, None)
    assert e.value is cause and e.value.field == "data[0].loss_fn_inputs.weights"
    port = HandlePort(lambda: _Handle(error=RuntimeError("replica died")))
    with pytest.raises(RuntimeError, match="replica died"):
        await port.health()


def test_settings_from_server_args(tmp_path):
    s = TinkerSettings.from_server_args(
        {"api_keys": ["tml-a"], "supported_models": None, "session_timeout_s": 60.0, "long_poll_timeout_s": 20.0,
         "future_ttl_s": 3600.0},
        checkpoint_dir=str(tmp_path), state_db="", host="0.0.0.0")
    assert (s.api_keys, s.long_poll_timeout_s, s.host) == (["tml-a"], 20.0, "0.0.0.0")
    assert s.state_path == str(tmp_path / "twinkle-state.sqlite")
    assert TinkerSettings.from_server_args(None, checkpoint_dir="/c", state_db="/s.db").state_path == "/s.db"
    with pytest.raises(ValueError, match="invalid server args"):
        TinkerSettings.from_server_args({"bogus": 1}, checkpoint_dir="/c")
    with pytest.raises(ValueError, match="45 s"):
        TinkerSettings(checkpoint_dir="/c", long_poll_timeout_s=60)


@pytest.mark.parametrize("uri", [
    "tinker://sess-1:train:0/weights/ckpt-1",
    "tinker://sess-1:train:0/sampler_weights/s.1",
    "twinkle://run/weights/step_000100",
])
def test_valid_uris(uri):
    ref = parse_uri(uri)
    assert ref.uri == uri and ref.checkpoint_id == "/".join(uri.split("/")[-2:])


@pytest.mark.parametrize("uri, message", [
    ("/etc/passwd", "not a checkpoint path"),
    ("tinker://run/weights", "exactly three parts"),
    ("tinker://run/weights/a/b", "exactly three parts"),
    ("tinker://run/other/a", "kind 'other'"),
    ("tinker://run/weights/..", "invalid checkpoint name"),
    ("tinker://run/weights/.hidden", "invalid checkpoint name"),
    ("tinker://../weights/a", "invalid training run id"),
    ("tinker://run/weights/", "invalid checkpoint name"),
    ("tinker://ru n/weights/a", "invalid training run id"),
])
def test_invalid_uris(uri, message):
    with pytest.raises(UserError, match=message):
        parse_uri(uri)


def test_checkpoint_ids_and_layout(tmp_path):
    assert parse_checkpoint_id("weights/ckpt-1") == ("weights", "ckpt-1")
    with pytest.raises(UserError):
        parse_checkpoint_id("weights/a/b")
    layout = CheckpointLayout(str(tmp_path))
    path = layout.path_for("p-abc", "sess:train:0", "weights", "c1")
    assert path == str(tmp_path / "p-abc" / "sess:train:0" / "weights" / "c1")
    with pytest.raises(ValueError):
        layout.path_for("../x", "sess:train:0", "weights", "c1")
    with pytest.raises(UserError):
        layout.path_for("p-abc", "sess:train:0", "weights", "../../x")
    (tmp_path / "outside").mkdir()
    with pytest.raises(UserError):
        layout.remove(str(tmp_path / ".." / "outside"))


def test_healthz_is_503_naming_a_service_that_does_not_answer(tmp_path):
    from litestar.testing import TestClient

    from twinkle.server.tinker import create_tinker_app

    class _Down:
        async def health(self):
            raise ConnectionError("replica gone")

    class _Up:
        async def health(self):
            return {"status": "ok"}

    settings = TinkerSettings(checkpoint_dir=str(tmp_path / "ckpt"))
    app = create_tinker_app(settings, {"m": LocalPort(_Up())}, {"m": LocalPort(_Down())}, path_prefix="/api/v1")
    with TestClient(app) as client:
        r = client.get("/api/v1/healthz")
        assert r.status_code == 503 and r.json() == {"status": "unavailable", "unavailable": ["sampler m"]}
    app = create_tinker_app(settings, {"m": LocalPort(_Up())}, {"m": LocalPort(_Up())}, path_prefix="/api/v1")
    with TestClient(app) as client:
        assert client.get("/api/v1/healthz").json() == {"status": "ok"}
