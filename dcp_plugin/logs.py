"""Logging, as Lightning and Accelerate do it: named loggers under ``dcp_plugin``, no handlers installed.

Every module logs to ``logging.getLogger(__name__)``; the application decides where records go. Two knobs set
the level of the ``dcp_plugin`` logger (and so of every module's logger) without adding a handler:

* ``DCP_PLUGIN_LOG_LEVEL`` (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``, ``CRITICAL`` or a number), read when
  ``dcp_plugin`` is imported;
* the ``dcp-plugin`` command's ``-v`` (INFO) / ``-vv`` (DEBUG), which also installs the command's one handler.
"""

from __future__ import annotations

import logging
import os
import sys

from dcp_plugin.errors import ConfigError

ROOT = "dcp_plugin"
LEVEL_VARIABLE = "DCP_PLUGIN_LOG_LEVEL"
_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_level(text: str, source: str = LEVEL_VARIABLE) -> int:
    """A level name (any case) or number; a :class:`ConfigError` naming ``source`` otherwise."""
    value = text.strip().upper()
    if value.isdigit():
        return int(value)
    if value == "WARN":
        value = "WARNING"
    if value not in _NAMES:
        raise ConfigError(f"{source}={text!r} is not a log level; use one of {', '.join(_NAMES)} (or a number).")
    return int(getattr(logging, value))


def environment_level() -> int | None:
    """The level ``DCP_PLUGIN_LOG_LEVEL`` asks for, or None when it is unset or empty."""
    text = os.environ.get(LEVEL_VARIABLE, "")
    return parse_level(text) if text.strip() else None


def apply_environment_level() -> None:
    """Set the ``dcp_plugin`` logger's level from ``DCP_PLUGIN_LOG_LEVEL`` (nothing when unset)."""
    level = environment_level()
    if level is not None:
        logging.getLogger(ROOT).setLevel(level)


def configure_cli(verbosity: int) -> int:
    """The command's logging: ``-v`` INFO, ``-vv`` DEBUG, else ``DCP_PLUGIN_LOG_LEVEL``, else WARNING, on one
    handler on stderr for dcp-plugin's records (replaced, not added, when called again). Returns the level."""
    global _cli_handler
    if verbosity > 0:
        level = logging.INFO if verbosity == 1 else logging.DEBUG
    else:
        level = environment_level() or logging.WARNING
    logger = logging.getLogger(ROOT)
    if _cli_handler is not None:
        logger.removeHandler(_cli_handler)
    _cli_handler = logging.StreamHandler(sys.stderr)
    _cli_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(_cli_handler)
    logger.setLevel(level)
    return level


_cli_handler: logging.Handler | None = None


__all__ = ["LEVEL_VARIABLE", "apply_environment_level", "configure_cli", "environment_level", "parse_level"]
