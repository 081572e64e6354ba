"""Errors coming back from another process: one place unwraps them (``wire.remote_call``)."""

from __future__ import annotations

import pickle

import pytest
from twinkle.common.authority import HandleAuthority
from twinkle.common.wire import ResyncNeeded, ServiceUnavailable, UserError, remote_call


class RayActorError(Exception):
    """Named like Ray's: a lost actor or replica (ActorDiedError and ActorUnavailableError derive from it)."""


class ActorDiedError(RayActorError):
    pass


async def _raise(e: BaseException):
    raise e


async def test_a_lost_process_is_service_unavailable_and_a_user_error_stays_itself():
    with pytest.raises(ServiceUnavailable, match="ActorDiedError"):
        await remote_call(_raise(ActorDiedError("the actor died unexpectedly: <traceback, paths>")))
    with pytest.raises(UserError) as e:
        await remote_call(_raise(UserError("bad field", field="data[0]", status=422)))
    assert (e.value.field, e.value.status) == ("data[0]", 422)


def test_resync_needed_keeps_where_the_run_stands_across_processes():
    again = pickle.loads(pickle.dumps(ResyncNeeded("restored", expected=7)))
    assert isinstance(again, ResyncNeeded) and again.expected == 7 and again.status == 409


class _DeadMethod:
    def remote(self, *args):
        return _raise(ActorDiedError("central replica died"))


class _DeadHandle:
    def __getattr__(self, name):
        return _DeadMethod()


async def test_a_central_server_that_died_is_a_503_for_the_component_caller():
    authority = HandleAuthority("CentralServer", "server", timeout_s=5)
    authority._handle = _DeadHandle()
    with pytest.raises(UserError) as e:
        await authority.authenticate("tml-key")
    assert e.value.status == 503 and "not available" in str(e.value)
