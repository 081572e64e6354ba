"""Checkpoint directories: atomic writes and the on-disk layout.

A checkpoint is a directory, in the PEFT layout so that stock peft (``PeftModel.from_pretrained(base, dir)``)
and vLLM load it::

    adapter_config.json          peft.LoraConfig of the adapter (inference_mode true)
    adapter_model.safetensors    LoRA weights, keys as peft writes them (adapter name removed)
    optimizer.safetensors        state checkpoints with optimizer only: AdamW moments and step per weight
    twinkle_state.json           state checkpoints only: format, training step, LoRA config, optimizer flag

Why atomic: a crash or a concurrent reader must never see half a checkpoint. Everything is written into a
temporary sibling directory, its files and the directory fsynced, then renamed into place. An existing target
is swapped with the new directory in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so at every instant the
path holds the old or the new checkpoint, even through a crash; where the exchange is not available the old
one is renamed aside first, and a later write of the same checkpoint puts it back if a crash came between.
Leftovers of a crashed write (``.<name>.tmp-*``, ``.<name>.old-*``) are removed by the next write of that
name. A write that fails (disk full, permissions) is a ``UserError`` for that request and leaves whatever was
saved before untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

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
    parent, name = os.path.split(target)
    try:
        os.makedirs(parent, exist_ok=True)
        _recover(parent, name)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    except OSError as e:
        raise UserError(f"cannot write the checkpoint: {e.strerror}", field="path", status=507) from None
    try:
        yield tmp
        for entry in os.listdir(tmp):
            _fsync(os.path.join(tmp, entry))
        _fsync(tmp)
        if not os.path.lexists(target):
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # it holds the old checkpoint now
        else:
            aside = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, aside)
            os.rename(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        _fsync(parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the checkpoint: {e.strerror}", field="path", status=507) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _leftovers(parent: str, name: str) -> list[str]:
    """Temporary and set-aside directories that writes of ``name`` create next to it."""
    return [e for e in os.listdir(parent) if e.startswith((f".{name}.tmp-", f".{name}.old-"))]


def remove_directory(path: str) -> None:
    """Delete a checkpoint directory and whatever crashed writes of it left next to it."""
    parent, name = os.path.split(os.path.abspath(path))
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        for entry in _leftovers(parent, name):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _recover(parent: str, name: str) -> None:
    """Undo what a crashed write of ``name`` left: put an old checkpoint back if the new one never arrived,
    then remove temporary and set-aside directories."""
    target = os.path.join(parent, name)
    leftovers = _leftovers(parent, name)
    olds = sorted(e for e in leftovers if e.startswith(f".{name}.old-"))
    if olds and not os.path.lexists(target):
        os.rename(os.path.join(parent, olds[-1]), target)
        leftovers.remove(olds[-1])
    for entry in leftovers:
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err))


def _fsync(path: str) -> None:
    """Flush a file or directory to disk; a failure is a failed write (the data may not be there)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def directory_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


@dataclass(frozen=True)
class RunSnapshot:
    """A run's state copied off the live model (CPU tensors), to be written by any thread.

    ``tensors`` uses the backend's export keys (``w:`` weights, ``m:``/``v:``/``s:`` AdamW moments and step,
    ``rng:``); ``adapter_config`` is the object whose ``save_pretrained`` writes ``adapter_config.json``."""

    step: int
    lora: LoraConfig
    model: str
    adapter_config: Any
    tensors: dict[str, Any] = field(repr=False)
    has_optimizer: bool = True


def write_snapshot(path: str, snap: RunSnapshot, *, state_file: bool = True,
                   extra_files: dict[str, bytes] | None = None) -> None:
    """Write ``snap`` at ``path`` (atomically, see the module docstring): a state checkpoint, or with
    ``state_file=False`` sampler weights (PEFT files only); ``extra_files`` (name -> bytes) go in too."""
    from safetensors.torch import save_file

    with atomic_directory(path) as tmp:
        weights = {k[2:]: v for k, v in snap.tensors.items() if k.startswith("w:")}
        save_file(weights, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        snap.adapter_config.save_pretrained(tmp)
        if snap.has_optimizer:
            opt = {k: v for k, v in snap.tensors.items() if not k.startswith("w:")}
            save_file(opt, os.path.join(tmp, OPTIMIZER_STATE), metadata={"format": "pt"})
        if state_file:
            write_state_file(tmp, step=snap.step, lora=snap.lora, has_optimizer=snap.has_optimizer, model=snap.model)
        for name, data in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)


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
