"""The core needs torch, fsspec and xxhash only; Lightning and Accelerate are extras. Each test runs a fresh
interpreter in which one framework cannot be imported (a meta-path finder refuses it, as if it were not installed)
and checks what a user of that interpreter sees."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.paths import REPO

BLOCKER = """
import sys

class NotInstalled:
    def __init__(self, *names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled(*sys.argv[1:]))
"""


def _run(code: str, *missing: str) -> subprocess.CompletedProcess:
    script = BLOCKER + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script, *missing], cwd=REPO, capture_output=True, text=True, timeout=240
    )


@pytest.mark.parametrize(("package", "framework"), [("lightning", "lightning"), ("accelerate", "accelerate")])
def test_an_adapter_without_its_framework_names_the_extra_to_install(package, framework):
    result = _run(
        f"""
        try:
            import dcp_plugin.{package}
        except ImportError as err:
            from dcp_plugin.errors import MissingExtraError
            assert isinstance(err, MissingExtraError) and isinstance(err, ModuleNotFoundError), type(err)
            print(err)
        else:
            raise SystemExit("imported without {framework}")
        """,
        framework,
    )
    assert result.returncode == 0, result.stderr
    assert f"dcp_plugin.{package} needs {framework}, which is not installed" in result.stdout
    assert f"pip install 'dcp-plugin[{package}]'" in result.stdout


def test_the_core_and_the_command_work_without_lightning_and_accelerate(tmp_path):
    result = _run(
        f"""
        import torch
        from dcp_plugin import CheckpointManager
        from dcp_plugin.cli import main

        model = torch.nn.Linear(4, 2)
        with CheckpointManager({str(tmp_path)!r}) as manager:
            manager.save(1, {{"model": model}})
        restored = torch.nn.Linear(4, 2)
        with CheckpointManager({str(tmp_path)!r}) as manager:
            manager.load({{"model": restored}})
        assert torch.equal(restored.weight, model.weight)
        assert main(["ls", {str(tmp_path)!r}]) == 0
        assert main(["verify", {str(tmp_path / "step_000000001")!r}]) == 0
        assert "lightning" not in sys.modules and "accelerate" not in sys.modules
        """,
        "lightning",
        "accelerate",
    )
    assert result.returncode == 0, result.stderr
    assert "step_000000001" in result.stdout


def test_accelerate_users_need_no_lightning_and_lightning_users_no_accelerate():
    for package, other in (("accelerate", "lightning"), ("lightning", "accelerate")):
        result = _run(f"import dcp_plugin.{package}", other)
        assert result.returncode == 0, result.stderr


def test_exporting_to_lightning_without_lightning_names_the_extra(tmp_path):
    result = _run(
        f"""
        import torch
        from dcp_plugin import CheckpointManager
        from dcp_plugin.cli import main

        with CheckpointManager({str(tmp_path)!r}, async_mode="sync") as manager:
            manager.save(1, {{"model": torch.nn.Linear(4, 2)}})
        raise SystemExit(main(["export", {str(tmp_path / "step_000000001")!r}, {str(tmp_path / "out.ckpt")!r}]))
        """,
        "lightning",
    )
    assert result.returncode == 1, result.stderr
    assert "pip install 'dcp-plugin[lightning]'" in result.stderr and "Traceback" not in result.stderr


def test_a_module_missing_inside_the_framework_is_not_blamed_on_the_extra():
    result = _run(
        """
        try:
            import dcp_plugin.lightning
        except ModuleNotFoundError as err:
            from dcp_plugin.errors import MissingExtraError
            assert not isinstance(err, MissingExtraError) and err.name == "torchmetrics", repr(err)
        else:
            raise SystemExit("imported without torchmetrics")
        """,
        "torchmetrics",
    )
    assert result.returncode == 0, result.stderr
