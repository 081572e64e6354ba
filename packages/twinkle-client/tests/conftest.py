"""Client tests run against the real native stack in-process (``LocalTwinkleStack``: the real apps and
engines on one uvicorn port), when the server packages are installed (the dev env); the client itself never
imports them."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEYS = ("tml-client-alice", "tml-client-bob")


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    pytest.importorskip("twinkle.server.native.testing", reason="the server packages are not installed")
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.server.native import NativeSettings
    from twinkle.server.native.testing import LocalTwinkleStack

    root = tmp_path_factory.mktemp("client-stack")
    settings = NativeSettings(checkpoint_dir=str(root / "ckpt"), api_keys=list(KEYS), heartbeat_interval_s=0.5)
    with LocalTwinkleStack(settings, TINY_MODEL_ID) as s:
        yield s


@pytest.fixture(scope="session")
def tinker_server(tmp_path_factory):
    """The Tinker-compatible app (with its OpenAI-compatible surface) in-process over the real engines."""
    pytest.importorskip("twinkle.server.tinker.testing", reason="the server packages are not installed")
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.server.tinker import TinkerSettings
    from twinkle.server.tinker.testing import LocalTinkerServer

    settings = TinkerSettings(checkpoint_dir=str(tmp_path_factory.mktemp("tinker-server") / "ckpt"))
    with LocalTinkerServer(settings, TINY_MODEL_ID) as server:
        yield server


@pytest.fixture(scope="session")
def keys():
    return KEYS
