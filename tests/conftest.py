import os
import sys

import pytest

# Cross-package tests share helpers in this folder (pytest runs with --import-mode=importlib).
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used a deployed stack shows the end of that stack's server log: a hang or a crash
    on the server side is otherwise invisible in CI's output."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        tail = getattr(value, "log_tail", None)
        if callable(tail):
            try:
                report.sections.append((f"server log of {name} (last lines)", tail()))
            except OSError as e:
                report.sections.append((f"server log of {name}", f"unreadable: {e}"))
