"""The one table writer of benchmarks and recipes."""

import json

from hf_epr.results import markdown_table, write_results


def test_markdown_table_formats_and_selects_columns():
    rows = [{"name": "a", "bytes": 1234, "ratio": 12.3456789, "note": None}, {"name": "b", "bytes": 5, "ratio": 0.5}]
    assert markdown_table(rows).splitlines() == ["| name | bytes | ratio | note |", "|---|---|---|---|",
                                                 "| a | 1234 | 12.35 |  |", "| b | 5 | 0.5 |  |"]
    text = markdown_table(rows, {"run": "name", "KB": lambda r: f"{r['bytes'] / 1000:.1f}"})
    assert text.splitlines()[2:] == ["| a | 1.2 |", "| b | 0.0 |"]


def test_write_results(tmp_path):
    md, js = write_results(tmp_path / "out", "bench", "| a |", {"rows": [{"x": 1.5}]})
    assert open(md).read() == "| a |\n" and json.load(open(js)) == {"rows": [{"x": 1.5}]}
