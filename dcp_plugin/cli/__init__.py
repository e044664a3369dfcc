"""The ``dcp-plugin`` command: :mod:`~dcp_plugin.cli.main` (parser, exit codes, logging), one module per command
family (:mod:`~dcp_plugin.cli.commands`, :mod:`~dcp_plugin.cli.maintenance`, :mod:`~dcp_plugin.cli.export`,
:mod:`~dcp_plugin.cli.copy`) and
:mod:`~dcp_plugin.cli.output` (how results are printed). Torch is imported only by the commands that need it."""

from __future__ import annotations

from dcp_plugin.cli.main import main, run

__all__ = ["main", "run"]
