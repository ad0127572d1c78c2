"""pytest plugin: under CI=true a test (or module) skipped because an import failed fails the run.

`pytest.importorskip` turns a missing dependency into a quiet skip; in CI that would hide a broken
install. Registered by tests/conftest.py; usable alone with `-p tests.import_guard`.
"""

from __future__ import annotations

import os
import re

import pytest

_IMPORT_SKIP = re.compile(r"could not import|No module named|ImportError|ModuleNotFoundError")


def _skip_reason(report) -> str | None:
    if not report.skipped:
        return None
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_import_skip(report) -> None:
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    if getattr(report, "wasxfail", None) is not None:
        return
    reason = _skip_reason(report)
    if reason is not None and _IMPORT_SKIP.search(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped because an import failed, which CI=true does not allow: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_import_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_import_skip(outcome.get_result())
