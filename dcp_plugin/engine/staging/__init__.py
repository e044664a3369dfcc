"""Staging: the host buffers a snapshot is copied into before it is written — DCP's stager reused from save to
save (:mod:`.stagers`), the bounded pool (:mod:`.pool`), the head start before the first save (:mod:`.prestage`)
and the preparation after the first optimizer step (:mod:`.warmup`)."""
