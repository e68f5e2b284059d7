"""The table and JSON every `dicomnode bench ...` writes (also described in README,
"Benchmarks").

Printed: a header line ``benchmark: NAME   device: DEVICE   memory: KIND``, then up to three
plain-text tables, each with a header row and a dashed rule, separated by blank lines: the
benchmark's own rows (columns: the union of the rows' keys, in first-seen order; a missing
value is ``-``; floats with 3 decimals below 100, else 1), the timings (``timing``,
``median_s``, ``runs``) and the ratios (``ratio``, ``value``, ``against``: the baseline
measured in the same run).

JSON (``--json FILE``): one object, ``{"benchmark": str, "device": str, "memory_kind":
"cuda" | "rss", "rows": [{...}], "timings": [{"name", "median_s", "runs"}], "ratios":
[{"name", "value", "against"}]}``; seconds are medians over ``runs`` samples; memory_kind
says whether memory columns are the CUDA allocator's peak or the process's peak RSS.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Timing:
    name: str
    median_s: float
    runs: int


@dataclass
class Ratio:
    name: str
    value: float
    against: str


@dataclass
class BenchReport:
    benchmark: str
    device: str
    memory_kind: str  # "cuda" (allocator peak) or "rss"
    rows: list[dict] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)

    def add_timing(self, name: str, samples_s: list[float]) -> float:
        median = statistics.median(samples_s)
        self.timings.append(Timing(name, median, len(samples_s)))
        return median

    def add_ratio(self, name: str, value: float, against: str) -> None:
        self.ratios.append(Ratio(name, value, against))

    def add_throughput(self, name: str, seconds: float, instances: int,
                       total_bytes: int) -> None:
        """A row: a study of `instances` and `total_bytes` sent in `seconds`."""
        mb = total_bytes / 1e6
        self.rows.append({"name": name, "instances": instances, "mb": round(mb, 1),
                          "mb_per_s": mb / seconds, "instances_per_s": instances / seconds})

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "device": self.device,
            "memory_kind": self.memory_kind,
            "rows": self.rows,
            "timings": [asdict(t) for t in self.timings],
            "ratios": [asdict(r) for r in self.ratios],
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def render(self) -> str:
        lines = [f"benchmark: {self.benchmark}   device: {self.device}   "
                 f"memory: {self.memory_kind}"]
        if self.rows:
            lines.append("")
            lines.extend(_table(self.rows))
        if self.timings:
            lines.append("")
            lines.extend(_table([{"timing": t.name, "median_s": t.median_s, "runs": t.runs}
                                 for t in self.timings]))
        if self.ratios:
            lines.append("")
            lines.extend(_table([{"ratio": r.name, "value": r.value, "against": r.against}
                                 for r in self.ratios]))
        return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in
                         enumerate(zip(r, widths, strict=True))).rstrip() for r in cells)
    return out
