"""Shared fixtures: the real built-in tiny Qwen2 model (built once into $TWINKLE_CACHE_DIR), datum factories.

Tests run the real engine (transformers + peft) on CPU; batches are tiny so the suite stays fast on 2 cores.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from twinkle.common.models import TINY_MODEL_ID, build_tiny_model

sys.path.insert(0, os.path.dirname(__file__))  # for model_testutil (importlib import mode)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _torch_threads():
    """One intra-op thread by default (TWINKLE_TEST_THREADS): on a shared 2-core box, 2 threads contend badly.
    Restored after each test so other packages' tests in the same session are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TWINKLE_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_id() -> str:
    build_tiny_model()
    return TINY_MODEL_ID


@pytest.fixture(scope="module")
def backend(tiny_model_id):
    """One real backend per test module; tests use distinct run ids."""
    from twinkle.model.transformers_backend import TransformersBackend

    b = TransformersBackend(tiny_model_id, device="cpu")
    yield b
    b.close()
