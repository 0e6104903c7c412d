"""Suite-wide rules.

``PPN_REQUIRE_REAL=1`` (set by ``.ci/run``) turns a skipped test marked ``real``
into a failure: in CI a real component that cannot run is a broken build, not a
skip.
"""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("PPN_REQUIRE_REAL") == "1"
            and item.get_closest_marker("real") is not None):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"real-component test skipped under PPN_REQUIRE_REAL=1: {reason}"
