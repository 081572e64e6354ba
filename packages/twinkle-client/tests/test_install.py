"""``pip install packages/twinkle-client`` into a fresh venv: it pulls httpx and msgspec, never torch (nor the
server packages), imports without them, and stays small. Needs the package registry (set
``TWINKLE_OFFLINE=1`` to skip where there is none)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1]
# What ``python -m venv`` puts there itself; not part of what installing the client costs.
_BOOTSTRAP = ("pip", "setuptools", "_distutils_hack", "distutils-precedence.pth", "pkg_resources", "__pycache__")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.skipif(bool(os.environ.get("TWINKLE_OFFLINE")), reason="TWINKLE_OFFLINE is set: no package registry")
def test_the_client_installs_without_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(PACKAGE)],
                             capture_output=True, text=True, timeout=600, check=False)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    names = {line.split("==")[0] for line in listed.split()}
    assert {"twinkle-client", "httpx", "msgspec"} <= names
    assert not names & {"torch", "transformers", "ray", "twinkle-common", "twinkle-gateway", "numpy"}, names
    probe = ("import sys, twinkle_client; from twinkle_client import TwinkleClient, Datum; "
             "assert 'torch' not in sys.modules and 'twinkle' not in sys.modules; print(twinkle_client.__version__)")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "0.1.0", out.stderr
    (site,) = (venv / "lib").glob("python*/site-packages")
    installed = sum(_size(p) for p in site.iterdir() if not p.name.startswith(_BOOTSTRAP))
    print(f"twinkle-client and its dependencies: {installed / 2**20:.1f} MiB in site-packages")
    assert installed < 20 * 2**20
