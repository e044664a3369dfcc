"""The dcp-plugin command: list, query, inspect, verify, export, copy and clean up checkpoints on any fsspec storage.

Start-up imports neither torch nor the adapters; commands that read tensors import them when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dcp_plugin import __version__, logs
from dcp_plugin.cli.commands import add_commands
from dcp_plugin.cli.copy import add_copy_command
from dcp_plugin.cli.export import add_export_commands
from dcp_plugin.cli.maintenance import add_maintenance_commands
from dcp_plugin.errors import CheckpointError, ConfigError

EXIT_OK = 0
EXIT_FAILED = 1
"""A checkpoint or directory is missing, broken or refused, or the storage failed."""
EXIT_USAGE = 2
"""Bad arguments or options (nothing was read)."""

_EPILOG = """\
global options (--json, --storage-options, -v, --no-progress) go before or after the command.
exit codes: 0 ok; 1 missing, broken or refused checkpoint, or a storage error; 2 bad usage.
environment: DCP_PLUGIN_LOG_LEVEL sets the log level when -v is not given."""

_GLOBAL_DEFAULTS = {"json": False, "storage_options": None, "verbose": 0, "progress": True}


def global_options() -> argparse.ArgumentParser:
    """The options every command accepts, before or after its name (defaults are filled in after parsing, so a
    value given before the command is not reset by the command's parser)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the result as JSON")
    group.add_argument(
        "--storage-options",
        metavar="JSON",
        default=argparse.SUPPRESS,
        help="fsspec options as a JSON object, e.g. '{\"anon\": false}'",
    )
    group.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log INFO (-v) or DEBUG (-vv) to stderr"
    )
    group.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=argparse.SUPPRESS,
        help="no progress bars (they are shown on stderr only when it is a terminal)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = global_options()
    parser = argparse.ArgumentParser(
        prog="dcp-plugin",
        description=(__doc__ or "").split("\n\n")[0],
        epilog=_EPILOG,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dcp-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub, [common])
    add_maintenance_commands(sub, [common])
    add_export_commands(sub, [common])
    add_copy_command(sub, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 missing or broken, 2 bad usage)."""
    try:
        code = _run(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _silence_stdout()  # the reader (e.g. `| head`) has what it wanted
        return EXIT_OK


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version (0) or a usage error (2, already printed)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    for name, default in _GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.json:
        args.progress = False
    try:
        logs.configure_cli(args.verbose)
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"dcp-plugin {args.command}: interrupted", file=sys.stderr)
        return 130
    except ConfigError as err:
        return _fail(args, err, EXIT_USAGE)
    except (CheckpointError, OSError) as err:
        if isinstance(err, BrokenPipeError):
            raise
        return _fail(args, err, EXIT_FAILED)
    except ValueError as err:
        return _fail(args, err, EXIT_USAGE)


def _fail(args: argparse.Namespace, err: BaseException, code: int) -> int:
    print(f"dcp-plugin {args.command}: {err}", file=sys.stderr)
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def run() -> None:
    """The console script's entry point."""
    sys.exit(main())
