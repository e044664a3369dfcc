"""Accelerate adapter: ``accelerator.save_state()`` / ``load_state()`` through DCP.

.. code-block:: python

    accelerator = Accelerator(project_config=ProjectConfiguration(project_dir="runs/a",
                              automatic_checkpoint_naming=True, total_limit=3))
    dcp_plugin.accelerate.enable(accelerator, async_mode="process")  # or only DCP_PLUGIN_* variables
    ...
    accelerator.save_state()   # asynchronous, returns once the snapshot is taken
    accelerator.load_state()   # latest committed checkpoint, in place

See ``docs/accelerate.md`` for the environment variables and caveats. Needs Accelerate:
``pip install 'dcp-plugin[accelerate]'`` (without it, importing this package says so).
"""

from typing import TYPE_CHECKING, Any

from dcp_plugin.errors import import_extra

import_extra("accelerate", extra="accelerate", feature="dcp_plugin.accelerate")

from dcp_plugin.accelerate.checkpointer import AccelerateCheckpointer  # noqa: E402 - after the check above
from dcp_plugin.accelerate.install import DCPAccelerator, checkpointer_of, disable, enable  # noqa: E402
from dcp_plugin.accelerate.options import AccelerateOptions  # noqa: E402

if TYPE_CHECKING:
    from dcp_plugin.accelerate.export import export_weights


def __getattr__(name: str) -> Any:
    # Imported on use: ``python -m dcp_plugin.accelerate.export`` must not find the module already imported by
    # its package (runpy warns, and the module would run twice).
    if name == "export_weights":
        from dcp_plugin.accelerate.export import export_weights

        return export_weights
    raise AttributeError(f"module 'dcp_plugin.accelerate' has no attribute {name!r}")


__all__ = [
    "AccelerateCheckpointer",
    "AccelerateOptions",
    "DCPAccelerator",
    "checkpointer_of",
    "disable",
    "enable",
    "export_weights",
]
