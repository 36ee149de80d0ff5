"""The benchmark's table: rows of text cells (ours, the baseline, each peer), medians over repeats, printing."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Row:
    workload: str
    metric: str
    ours: str
    baseline: str
    ratio: str
    # Peer name -> (its figure, ours over its figure): both measured in the same run as `ours`.
    peers: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)

    def add(
        self,
        workload: str,
        metric: str,
        ours: str,
        baseline: str = "",
        ratio: str = "",
        peers: dict[str, tuple[str, str]] | None = None,
    ) -> None:
        self.rows.append(Row(workload, metric, ours, baseline, ratio, dict(peers or {})))


def ratio(ours: float, theirs: float) -> str:
    """Ours over theirs, as the peer columns print it (for a time, below 1 is ours faster; for a rate, above 1)."""
    return f"{ours / theirs:.2f}x" if theirs > 0 else "-"


def median_rows(runs: list[Results]) -> Results:
    """Per cell, the median of the numbers the runs printed (text cells from the first run); ratios also show the
    lowest and highest run."""
    if len(runs) == 1:
        return runs[0]
    out = Results()
    for cells in zip(*(r.rows for r in runs), strict=True):
        first = cells[0]
        values = [_median_text([getattr(c, attr) for c in cells]) for attr in ("ours", "baseline", "ratio")]
        peers = {
            name: (
                _median_text([c.peers[name][0] for c in cells]),
                _median_text([c.peers[name][1] for c in cells]),
            )
            for name in first.peers
        }
        ours, baseline, ratio_cell = values
        out.add(first.workload, first.metric, ours, baseline, ratio_cell, peers)
    return out


def _median_text(texts: list[str]) -> str:
    head = texts[0]
    # A figure may carry its share of the memory limit in brackets, "24.1 (48%)": the median is of the figure.
    numbers = [t.split(" (")[0] for t in texts]
    tail = head[len(numbers[0]) :]
    for suffix in ("x faster", "x", ""):
        if numbers[0].endswith(suffix):
            try:
                nums = [float(t[: len(t) - len(suffix)] if suffix else t) for t in numbers]
            except ValueError:
                return head
            value = f"{statistics.median(nums):.2f}{suffix}"
            if suffix:
                return f"{value} ({min(nums):.2f}-{max(nums):.2f})"
            return value + (_median_share(texts) if tail else "")
    return head


def _median_share(texts: list[str]) -> str:
    shares = []
    for t in texts:
        try:
            shares.append(float(t.split(" (")[1].rstrip("%)")))
        except (IndexError, ValueError):
            return ""
    return f" ({statistics.median(shares):.0f}%)"


def print_table(res: Results, title: str) -> None:
    names = list(dict.fromkeys(name for r in res.rows for name in r.peers))
    headers: tuple[str, ...] = ("workload", "metric", "ours", "baseline", "ratio")
    headers += tuple(h for name in names for h in (name, f"ours/{name}"))
    rows = [headers]
    for r in res.rows:
        cells: tuple[str, ...] = (r.workload, r.metric, r.ours, r.baseline, r.ratio)
        rows.append(cells + tuple(c for name in names for c in r.peers.get(name, ("", ""))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    print(f"\n{title}")
    for i, row in enumerate(rows):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
