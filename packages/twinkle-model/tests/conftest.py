"""Shared fixtures: the real built-in tiny Qwen2 model (built once into $TWINKLE_CACHE_DIR), datum factories.

Tests run the real engine (transformers + peft) on CPU; batches are tiny so the suite stays fast on 2 cores.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from twinkle.common.models import TINY_MODEL_ID, build_tiny_model

sys.path.insert(0, os.path.dirname(__file__))  # for model_testutil (importlib import mode)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(int(os.environ.get("TWINKLE_TEST_THREADS", "1")))


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
