"""The docs cannot rot: every Python block of the docs pages and the README runs, in order, page by page.

A page's blocks share one namespace (later blocks build on earlier ones) and run in a fresh temporary
directory with no ``DCP_PLUGIN_*`` variables set. Two HTML comments, invisible on the site, steer this:

- ``<!-- no-run: reason -->`` right before a block skips it (it needs S3 credentials, several GPUs,
  ``accelerate launch``...); the reason is required.
- ``<!-- test-setup`` ... ``-->`` holds code run at that point (e.g. a tiny model for a later snippet that
  says ``model``). Never before the first Python block of a page or of a README section: that block is what a
  user copies first, so it must run exactly as shown, with everything it needs visible.

The API reference must name every public name of the three public modules.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
PYTHON = {"python", "py", "python3"}

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
NO_RUN = re.compile(r"^\s*<!--\s*no-run\b(?P<rest>.*?)-->\s*$")
SETUP_START = re.compile(r"^\s*<!--\s*test-setup\s*$")


@dataclass
class Block:
    """One code block of a page: its language, code, first code line (1-based) and why it is skipped."""

    lang: str
    code: str
    line: int
    skip: str | None = None
    hidden: bool = False


def parse(page: Path) -> list[Block]:
    """Every fenced block and ``test-setup`` comment of a page, in order, with its ``no-run`` marker."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    skip: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = NO_RUN.match(line)
        if marker:
            rest = marker["rest"].strip()
            if not rest.startswith(":") or not rest[1:].strip():
                raise AssertionError(f"{page.name}:{i + 1}: a no-run marker needs a reason: <!-- no-run: why -->")
            skip = rest[1:].strip()
            i += 1
            continue
        if SETUP_START.match(line):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->")
            blocks.append(Block("python", "\n".join(lines[i + 1 : end]), i + 2, hidden=True))
            i = end + 1
            continue
        fence = FENCE.match(line)
        if fence:
            indent, closing = fence["indent"], fence["fence"]
            end = next(
                j
                for j in range(i + 1, len(lines))
                if lines[j].strip().startswith(closing) and not lines[j].strip()[len(closing) :].strip()
            )
            body = [text[len(indent) :] if text.startswith(indent) else text.lstrip() for text in lines[i + 1 : end]]
            blocks.append(Block(fence["lang"].lower(), textwrap.dedent("\n".join(body)), i + 2, skip))
            skip = None
            i = end + 1
            continue
        if skip is not None and line.strip():
            raise AssertionError(f"{page.name}:{i + 1}: a no-run marker must come right before a code block")
        i += 1
    return blocks


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _runnable(page: Path) -> bool:
    try:
        return any(block.lang in PYTHON and block.skip is None for block in parse(page))
    except AssertionError:
        return False  # reported by the marker test


RUNNABLE = [page for page in PAGES if _runnable(page)]


def test_every_skipped_block_is_a_python_block_with_a_reason():
    for page in PAGES:
        for block in parse(page):  # parse raises on a marker without a reason or not before a block
            if block.skip is not None:
                assert block.lang in PYTHON, f"{page.name}:{block.line}: only Python blocks are run; drop the marker"


@pytest.mark.parametrize("page", RUNNABLE, ids=_page_id)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in [name for name in os.environ if name.startswith("DCP_PLUGIN_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    _reset_accelerate()
    try:
        for block in parse(page):
            if block.lang not in PYTHON or block.skip is not None:
                continue
            # blank lines in front, so a traceback names the block's real line in the markdown file
            code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
            exec(code, namespace)
    finally:
        _close(namespace)
        _reset_accelerate()


def _close(namespace: dict) -> None:
    """Flush what a page left open (its blocks may end mid-story), so the next test starts clean."""
    from dcp_plugin import Checkpointer, CheckpointManager

    for value in namespace.values():
        if isinstance(value, (CheckpointManager, Checkpointer)):
            value.close()


def _reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each page starts and ends without them."""
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        GradientState._reset_state()


def _sections(page: Path) -> list[list[Block]]:
    """The blocks of a page, or of each ``##``/``###`` section of the README (each is a first read of its own)."""
    blocks = parse(page)
    if page.name != "README.md":
        return [blocks]
    lines = page.read_text(encoding="utf-8").splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line.startswith(("## ", "### "))]
    sections: list[list[Block]] = [[] for _ in range(len(starts) + 1)]
    for block in blocks:
        sections[sum(1 for start in starts if start < block.line)].append(block)
    return sections


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_the_first_python_block_runs_as_shown(page: Path):
    """A user copies the first block of a page (of a README section) first: no hidden setup may come before it."""
    for blocks in _sections(page):
        first = next((b for b in blocks if b.lang in PYTHON and b.skip is None and not b.hidden), None)
        if first is None:
            continue
        hidden = [b.line - 1 for b in blocks if b.hidden and b.line < first.line]
        assert not hidden, (
            f"{page.name}:{first.line}: the first Python block depends on a hidden <!-- test-setup --> (line "
            f"{hidden[0]}); show what it needs in the block itself"
        )


def test_api_reference_covers_every_public_name():
    import dcp_plugin
    import dcp_plugin.accelerate
    import dcp_plugin.lightning

    documented = set(re.findall(r"^::: (\S+)", "".join(p.read_text() for p in (DOCS / "api").glob("*.md")), re.M))
    for module in (dcp_plugin, dcp_plugin.lightning, dcp_plugin.accelerate):
        public = {f"{module.__name__}.{name}" for name in module.__all__ if not name.startswith("__")}
        assert not public - documented, f"add these to docs/api/: {sorted(public - documented)}"


REFERENCE_ENTRY = re.compile(r"^::: (?P<path>\S+)\n(?P<options>(?:[ \t]+\S.*\n?)*)", re.M)


def _reference_entries() -> list[tuple[str, list[str] | None, bool]]:
    """Each ``::: name`` of docs/api/*.md: the name, its ``members:`` list (None: all) and ``inherited_members``."""
    entries = []
    for page in sorted((DOCS / "api").glob("*.md")):
        for entry in REFERENCE_ENTRY.finditer(page.read_text(encoding="utf-8")):
            options = entry["options"]
            members = re.findall(r"^\s+- (\w+)\s*$", options, re.M) or None
            entries.append((entry["path"], members, bool(re.search(r"inherited_members:\s*true", options))))
    return entries


def _resolve(path: str) -> object:
    import importlib

    module_name, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def _documented_attributes(cls: type) -> tuple[bool, set[str], set[str]]:
    """From the class's source, as mkdocstrings reads it: whether the class has a docstring, the attributes it
    declares (class body and ``self.x = ...`` in ``__init__``) and those followed by a docstring."""
    import ast
    import inspect

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef))

    def names(statement: ast.stmt, owner: str | None) -> list[str]:
        targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
        found = []
        for target in targets:
            if owner is None and isinstance(target, ast.Name):
                found.append(target.id)
            elif owner and isinstance(target, ast.Attribute) and getattr(target.value, "id", None) == owner:
                found.append(target.attr)
        return found

    declared: set[str] = set()
    with_doc: set[str] = set()

    def scan(body: list[ast.stmt], owner: str | None) -> None:
        for i, statement in enumerate(body):
            if isinstance(statement, (ast.Assign, ast.AnnAssign)):
                found = names(statement, owner)
                declared.update(found)
                after = body[i + 1] if i + 1 < len(body) else None
                if (
                    isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                    and after.value.value.strip()
                ):
                    with_doc.update(found)
            elif owner and isinstance(statement, (ast.If, ast.Try, ast.With, ast.For)):
                for block in ("body", "orelse", "finalbody"):
                    scan(getattr(statement, block, []), owner)
                for handler in getattr(statement, "handlers", []):
                    scan(handler.body, owner)

    scan(node.body, None)
    for statement in node.body:
        if isinstance(statement, ast.FunctionDef) and statement.name == "__init__" and statement.args.args:
            scan(statement.body, statement.args.args[0].arg)
    return bool(ast.get_docstring(node)), declared, with_doc


def _own_doc(value: object) -> str | None:
    """The docstring the object itself carries (``inspect.getdoc`` would borrow a base class's)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, property):
        value = value.fget
    return getattr(value, "__doc__", None)


def _undocumented(path: str, obj: object, members: list[str] | None, inherited: bool) -> list[str]:
    """What the API reference shows blank for one ``::: path`` entry."""
    if not isinstance(obj, type):
        return [] if (_own_doc(obj) or "").strip() else [path]
    # members from our own classes only: those of Lightning, Accelerate, torch or object are theirs to document
    classes = [c for c in obj.__mro__ if c.__module__.startswith("dcp_plugin")] if inherited else [obj]
    missing: list[str] = []
    seen: set[str] = set()
    for index, cls in enumerate(classes):
        has_doc, declared, with_doc = _documented_attributes(cls)
        if index == 0 and not has_doc and not (_own_doc(vars(cls).get("__init__")) or "").strip():
            missing.append(path)
        names = [n for n in [*vars(cls), *declared] if not n.startswith("_") and n not in seen]
        for name in dict.fromkeys(names):
            seen.add(name)
            if members is not None and name not in members:
                continue
            # an attribute's docstring is the string right after its assignment; a method's is its own
            own = name in with_doc if name in declared else bool((_own_doc(vars(cls).get(name)) or "").strip())
            if not own:
                missing.append(f"{path}.{name} ({cls.__module__})")
    return missing


def test_api_reference_shows_a_docstring_for_every_member():
    missing = []
    for path, members, inherited in _reference_entries():
        missing += _undocumented(path, _resolve(path), members, inherited)
    assert not missing, f"{len(missing)} objects in the API reference have no docstring:\n" + "\n".join(missing)
