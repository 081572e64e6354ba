"""Shared fixtures: the built-in tiny model's real tokenizer, and services over it.

Services are module-scoped because starting worker processes (each imports transformers) is the slow part
of this suite; tests must not leave state behind in them.
"""

from __future__ import annotations

import asyncio

import pytest

from twinkle.common.models import TINY_MODEL_ID, load_tokenizer
from twinkle.processor.service import ProcessorService


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TINY_MODEL_ID)


@pytest.fixture(scope="module")
def service():
    svc = ProcessorService(TINY_MODEL_ID, num_workers=1, max_rows_per_request=50)
    yield svc
    asyncio.run(svc.close())


@pytest.fixture(scope="module")
def service2():
    """Two worker processes and small shards, so a few dozen rows already spread over many shards."""
    svc = ProcessorService(TINY_MODEL_ID, num_workers=2, max_rows_per_request=50, shard_rows=7)
    yield svc
    asyncio.run(svc.close())
