"""The reliability summary table: one row per scenario, printed at the end of the session.

A scenario records what it did through the `reliability_report` fixture (see conftest.py); the table
goes to the terminal and, when `FSW_RELIABILITY_JSON` names a file, to that file as JSON. A scenario
records its row before it asserts, so a failing scenario still shows its figures.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

COLUMNS = ("scenario", "trials", "jobs sent", "jobs answered", "jobs lost", "wrong answers", "recovery s (median/max)")


@dataclass
class Row:
    """One scenario's outcome. A 'job' is one request a client waits on: a queue job, or a search."""

    scenario: str
    trials: int
    jobs_sent: int
    jobs_answered: int
    jobs_lost: int
    wrong_answers: int
    recovery_median_s: float | None = None
    recovery_max_s: float | None = None
    notes: str = ""

    def cells(self) -> tuple[str, ...]:
        if self.recovery_median_s is None:
            recovery = "-"
        else:
            recovery = f"{self.recovery_median_s:.2f} / {self.recovery_max_s:.2f}"
        return (self.scenario, str(self.trials), str(self.jobs_sent), str(self.jobs_answered), str(self.jobs_lost),
                str(self.wrong_answers), recovery)


class ReliabilityReport:
    """Rows recorded by the scenarios of one pytest session."""

    def __init__(self, mode: str):
        self.mode = mode  # "short" (make test) or "full" (make reliability)
        self.rows: list[Row] = []

    def record(
        self,
        scenario: str,
        *,
        trials: int,
        jobs_sent: int,
        jobs_answered: int,
        wrong_answers: int,
        jobs_lost: int | None = None,
        recovery_s: list[float] | None = None,
        notes: str = "",
    ) -> Row:
        """Add a scenario's row; `jobs_lost` defaults to sent minus answered; recovery is per trial."""
        lost = jobs_sent - jobs_answered if jobs_lost is None else jobs_lost
        times = [t for t in (recovery_s or []) if t is not None]
        row = Row(
            scenario,
            trials,
            jobs_sent,
            jobs_answered,
            lost,
            wrong_answers,
            round(statistics.median(times), 3) if times else None,
            round(max(times), 3) if times else None,
            notes,
        )
        self.rows.append(row)
        return row

    def lines(self) -> list[str]:
        """The table as text lines, notes below it."""
        table = [COLUMNS, *(r.cells() for r in self.rows)]
        widths = [max(len(cells[i]) for cells in table) for i in range(len(COLUMNS))]

        def fmt(cells: tuple[str, ...]) -> str:
            first = cells[0].ljust(widths[0])
            return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

        out = [fmt(COLUMNS), "  ".join("-" * w for w in widths), *(fmt(r.cells()) for r in self.rows)]
        out += [f"{r.scenario}: {r.notes}" for r in self.rows if r.notes]
        return out

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps({"mode": self.mode, "rows": [asdict(r) for r in self.rows]}, indent=2) + "\n")
