"""The result tables, built once and rendered for the terminal (rich) and Markdown.

One builder per table: :func:`models_table` (every model of a run: accuracy, size, latency; the
distill stage's ``results.md``, ``specdistill report`` and BENCHMARKS.md) and
:func:`table4_table` (the paper's Table 4: accuracy change by the number of specialists covering
the true class). Cells are formatted by :func:`format_number`, which also renders a missing value
as "n/a" and a ``{"mean", "std"}`` aggregate over seeds as ``mean ± std``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MODEL_COLUMNS = ("model", "teacher", "test top-1", "test top-5", "parameters", "latency ms/example")
TABLE4_COLUMNS = ("# specialists covering", "# test examples", "delta top-1 correct",
                  "relative accuracy change")
SAME_COMPUTE_COLUMNS = ("delta vs same-compute", "relative vs same-compute")


@dataclass(frozen=True)
class Table:
    """A titled table of formatted cells; ``numeric[i]`` right-aligns column ``i``."""

    title: str
    columns: tuple[str, ...]
    numeric: tuple[bool, ...]
    rows: tuple[tuple[str, ...], ...]

    def markdown(self) -> str:
        """GitHub Markdown (no title line; callers put it in a heading)."""
        rule = "|" + "|".join("---:" if n else "---" for n in self.numeric) + "|"
        lines = ["| " + " | ".join(self.columns) + " |", rule]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def rich(self):
        """A ``rich.table.Table`` for a console."""
        from rich.table import Table as RichTable

        table = RichTable(title=self.title)
        for column, numeric in zip(self.columns, self.numeric, strict=True):
            table.add_column(column, justify="right" if numeric else "left")
        for row in self.rows:
            table.add_row(*row)
        return table


def format_number(value: Any, fmt: str = ".4f") -> str:
    """``format(value, fmt)``; "n/a" for a missing or non-finite value; ``mean ± std`` for a
    ``{"mean": m, "std": s}`` aggregate (std omitted when absent or NaN)."""
    if isinstance(value, Mapping):
        mean, std = value.get("mean"), value.get("std")
        text = format_number(mean, fmt)
        return text if std is None or not _finite(std) else f"{text} ± {format_number(std, fmt)}"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, fmt)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _params(value: Any) -> str:
    if isinstance(value, Mapping):
        value = value.get("mean")
    if isinstance(value, float) and _finite(value) and value.is_integer():
        value = int(value)
    return format_number(value, ",d" if isinstance(value, int) else ",.0f")


def models_table(rows: Sequence[Mapping[str, Any]], title: str = "specdistill results") -> Table:
    """One line per model: ``name``, ``teacher``, ``top1``, ``top5``, ``params``, ``latency_ms``
    (each a number, None, or a mean/std aggregate)."""
    cells = tuple(
        (str(r["name"]), str(r.get("teacher", "-")), format_number(r.get("top1")),
         format_number(r.get("top5")), _params(r.get("params")), format_number(r.get("latency_ms"), ".3f"))
        for r in rows)
    return Table(title, MODEL_COLUMNS, (False, False, True, True, True, True), cells)


def table_cell(value: Any) -> str | Any:
    """A list of class names as one comma-separated cell; anything else as is."""
    return ", ".join(map(str, value)) if isinstance(value, list | tuple) else value


def groups_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """The confusable groups (the clustering stage's ``groups_table.json`` rows)."""
    cells = tuple((str(r["group_id"]), str(r["size"]), format_number(r.get("confusion_share"), ".3f"),
                   f"{r['mass_share']:.3f}", str(table_cell(r["classes"])))
                  for r in rows)
    return Table("confusable groups (share of the holdout confusions inside each: conf.; of the "
                 "prediction covariance: cov.)", ("group", "size", "conf.", "cov.", "classes"),
                 (True, True, True, True, False), cells)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def table4_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """The paper's Table 4 from the ensemble stage's ``table4`` rows (with the columns against the
    same-compute generalist when the rows have them)."""
    against = bool(rows) and "delta_vs_same_compute" in rows[0]
    cells = tuple(
        (str(r["specialists_covering"]), f"{r['n_examples']:,}", f"{r['delta_correct']:+d}",
         _percent(r["relative_accuracy_change"]))
        + ((f"{r['delta_vs_same_compute']:+d}", _percent(r["relative_vs_same_compute"])) if against else ())
        for r in rows)
    columns = TABLE4_COLUMNS + (SAME_COMPUTE_COLUMNS if against else ())
    return Table("Table 4: accuracy change by specialists covering the true class", columns,
                 (True,) * len(columns), cells)
