"""The reliability harness: the short/full switch, the summary-table fixture and its terminal report.

`make test` runs every scenario in its short form; `make reliability` (`pytest tests/reliability
--reliability-full`) runs the full one. `FSW_RELIABILITY_FULL=1` does the same from any invocation: pytest
reads this file's option only when the run names tests/reliability (or a file in it).

A scenario asks `reliability_trials(full, short)` how many trials to run (`FSW_RELIABILITY_SCALE=5`
multiplies the full counts, for a longer hunt) and records its outcome with
`reliability_report.record(...)`; the table is printed after the test results and written as JSON to
`FSW_RELIABILITY_JSON` when that is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .report import ReliabilityReport

_REPORT = pytest.StashKey[ReliabilityReport]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-full",
        action="store_true",
        default=False,
        help="run the reliability scenarios in full (many trials) rather than their short form",
    )


def is_full(config: pytest.Config) -> bool:
    return bool(config.getoption("reliability_full", default=False)) or os.environ.get("FSW_RELIABILITY_FULL") == "1"


def _report(config: pytest.Config) -> ReliabilityReport:
    if _REPORT not in config.stash:
        config.stash[_REPORT] = ReliabilityReport("full" if is_full(config) else "short")
    return config.stash[_REPORT]


@pytest.fixture(scope="session")
def reliability_full(pytestconfig: pytest.Config) -> bool:
    """True under `make reliability`, False in `make test`."""
    return is_full(pytestconfig)


@pytest.fixture(scope="session")
def reliability_trials(reliability_full: bool):  # type: ignore[no-untyped-def]
    """`reliability_trials(full, short)`: the trial count for this run's mode."""
    scale = float(os.environ.get("FSW_RELIABILITY_SCALE", "1"))
    return lambda full, short: max(1, round(full * scale)) if reliability_full else short


@pytest.fixture(scope="session")
def reliability_report(pytestconfig: pytest.Config) -> ReliabilityReport:
    """Where each scenario records its row of the summary table."""
    return _report(pytestconfig)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    if _REPORT not in config.stash or not config.stash[_REPORT].rows:
        return
    report = config.stash[_REPORT]
    terminalreporter.write_sep("=", f"fsw reliability ({report.mode})")
    for line in report.lines():
        terminalreporter.write_line(line)
    target = os.environ.get("FSW_RELIABILITY_JSON")
    if target:
        report.write_json(Path(target))
        terminalreporter.write_line(f"written to {target}")
