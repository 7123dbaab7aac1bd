"""An evaluation's report: what `fsw-index eval` prints (a table), keeps (JSON) and draws (a PNG).

The figures come from `indexer.scoring`; this module only lays them out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from indexer.scoring import Row


@dataclass
class Report:
    """An evaluation: counts per threshold, each query's outcome at the default, checks and costs."""

    labels: str
    gallery: str
    settings: dict[str, Any]
    default_threshold: float
    rows: list[Row]
    queries: list[dict[str, Any]]
    gallery_checks: dict[str, Any]
    timing_ms: dict[str, float]
    expansion: dict[str, Any] = field(default_factory=dict)

    def row(self, threshold: float) -> Row:
        return next(r for r in self.rows if abs(r.threshold - threshold) < 1e-9)

    def to_json(self) -> str:
        d = asdict(self)
        d["rows"] = [r.to_dict() for r in self.rows]
        return json.dumps(d, indent=2)

    def table(self) -> str:
        head = (f"{'threshold':>10}  {'found/wanted':>12}  {'recall':>7}  {'wrong':>5}  {'wrong rate':>10}  "
                f"{'perfect':>7}  {'strangers':>9}  {'no face':>7}  {'expanded':>8}")
        lines = [head]
        for r in self.rows:
            mark = "*" if abs(r.threshold - self.default_threshold) < 1e-9 else " "
            lines.append(
                f"{mark} {r.threshold:>8.2f}  {f'{r.found}/{r.wanted}':>12}  {r.recall:>7.1%}  {r.wrong:>5}  "
                f"{r.wrong_rate:>10.2%}  {f'{r.perfect}/{r.person_queries}':>7}  "
                f"{f'{r.strangers_ok}/{r.strangers}':>9}  {f'{r.no_face_ok}/{r.no_face}':>7}  {r.expanded:>8}"
            )
        lines.append(f"* the default threshold ({self.default_threshold}); strangers: given no photo; "
                     "no face: refused or given no photo; expanded: queries whose descriptor was refined")
        if any(r.unlabelled for r in self.rows):
            lines.append("unlabelled photos returned: " + ", ".join(f"{r.threshold:.2f}: {r.unlabelled}"
                                                                    for r in self.rows))
        return "\n".join(lines)

    def summary(self) -> str:
        """The lines `fsw-index eval` prints around the table: settings and costs above, face checks below."""
        s, checks = self.settings, self.gallery_checks
        return "\n".join([
            f"{self.labels}: gallery {self.gallery}; selfie jitters {s['selfie_jitters']}, mirror "
            f"{'on' if s['selfie_mirror'] else 'off'}, expansion {'on' if s['selfie_expansion'] else 'off'}; "
            f"encode {self.timing_ms['selfie_encode_median']} ms, search {self.timing_ms['search_median']} ms "
            "(medians per query)",
            self.table(),
            f"gallery: {checks['faces_found']} faces found, {checks['faces_labelled']} labelled; "
            f"false faces in faceless photos: {len(checks['false_faces_in_faceless_photos'])}; photos with "
            f"fewer faces than labelled: {len(checks['photos_with_fewer_faces_than_labelled'])}",
        ])

    def plot(self, path: str | Path) -> None:
        """Recall and wrong-photo rate against threshold, the default marked (a PNG). ImportError without
        matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = [r.threshold for r in self.rows]
        fig, left = plt.subplots(figsize=(7, 4.2), dpi=110)
        right = left.twinx()
        left.plot(t, [100 * r.recall for r in self.rows], "o-", color="tab:blue", label="photos found (recall)")
        right.plot(t, [100 * r.wrong_rate for r in self.rows], "s--", color="tab:red", label="wrong-photo rate")
        left.axvline(self.default_threshold, color="grey", linestyle=":", label=f"default {self.default_threshold}")
        left.set_xlabel("threshold (a match has similarity = 1 - distance > threshold)")
        left.set_ylabel("photos found, % of those holding the person", color="tab:blue")
        right.set_ylabel("wrong photos, % of (query, other photo) pairs", color="tab:red")
        left.set_ylim(0, 105)
        right.set_ylim(0, max(5.0, 110 * max(r.wrong_rate for r in self.rows)))
        s = self.settings
        left.set_title(f"{Path(self.labels).name}: mirror {'on' if s.get('selfie_mirror') else 'off'}, "
                       f"expansion {'on' if s.get('selfie_expansion') else 'off'}, "
                       f"selfie jitters {s.get('selfie_jitters')}", fontsize=10)
        handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        left.legend(handles, [str(h.get_label()) for h in handles], loc="center left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
