"""Errors about checkpoints tell the client what is wrong, never where the server keeps its files."""

from __future__ import annotations

import pytest
from twinkle.common.wire import LoraConfig, UserError


def test_checkpoint_errors_carry_no_server_path(backend, tmp_path):
    backend.create_adapter("paths", LoraConfig(rank=2, seed=0))
    saved = tmp_path / "secret-root" / "weights-only"
    backend.save_state("paths", str(saved), include_optimizer=False)
    for call in (lambda: backend.load_state("paths", str(saved), True),
                 lambda: backend.load_state("paths", str(tmp_path / "secret-root" / "missing"), False)):
        with pytest.raises(UserError) as e:
            call()
        assert "secret-root" not in str(e.value) and str(tmp_path) not in str(e.value)
