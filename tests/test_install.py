"""Installing dcp-plugin as the README says: the documented command works from any directory, and what it builds
carries the version, the core dependencies with the adapters' frameworks as extras, and the ``py.typed`` marker that
lets type checkers use the package's annotations."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import dcp_plugin
from tests.paths import REPO

README = Path(REPO) / "README.md"


def _documented_install() -> list[str]:
    """The lines of the README's install block: ``DCP=...`` (where the clone is) and the pip command."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Install into your own environment") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's install section has no bash block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.split("#", 1)[0].strip()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from this checkout (no download: the running environment's setuptools)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), REPO],
        check=True,
        capture_output=True,
        cwd=out,
        timeout=300,
    )
    (found,) = out.glob("dcp_plugin-*.whl")
    return found


def test_the_documented_install_command_works_from_any_directory(tmp_path):
    lines = _documented_install()
    assert lines[0].startswith("DCP=") and any('"$DCP[' in line for line in lines[1:]), lines
    report = tmp_path / "report.json"
    dry_run = f"{sys.executable} -m pip install --dry-run --no-deps --no-build-isolation -q --report {report}"
    command = "\n".join([f"DCP={REPO}", *lines[1:]]).replace("python -m pip install", dry_run)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    result = subprocess.run(["bash", "-ec", command], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (item,) = json.loads(report.read_text())["install"]
    assert item["metadata"]["name"] == "dcp-plugin" and item["metadata"]["version"] == dcp_plugin.__version__
    assert item["requested_extras"] == ["lightning"]


def test_the_wheel_carries_the_version_the_extras_and_py_typed(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "dcp_plugin/py.typed" in names and "dcp_plugin_autoload.pth" in names
    assert f"\nVersion: {dcp_plugin.__version__}\n" in metadata
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(re.split(r"[<>=; ]", line.split(": ", 1)[1])[0] for line in core) == ["fsspec", "torch", "xxhash"]
    for extra, framework in (("lightning", "lightning"), ("accelerate", "accelerate")):
        assert f"Provides-Extra: {extra}" in metadata
        assert re.search(rf"Requires-Dist: {framework}\b.*extra == \"{extra}\"", metadata)


def test_mypy_uses_the_annotations_of_an_installed_copy(wheel, tmp_path):
    pytest.importorskip("mypy")
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = next(env_dir.glob("lib/python*/site-packages"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    user = tmp_path / "train.py"
    user.write_text(
        "from dcp_plugin import CheckpointConfig\n"
        "config = CheckpointConfig(thread_count='four')\n"
        "reveal_type(config.thread_count)\n"
    )
    result = subprocess.run(  # from a directory of the user's: nothing of this checkout on mypy's path
        [
            sys.executable,
            "-m",
            "mypy",
            "--python-executable",
            str(env_dir / "bin" / "python"),
            "--no-incremental",
            "--config-file",
            os.devnull,
            "--cache-dir",
            os.devnull,
            "train.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout
    assert "missing library stubs or py.typed marker" not in out, out
    assert re.search(r'train.py:3: note: Revealed type is "(builtins\.)?int"', out), out
    assert 'train.py:2: error: Argument "thread_count" to "CheckpointConfig" has incompatible type "str"' in out, out


def test_the_readme_and_the_changelog_name_the_version_of_these_sources():
    base = re.match(r"\d+\.\d+\.\d+", dcp_plugin.__version__).group(0)
    readme = README.read_text(encoding="utf-8")
    assert f"describe **dcp-plugin {base}**" in readme and f"`{dcp_plugin.__version__}`" in readme
    newest = re.search(r"^## (\S+) — (.+)$", (Path(REPO) / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)
    assert newest and newest.group(1) == base, "the CHANGELOG's newest section is not this version"
    assert (newest.group(2) == "unreleased") == (".dev" in dcp_plugin.__version__)
