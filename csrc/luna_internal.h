/* luna_internal.h - what the C files of luna_shm share with each other (and
 * with the C tests, tests/c/), but not with Python: these functions take raw
 * addresses or leave an fd half set up, so the cffi binding does not offer
 * them. luna_shm.h, which this includes, is the API Python calls.
 *
 * The conventions of luna_shm.h hold: >= 0 on success, -errno on failure, and
 * every size checked by the function itself.
 */
#ifndef LUNA_INTERNAL_H
#define LUNA_INTERNAL_H

#include "luna_shm.h"

#include <unistd.h>

/* ---- files.c ------------------------------------------------------------- */

/* luna_lock(fd, 0, 1) that waits through signals: for a file just created,
 * which no other process can hold for more than a moment (a sweep's try).
 * Returns 0 or -errno. */
int luna_lock_new_file(int fd);

/* An fd cell (see luna_fd_release) that may take a new fd: NULL (no cell) or
 * empty. One that holds an fd already is refused, never overwritten. */
static inline int luna_cell_is_empty(const int *cell)
{
    return !cell || *cell < 0;
}

/* Around the making of an fd and its store into a cell (or a record of it
 * that a child reads), and around a cell's clearing and the close of its fd:
 * a fork waits for both steps or neither (the fork lock of fd cells, files.c).
 * A holder must not take it again: what it calls gets NULL for a cell. */
void luna_cells_lock(void);
void luna_cells_unlock(void);

/* luna_cells_lock for a call that fills cell: nothing for a NULL cell. */
static inline void luna_cells_enter(const int *cell)
{
    if (cell)
        luna_cells_lock();
}

static inline void luna_cells_leave(const int *cell)
{
    if (cell)
        luna_cells_unlock();
}

/* Note that cell holds fd: a forked child closes fd and empties cell (see
 * luna_fd_keep_in_child). Under luna_cells_lock. */
void luna_cell_note(int *cell, int fd);

/* fd, stored into cell as well (and noted) when it is an fd and cell is not
 * NULL. Under luna_cells_enter(cell). */
static inline int luna_store_fd(int *cell, int fd)
{
    if (cell && fd >= 0) {
        *cell = fd;
        luna_cell_note(cell, fd);
    }
    return fd;
}

/* A failure path's close of the fd a call made: through cell (emptied under
 * the fork lock) when there is one, else the plain fd. */
static inline void luna_drop_fd(int *cell, int fd)
{
    if (cell)
        (void)luna_fd_release(cell);
    else
        close(fd);
}

/* ---- mapping.c: unnamed files -------------------------------------------- */

/* Open an unnamed file in directory dir (O_TMPFILE, mode 0600). Returns the
 * fd, -EOPNOTSUPP when the filesystem or platform cannot, or -errno. */
int luna_open_unnamed(const char *dir);

/* luna_open_unnamed, then the file's mode set to exactly mode (O_TMPFILE's
 * went through the umask) and a shared flock taken, all before the file can
 * have a name: no cleanup ever sees it unlocked. Returns the fd, -EOPNOTSUPP
 * as luna_open_unnamed, -EINVAL for mode bits past 07777, or -errno. */
int luna_open_unnamed_locked(const char *dir, unsigned int mode);

/* ---- guard.c: the registry behind luna_map and luna_mapping_release ----- */

/* Register [addr, addr+len) (a shared file mapping of protection prot, addr
 * page-aligned) and make sure our SIGBUS handler is installed in front of
 * whatever handler is there now (faulthandler enabled after us, say). A kernel
 * SIGBUS inside a registered range replaces the whole range with anonymous
 * zero pages of the same protection and marks it broken; every other SIGBUS
 * goes to the previous handler as if we were not there. Returns the guard id
 * (>= 0), -ENOMEM when the registry cannot grow, or -errno from sigaction.
 * Async-signal-safe: no. Cost: one sigaction query plus a compare-and-swap. */
int luna_guard_register(void *addr, uint64_t len, int prot);

/* Watch only the first len bytes (0 < len <= its length) of guard's range,
 * before its file is cut to len; its state goes through ST_CLAIMED meanwhile,
 * so that no handler acts on the old length. Returns 0, or -EINVAL for an id
 * that is not a live, whole mapping, or a len outside (0, length]. */
int luna_guard_shrink(int guard, uint64_t len);

/* Break guard's mapping now, as a fault in it would: its range becomes
 * anonymous zero pages and luna_guard_broken says 1 from then on. Returns 0
 * (broken now, or before), -EINVAL for an id that is not registered, or
 * -ENOMEM when the zero pages cannot be mapped (the mapping is left whole). */
int luna_guard_break(int guard);

/* A system call answered EFAULT for [addr, addr+len): the kernel read or wrote
 * that memory itself and found a page gone, which raises no SIGBUS. Break every
 * registered mapping overlapping the range whose last byte can no longer be
 * read (its file was cut), as a fault in it would: zeros from then on, so that
 * the call, made again, reads or writes what numpy would. Returns how many
 * registered mappings overlapping the range are broken after the call, here
 * or before (a fault in another thread may have broken one between the
 * caller's EFAULT and this call). A caller retries only while that number
 * grows: a broken mapping stays broken while its memory is in use, so it
 * retries a bounded number of times, and an EFAULT that is not the guard's
 * is returned. Not async-signal-safe (it may wait for a handler). */
int luna_guard_absorb_range(const void *addr, uint64_t len);

/* Forget guard (before its range is unmapped). Returns 0, or -EINVAL for an
 * id that is not registered. */
int luna_guard_unregister(int guard);

/* ---- decode.c: the conversion luna_read_decode runs on each chunk --------- */

/* Convert count samples stored as (src_format, src_bits) at src (PCM 8-bit
 * unsigned, 16, 24 packed, 32; IEEE float 32, 64) to dst_type (a
 * LUNA_DECODE_* of luna_shm.h) at dst, in one pass, with python-soundfile's
 * values: PCM to float scaled by 1/2^(bits-1), PCM to int left-justified or
 * cut to its top bits, float to float a cast. No pointer needs any alignment.
 * Returns 0, -EINVAL for a conversion not made (float to int, an unknown
 * encoding or type), or -EFBIG for a count no buffer can hold. */
int luna_decode(const void *src, int src_format, int src_bits, void *dst,
                int dst_type, uint64_t count);

#endif /* LUNA_INTERNAL_H */
