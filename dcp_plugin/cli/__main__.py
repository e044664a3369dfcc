"""``python -m dcp_plugin.cli``: the same as the ``dcp-plugin`` command."""

from dcp_plugin.cli.main import run

if __name__ == "__main__":
    run()
