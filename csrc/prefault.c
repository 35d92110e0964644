/* prefault.c - unnamed files whose pages are allocated and written in advance.
 *
 * A new tmpfs page is allocated and zeroed when it is first touched; through
 * a mapping that costs about three times a writev of the same bytes (Linux
 * 6.18, benchmarks/profile_notes.md). A file prepared here has every page
 * allocated and written once already, so mapping it later with MAP_POPULATE
 * only installs page table entries.
 */
#include "luna_internal.h"

#include <errno.h>
#include <limits.h>
#include <sys/uio.h>
#include <unistd.h>

#define ZERO_BLOCK 4096
#define ZERO_IOVECS 256 /* 1 MiB per pwritev */

static const uint8_t zero_block[ZERO_BLOCK];

/* Write zeros over [0, len) with pwritev of one static zero page repeated. */
static int write_zeros(int fd, uint64_t len)
{
    struct iovec iov[ZERO_IOVECS];
    for (int i = 0; i < ZERO_IOVECS; i++) {
        iov[i].iov_base = (void *)zero_block;
        iov[i].iov_len = ZERO_BLOCK;
    }
    uint64_t done = 0;
    while (done < len) {
        uint64_t left = len - done;
        int count = 0;
        while (count < ZERO_IOVECS && left > 0) {
            size_t piece = left < ZERO_BLOCK ? (size_t)left : ZERO_BLOCK;
            iov[count].iov_len = piece;
            left -= piece;
            count++;
        }
        ssize_t n = pwritev(fd, iov, count, (off_t)done);
        for (int i = 0; i < count; i++)
            iov[i].iov_len = ZERO_BLOCK;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO; /* a regular file never accepts nothing: do not spin */
        done += (uint64_t)n;
    }
    return 0;
}

int luna_prepare_file(const char *dir, const char *memfd_name, uint64_t len, int *cell)
{
    if (!luna_cell_is_empty(cell))
        return -EINVAL;
    if (len == 0 || len > (uint64_t)INT64_MAX)
        return len == 0 ? -EINVAL : -EFBIG;
    if (dir == NULL && memfd_name == NULL)
        return -EINVAL;
    /* An unnamed file in dir (mode 0600, shared flock held), or a memfd, in the
     * cell at once: a fork waits for the open, never for the filling. */
    luna_cells_enter(cell);
    int fd = luna_store_fd(cell, dir == NULL ? luna_memfd(memfd_name, NULL)
                                             : luna_open_unnamed_locked(dir, 0600));
    luna_cells_leave(cell);
    if (fd < 0)
        return fd;
    int rc = luna_reserve(fd, 0, len);
    if (rc == 0)
        rc = write_zeros(fd, len);
    if (rc < 0) {
        /* unnamed: closing it frees everything it held */
        luna_drop_fd(cell, fd);
        return rc;
    }
    return fd;
}
