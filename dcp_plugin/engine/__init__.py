"""The DCP pipeline: :class:`~dcp_plugin.engine.checkpoint_engine.CheckpointEngine` (``dcp.save`` / ``async_save``
/ ``load``, one save in flight, background errors) and its parts: the save in flight (:mod:`.pending`), background
errors and finished stats (:mod:`.outcomes`, :mod:`.failures`), the writer daemon, process groups, plan caching,
writer priority, saves in flight per URL, the exit-time flush, save statistics, and staging (:mod:`.staging`)."""
