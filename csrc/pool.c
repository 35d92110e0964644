/* pool.c - the hot path of AudioPool.write_wav for a small WAV, in one call.
 *
 * A pooled write of a few hundred bytes costs almost nothing in memcpy; what it
 * costs is crossings from Python into C. Before a free slot is handed out, its
 * mapping must be whole (the SIGBUS guard) and, for a named pool, the pool's
 * inotify watch must have seen nothing since the slot's name was last checked.
 * This does both checks and the fill together. The caller holds the pool's
 * lock: an event drained here must make the caller unverify every slot before
 * any other thread looks at the watch.
 */
#include "luna_shm.h"

#include <errno.h>

int luna_pool_fill(int guard, int watch_fd, uint8_t *slot, uint64_t slot_len,
                   const struct luna_wav_spec *spec, const void *data, uint64_t data_bytes)
{
    int broken = luna_guard_broken(guard);
    if (broken != 0)
        return broken < 0 ? broken : -ESTALE;
    if (watch_fd >= 0 && luna_watch_wait(watch_fd, 0) != 0)
        return 0; /* an event (or an error reading the watch): the caller checks by name */
    int rc = luna_wav_fill_slot(slot, slot_len, spec, data, data_bytes);
    if (rc >= 0 && luna_guard_broken(guard) != 0)
        return -ESTALE; /* the file shrank while we wrote */
    return rc;
}
