"""TEST-ONLY: with ``TWINKLE_TEST_MEGATRON_CPU_SHIM=1`` and this directory on ``PYTHONPATH``, every Python process
(Ray workers and spawned ranks inherit both) installs ``cpu_shim`` right after ``megatron.core`` is imported.

Nothing is imported at interpreter start (not even torch): a ``sys.meta_path`` finder only watches for the
``megatron.core`` import, lets the normal import run, then installs the shim.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_TARGET = "megatron.core"
_HERE = os.path.dirname(os.path.abspath(__file__))


class _InstallShimAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._busy = False
        self._loader = None

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET or self._busy:
            return None
        self._busy = True  # find the real spec without finding ourselves again
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]  # once per process
        # By file, not by name: a spawned child's sys.path is replaced by its parent's, which may lack this folder.
        spec = importlib.util.spec_from_file_location("cpu_shim", os.path.join(_HERE, "cpu_shim.py"))
        shim = sys.modules.setdefault("cpu_shim", importlib.util.module_from_spec(spec))
        if not hasattr(shim, "install"):
            spec.loader.exec_module(shim)
        shim.install()


if os.environ.get("TWINKLE_TEST_MEGATRON_CPU_SHIM") == "1":
    sys.meta_path.insert(0, _InstallShimAfterImport())
