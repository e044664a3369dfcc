"""Sessions: tests (all), tests_quick (no multi-process tests), lint, typecheck, demo, bench.

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
