"""``DCP_PLUGIN_ENABLE=1 accelerate launch train.py``: an unchanged script's save_state/load_state go through DCP.

The mechanism is the ``dcp_plugin_autoload.pth`` file the package installs into site-packages. These tests put
it in the site-packages of a throw-away virtual environment (over this one's packages) and run real scripts.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

UNCHANGED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = sys.argv[1]
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=project, automatic_checkpoint_naming=True))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    weights = model.weight.detach().clone()
    accelerator.save_state()
    accelerator.wait_for_everyone()
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state()
    assert torch.equal(model.weight, weights)
    accelerator.end_training()
    print(json.dumps(sorted(os.listdir(os.path.join(project, "checkpoints", "checkpoint_0")))))
    """
)


@pytest.fixture(scope="module")
def site_with_pth(tmp_path_factory):
    """A virtual environment seeing this one's packages, with dcp-plugin's .pth (and its module) installed."""
    base = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(base)
    python = base / "bin" / "python"
    site_packages = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # this environment's packages (torch, accelerate...), as plain path entries
    (site_packages / "_this_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    shutil.copy(ROOT / "dcp_plugin_autoload.pth", site_packages)
    shutil.copy(ROOT / "_dcp_plugin_autoload.py", site_packages)
    return python


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCP_PLUGIN_")}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _run_unchanged_script(python: Path, tmp_path: Path, *, launcher: bool, **env: str) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "train.py"
    script.write_text(UNCHANGED_SCRIPT)
    project = tmp_path / "project"
    if launcher:
        command = [str(python), "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    else:
        command = [str(python), str(script)]
    result = subprocess.run(
        [*command, str(project)], env=_env(**env), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_accelerate_launch_with_the_variable_routes_an_unchanged_script_through_dcp(site_with_pth, tmp_path):
    files = _run_unchanged_script(site_with_pth, tmp_path, launcher=True, DCP_PLUGIN_ENABLE="1")
    assert "dcp_plugin.json" in files and ".metadata" in files
    assert not any(name.endswith((".safetensors", ".bin", ".pkl")) for name in files)


def test_without_the_variable_the_script_keeps_accelerate_own_checkpoints(site_with_pth, tmp_path):
    files = _run_unchanged_script(site_with_pth, tmp_path, launcher=False)
    assert "model.safetensors" in files and "dcp_plugin.json" not in files
    on = _run_unchanged_script(site_with_pth, tmp_path / "on", launcher=False, DCP_PLUGIN_ENABLE="yes")
    assert "dcp_plugin.json" in on


def test_the_pth_costs_nothing_when_the_variable_is_unset(site_with_pth):
    wanted = "{'_dcp_plugin_autoload', 'dcp_plugin', 'torch', 'accelerate'}"
    probe = f"import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {wanted}))"
    unset = subprocess.run([str(site_with_pth), "-c", probe], env=_env(), capture_output=True, text=True, check=True)
    assert json.loads(unset.stdout.replace("'", '"')) == []
    # set: only the tiny hook module is imported at start; accelerate, torch and dcp_plugin wait for the script
    on = subprocess.run(
        [str(site_with_pth), "-c", probe], env=_env(DCP_PLUGIN_ENABLE="1"), capture_output=True, text=True, check=True
    )
    assert json.loads(on.stdout.replace("'", '"')) == ["_dcp_plugin_autoload"]


def test_a_script_calling_enable_itself_replaces_the_automatic_installation(tmp_path):
    code = textwrap.dedent(
        """
        import _dcp_plugin_autoload
        _dcp_plugin_autoload.install()
        from accelerate import Accelerator
        import dcp_plugin.accelerate as dpa
        accelerator = Accelerator(cpu=True)
        automatic = dpa.checkpointer_of(accelerator)
        assert automatic is not None and automatic.installed_automatically
        explicit = dpa.enable(accelerator, async_mode="sync")
        assert dpa.checkpointer_of(accelerator) is explicit and explicit.config.async_mode == "sync"
        own = dpa.DCPAccelerator(cpu=True, dcp_keep_last=2)
        assert not dpa.checkpointer_of(own).installed_automatically and own.dcp_checkpointer.keep_last == 2
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env(DCP_PLUGIN_ENABLE="1"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-4000:]
