/* mapping.c - reserved space, shared mappings and anonymous files. */
#include "luna_internal.h"

#include <errno.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

int luna_reserve(int fd, uint64_t offset, uint64_t len)
{
    if (offset > (uint64_t)INT64_MAX)
        return -EINVAL;
    if (len > (uint64_t)INT64_MAX - offset)
        return -EFBIG;
    if (len == 0)
        return 0;
    /* posix_fallocate returns the error number itself, not -1/errno. */
    int err;
    do {
        err = posix_fallocate(fd, (off_t)offset, (off_t)len);
    } while (err == EINTR);
    return -err;
}

int luna_set_length(int fd, uint64_t len)
{
    if (len > (uint64_t)INT64_MAX)
        return -EFBIG; /* (off_t)len would be negative */
    int rc;
    do {
        rc = ftruncate(fd, (off_t)len);
    } while (rc != 0 && errno == EINTR);
    return rc == 0 ? 0 : -errno;
}

int luna_map(int fd, uint64_t len, int writable, int populate, struct luna_mapping *m)
{
    if (!m || m->addr || len == 0 || len > (uint64_t)SIZE_MAX)
        return -EINVAL; /* m->addr set: m owns a mapping already, never overwrite it */
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    int flags = MAP_SHARED;
#ifdef MAP_POPULATE
    if (populate)
        flags |= MAP_POPULATE;
#else
    (void)populate;
#endif
    /* A mapping holds its open file (and the file's flock) as an fd does: made and
     * stored into m while forks wait, so that a child's copy of m says exactly
     * whether the child has it (see luna_cells_lock). */
    luna_cells_lock();
    void *addr = mmap(NULL, (size_t)len, prot, flags, fd, 0);
    int guard = addr == MAP_FAILED ? -errno : luna_guard_register(addr, len, prot);
    if (guard >= 0) {
        m->len = len;
        m->guard = guard;
        m->addr = addr;
    } else if (addr != MAP_FAILED) {
        munmap(addr, (size_t)len);
    }
    luna_cells_unlock();
    return guard;
}

int luna_mapping_cut(struct luna_mapping *m, uint64_t len)
{
    if (!m || !m->addr || len == 0 || len > m->len)
        return -EINVAL;
    /* The tail stays mapped (m->len unchanged: the release unmaps it all) but is
     * no longer guarded, and no view of it is left. Unmapping it would split a
     * huge-page mapping: measured, 40 us more per 500 KB buffer and a slower fill. */
    return luna_guard_shrink(m->guard, len);
}

int luna_mapping_check_size(struct luna_mapping *m, int fd, uint64_t size)
{
    if (!m || !m->addr)
        return -EINVAL;
    int broken = luna_guard_broken(m->guard);
    if (broken != 0)
        return broken;
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -errno;
    if ((uint64_t)st.st_size == size)
        return 0;
    int rc = luna_guard_break(m->guard);
    return rc < 0 ? rc : 1;
}

int luna_mapping_release(struct luna_mapping *m)
{
    if (!m)
        return -EINVAL;
    luna_cells_lock(); /* cleared and unmapped while forks wait, as an fd cell */
    void *addr = m->addr;
    m->addr = NULL;
    /* Unregistered first: from here on a fault in this range is not ours. */
    int rc = addr ? luna_guard_unregister(m->guard) : 0; /* NULL: never mapped, or released */
    if (addr && munmap(addr, (size_t)m->len) != 0)
        rc = -errno;
    luna_cells_unlock();
    return rc;
}

int luna_mapping_let_go(struct luna_mapping *m)
{
    if (!m)
        return -EINVAL;
    return m->addr ? luna_guard_break(m->guard) : 0;
}

int luna_mapping_release_view(struct luna_mapping *m, void *view)
{
    (void)view;
    return luna_mapping_release(m);
}

int luna_memfd(const char *name, int *cell)
{
    if (!luna_cell_is_empty(cell))
        return -EINVAL;
#if LUNA_HAS_MEMFD
    luna_cells_enter(cell);
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    fd = fd < 0 ? -errno : luna_store_fd(cell, fd);
    luna_cells_leave(cell);
    return fd;
#else
    (void)name;
    return -ENOSYS;
#endif
}

int luna_seal_shrink(int fd)
{
#if LUNA_HAS_MEMFD && defined(F_ADD_SEALS)
    return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) == 0 ? 0 : -errno;
#else
    (void)fd;
    return -ENOSYS;
#endif
}

int luna_open_unnamed(const char *dir)
{
#if LUNA_HAS_O_TMPFILE
    int fd;
    do {
        fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    } while (fd < 0 && errno == EINTR);
    if (fd >= 0)
        return fd;
    /* Old kernels answer EISDIR, filesystems without support EOPNOTSUPP. */
    return (errno == EISDIR || errno == EOPNOTSUPP) ? -EOPNOTSUPP : -errno;
#else
    (void)dir;
    return -EOPNOTSUPP;
#endif
}

int luna_open_unnamed_locked(const char *dir, unsigned int mode)
{
    if (mode & ~07777u)
        return -EINVAL;
    int fd = luna_open_unnamed(dir);
    if (fd < 0)
        return fd;
    int rc = fchmod(fd, (mode_t)mode) == 0 ? 0 : -errno;
    if (rc == 0)
        rc = luna_lock_new_file(fd);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    return fd;
}

int luna_link_unnamed(int fd, const char *path)
{
    char proc_path[64];
    snprintf(proc_path, sizeof proc_path, "/proc/self/fd/%d", fd);
    /* linkat(fd, "", ..., AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH before Linux
     * 6.10; the /proc link works for any user, where /proc is mounted. */
    if (linkat(AT_FDCWD, proc_path, AT_FDCWD, path, AT_SYMLINK_FOLLOW) == 0)
        return 0;
    if (errno != ENOENT)
        return -errno;
    /* ENOENT: path's directory is gone, or there is no /proc (a chroot or a
     * sandbox without one): AT_EMPTY_PATH works there for root, and for any
     * user that opened the file since Linux 6.10. Its errno is the one given
     * back (ENOENT again when the directory is gone). */
    return linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH) == 0 ? 0 : -errno;
}
