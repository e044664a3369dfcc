"""The docs session's layout check (docs/_build/check_layout.py) in a real headless Chromium: a page whose code
block or table is cut off at 1280 px fails it, a page that fits passes, and without a browser it says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import REPO

SCRIPT = os.path.join(REPO, "docs", "_build", "check_layout.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
from check_layout import find_browser  # noqa: E402

LONG = "manager = CheckpointManager('s3://bucket/run1', save_policy=EveryNSteps(500) | EveryNSeconds(1800)) " * 3
PAGE = """<!doctype html><html><head><style>
body {{ margin: 0; }} .md-content {{ width: 700px; margin-left: 240px; }}
pre > code {{ display: block; overflow: auto; white-space: {wrap}; }}
</style></head><body><div class="md-content"><div class="md-content__inner">
<p>Some prose.</p><pre><code>{code}</code></pre>
<div class="md-typeset__scrollwrap" style="overflow-x: auto"><table><tr>{cells}</tr></table></div>
</div></div></body></html>"""


def _site(tmp_path: Path, *, fits: bool) -> Path:
    site = tmp_path / ("fits" if fits else "cut")
    cells = "".join(f"<td>{'short' if fits else 'a-long-unbreakable-cell-' * 3}</td>" for _ in range(8))
    html = PAGE.format(wrap="pre-wrap" if fits else "pre", code=LONG, cells=cells)
    (site / "page").mkdir(parents=True)
    (site / "page" / "index.html").write_text(html, encoding="utf-8")
    return site


def _check(site: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, str(site), "--screenshots", str(tmp_path / "shots")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


needs_chromium = pytest.mark.skipif(
    find_browser(None) is None, reason="no Chromium on this machine (apt-get install chromium; CI installs it)"
)


@needs_chromium
def test_a_cut_off_code_block_and_table_fail_the_check_with_a_screenshot(tmp_path):
    result = _check(_site(tmp_path, fits=False), tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "page/index.html:" in result.stdout
    assert '<code> "manager = CheckpointManager(' in result.stdout and "px box (overflow auto)" in result.stdout
    assert '<div class="md-typeset__scrollwrap">' in result.stdout
    assert (tmp_path / "shots" / "page_index.html.png").stat().st_size > 0


@needs_chromium
def test_a_page_that_fits_passes(tmp_path):
    result = _check(_site(tmp_path, fits=True), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 pages at 1280 px, nothing cut off" in result.stdout


def test_without_a_browser_the_check_says_how_to_get_one(tmp_path):
    result = _check(_site(tmp_path, fits=True), tmp_path, PATH=str(tmp_path), CHROMIUM="")
    assert result.returncode == 2
    assert "no Chromium found" in result.stderr and "apt-get install chromium" in result.stderr
