"""Checkpoint URIs and where they live on disk.

A checkpoint is addressed by ``tinker://<run_id>/<kind>/<name>`` (the official SDK parses exactly three
``/``-separated parts) or ``twinkle://…`` (same shape, for the native client). ``kind`` is ``weights`` (a
training state: adapter + optimizer), ``sampler_weights`` (adapter only) or ``external_weights`` (an adapter
exported for download; it cannot be loaded or sampled, only listed, downloaded and deleted). Clients never see or pass server
paths: the path is derived here from the owner and the URI, under one root that every node can read.

Layout::

    <checkpoint_dir>/<owner>/<run_id>/weights/<name>/           save_state / load_state
    <checkpoint_dir>/<owner>/<run_id>/sampler_weights/<name>/   named sampler checkpoints
    <checkpoint_dir>/<owner>/<run_id>/external_weights/<name>/  save_weights_external
    <checkpoint_dir>/<owner>/<run_id>/ephemeral/<id>/           save_weights_and_get_sampling_client

Every part is validated strictly (a whitelist of characters, no ``..``), then the joined path is checked to
stay under the root: a URI can never reach outside the owner's tree.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass

from twinkle.common.wire import UserError

SCHEMES = ("tinker://", "twinkle://")
KINDS = ("weights", "sampler_weights")  # what loads and samples
ALL_KINDS = (*KINDS, "external_weights")
CHECKPOINT_TYPE = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
EPHEMERAL = "ephemeral"

# Run ids look like "<session>:train:<n>"; names are user-chosen labels such as "step-100" or "ckpt.v2".
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:=+@-]{0,127}$")
_OWNER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class CheckpointRef:
    """A parsed checkpoint URI."""

    run_id: str
    kind: str
    name: str
    scheme: str = "tinker://"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def uri(self) -> str:
        return f"{self.scheme}{self.run_id}/{self.kind}/{self.name}"


def validate_name(name: str, *, field: str = "path") -> str:
    """A checkpoint name as given to ``save_state(name)``: one path component, no traversal."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise UserError(
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits and . _ - : = + @ "
            "(no '/', no '..', not starting with '.')",
            field=field,
        )
    return name


def validate_run_id(run_id: str, *, field: str = "model_id") -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        raise UserError(f"invalid training run id {run_id!r}", field=field)
    return run_id


def parse_uri(uri: str, *, field: str = "path", kinds: tuple[str, ...] = KINDS) -> CheckpointRef:
    """Parse ``tinker://<run>/<kind>/<name>``; raise a ``UserError`` that says what a valid one looks like."""
    if not isinstance(uri, str):
        raise UserError("must be a string like tinker://<run_id>/weights/<name>", field=field)
    scheme = next((s for s in SCHEMES if uri.startswith(s)), None)
    if scheme is None:
        raise UserError(
            f"{uri!r} is not a checkpoint path; expected tinker://<run_id>/{kinds[0]}/<name> "
            "(server file paths are not accepted)",
            field=field,
        )
    parts = uri[len(scheme):].split("/")
    if len(parts) != 3:
        raise UserError(f"{uri!r} must have exactly three parts: {scheme}<run_id>/<kind>/<name>", field=field)
    run_id, kind, name = parts
    if kind not in kinds:
        raise UserError(f"{uri!r}: kind {kind!r} must be one of {', '.join(kinds)}", field=field)
    validate_run_id(run_id, field=field)
    validate_name(name, field=field)
    return CheckpointRef(run_id=run_id, kind=kind, name=name, scheme=scheme)


def parse_checkpoint_id(checkpoint_id: str, *, field: str = "checkpoint_id") -> tuple[str, str]:
    """``weights/ckpt-1`` → ("weights", "ckpt-1")."""
    parts = checkpoint_id.split("/")
    if len(parts) != 2 or parts[0] not in ALL_KINDS:
        raise UserError(
            f"{checkpoint_id!r} is not a checkpoint id; expected <kind>/<name> with kind one of "
            f"{', '.join(ALL_KINDS)}",
            field=field,
        )
    validate_name(parts[1], field=field)
    return parts[0], parts[1]


class CheckpointLayout:
    """Maps (owner, run, kind, name) to a directory under ``root``."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(os.path.expanduser(root))

    def run_dir(self, owner: str, run_id: str) -> str:
        if not _OWNER.match(owner):
            raise ValueError(f"invalid owner id {owner!r}")
        validate_run_id(run_id)
        return self._inside(os.path.join(self.root, owner, run_id))

    def path_for(self, owner: str, run_id: str, kind: str, name: str) -> str:
        if kind not in ALL_KINDS and kind != EPHEMERAL:
            raise ValueError(f"invalid checkpoint kind {kind!r}")
        validate_name(name)
        return self._inside(os.path.join(self.run_dir(owner, run_id), kind, name))

    def _inside(self, path: str) -> str:
        real = os.path.realpath(path)
        if not real.startswith(self.root + os.sep):
            raise UserError("checkpoint path escapes the checkpoint directory")
        return real

    def remove(self, path: str) -> None:
        """Delete a checkpoint directory (only ever one under the root)."""
        real = self._inside(path)
        shutil.rmtree(real, ignore_errors=True)


def dir_size(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def safe_file_name(text: str) -> str:
    """``text`` with anything but letters, digits and ``-_.`` replaced: fit for a download's file name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:120]


def pack_checkpoint(path: str, top: str) -> str:
    """The checkpoint directory ``path`` as a tar file (members under ``top/``) in a temporary place; the
    caller removes it. Links are not followed, so nothing outside the checkpoint can be packed."""
    fd, archive = tempfile.mkstemp(prefix="twinkle-checkpoint-", suffix=".tar")
    os.close(fd)
    try:
        with tarfile.open(archive, "w") as tar:
            for dirpath, dirs, files in os.walk(path, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(dirpath, d)))
                for f in sorted(files):
                    full = os.path.join(dirpath, f)
                    if os.path.isfile(full) and not os.path.islink(full):
                        tar.add(full, arcname=os.path.join(safe_file_name(top), os.path.relpath(full, path)),
                                recursive=False)
    except BaseException:
        os.remove(archive)
        raise
    return archive
