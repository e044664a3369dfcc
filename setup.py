"""Build hook: ship ``dcp_plugin_autoload.pth`` into site-packages (zero-code Accelerate integration).

Everything else is configured in pyproject.toml. A ``.pth`` file must sit at the top of site-packages; setuptools
has no declarative way to put it there, so ``build_py`` copies it next to the top-level modules. Unless
``DCP_PLUGIN_ENABLE`` is set to a true value, its one line costs one environment lookup at interpreter start.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "dcp_plugin_autoload.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


class EditableWheelWithPth(editable_wheel):
    """``pip install -e .`` builds an editable wheel without ``build_py``'s extra files; add the ``.pth`` to it
    (``_dcp_plugin_autoload`` itself is found through the editable install like any other module)."""

    def _select_strategy(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - setuptools' signature
        return _AlsoWritePth(super()._select_strategy(*args, **kwargs))


class _AlsoWritePth:
    def __init__(self, strategy) -> None:  # noqa: ANN001
        self.strategy = strategy

    def __call__(self, wheel, files, mapping) -> None:  # noqa: ANN001
        self.strategy(wheel, files, mapping)
        with open(PTH, encoding="utf-8") as handle:
            wheel.writestr(PTH, handle.read())

    def __enter__(self):  # noqa: ANN204
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.strategy.__exit__(*exc)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
