"""How numbers read wherever a person sees them: sizes, durations and markdown tables.

One convention each, shared by the library (the comparison, tune and scaling tables, the progress
line) and the benchmarks, so that a size or a table reads the same in `ray-codistill report`, in a
benchmark's output and in the docs that quote them:
- `human_bytes`: decimal (SI) units, one decimal from a kilobyte on: "512 B", "1.2 kB", "300.0 MB";
- `duration`: whole seconds as "m:ss", "h:mm:ss" from an hour on: "0:30", "12:05", "1:02:03";
- `markdown_table`: a GitHub markdown table of rows, each column left- or right-aligned (figures
  right, as a reader scans them); `to_markdown` is a DataFrame's, numeric columns right-aligned.
A value that is missing (None, NaN) reads `DASH`, as a table's "not applicable" does. Methods
appear in one order in every table and plot legend (`method_rank`).

Pure functions of the standard library: importing this costs nothing (pandas only reaches it in
the DataFrame a caller passes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

DASH = "–"  # en dash: "missing" or "not applicable", e.g. the ensemble of a single model
BYTE_UNITS = ("kB", "MB", "GB", "TB", "PB")
METHOD_ORDER = ("codistill", "independent", "allreduce", "distill")


def method_rank(group: str) -> tuple[int, str]:
    """Sort key of a method, or of a group named after one ("codistill mlp(hidden=8)"): the known
    methods in a fixed order, so that tables from different runs line up; others after, by name."""
    method = group.split(" ", 1)[0]
    if method in METHOD_ORDER:
        return (METHOD_ORDER.index(method), group)
    return (len(METHOD_ORDER), group)


def _missing(x) -> bool:
    return x is None or not math.isfinite(x)  # NaN and inf, numpy's too


def human_bytes(n: float | None) -> str:
    """Bytes in decimal units, one decimal: 512 -> "512 B", 1_234_567 -> "1.2 MB"."""
    if _missing(n):
        return DASH
    n = float(n)
    # the unit is chosen after rounding, so 999_999 reads "1.0 MB", never "1000.0 kB"
    if abs(round(n)) < 1000:
        return f"{n:.0f} B"
    for unit in BYTE_UNITS:
        n /= 1000.0
        if abs(round(n, 1)) < 1000 or unit == BYTE_UNITS[-1]:
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    """Seconds rounded to whole ones, as a clock reads them: 30 -> "0:30", 3723 -> "1:02:03"."""
    if _missing(seconds):
        return DASH
    total = int(round(abs(seconds)))
    h, rest = divmod(total, 3600)
    text = f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
    return f"-{text}" if seconds < 0 and total else text


def _cell(x) -> str:
    # A bare "|" would split the cell; a newline would end the row.
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence, rows: Iterable[Sequence], right: Iterable[int] | None = None) -> str:
    """A GitHub markdown table: header, alignment row, one line per row, ending in a newline.

    `right`: the indices of the right-aligned columns (`---:`); by default every column but the
    first (a label, then figures). Cells are `str()`ed, unpadded (pandas' `to_markdown` would need
    `tabulate`, which is not a dependency).
    """
    right = set(range(1, len(headers)) if right is None else right)
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_markdown(table) -> str:
    """`markdown_table` of a pandas DataFrame: its columns, its rows, numeric columns right-aligned."""
    from pandas.api.types import is_numeric_dtype
    right = [i for i, c in enumerate(table.columns) if is_numeric_dtype(table.iloc[:, i])]
    return markdown_table(list(table.columns), table.itertuples(index=False), right)
