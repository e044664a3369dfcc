"""Read checkpoints in a fresh process, as a resumed job would: ``read_fresh.py OUT CKPT...``.

For each checkpoint directory, ``torch.save``s into OUT ``{ckpt: {"plugin": <dcp-plugin's read()>, "torch":
<PyTorch's dcp_to_torch_save>}}``; a reader that refuses the checkpoint gives its error text instead.
"""

import sys
import tempfile

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dcp_plugin import Checkpointer

if __name__ == "__main__":
    out, paths = sys.argv[1], sys.argv[2:]
    results = {}
    checkpointer = Checkpointer(distributed=False)
    for path in paths:
        result = {}
        try:
            result["plugin"] = checkpointer.read(path)
        except Exception as err:  # noqa: BLE001 - reported to the test
            result["plugin"] = f"{type(err).__name__}: {err}"
        with tempfile.NamedTemporaryFile(suffix=".pt") as handle:
            try:
                dcp_to_torch_save(path, handle.name)
                result["torch"] = torch.load(handle.name, weights_only=False)
            except Exception as err:  # noqa: BLE001
                result["torch"] = f"{type(err).__name__}: {err}"
        results[path] = result
    checkpointer.close()
    torch.save(results, out)
