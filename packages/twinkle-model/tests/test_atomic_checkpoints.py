"""Checkpoint directories are replaced atomically, through crashes and failed writes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from twinkle.common.wire import UserError
from twinkle.model.checkpoints import atomic_directory


def _write(path, content: str) -> None:
    with atomic_directory(str(path)) as tmp:
        for name in ("a.bin", "b.bin"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(content)


def _content(path) -> set[str]:
    return {open(os.path.join(path, n)).read() for n in sorted(os.listdir(path))}


def test_an_overwrite_swaps_the_whole_directory_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "ckpt"
    _write(target, "old")
    _write(target, "new")
    assert _content(target) == {"new"} and os.listdir(tmp_path) == ["ckpt"]


def test_a_failed_write_is_a_user_error_and_keeps_the_old_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    _write(target, "old")
    with pytest.raises(UserError) as e:
        with atomic_directory(str(target)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.status == 507 and "No space left" in str(e.value) and str(tmp_path) not in str(e.value)
    assert _content(target) == {"old"} and os.listdir(tmp_path) == ["ckpt"]


def test_leftovers_of_a_crash_are_repaired_by_the_next_write(tmp_path):
    # a crash between "old set aside" and "new renamed in" (where no atomic exchange exists)
    (tmp_path / ".ckpt.old-1234").mkdir()
    (tmp_path / ".ckpt.old-1234" / "a.bin").write_text("old")
    (tmp_path / ".ckpt.tmp-5678").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_directory(str(tmp_path / "ckpt")):
            raise RuntimeError("this write fails too")
    assert _content(tmp_path / "ckpt") == {"old"} and os.listdir(tmp_path) == ["ckpt"]


def test_sigkill_during_overwrites_never_leaves_a_partial_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    _write(target, "0")
    script = textwrap.dedent(f"""
        import os, sys
        from twinkle.model.checkpoints import atomic_directory
        print("ready", flush=True)
        i = 0
        while True:
            i += 1
            with atomic_directory({str(target)!r}) as tmp:
                for name in ("a.bin", "b.bin"):
                    with open(os.path.join(tmp, name), "w") as f:
                        f.write(str(i) * 100000)
    """)
    for delay in (0.05, 0.2, 0.5):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        files = sorted(os.listdir(target))
        assert files == ["a.bin", "b.bin"] and len(_content(target)) == 1  # one whole version, never a mix
        _write(target, "again")  # the next write repairs any leftovers
        assert os.listdir(tmp_path) == ["ckpt"]
