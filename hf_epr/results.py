"""Tables of results: one markdown writer, and the markdown + JSON files that benchmarks and recipes leave."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[str] | Mapping[str, str | Callable[[Mapping[str, Any]], Any]] | None = None) -> str:
    """A markdown table of ``rows``. ``columns``: keys (the header is the key), or header -> key or function of
    the row; default: every key of the rows. Floats get 4 significant digits, None an empty cell."""
    if columns is None:  # every key of every row, in order of first appearance
        columns = list(dict.fromkeys(k for r in rows for k in r))
    if not isinstance(columns, Mapping):
        columns = {key: key for key in columns}
    getters = [(lambda r, k=spec: r.get(k)) if isinstance(spec, str) else spec for spec in columns.values()]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(get(r)) for get in getters) + " |" for r in rows]
    return "\n".join(lines)


def write_results(folder: str | os.PathLike, name: str, text: str, data: Mapping[str, Any]) -> tuple[str, str]:
    """Write ``name.md`` (the text) and ``name.json`` (the data) into ``folder``; returns both paths."""
    os.makedirs(folder, exist_ok=True)
    md, js = os.path.join(folder, f"{name}.md"), os.path.join(folder, f"{name}.json")
    with open(md, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    with open(js, "w") as f:
        json.dump(data, f, indent=1, default=float)
    return md, js
