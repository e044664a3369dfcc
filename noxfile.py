"""Sessions: tests (all), tests_quick (no multi-process tests), lint, typecheck, demo, bench, figures, docs.

Every session installs the package with the pinned versions in requirements/constraints.txt
(torch is pinned to the CPU build this project is tested with).
"""

from __future__ import annotations

import os
import sys

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
CONSTRAINTS = ("-c", "requirements/constraints.txt")
PYTEST = ("python", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider")
"""Quiet, but with the reason of every skipped test in the summary."""


def install(session: nox.Session, extras: str = "dev") -> None:
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole suite, multi-process and S3 tests included (a local S3 server is started by a fixture)."""
    install(session)
    session.run(*PYTEST, *session.posargs)


@nox.session(python=PYTHON)
def tests_quick(session: nox.Session) -> None:
    """Single-process tests only (a couple of minutes)."""
    install(session)
    session.run(*PYTEST, "-m", "not slow", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", "dcp_plugin", "tests", "examples", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "dcp_plugin", "tests", "examples")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    install(session)
    session.run("mypy", "dcp_plugin")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Train with async checkpoints, get killed, resume, and print what was saved and how long training waited."""
    session.install(*CONSTRAINTS, "-e", ".")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmark against torch.save, Lightning, Accelerate and plain DCP: `nox -s bench -- --quick`."""
    install(session)
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python=PYTHON)
def figures(session: nox.Session) -> None:
    """Measure the documentation's benchmark figures again and rewrite them: benchmarks/results/headline.json, the
    charts in docs/figures/ and the figures in the pages (about an hour on a 2-core host; `-- --render` redraws from
    the committed file without measuring)."""
    install(session)
    session.run("python", "benchmarks/headline.py", *session.posargs)


@nox.session(python=PYTHON)
def scaling(session: nox.Session) -> None:
    """Measure what saves and restores cost on 1-8 ranks, refit the scaling model and rewrite docs/scaling.md
    (a few minutes on a quiet 2-core host; `-- --quick` for a smoke test, `-- --refit` to refit without measuring)."""
    install(session)
    session.run("python", "benchmarks/scaling.py", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site with `mkdocs build --strict` (into site/; `-- serve` previews it instead), then
    load every page in headless Chromium at 1280 px and fail on anything cut off (docs/_build/check_layout.py).

    Only the docs tools are installed: mkdocstrings reads the docstrings from the source without importing it.
    Without a Chromium the layout check is skipped with a message, unless DOCS_REQUIRE_BROWSER=1 (as in CI).
    """
    tools = nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]["docs"]
    session.install(*CONSTRAINTS, *tools)
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    if session.posargs and session.posargs[0] == "serve":
        session.run("mkdocs", "serve", *session.posargs[1:])
        return
    session.run("mkdocs", "build", "--strict", *session.posargs)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "docs", "_build"))
    from check_layout import find_browser  # the standard library only: importable here

    browser = find_browser(None)
    if browser is None:
        message = "no Chromium found: the 1280 px layout check of every page did not run (apt-get install chromium)"
        if os.environ.get("DOCS_REQUIRE_BROWSER") == "1":
            session.error(message)
        session.warn(f"SKIPPED: {message}")
        return
    session.run("python", "docs/_build/check_layout.py", "site", "--browser", browser)
