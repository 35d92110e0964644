"""AudioPool: reusable RAM-disk WAV slots whose pages are already allocated and mapped.

A fresh tmpfs file pays for every new page it touches (about 0.1 ms for the
125 pages of 500 KB on our machines); a slot pays once, when the pool starts.
``pool.write_wav(data, rate)`` then costs one copy (or one C conversion) into
memory that *is* the file. A slot's path must still name its own file when the
slot is handed out: one inotify instance per pool watches every slot file, so that
check is a ``stat`` only after someone else touched one (otherwise one ``FIONREAD``
of the watch). A small write takes that check and its copy in one C call. Each slot
is a complete, valid WAV at every moment: the unused space after the audio is a
``JUNK`` chunk that readers skip.

Slots hold a shared flock for the pool's lifetime, so
:func:`cleanup_all_temp_audio` never removes a live pool's files, and a new
pool reclaims the slot files of pools whose process died (only files that
carry the slot marker). A pool belongs to the process that made it: a forked
child can neither take its slots nor remove its files, and closes its copies of
the slots' descriptors and mappings at the fork (a killed parent's slots are then
reclaimable while the child lives).

The package: ``_slot_files`` makes, marks, checks and closes slot files (and reclaims
dead pools' ones); ``_audio_pool`` lends the slots (AudioPool, PooledWav).
"""

from __future__ import annotations

from luna_shm.pool._audio_pool import AudioPool, PooledWav
from luna_shm.pool._slot_files import reclaim_dead_pool_files

__all__ = ["AudioPool", "PooledWav", "reclaim_dead_pool_files"]

# The public classes say where users import them from (reprs, tracebacks).
for _public in (AudioPool, PooledWav, reclaim_dead_pool_files):
    _public.__module__ = __name__
del _public
