/* live.c - live streams: the stream-state chunk, waiting for a file to
 * change (inotify), and asking whether anyone still has a file open for
 * writing (a read lease).
 *
 * A WavWriter's header carries a "JUNK" chunk whose body starts "lsst" and a
 * four-byte state ("live", "done", "fail"), placed before "data" (it also
 * does the alignment padding that a plain header does with its own JUNK
 * chunk). JUNK, because every reader skips it without a word (scipy warns
 * about any other unknown chunk); before the data, because the data grows.
 */
#include "luna_internal.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

static void put_u32le(uint8_t *p, uint64_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static const char *state_tag(int state)
{
    switch (state) {
    case LUNA_STREAM_LIVE:
        return "live";
    case LUNA_STREAM_DONE:
        return "done";
    case LUNA_STREAM_FAIL:
        return "fail";
    default:
        return NULL;
    }
}

int luna_live_header(uint8_t *out, const struct luna_wav_spec *spec,
                     uint64_t data_bytes, int state)
{
    uint8_t plain[LUNA_WAV_MAX_HEADER];
    const char *tag = state_tag(state);
    if (!out || !tag)
        return -EINVAL;
    int len = luna_wav_header(plain, spec, data_bytes, 0);
    if (len < 0)
        return len;
    /* The chunks before the plain header's padding JUNK or its "data": a
     * walk over at most four chunk headers, all inside plain[0, len). */
    uint64_t base = 12;
    while (base + 8u <= (uint64_t)len && memcmp(plain + base, "JUNK", 4) != 0 &&
           memcmp(plain + base, "data", 4) != 0) {
        uint64_t size = (uint64_t)plain[base + 4] | ((uint64_t)plain[base + 5] << 8);
        base += 8u + size + (size & 1u);
    }
    if (base + 8u > (uint64_t)len)
        return -EINVAL; /* not a header luna_wav_header writes */
    uint32_t sample_bytes = spec->bits / 8u;
    uint32_t align = sample_bytes == 3u ? 1u : sample_bytes;
    uint64_t body = 8; /* "lsst" + state */
    while ((base + 8u + body + 8u) % align != 0u)
        body += 2u;
    uint64_t header_len = base + 8u + body + 8u;
    if (header_len > LUNA_WAV_MAX_HEADER)
        return -EINVAL;
    /* data_bytes <= 4 GiB (luna_wav_header accepted it): no wrap. */
    uint64_t riff_size = header_len - 8u + data_bytes + (data_bytes & 1u);
    if (riff_size > 0xFFFFFFFFu)
        return -EFBIG;
    memcpy(out, plain, (size_t)base);
    put_u32le(out + 4, riff_size);
    uint8_t *p = out + base;
    memcpy(p, "JUNK", 4);
    put_u32le(p + 4, body);
    memcpy(p + 8, "lsst", 4);
    memcpy(p + 12, tag, 4);
    memset(p + 16, 0, (size_t)(body - 8u));
    p += 8u + body;
    memcpy(p, "data", 4);
    put_u32le(p + 4, data_bytes);
    return (int)header_len;
}

int luna_live_set_state(uint8_t *header_map, uint64_t header_len, int state)
{
    const char *tag = state_tag(state);
    if (!header_map || !tag || header_len > LUNA_WAV_MAX_HEADER)
        return -EINVAL;
    for (uint64_t off = 12; off + 16u <= header_len; off++) {
        if (memcmp(header_map + off, "JUNK", 4) == 0 &&
            memcmp(header_map + off + 8, "lsst", 4) == 0) {
            /* Everything stored before (the last chunk's samples and sizes)
             * is visible to a process that sees the new state. */
            __atomic_thread_fence(__ATOMIC_RELEASE);
            memcpy(header_map + off + 12, tag, 4);
            return 0;
        }
    }
    return -EINVAL;
}

int luna_watch_open(const char *path, int directory, int *cell)
{
    uint32_t mask = directory
        ? (uint32_t)(IN_CREATE | IN_MOVED_TO | IN_ONLYDIR)
        : (uint32_t)(IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB | IN_DELETE_SELF |
                     IN_MOVE_SELF);
    if (!path || !luna_cell_is_empty(cell))
        return -EINVAL;
    luna_cells_enter(cell);
    int fd = luna_watch_new(NULL);
    if (fd >= 0 && inotify_add_watch(fd, path, mask) < 0) {
        int err = errno;
        close(fd);
        fd = -err;
    }
    fd = luna_store_fd(cell, fd);
    luna_cells_leave(cell);
    return fd;
}

int luna_watch_new(int *cell)
{
    if (!luna_cell_is_empty(cell))
        return -EINVAL;
    luna_cells_enter(cell);
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    fd = fd < 0 ? -errno : luna_store_fd(cell, fd);
    luna_cells_leave(cell);
    return fd;
}

int luna_watch_add(int watch_fd, const char *path)
{
    /* No IN_CLOSE_WRITE: readers and our own mapped writes make no event at
     * all, so a quiet watch means nobody else touched the file. */
    if (!path)
        return -EINVAL;
    int wd = inotify_add_watch(watch_fd, path,
                               IN_MODIFY | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF);
    return wd < 0 ? -errno : wd;
}

int luna_watch_wait(int fd, int timeout_ms)
{
    struct pollfd pfd = {fd, POLLIN, 0};
    if (timeout_ms == 0) {
        /* Nothing queued is the common answer (a pool's take asks it every time):
         * FIONREAD says so faster than a read that fails with EAGAIN. An error
         * here falls through to the read, which reports it. */
        int queued;
        if (ioctl(fd, FIONREAD, &queued) == 0 && queued == 0)
            return 0;
    } else {
        int n = poll(&pfd, 1, timeout_ms < 0 ? -1 : timeout_ms);
        if (n < 0)
            return errno == EINTR ? 0 : -errno; /* the caller looks again */
        if (n == 0)
            return 0;
    }
    /* Drain every queued event: one wake-up covers them all. */
    union {
        struct inotify_event event;
        char bytes[4096];
    } buf;
    int seen = 0;
    for (;;) {
        ssize_t r = read(fd, buf.bytes, sizeof buf.bytes);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return seen;
            return -errno;
        }
        if (r == 0)
            return -EINVAL; /* an inotify fd never reads 0 bytes: not one */
        for (ssize_t off = 0; off + (ssize_t)sizeof(struct inotify_event) <= r;) {
            const struct inotify_event *ev =
                (const struct inotify_event *)(buf.bytes + off);
            if (ev->mask & (IN_MODIFY | IN_ATTRIB))
                seen |= LUNA_WATCH_CHANGED;
            if (ev->mask & IN_CLOSE_WRITE)
                seen |= LUNA_WATCH_CLOSED;
            if (ev->mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED))
                seen |= LUNA_WATCH_GONE;
            if (ev->mask & (IN_CREATE | IN_MOVED_TO))
                seen |= LUNA_WATCH_NAMED;
            if (ev->mask & IN_Q_OVERFLOW)
                seen |= LUNA_WATCH_CHANGED;
            off += (ssize_t)sizeof(struct inotify_event) + (ssize_t)ev->len;
        }
    }
}

int luna_watch_read(int watch_fd, int timeout_ms, int fd, uint64_t data_offset,
                    uint64_t offset, uint32_t block, void *dst, uint64_t cap,
                    uint64_t *file_size, uint64_t *data_bytes, uint64_t *got)
{
    if (!file_size || !data_bytes || !got || block == 0 || (!dst && cap) ||
        data_offset < 20u || data_offset > LUNA_WAV_MAX_HEADER || offset < data_offset)
        return -EINVAL;
    *got = 0;
    *data_bytes = 0;
    int bits = luna_watch_wait(watch_fd, timeout_ms);
    if (bits < 0)
        return bits;
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -errno;
    *file_size = (uint64_t)st.st_size;
    if (bits != LUNA_WATCH_CHANGED || *file_size <= offset)
        return bits; /* anything but an append: the caller looks at the whole file */
    /* The data size the writer stored, read before the samples: it stores it only
     * after the samples it counts are in the file, so every byte below it is the
     * writer's. Bytes past it are not, yet: an append whose sizes are still to come,
     * or another process's bytes, which the writer's next append writes over. With
     * the chunk id before it: a file another process rewrote in place has other
     * bytes there (its samples, say), which are no count of ours. */
    uint8_t chunk[8];
    int rc = luna_read_at(fd, data_offset - 8u, chunk, sizeof chunk);
    if (rc == -ENODATA)
        return bits; /* it shrank meanwhile: the caller finds out */
    if (rc < 0)
        return rc;
    if (memcmp(chunk, "data", 4) != 0)
        return bits; /* not our header any more: the caller parses it again */
    const uint8_t *field = chunk + 4;
    *data_bytes = (uint64_t)field[0] | ((uint64_t)field[1] << 8) |
                  ((uint64_t)field[2] << 16) | ((uint64_t)field[3] << 24);
    uint64_t end = data_offset + *data_bytes; /* <= 4 GiB + 128: no wrap */
    if (end > *file_size)
        end = *file_size;
    if (end <= offset)
        return bits;
    uint64_t n = end - offset;
    if (n > cap)
        n = cap;
    n -= n % block;
    if (n == 0)
        return bits;
    rc = luna_read_at(fd, offset, dst, n);
    if (rc == -ENODATA)
        return bits; /* it shrank meanwhile: the caller finds out */
    if (rc < 0)
        return rc;
    *got = n;
    return bits;
}

int luna_writers_gone(int fd)
{
    /* A read lease is granted only while no process has the file open for
     * writing. A lease break would signal us: send it a signal whose default
     * action is to do nothing (SIGURG), never SIGIO (which kills), and hold
     * the lease for two system calls only. */
    if (fcntl(fd, F_SETSIG, SIGURG) != 0)
        return -errno;
    if (fcntl(fd, F_SETLEASE, F_RDLCK) != 0) {
        int err = errno;
        (void)fcntl(fd, F_SETSIG, 0);
        return err == EAGAIN ? 0 : -err;
    }
    (void)fcntl(fd, F_SETLEASE, F_UNLCK);
    (void)fcntl(fd, F_SETSIG, 0);
    return 1;
}
