/* floor.c - the least work a WAV write or read can cost, for the benchmarks.
 *
 * Each function is the bare system calls with no checks beyond errors: what
 * any implementation must pay at least. The benchmarks time them in the same
 * run as the library, so that "within 1.10x of the floor" is a measurement.
 */
#include "luna_shm.h"

#include <errno.h>
#include <limits.h>
#include <sys/uio.h>
#include <unistd.h>

int luna_floor_write(const char *path, const void *header, uint64_t header_len,
                     const void *data, uint64_t data_len)
{
    /* One writev must be able to report the whole length (ssize_t). */
    if (header_len > (uint64_t)SSIZE_MAX || data_len > (uint64_t)SSIZE_MAX - header_len)
        return -EFBIG;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    struct iovec iov[2] = {{(void *)header, (size_t)header_len},
                           {(void *)data, (size_t)data_len}};
    ssize_t w = writev(fd, iov, 2);
    int err = w < 0 ? errno : (w != (ssize_t)(header_len + data_len) ? EIO : 0);
    close(fd);
    return -err;
}

int luna_floor_read(const char *path, uint64_t offset, void *dst, uint64_t len)
{
    if (offset > (uint64_t)INT64_MAX)
        return -EINVAL;
    if (len > (uint64_t)SSIZE_MAX || len > (uint64_t)INT64_MAX - offset)
        return -EFBIG;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct iovec iov = {dst, (size_t)len};
    ssize_t r = preadv(fd, &iov, 1, (off_t)offset);
    int err = r < 0 ? errno : (r != (ssize_t)len ? EIO : 0);
    close(fd);
    return -err;
}
