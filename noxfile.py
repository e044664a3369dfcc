"""Sessions: tests (all), tests_quick (no multi-process tests), lint, typecheck, demo, bench, docs.

Every session installs the package with the pinned versions in requirements/constraints.txt
(torch is pinned to the CPU build this project is tested with).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
CONSTRAINTS = ("-c", "requirements/constraints.txt")


def install(session: nox.Session, extras: str = "dev") -> None:
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole suite, multi-process and S3 tests included (a local S3 server is started by a fixture)."""
    install(session)
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=PYTHON)
def tests_quick(session: nox.Session) -> None:
    """Single-process tests only (a couple of minutes)."""
    install(session)
    session.run("python", "-m", "pytest", "-q", "-m", "not slow", *session.posargs)


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
def docs(session: nox.Session) -> None:
    """Build the documentation site with `mkdocs build --strict` (into site/; `-- serve` previews it instead).

    Only the docs tools are installed: mkdocstrings reads the docstrings from the source without importing it.
    """
    tools = nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]["docs"]
    session.install(*CONSTRAINTS, *tools)
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    if session.posargs and session.posargs[0] == "serve":
        session.run("mkdocs", "serve", *session.posargs[1:])
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs)
