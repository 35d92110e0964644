/* wav_io.c - moving WAV bytes between memory and files in few system calls. */
#include "luna_internal.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

/* Step past the first done bytes of iov[0..*n), and past empty entries. */
static struct iovec *iov_advance(struct iovec *iov, int *n, size_t done)
{
    while (*n > 0 && done >= iov->iov_len) {
        done -= iov->iov_len;
        iov++;
        (*n)--;
    }
    if (*n > 0) {
        iov->iov_base = (char *)iov->iov_base + done;
        iov->iov_len -= done;
    }
    return iov;
}

/* Whether [offset, offset + n) can be a range of a file and of memory:
 * -EINVAL for an offset that is no file position (above INT64_MAX, where it
 * would also turn into write_all's "file position" sentinel), -EFBIG when the
 * range ends past the largest file offset or n does not fit a size_t. */
static int check_range(uint64_t offset, uint64_t n)
{
    if (offset > (uint64_t)INT64_MAX)
        return -EINVAL;
    if (n > (uint64_t)INT64_MAX - offset || n > (uint64_t)SIZE_MAX)
        return -EFBIG;
    return 0;
}

/* EFAULT from a write of iov[0..n): some of that memory may lie in a mapping
 * of ours whose file was cut (the kernel's copy finds the page gone, and raises
 * no SIGBUS). Returns how many mappings of ours in it are broken (zeros) now:
 * while that grows, the rest is worth writing again, as numpy would read it. */
static int absorb_iov(const struct iovec *iov, int n)
{
    int found = 0;
    for (int i = 0; i < n; i++)
        found += luna_guard_absorb_range(iov[i].iov_base, iov[i].iov_len);
    return found;
}

/* Write all of iov[0..n) at off, or at the file position when off < 0,
 * resuming after short writes and EINTR, and after EFAULT from a view of a
 * cut file (see absorb_iov). Callers check their offsets with check_range, so
 * that a real offset is never negative. */
static int write_all(int fd, struct iovec *iov, int n, int64_t off)
{
    int broken = 0; /* mappings of ours in what is left, broken at the last EFAULT */
    iov = iov_advance(iov, &n, 0);
    while (n > 0) {
        ssize_t w = off < 0 ? writev(fd, iov, n) : pwritev(fd, iov, n, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EFAULT) {
                int now = absorb_iov(iov, n);
                if (now > broken) {
                    broken = now;
                    continue;
                }
                errno = EFAULT;
            }
            return -errno;
        }
        broken = 0; /* what is left is less: count it anew */
        if (w == 0)
            return -EIO;
        if (off >= 0)
            off += w;
        iov = iov_advance(iov, &n, (size_t)w);
    }
    return 0;
}

int luna_write_wav_fd(int fd, const struct luna_wav_spec *spec,
                      const void *data, uint64_t data_bytes)
{
    uint8_t header[LUNA_WAV_MAX_HEADER];
    static const uint8_t pad = 0;
    if (data_bytes > (uint64_t)SIZE_MAX)
        return -EFBIG;
    int len = luna_wav_header(header, spec, data_bytes, 0);
    if (len < 0)
        return len;
    struct iovec iov[3] = {
        {header, (size_t)len},
        {(void *)data, (size_t)data_bytes},
        {(void *)&pad, (size_t)(data_bytes & 1u)},
    };
    return write_all(fd, iov, (data_bytes & 1u) ? 3 : 2, -1);
}

int luna_write_wav_path(const char *dir, const char *path,
                        const char *tmp_path,
                        const struct luna_wav_spec *spec,
                        const void *data, uint64_t data_bytes)
{
    int created = 0;
    uint64_t old_size = 0;
    if (tmp_path != NULL && dir == NULL)
        return -EINVAL; /* a replacement is made in dir */
    int cell = -1; /* a child forked during the write closes its copy */
    int fd = luna_open_for_write(path, 0600, &created, &old_size, &cell);
    if (fd < 0)
        return fd;
    if (old_size > 0) {
        /* A file with content: whoever mapped it must keep reading it whole,
         * so it is replaced by a new file, never cut under their feet. */
        (void)luna_fd_release(&cell);
        if (tmp_path == NULL)
            return LUNA_WRITE_REPLACE; /* the caller names the new file */
        return luna_write_wav_atomic(dir, path, tmp_path, spec, data,
                                     data_bytes);
    }
    int rc = luna_write_wav_fd(fd, spec, data, data_bytes);
    if (rc < 0) {
        /* Never leave a half-written WAV: remove what we made, and put an
         * existing (empty) file back as it was. */
        if (created)
            unlink(path);
        else
            (void)luna_set_length(fd, 0);
    }
    int crc = luna_fd_release(&cell);
    return rc < 0 ? rc : crc;
}

int luna_write_wav_atomic(const char *dir, const char *path,
                          const char *tmp_path,
                          const struct luna_wav_spec *spec,
                          const void *data, uint64_t data_bytes)
{
    /* Only a regular file is replaced (a symlink itself, never its target; a
     * directory makes the rename fail): a FIFO, socket or device at path is
     * someone else's (a player's pipe, a daemon's socket, /dev/null for root). */
    struct stat st;
    int keep_mode = -1; /* the permission bits of a file of ours being replaced */
    if (path != NULL && lstat(path, &st) == 0) {
        if (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode) || S_ISCHR(st.st_mode) ||
            S_ISBLK(st.st_mode))
            return -EINVAL;
        /* A regular file of this user keeps its permission bits (never the
         * setuid, setgid or sticky bits): the replacement is no wider than it
         * was. Another user's file, or a symlink, gets a private 0600. */
        if (S_ISREG(st.st_mode) && st.st_uid == geteuid())
            keep_mode = (int)(st.st_mode & 0777);
    }
    /* Unnamed first: if we die mid-write the kernel frees the file. Opened into
     * a cell while forks wait: a child forked during the write closes its copy
     * (it would keep the file's lock, and a removed file's RAM, while it lived). */
    int named = 0, cell = -1;
    luna_cells_lock();
    int fd = luna_open_unnamed(dir);
    if (fd == -EOPNOTSUPP) {
        fd = luna_create_excl(tmp_path, 0600, NULL);
        named = 1;
    }
    fd = luna_store_fd(&cell, fd);
    luna_cells_unlock();
    if (fd < 0)
        return fd;
    /* Locked before it has a name: a concurrent cleanup never takes the
     * partial file for an abandoned one. */
    int rc = luna_lock_new_file(fd);
    if (rc == 0 && keep_mode >= 0 && keep_mode != 0600)
        rc = fchmod(fd, (mode_t)keep_mode) == 0 ? 0 : -errno;
    if (rc == 0)
        rc = luna_write_wav_fd(fd, spec, data, data_bytes);
    if (rc == 0 && !named) {
        rc = luna_link_unnamed(fd, tmp_path);
        named = rc == 0;
    }
    if (rc == 0 && rename(tmp_path, path) != 0)
        rc = -errno;
    if (rc < 0 && named)
        unlink(tmp_path);
    /* The lock belongs to the open file description, which a child forked
     * without our fork handlers (_Fork, a raw clone) may share: let go of it for
     * every copy first, so that no cleanup ever takes the finished file for one
     * in use. */
    (void)flock(fd, LOCK_UN);
    int crc = luna_fd_release(&cell);
    return rc < 0 ? rc : crc;
}

int luna_read_at(int fd, uint64_t offset, void *dst, uint64_t n)
{
    int rc = check_range(offset, n);
    if (rc < 0)
        return rc;
    char *p = dst;
    const uint64_t first = offset, total = n;
    int broken = 0; /* mappings of ours in dst, broken at the last EFAULT */
    while (n > 0) {
        size_t want = n > (uint64_t)SSIZE_MAX ? (size_t)SSIZE_MAX : (size_t)n;
        ssize_t r = pread(fd, p, want, (off_t)offset);
        if (r < 0) {
            int err = errno;
            if (err == EINTR)
                continue;
            /* dst is (in) a mapping of ours whose file was cut: the guard made it
             * zeros, what was read into it too, so the read starts over. */
            int now = err == EFAULT ? luna_guard_absorb_range(dst, total) : 0;
            if (now > broken) {
                broken = now;
                p = dst;
                offset = first;
                n = total;
                continue;
            }
            return -err;
        }
        if (r == 0)
            return -ENODATA;
        p += r;
        offset += (uint64_t)r;
        n -= (uint64_t)r;
    }
    return 0;
}

int luna_write_at(int fd, uint64_t offset, const void *src, uint64_t n)
{
    int rc = check_range(offset, n);
    if (rc < 0)
        return rc;
    struct iovec iov = {(void *)src, (size_t)n};
    return write_all(fd, &iov, 1, (int64_t)offset);
}

/* The header of a stream of data_bytes whose data starts at data_offset: a
 * plain one, or a live.c one (state "live") when that is where it ends. */
static int stream_header(uint8_t *out, const struct luna_wav_spec *spec,
                         uint64_t data_bytes, uint64_t data_offset)
{
    int len = luna_wav_header(out, spec, data_bytes, 0);
    if (len >= 0 && (uint64_t)len != data_offset) /* a live.c stream header */
        len = luna_live_header(out, spec, data_bytes, LUNA_STREAM_LIVE);
    if (len < 0)
        return len;
    return (uint64_t)len == data_offset ? len : -EINVAL;
}

int luna_stream_append(int fd, uint8_t *header_map, int header_guard,
                       const struct luna_wav_spec *spec, uint64_t data_offset,
                       uint64_t *data_bytes, const void *data, uint64_t n)
{
    uint8_t header[LUNA_WAV_MAX_HEADER];
    static const uint8_t pad = 0;
    if (n > UINT64_MAX - *data_bytes || n > (uint64_t)SIZE_MAX)
        return -EFBIG; /* the sum would wrap to a small, valid-looking size */
    uint64_t total = *data_bytes + n;
    /* total <= 4 GiB once the header accepts it, data_offset == len <= 128:
     * no sum below can wrap. */
    int len = stream_header(header, spec, total, data_offset);
    if (len < 0)
        return len;
    /* Samples first, header second: a reader in between sees sizes that
     * cover only bytes that are already there. The pad byte keeps an odd
     * data size a well-formed chunk; the next append overwrites it. */
    struct iovec iov[2] = {
        {(void *)data, (size_t)n},
        {(void *)&pad, (size_t)(total & 1u)},
    };
    uint64_t old_end = data_offset + *data_bytes + (*data_bytes & 1u);
    /* A cut since the last append (say to 0 bytes) must be seen before the samples
     * go in: their write would extend the file over the cut page again, and the
     * header store below would then land in a fresh zero page of the file with no
     * fault, describing audio whose first bytes are now zeros. A read of the page
     * faults if it is cut (the guard turns that into zeros and marks it broken),
     * which the check after the store reports. */
    if (header_map) {
        (void)*(volatile const uint8_t *)header_map;
        /* Another program that rewrote the file in place (soundfile.write over it: a
         * truncation to 0, then a WAV of its own as long as ours or longer) left the
         * header page in the file, holding its header: our store would put our sizes
         * over it and our samples after its own, a WAV of another file's audio. The
         * page must still hold the header we stored last (zeros, if it was cut). */
        uint8_t was[LUNA_WAV_MAX_HEADER];
        int was_len = stream_header(was, spec, *data_bytes, data_offset);
        if (was_len < 0)
            return was_len;
        if (memcmp(header_map, was, (size_t)was_len) != 0)
            return -ESTALE;
    }
    /* A cut that kept the header page but not all the samples (to a size above what
     * a follower has read, say): the write would extend the file again over a hole
     * of zeros that the sizes then count as audio. Refused before anything is
     * written; the file stays as the cut left it. */
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -errno;
    if ((uint64_t)st.st_size < data_offset + *data_bytes)
        return -ESTALE;
    int rc = write_all(fd, iov, (total & 1u) ? 2 : 1,
                       (int64_t)(data_offset + *data_bytes));
    if (rc == 0 && header_map) {
        /* The page cache is shared: readers see the new sizes at once, and
         * only after the samples they cover are in the file. */
        memcpy(header_map, header, (size_t)len);
        /* Only this store touches the header page: a cut that raced it broke
         * the mapping just now, and the new sizes went to zeros, not the file.
         * The samples did go in: *data_bytes counts them all the same. */
        if (header_guard >= 0 && luna_guard_broken(header_guard) != 0) {
            *data_bytes = total;
            return -ESTALE;
        }
    } else if (rc == 0) {
        rc = luna_write_at(fd, 0, header, (uint64_t)len);
    }
    if (rc < 0) {
        /* Cut off what part of the chunk got in: the file stays exactly the
         * valid WAV its (unchanged) header describes. Should the cut itself
         * fail, the stray bytes lie past the RIFF end, where readers stop. */
        (void)luna_set_length(fd, old_end);
        /* The chunk's first byte went over the pad byte of an odd data size:
         * put the 0 back, or the file differs from before in that byte. */
        if (*data_bytes & 1u)
            (void)luna_write_at(fd, old_end - 1, &pad, 1);
        return rc;
    }
    *data_bytes = total;
    return 0;
}
