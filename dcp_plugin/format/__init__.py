"""The checkpoint format: ``Stateful`` wrappers (:mod:`.state`), non-tensor state without pickle (:mod:`.encoding`),
a state mapping packed into one flat DCP state dict plus a skeleton and back (:mod:`.packing`), and which tensors
a save keeps in shared blobs (:mod:`.incremental`)."""
