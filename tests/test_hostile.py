"""Hostile checkpoints x every loader: nothing runs, nothing outside the checkpoint is opened, nothing hangs, and
every error is a project error naming the checkpoint (DESIGN.md section 7, "Hostile files").

Each case (see :mod:`tests.hostile`) turns one of two checkpoints in a root hostile; the other stays good. The
loaders are the API (``load``, ``read``, ``list``, ``latest``), the CLI (``ls``, ``inspect``, ``verify``,
``verify --load``, ``export``), Lightning's ``DCPCheckpointIO.load_checkpoint`` and Accelerate's ``load_state``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from dcp_plugin import CheckpointManager
from dcp_plugin.errors import CheckpointError
from tests import hostile
from tests.models import make_training, train_step

pytestmark = pytest.mark.timeout(30)

GOOD, BAD = "step_000000001", "step_000000002"
"""The hostile checkpoint is the newer one, so ``latest()`` must step over it to the good one."""

# -- watching which files are opened ----------------------------------------------------------------------
_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes)):
        _opened.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextmanager
def watched(case: Case) -> Iterator[None]:
    """Fail if the sentinel outside the checkpoint or /dev/zero is opened by name, or a payload ran."""
    global _opened
    _opened = []
    try:
        yield
    finally:
        opened, _opened = _opened, None
        forbidden = {case.outside, "/dev/zero"}
        assert not forbidden & set(opened), f"opened {sorted(forbidden & set(opened))}"
        assert not os.path.exists(hostile.marker_of(case.outside)), "a pickle payload ran"


# -- pristine roots, one per flavour (who wrote it), copied per case --------------------------------------
def _manager_root(root: str) -> None:
    model, optimizer, scheduler = make_training()
    with CheckpointManager(root, async_mode="sync") as manager:
        for step in (1, 2):
            train_step(model, optimizer, scheduler)
            manager.save(step, {"model": model, "optim": optimizer})


def _lightning_root(root: str) -> None:
    from dcp_plugin.lightning import DCPCheckpointIO

    model, optimizer, scheduler = make_training()
    plugin = DCPCheckpointIO(async_mode="sync")
    for step, name in ((1, GOOD), (2, BAD)):
        train_step(model, optimizer, scheduler)
        checkpoint = {
            "state_dict": model.state_dict(),
            "optimizer_states": [optimizer.state_dict()],
            "global_step": step,
            "epoch": 0,
        }
        plugin.save_checkpoint(checkpoint, os.path.join(root, name))
    plugin.teardown()


@contextmanager
def _accelerator() -> Iterator[tuple[Any, Any]]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    import dcp_plugin.accelerate as dpa

    accelerator = Accelerator(cpu=True)
    try:
        dpa.enable(accelerator, environ={"DCP_PLUGIN_ASYNC_MODE": "sync"})
        yield accelerator, accelerator.prepare(*make_training())
    finally:
        accelerator.end_training()
        AcceleratorState._reset_state(True)
        PartialState._reset_state()


def _accelerate_root(root: str) -> None:
    with _accelerator() as (accelerator, (model, optimizer, scheduler)):
        for name in (GOOD, BAD):
            train_step(model, optimizer, scheduler)
            accelerator.save_state(os.path.join(root, name))


_BUILDERS = {"manager": _manager_root, "lightning": _lightning_root, "accelerate": _accelerate_root}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    built: dict[str, str] = {}

    def get(flavour: str) -> str:
        if flavour not in built:
            root = str(tmp_path_factory.mktemp(f"pristine-{flavour}"))
            _BUILDERS[flavour](root)
            built[flavour] = root
        return built[flavour]

    return get


@dataclass
class Case:
    name: str
    level: str
    root: str
    directory: str
    outside: str


PRISTINE = "pristine"
"""Not a case: the untouched checkpoint, which every loader must accept (so no refusal above is vacuous)."""


def make_case(pristine_root: str, where: str, name: str) -> Case:
    root = os.path.join(where, "root")
    shutil.copytree(pristine_root, root, symlinks=True)
    directory = os.path.join(root, BAD)
    outside = os.path.join(root, "outside.bin")  # a valid copy of the data file, outside the checkpoint
    shutil.copyfile(os.path.join(directory, hostile.DATA), outside)
    if name == PRISTINE:
        return Case(name, PRISTINE, root, directory, outside)
    build, level = hostile.CASES[name]
    build(directory, outside)
    return Case(name, level, root, directory, outside)


def assert_refused(err: BaseException, case: Case) -> None:
    assert isinstance(err, CheckpointError), f"{type(err).__name__} is not a project error: {err}"
    assert BAD in str(err), f"the error does not name the checkpoint: {err}"


def test_the_watch_sees_an_open_of_the_sentinel(pristine, tmp_path):
    case = make_case(pristine("manager"), str(tmp_path), "dotdot-path")
    with pytest.raises(AssertionError, match="outside.bin"), watched(case):
        open(case.outside, "rb").close()


# -- in-process loaders ------------------------------------------------------------------------------------
def load_with_manager(case: Case, caplog: Any) -> None:
    model, optimizer, _ = make_training(seed=7)
    with CheckpointManager(case.root, async_mode="sync") as manager, pytest.raises(Exception) as info:
        manager.load({"model": model, "optim": optimizer}, name=BAD)
    assert_refused(info.value, case)


def read_with_manager(case: Case, caplog: Any) -> None:
    with CheckpointManager(case.root, async_mode="sync") as manager, pytest.raises(Exception) as info:
        manager.read(name=BAD)
    assert_refused(info.value, case)


def _skipped_once(case: Case, caplog: Any, names: list[str]) -> None:
    assert GOOD in names
    if case.level == hostile.MANIFEST:
        assert BAD not in names
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and BAD in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]


def list_with_manager(case: Case, caplog: Any) -> None:
    with CheckpointManager(case.root, async_mode="sync") as manager, caplog.at_level(logging.WARNING):
        names = [info.name for info in manager.list()]
    _skipped_once(case, caplog, names)


def latest_with_manager(case: Case, caplog: Any) -> None:
    with CheckpointManager(case.root, async_mode="sync") as manager, caplog.at_level(logging.WARNING):
        latest = manager.latest()
    assert latest is not None
    if case.level == hostile.MANIFEST:
        assert latest.name == GOOD
        _skipped_once(case, caplog, [GOOD])


def load_with_lightning(case: Case, caplog: Any) -> None:
    from dcp_plugin.lightning import DCPCheckpointIO

    plugin = DCPCheckpointIO(async_mode="sync")
    try:
        with pytest.raises(Exception) as info:
            plugin.load_checkpoint(case.directory)
    finally:
        plugin.teardown()
    assert_refused(info.value, case)


def load_with_accelerate(case: Case, caplog: Any) -> None:
    with _accelerator() as (accelerator, _), pytest.raises(Exception) as info:
        accelerator.load_state(case.directory)
    assert_refused(info.value, case)


LOADERS = {
    "load": ("manager", load_with_manager),
    "read": ("manager", read_with_manager),
    "list": ("manager", list_with_manager),
    "latest": ("manager", latest_with_manager),
    "lightning": ("lightning", load_with_lightning),
    "accelerate": ("accelerate", load_with_accelerate),
}

KNOWN_GAPS: dict[tuple[str, str], str] = {}
"""(case, loader) -> why it fails today and what must change; kept as strict xfails."""


def _params(loaders: list[str]) -> list[Any]:
    out = []
    for case in hostile.CASES:
        for loader in loaders:
            reason = KNOWN_GAPS.get((case, loader))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            out.append(pytest.param(case, loader, marks=marks, id=f"{case}-{loader}"))
    return out


def test_every_loader_accepts_the_pristine_checkpoint(pristine, tmp_path):
    case = make_case(pristine("manager"), str(tmp_path / "manager"), PRISTINE)
    with watched(case), CheckpointManager(case.root, async_mode="sync") as manager:
        model, optimizer, _ = make_training(seed=7)
        manager.load({"model": model, "optim": optimizer}, name=BAD)
        assert set(manager.read(name=BAD)) == {"model", "optim"}
        assert [info.name for info in manager.list()] == [GOOD, BAD] and manager.latest().name == BAD
    from dcp_plugin.lightning import DCPCheckpointIO

    case = make_case(pristine("lightning"), str(tmp_path / "lightning"), PRISTINE)
    plugin = DCPCheckpointIO(async_mode="sync")
    with watched(case):
        assert plugin.load_checkpoint(case.directory)["global_step"] == 2
    plugin.teardown()
    case = make_case(pristine("accelerate"), str(tmp_path / "accelerate"), PRISTINE)
    with watched(case), _accelerator() as (accelerator, _):
        accelerator.load_state(case.directory)


@pytest.mark.parametrize(("case_name", "loader"), _params(list(LOADERS)))
def test_loader_refuses_hostile_checkpoint(pristine, tmp_path, caplog, case_name, loader):
    flavour, run = LOADERS[loader]
    case = make_case(pristine(flavour), str(tmp_path), case_name)
    with watched(case):
        run(case, caplog)


# -- the CLI -----------------------------------------------------------------------------------------------
CLI_COMMANDS = {
    "ls": lambda case: ["ls", case.root],
    "inspect": lambda case: ["inspect", case.directory],
    "verify": lambda case: ["verify", case.directory],
    "verify-load": lambda case: ["verify", "--load", case.directory],
    "export": lambda case: ["export", case.directory, os.path.join(os.path.dirname(case.root), "export.pt")],
}

CLI_GAPS: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def cli_results(pristine, tmp_path_factory) -> dict[tuple[str, str], tuple[Case, dict[str, Any]]]:
    """Every case x command, run by one interpreter (``python -m tests.hostile``); each call under an alarm."""
    where = tmp_path_factory.mktemp("cli")
    cases, calls = {}, []
    for name in [PRISTINE, *hostile.CASES]:
        cases[name] = make_case(pristine("manager"), str(where / name), name)
        calls += [CLI_COMMANDS[command](cases[name]) for command in CLI_COMMANDS]
    (where / "calls.json").write_text(json.dumps(calls))
    done = subprocess.run(
        [sys.executable, "-m", "tests.hostile", str(where / "calls.json")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = iter(json.loads(done.stdout.strip().splitlines()[-1]))
    return {(name, command): (cases[name], next(results)) for name in cases for command in CLI_COMMANDS}


def _cli_params() -> list[Any]:
    out = []
    for case in hostile.CASES:
        for command in CLI_COMMANDS:
            reason = CLI_GAPS.get((case, command))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            out.append(pytest.param(case, command, marks=marks, id=f"{case}-{command}"))
    return out


@pytest.mark.parametrize("command", list(CLI_COMMANDS))
def test_cli_accepts_the_pristine_checkpoint(cli_results, command):
    _, result = cli_results[(PRISTINE, command)]
    assert result["rc"] == 0 and "Traceback" not in result["stderr"], result
    assert BAD in result["stdout"] or command in ("inspect", "export"), result


_EXPORT_NEVER_READS = {"pickle-in-skeleton-value"}
"""Cases whose tampered part lies outside the entry ``export`` reads (the model): it may succeed, running nothing."""


def _must_fail(level: str, command: str, case_name: str = "") -> bool:
    if command == "export" and case_name in _EXPORT_NEVER_READS:
        return False
    if command == "ls":
        return False
    if command == "inspect":
        return level in (hostile.MANIFEST, hostile.METADATA)
    if command == "verify":
        return level != hostile.FORGED_DATA
    return True


@pytest.mark.timeout(300)  # the first test waits for the whole batch; each call has its own 20 s alarm
@pytest.mark.parametrize(("case_name", "command"), _cli_params())
def test_cli_refuses_hostile_checkpoint(cli_results, case_name, command):
    case, result = cli_results[(case_name, command)]
    shown = f"rc={result['rc']}\nstdout:\n{result['stdout']}\nstderr:\n{result['stderr']}"
    assert result["rc"] != -1, f"hung: {shown}"
    assert "Traceback" not in result["stderr"], shown
    assert not os.path.exists(hostile.marker_of(case.outside)), "a pickle payload ran"
    if command == "ls":
        assert result["rc"] == 0 and GOOD in result["stdout"], shown
        if case.level == hostile.MANIFEST:
            broken = [line for line in result["stdout"].splitlines() if BAD in line]
            assert broken and all("BROKEN" in line for line in broken), shown
    elif _must_fail(case.level, command, case_name):
        assert result["rc"] != 0, shown
        assert BAD in result["stdout"] + result["stderr"], shown
    if command == "export" and result["rc"] != 0:
        assert not os.path.exists(os.path.join(os.path.dirname(case.root), "export.pt"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "case_name",
    [
        "fifo-manifest",
        "fifo-metadata",
        "pickle-in-metadata",
    ],
)
def test_cli_entry_point_in_its_own_process(pristine, tmp_path, case_name):
    """The real ``python -m dcp_plugin.cli`` (the batch above calls ``main`` directly) on the cases most
    likely to hang or run code."""
    case = make_case(pristine("manager"), str(tmp_path), case_name)
    done = subprocess.run(
        [sys.executable, "-m", "dcp_plugin.cli", "inspect", case.directory],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and BAD in done.stdout + done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not os.path.exists(hostile.marker_of(case.outside))
