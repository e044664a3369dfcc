"""docs/scaling.md carries its numbers between markers that this module rewrites from the scaling results and model
files (and that ``tests/test_scaling.py`` checks):

- inline: ``<!-- sc error.held_out.cpu.median -->12 %<!-- /sc -->``
- a block (tables): ``<!-- scaling table:tensors -->``, a blank line, the generated markdown, a blank line,
  ``<!-- /scaling -->``.

The markers differ from ``benchmarks/figures.py``'s (``fig`` / ``figures``), which the headline figures use: the two
sets of pages are rendered from different files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from benchmarks.figures import ROOT
from benchmarks.scaling_tables import figures, tables

PAGE = ROOT / "docs" / "scaling.md"
RESULTS = ROOT / "benchmarks" / "results" / "scaling.json"
MODEL = ROOT / "benchmarks" / "results" / "scaling-model.json"

INLINE = re.compile(r"<!-- sc (?P<key>[\w.:-]+) -->(?P<value>.*?)<!-- /sc -->")
BLOCK = re.compile(r"<!-- scaling (?P<key>[\w.:-]+) -->\n(?P<body>.*?)\n<!-- /scaling -->", re.S)


class UnknownValue(KeyError):
    """The page names a value or block the files do not give."""


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def render(text: str, results: dict[str, Any], model: dict[str, Any]) -> str:
    """``text`` with every marked value and block rewritten from the files."""
    values, blocks = figures(results, model), tables(results, model)

    def inline(match: re.Match[str]) -> str:
        key = match["key"]
        if key not in values:
            raise UnknownValue(f"no value {key!r} in the scaling files; known: {', '.join(sorted(values))}")
        return f"<!-- sc {key} -->{values[key]}<!-- /sc -->"

    def block(match: re.Match[str]) -> str:
        key = match["key"]
        if key not in blocks:
            raise UnknownValue(f"no block {key!r}; known: {', '.join(sorted(blocks))}")
        return f"<!-- scaling {key} -->\n\n{blocks[key]}\n\n<!-- /scaling -->"

    return INLINE.sub(inline, BLOCK.sub(block, text))


def stale(results: dict[str, Any], model: dict[str, Any], page: Path = PAGE) -> bool:
    """Whether the page's marked values differ from what the files give."""
    text = page.read_text(encoding="utf-8")
    return render(text, results, model) != text


def write(results: dict[str, Any], model: dict[str, Any], page: Path = PAGE) -> bool:
    """Rewrite the page's marked values; returns whether it changed."""
    text = page.read_text(encoding="utf-8")
    new = render(text, results, model)
    if new != text:
        page.write_text(new, encoding="utf-8")
    return new != text


__all__ = ["BLOCK", "INLINE", "MODEL", "PAGE", "RESULTS", "UnknownValue", "load", "render", "stale", "write"]
