"""Zero-code Accelerate integration: ``DCP_PLUGIN_ENABLE=1 accelerate launch train.py``.

Installed with dcp-plugin as ``dcp_plugin_autoload.pth`` in site-packages, whose one line runs at every
interpreter start and, only when ``DCP_PLUGIN_ENABLE`` is set to a true value (``1/true/yes/on``), calls
:func:`install`. Unset, it costs one environment lookup (``os`` is already imported by then).

:func:`install` adds an import hook that waits for ``accelerate.accelerator`` to be imported (nothing is
imported early) and then wraps ``Accelerator.__init__`` so that every new ``Accelerator`` gets
``dcp_plugin.accelerate.enable(accelerator)``, with options from the ``DCP_PLUGIN_*`` variables. A script that
calls ``enable()`` itself (or uses ``DCPAccelerator``) replaces that automatic installation with its own options.

This module must stay free of heavy imports: it runs in every Python process of the environment while the
variable is set (the launcher, tools, workers).
"""

from __future__ import annotations

import os
import sys

ENV = "DCP_PLUGIN_ENABLE"
TARGET = "accelerate.accelerator"
_TRUE = {"1", "true", "yes", "on"}


def requested(environ: dict | None = None) -> bool:
    """Whether ``DCP_PLUGIN_ENABLE`` asks for the zero-code integration."""
    return (os.environ if environ is None else environ).get(ENV, "").strip().lower() in _TRUE


class _Finder:  # a meta path finder (no importlib.abc: it would import typing at every start)
    """Lets ``accelerate.accelerator`` be found as usual, then patches it once it has executed."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib's signature
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader:
    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner = inner

    def create_module(self, spec):  # noqa: ANN001
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self.inner.exec_module(module)
        patch(module)

    def __getattr__(self, name: str):  # get_code, get_source... of the real loader
        return getattr(self.inner, name)


def patch(module) -> None:  # noqa: ANN001
    """Wrap ``module.Accelerator.__init__`` to enable dcp-plugin on every new instance (once)."""
    cls = getattr(module, "Accelerator", None)
    if cls is None or getattr(cls.__init__, "_dcp_plugin_auto", False):
        return
    original = cls.__init__

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN001, N807
        original(self, *args, **kwargs)
        from dcp_plugin.accelerate.install import enable_automatically

        enable_automatically(self)

    __init__._dcp_plugin_auto = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    __init__.__doc__ = original.__doc__
    cls.__init__ = __init__


def install() -> None:
    """Patch ``Accelerator`` now if accelerate is already imported, else when it is."""
    module = sys.modules.get(TARGET)
    if module is not None:
        patch(module)
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
