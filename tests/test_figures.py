"""The documentation's benchmark figures come from one results file: every page's marked figure equals what
``benchmarks/results/headline.json`` gives, the file is what its raw benchmark outputs give, the charts plot the
file's values, and the pages that lead with figures quote none outside the markers."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from benchmarks import charts, figures, headline

RESULTS = figures.load()
HEADLINE_PAGES = [figures.ROOT / "docs" / name for name in ("index.md", "benchmarks.md")]


def test_every_page_shows_the_figures_of_the_results_file():
    stale = [str(page.relative_to(figures.ROOT)) for page in figures.stale_pages(RESULTS)]
    assert not stale, f"{stale} disagree with {figures.RESULTS.name}: run python benchmarks/headline.py --render"


def test_the_pages_mark_the_figures_they_quote():
    marked = {m["key"] for page in figures.PAGES for m in figures.INLINE.finditer(page.read_text(encoding="utf-8"))}
    for key in ("goodput.plugin.extra", "goodput.dcp_async.extra", "saves.plugin.stall", "saves.torch_save.stall"):
        assert key in marked, f"no page quotes {key}"


def test_no_line_starts_with_a_figure():
    """Markdown takes a line that starts with ``<!--`` for the start of an HTML block and cuts the paragraph."""
    starting = [
        f"{page.name}:{number}"
        for page in figures.PAGES
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if line.startswith("<!-- fig ")
    ]
    assert not starting, f"move the figure off the start of the line: {starting}"


def test_the_results_file_is_what_its_benchmark_outputs_give():
    sections = ("saves", "goodput", "goodput_rare", "restore")
    sources = {s: figures.ROOT / RESULTS[s]["source"] for s in sections if RESULTS.get(s)}
    measured = {s: RESULTS[s]["measured"] for s in sources}
    assert headline.build(sources, measured) == RESULTS, "headline.json was edited by hand or its sources changed"


def test_each_chart_plots_the_results_file():
    for name, data in charts.chart_data(RESULTS).items():
        path = figures.CHARTS / f"{name}.svg"
        assert charts.plotted(path) == json.loads(json.dumps(data)), f"redraw {path.name}: benchmarks/headline.py"


def _prose(text: str) -> str:
    """The text a reader sees as prose: no code blocks, no marked figures, no links' targets."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"^    .*$", "", text, flags=re.M)
    text = figures.BLOCK.sub("", figures.INLINE.sub("", text))
    return re.sub(r"\]\([^)]*\)", "]", text)


FIGURE = re.compile(r"\d[\d.,]*\s?(?:ms|%|×)|\d+\.\d+\s?s\b")


@pytest.mark.parametrize("page", HEADLINE_PAGES, ids=lambda p: p.name)
def test_pages_that_lead_with_figures_quote_none_outside_the_markers(page: Path):
    found = FIGURE.findall(_prose(page.read_text(encoding="utf-8")))
    assert not found, f"{page.name} quotes {found} outside <!-- fig ... --> markers"


def test_the_short_version_of_performance_quotes_only_marked_figures():
    text = (figures.ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    short = text[text.index("## The short version") : text.index("## What the defaults choose")]
    assert not FIGURE.findall(_prose(short))


def test_a_figure_the_file_does_not_define_is_an_error():
    with pytest.raises(figures.UnknownFigure, match="no figure 'goodput.nobody.extra'"):
        figures.render("<!-- fig goodput.nobody.extra -->1 %<!-- /fig -->", RESULTS)


def test_the_restore_slot_shows_restore_times_once_the_file_has_them():
    page = "<!-- figures table:restore -->\n\nold\n\n<!-- /figures -->"
    assert "Not measured yet" in figures.render(page, RESULTS) or RESULTS["restore"] is not None
    measured = copy.deepcopy(RESULTS)
    measured["restore"] = {
        "source": "benchmarks/results/restore.json",
        "measured": "2027-01-01",
        "contenders": {"plugin": {"name": "dcp-plugin thread+staging", "restore_s": 1.234}},
    }
    shown = figures.render(page, measured)
    assert "| dcp-plugin (defaults) | 1.23 s |" in shown and "Not measured" not in shown
    assert figures.figures(measured)["restore.status"] == "measured 2027-01-01"


def test_ratios_are_derived_from_the_same_medians_the_pages_show():
    values = figures.figures(RESULTS)
    saves = RESULTS["saves"]["contenders"]
    for key, entry in saves.items():
        ratio = float(values[f"saves.{key}.stall_vs_torch_save"].rstrip("×"))
        assert ratio == pytest.approx(entry["stall_s"] / saves["torch_save"]["stall_s"], abs=0.005)
