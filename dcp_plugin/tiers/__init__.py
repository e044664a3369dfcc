"""Two storage tiers: :mod:`.two_tiers` (what is replicated, what each tier keeps, which tier a load reads),
:mod:`.replication` (committed checkpoints copied to the second tier in the background) and :mod:`.rank_copy`
(each rank uploads its own files, rank 0 commits); :mod:`.run_tiers` is what ``CheckpointManager`` asks, with one
tier or two."""
