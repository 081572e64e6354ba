"""Checkpoint directories: atomic writes and the on-disk layout.

A checkpoint is a directory, in the PEFT layout so that stock peft (``PeftModel.from_pretrained(base, dir)``)
and vLLM load it::

    adapter_config.json          peft.LoraConfig of the adapter (inference_mode true)
    adapter_model.safetensors    LoRA weights, keys as peft writes them (adapter name removed)
    optimizer.safetensors        state checkpoints with optimizer only: AdamW moments and step per weight
    twinkle_state.json           state checkpoints only: format, training step, LoRA config, optimizer flag

Why atomic: a crash or a concurrent reader must never see half a checkpoint (upstream wrote metadata before
weights). Everything is written into a temporary sibling directory, fsynced, then renamed into place. If the
target exists it is first renamed aside and removed after the new one is in place, so a reader sees the old or
the new checkpoint, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import msgspec
from twinkle.common.wire import LoraConfig, NotFoundError, UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
STATE_FILE = "twinkle_state.json"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a temporary directory; on success it replaces ``path`` atomically, on error it is removed."""
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the checkpoint's directory: {e.strerror}", field="path") from e
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
        for name in os.listdir(tmp):
            _fsync_file(os.path.join(tmp, name))
        _fsync_file(tmp)
        aside = None
        if os.path.lexists(target):
            aside = os.path.join(parent, f".{os.path.basename(target)}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, aside)
        os.rename(tmp, target)
        _fsync_file(parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def directory_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


def write_state_file(directory: str, *, step: int, lora: LoraConfig, has_optimizer: bool, model: str) -> None:
    doc = {
        "format": FORMAT_VERSION,
        "step": step,
        "lora": msgspec.to_builtins(lora),
        "has_optimizer": has_optimizer,
        "base_model": model,
    }
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)


def require_checkpoint(path: str) -> str:
    """Check that ``path`` is a checkpoint directory (PEFT files present); return its absolute path."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise NotFoundError("no checkpoint there (it was deleted, or never written)", field="path")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not os.path.isfile(os.path.join(path, name)):
            raise UserError(f"not a checkpoint: {name} is missing", field="path")
    return path


def read_state_file(path: str) -> dict | None:
    f = os.path.join(path, STATE_FILE)
    if not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"the checkpoint's {STATE_FILE} is unreadable ({type(e).__name__})", field="path") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
        raise UserError(f"the checkpoint's {STATE_FILE} has an unsupported format", field="path")
    return doc


def read_adapter_config(path: str) -> dict:
    try:
        with open(os.path.join(path, ADAPTER_CONFIG)) as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"the checkpoint's {ADAPTER_CONFIG} is unreadable ({type(e).__name__})", field="path") from e
    if not isinstance(doc, dict):
        raise UserError(f"the checkpoint's {ADAPTER_CONFIG} is not a JSON object", field="path")
    return doc
