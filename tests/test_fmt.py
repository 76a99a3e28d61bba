"""fmt.py: sizes, durations and markdown tables read the same everywhere (pure functions, no Ray)."""

import math

import numpy as np
import pandas as pd
import pytest

from ray_codistill.fmt import DASH, duration, human_bytes, markdown_table, to_markdown


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (999, "999 B"), (999.4, "999 B"),
    (999.6, "1.0 kB"),  # rounds to 1000 B: the next unit, never "1000 B"
    (1000, "1.0 kB"), (1_234, "1.2 kB"), (999_949, "999.9 kB"),
    (999_960, "1.0 MB"),  # rounds to 1000.0 kB: the next unit
    (1_000_000, "1.0 MB"), (300e6, "300.0 MB"), (4e9, "4.0 GB"), (1e12, "1.0 TB"), (1e15, "1.0 PB"),
    (2e18, "2000.0 PB"),  # the largest unit grows on
    (-1_500, "-1.5 kB"),  # a difference, e.g. memory given back
])
def test_sizes_in_decimal_units_at_the_boundaries(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("missing", [None, math.nan, math.inf, np.float32("nan")])
def test_a_missing_size_or_duration_reads_dash(missing):
    assert human_bytes(missing) == DASH and duration(missing) == DASH


@pytest.mark.parametrize("seconds, text", [
    (0, "0:00"), (0.4, "0:00"), (30, "0:30"), (59.6, "1:00"), (725, "12:05"), (3599, "59:59"),
    (3600, "1:00:00"), (3723, "1:02:03"), (90_000, "25:00:00"), (-65, "-1:05"),
])
def test_durations_read_as_a_clock(seconds, text):
    assert duration(seconds) == text


def test_markdown_table_aligns_columns_and_escapes_cells():
    md = markdown_table(["name", "size"], [["a|b", human_bytes(2_000)], ["two\nlines", 3]])
    assert md == ("| name | size |\n"
                  "| --- | ---: |\n"  # default: the first column left, the others right
                  "| a\\|b | 2.0 kB |\n"  # a bare "|" would split the cell
                  "| two lines | 3 |\n")  # a newline would end the row
    lines = markdown_table(["a", "b", "c"], [[1, 2, 3]], right={0, 2}).splitlines()
    assert lines[1] == "| ---: | --- | ---: |"
    assert markdown_table(["only"], []) == "| only |\n| --- |\n"


def test_a_dataframe_right_aligns_its_numeric_columns():
    df = pd.DataFrame({"method": ["codistill", "allreduce"], "seeds": [2, 1], "acc": [0.9, 0.8],
                       "bytes": ["1.3 MB", "0 B"]})
    assert to_markdown(df).splitlines() == [
        "| method | seeds | acc | bytes |",
        "| --- | ---: | ---: | --- |",
        "| codistill | 2 | 0.9 | 1.3 MB |",
        "| allreduce | 1 | 0.8 | 0 B |",
    ]


def test_importing_fmt_loads_no_pandas():
    import subprocess
    import sys
    code = "import sys, ray_codistill.fmt; print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
