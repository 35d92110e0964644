/* floors.c - the least work a WAV write or read can cost, for the benchmarks only.
 *
 * Each function is the bare system calls with no checks beyond errors: what any
 * implementation must pay at least. The benchmarks time them in the same run as
 * the library, so that "within 1.10x of the floor" is a measurement. This module
 * is built by the benchmark set-up (benchmarks/floors.py), never shipped.
 * Every function returns 0 on success, -errno on failure (floor_copy cannot fail).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

int floor_write(const char *path, const void *header, uint64_t header_len,
                const void *data, uint64_t data_len)
{
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

int floor_read(const char *path, uint64_t offset, void *dst, uint64_t len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct iovec iov = {dst, (size_t)len};
    ssize_t r = preadv(fd, &iov, 1, (off_t)offset);
    int err = r < 0 ? errno : (r != (ssize_t)len ? EIO : 0);
    close(fd);
    return -err;
}

int floor_touch_excl(const char *path, unsigned int mode)
{
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, (mode_t)mode);
    if (fd < 0)
        return -errno;
    return close(fd) == 0 ? 0 : -errno;
}

int floor_map(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    void *addr = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    int err = addr == MAP_FAILED ? errno : 0;
    close(fd);
    if (err)
        return -err;
    return munmap(addr, (size_t)st.st_size) == 0 ? 0 : -errno;
}

int floor_append(int fd, uint64_t offset, const void *data, uint64_t len)
{
    struct iovec iov = {(void *)data, (size_t)len};
    ssize_t w = pwritev(fd, &iov, 1, (off_t)offset);
    return w < 0 ? -errno : (w != (ssize_t)len ? -EIO : 0);
}

void floor_copy(void *dst, const void *src, uint64_t len)
{
    memcpy(dst, src, (size_t)len);
}
