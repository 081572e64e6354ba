"""Install Debian's Chromium for the console's browser test when it is missing (``hatch run test`` runs this).

Playwright drives the system Chromium (``executable_path``): its own browser download is not a package
registry and is unreachable from CI. Never fails the test run: when Chromium cannot be installed (no root, no
apt), it says so and the browser test reports the same reason when it skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def main() -> int:
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return 0
    apt = shutil.which("apt-get")
    if apt is None:
        print("ensure_chromium: no apt-get here; the console's browser test will be skipped", file=sys.stderr)
        return 0
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        print("ensure_chromium: not root and no sudo; the console's browser test will be skipped", file=sys.stderr)
        return 0
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, apt, "install", "-y", "-q", "--no-install-recommends", "chromium"]
    for attempt in (install, [*prefix, apt, "update", "-q"], install):
        done = subprocess.run(attempt, env=env, capture_output=True, text=True)
        if done.returncode == 0 and attempt is install:
            print("ensure_chromium: installed Debian's chromium", file=sys.stderr)
            return 0
    print(f"ensure_chromium: could not install chromium:\n{done.stderr[-2000:]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
