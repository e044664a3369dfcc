"""Single-file exports of one checkpoint entry: :mod:`.exporter` (safetensors streamed through the verifying
reader, ``torch.save``, or a format an adapter registers) and :mod:`.output` (a file that appears whole or not
at all)."""
