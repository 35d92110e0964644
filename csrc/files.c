/* files.c - creating and opening files safely. */
#include "luna_internal.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#ifndef SCM_PIDFD
#define SCM_PIDFD 0x04 /* Linux 6.5: a pidfd of the sender, with SO_PASSPIDFD */
#endif

/* Bytes kept for an SCM_SECURITY label (SO_PASSSEC) beside a passed fd: an LSM's
 * context string, e.g. SELinux's "system_u:system_r:unconfined_t:s0-s0:c0.c1023". */
#define LUNA_SECURITY_LABEL_ROOM 256

/* open() that retries on EINTR (a signal during open of a slow file). */
static int open_retry(const char *path, int flags, unsigned int mode)
{
    int fd;
    do {
        fd = open(path, flags, (mode_t)mode);
    } while (fd < 0 && errno == EINTR);
    return fd < 0 ? -errno : fd;
}

/* Keep fd only if it is a regular file: returns fd (its size in *size), or
 * closes it and returns -EISDIR for a directory, not_regular for anything
 * else, or -errno when fstat fails. */
static int keep_if_regular(int fd, int not_regular, uint64_t *size)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return S_ISDIR(st.st_mode) ? -EISDIR : not_regular;
    }
    *size = (uint64_t)st.st_size;
    return fd;
}

/* ---- the fork lock of fd cells ------------------------------------------- */

/* A fork copies the fd table before the memory, and a thread of the parent may run
 * between the two. A child forked after an fd was made but before its cell held it,
 * or after its cell was emptied but before it was closed, had the file in its fd
 * table and a cell that said "no fd": no at-fork handler closed that copy (the cell
 * is how a child finds what to close), and the child kept the file's flock, and a
 * removed file's RAM, for as long as it lived. So a cell is filled (the fd made and
 * stored) and emptied (cleared and closed) under this lock, shared, and fork takes it
 * exclusively (pthread_atfork): a child sees both steps or neither. Writers are
 * preferred, so that threads that keep opening files cannot hold a fork back; no
 * holder takes it again (a call that fills a cell passes NULL to the calls it makes).
 * luna_recv_fd takes it for a receive that cannot block (it waits for the
 * message outside). */
#ifdef PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP
#define CELLS_LOCK_INITIALIZER PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP
#else
#define CELLS_LOCK_INITIALIZER PTHREAD_RWLOCK_INITIALIZER
#endif
static pthread_rwlock_t cells_lock = CELLS_LOCK_INITIALIZER;

void luna_cells_lock(void)
{
    pthread_rwlock_rdlock(&cells_lock);
}

void luna_cells_unlock(void)
{
    pthread_rwlock_unlock(&cells_lock);
}

static void cells_lock_before_fork(void)
{
    pthread_rwlock_wrlock(&cells_lock);
}

static void cells_unlock_in_parent(void)
{
    pthread_rwlock_unlock(&cells_lock);
}

/* ---- the cells a child closes ------------------------------------------ */

/* Which cell holds each fd a C call stored into one (luna_store_fd), until the
 * cell is emptied: a forked child closes every such fd at once and empties its
 * cell, unless it was let stay (luna_fd_keep_in_child). So a child holds no file
 * of ours (its flock, a removed file's RAM) that the parent's threads were using
 * at the fork, whatever Python object or C frame held it. Indexed by the fd, two
 * levels deep: a block of slots is made when an fd in its range is first stored
 * and kept for good (8 KiB each). Slots change only under the fork lock (shared:
 * one fd number is in one cell at a time), so a child finds them as they were. */
#define CELL_BLOCK 1024
#define CELL_BLOCKS 1024 /* fds below 1,048,576 (the kernel's default nr_open) */
typedef int *_Atomic cell_slot;
static cell_slot *_Atomic cell_blocks[CELL_BLOCKS];
static pthread_mutex_t cell_blocks_grow = PTHREAD_MUTEX_INITIALIZER;

/* The slot of fd, its block made first when make is set; NULL for an fd past
 * the table (such an fd stays in a child) or when no block could be made. */
static cell_slot *slot_of(int fd, int make)
{
    if (fd < 0 || fd >= CELL_BLOCK * CELL_BLOCKS)
        return NULL;
    cell_slot *_Atomic *block = &cell_blocks[fd / CELL_BLOCK];
    cell_slot *slots = atomic_load(block);
    if (!slots && make) {
        pthread_mutex_lock(&cell_blocks_grow);
        slots = atomic_load(block);
        if (!slots) {
            slots = calloc(CELL_BLOCK, sizeof *slots);
            atomic_store(block, slots);
        }
        pthread_mutex_unlock(&cell_blocks_grow);
    }
    return slots ? &slots[fd % CELL_BLOCK] : NULL;
}

void luna_cell_note(int *cell, int fd)
{
    cell_slot *slot = slot_of(fd, 1);
    if (slot)
        atomic_store(slot, cell);
}

/* fd leaves cell: its slot forgets the cell (if it was this one). */
static void cell_forget(const int *cell, int fd)
{
    cell_slot *slot = slot_of(fd, 0);
    int *expected = (int *)cell;
    if (slot)
        atomic_compare_exchange_strong(slot, &expected, NULL);
}

int luna_fd_keep_in_child(int *cell)
{
    if (!cell)
        return -EINVAL;
    luna_cells_lock();
    if (*cell >= 0)
        cell_forget(cell, *cell);
    luna_cells_unlock();
    return 0;
}

/* In the child: close every noted fd and empty its cell. */
static void close_cells_in_child(void)
{
    for (int b = 0; b < CELL_BLOCKS; b++) {
        cell_slot *slots = atomic_load(&cell_blocks[b]);
        for (int i = 0; slots && i < CELL_BLOCK; i++) {
            int *cell = atomic_exchange(&slots[i], NULL);
            int fd = b * CELL_BLOCK + i;
            if (cell && *cell == fd) {
                *cell = -1;
                close(fd);
            }
        }
    }
}

/* Made anew, not unlocked: glibc's unlock tells a writer by its thread id, which
 * the child's one thread no longer has (an unlock there is taken for a reader's,
 * and the next lock waits for ever); it has no other thread, so no holder. Then
 * the noted cells are closed. */
static void cells_lock_anew_in_child(void)
{
    static const pthread_rwlock_t fresh = CELLS_LOCK_INITIALIZER;
    memcpy(&cells_lock, &fresh, sizeof cells_lock);
    close_cells_in_child();
}

/* Registered when the library is loaded, before any thread can call us. */
__attribute__((constructor)) static void register_cells_lock(void)
{
    pthread_atfork(cells_lock_before_fork, cells_unlock_in_parent, cells_lock_anew_in_child);
}

static int open_for_write(const char *path, unsigned int mode, int *created,
                          uint64_t *old_size);
static int create_locked(const char *dir, const char *path, unsigned int mode, int *cell);

int luna_create_excl(const char *path, unsigned int mode, int *cell)
{
    if (mode & ~07777u || !luna_cell_is_empty(cell))
        return -EINVAL; /* not permission bits: never let open() see them */
    /* O_EXCL with O_CREAT never follows a symlink at path, and fails on any
     * existing name: that is what makes a guessed name safe to use. */
    luna_cells_enter(cell);
    int fd = luna_store_fd(cell, open_retry(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW |
                                                    O_CLOEXEC, mode));
    luna_cells_leave(cell);
    return fd;
}

int luna_open_for_write(const char *path, unsigned int mode, int *created,
                        uint64_t *old_size, int *cell)
{
    if (!luna_cell_is_empty(cell))
        return -EINVAL;
    luna_cells_enter(cell);
    int fd = luna_store_fd(cell, open_for_write(path, mode, created, old_size));
    luna_cells_leave(cell);
    return fd;
}

static int open_for_write(const char *path, unsigned int mode, int *created,
                          uint64_t *old_size)
{
    *old_size = 0;
    /* The name can vanish between the two opens (a cleanup): then create it
     * again, a few times at most. */
    for (int attempt = 0; attempt < 8; attempt++) {
        int fd = luna_create_excl(path, mode, NULL);
        *created = fd >= 0;
        if (fd != -EEXIST)
            return fd;
        /* The name exists: open it without following a final symlink,
         * without blocking on a FIFO, read-write so that it can be mapped,
         * and refuse anything but a regular file. Its content is left alone:
         * the caller decides, knowing *old_size. */
        fd = open_retry(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, 0);
        if (fd == -ENOENT)
            continue;
        if (fd < 0)
            return fd;
        fd = keep_if_regular(fd, -EINVAL, old_size);
        if (fd < 0)
            return fd;
        int flags = fcntl(fd, F_GETFL);
        if (flags >= 0)
            (void)fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
        return fd;
    }
    return -ENOENT;
}

int luna_create_locked(const char *dir, const char *path, unsigned int mode, int *cell)
{
    if (mode & ~07777u || !luna_cell_is_empty(cell))
        return -EINVAL;
    return create_locked(dir, path, mode, cell);
}

int luna_create_unnamed_locked(const char *dir, unsigned int mode, int *cell)
{
    if (mode & ~07777u || !luna_cell_is_empty(cell))
        return -EINVAL;
    luna_cells_enter(cell);
    int fd = luna_store_fd(cell, luna_open_unnamed_locked(dir, mode));
    luna_cells_leave(cell);
    return fd;
}

static int create_locked(const char *dir, const char *path, unsigned int mode, int *cell)
{
    /* Lock the file before it has a name, so that no cleanup can ever see it
     * unlocked: an O_TMPFILE file, flocked, then linked in. Made and stored
     * into cell while forks wait; locked outside that: where there is no
     * O_TMPFILE the file is named at once, a sweep may hold its lock for a
     * moment, and that wait must not hold a fork back. */
    luna_cells_enter(cell);
    int fd = luna_open_unnamed(dir);
    int named = fd == -EOPNOTSUPP;
    if (named)
        fd = luna_create_excl(path, mode, NULL); /* tiny window before the lock */
    fd = luna_store_fd(cell, fd);
    luna_cells_leave(cell);
    if (fd < 0)
        return fd;
    int rc = named || fchmod(fd, (mode_t)mode) == 0 ? 0 : -errno;
    if (rc == 0)
        rc = luna_lock_new_file(fd);
    if (rc == 0 && !named)
        rc = luna_link_unnamed(fd, path);
    if (rc < 0) {
        if (named)
            unlink(path);
        luna_drop_fd(cell, fd);
        return rc;
    }
    return fd;
}

int luna_open_regular(const char *path, uint64_t *size, int *cell)
{
    if (!luna_cell_is_empty(cell))
        return -EINVAL;
    luna_cells_enter(cell);
    int fd = open_retry(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK, 0);
    if (fd >= 0)
        fd = luna_store_fd(cell, keep_if_regular(fd, -LUNA_EFORMAT, size));
    luna_cells_leave(cell);
    struct stat st;
    /* A socket (or a device with no driver) cannot be opened at all: ENXIO.
     * It is still "not a regular file", as a FIFO is, not a missing device. */
    if (fd == -ENXIO && stat(path, &st) == 0 && !S_ISREG(st.st_mode))
        return -LUNA_EFORMAT;
    return fd;
}

int luna_pin_shared(const char *path, int *cell, struct luna_pinned *out)
{
    if (!path || !cell || !out)
        return -EINVAL;
    int fd = luna_open_at(AT_FDCWD, path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK, 0, cell);
    if (fd < 0)
        return fd;
    int rc = luna_lock(fd, 0, 0);
    out->locked = rc == 0;
    struct stat st;
    if (rc == 0 || rc == -EWOULDBLOCK)
        rc = fstat(fd, &st) == 0 ? 0 : -errno;
    if (rc == 0 && !S_ISREG(st.st_mode))
        rc = -LUNA_EFORMAT; /* a FIFO or directory named like an entry: never ours */
    if (rc < 0) {
        (void)luna_fd_release(cell);
        return rc;
    }
    out->mode = (uint32_t)st.st_mode;
    out->nlink = (uint64_t)st.st_nlink;
    out->size = (uint64_t)st.st_size;
    out->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    return fd;
}

int luna_lock(int fd, int exclusive, int wait)
{
    int rc;
    int op = (exclusive ? LOCK_EX : LOCK_SH) | (wait ? 0 : LOCK_NB);
    do {
        rc = flock(fd, op);
        /* A wait that a signal interrupts goes back to the caller, whose signal
         * handlers must run (and may raise) before it waits again (PEP 475). */
    } while (rc != 0 && errno == EINTR && !wait);
    return rc == 0 ? 0 : -errno;
}

int luna_lock_new_file(int fd)
{
    int rc;
    do {
        rc = luna_lock(fd, 0, 1);
    } while (rc == -EINTR);
    return rc;
}

int luna_close(int fd)
{
    /* Linux releases the fd even when close reports EINTR: never retry. */
    return close(fd) == 0 || errno == EINTR ? 0 : -errno;
}

int luna_open_at(int dir_fd, const char *path, int flags, unsigned int mode, int *cell)
{
    if (!path || !cell || *cell >= 0 || (mode & ~07777u))
        return -EINVAL;
    int fd;
    luna_cells_enter(cell);
    do {
        fd = openat(dir_fd, path, flags | O_CLOEXEC, (mode_t)mode);
    } while (fd < 0 && errno == EINTR);
    fd = fd < 0 ? -errno : luna_store_fd(cell, fd);
    luna_cells_leave(cell);
    return fd;
}

int luna_dup(int fd, int *cell)
{
    if (!cell || *cell >= 0)
        return -EINVAL;
    luna_cells_enter(cell);
    int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    copy = copy < 0 ? -errno : luna_store_fd(cell, copy);
    luna_cells_leave(cell);
    return copy;
}

/* Wait until sock has something to receive (poll), for at most its SO_RCVTIMEO
 * when it has one, as a blocking recvmsg would. Returns 0, -EAGAIN when that
 * timeout ran out, -EINTR when a signal came first, or -errno; *shut is set when
 * the socket is shut down for reading (poll's POLLRDHUP, POLLHUP): a datagram
 * socket shut down so (shutdown(SHUT_RD), the usual way to wake a receiver) is
 * always readable to poll, yet a receive that does not wait finds nothing there,
 * where a blocking one returns 0. */
static int wait_readable(int sock, int *shut)
{
    struct timeval limit = {0, 0};
    socklen_t size = sizeof limit;
    *shut = 0;
    if (getsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &limit, &size) < 0)
        return -errno;
    int timeout_ms = -1;
    if (limit.tv_sec > 0 || limit.tv_usec > 0) {
        int64_t ms = (int64_t)limit.tv_sec * 1000 + (limit.tv_usec + 999) / 1000;
        timeout_ms = ms > INT_MAX ? INT_MAX : (int)ms;
    }
    struct pollfd wanted = {.fd = sock, .events = POLLIN | POLLRDHUP};
    int ready = poll(&wanted, 1, timeout_ms);
    if (ready < 0)
        return -errno;
    *shut = (wanted.revents & (POLLRDHUP | POLLHUP)) != 0;
    return ready == 0 ? -EAGAIN : 0;
}

int luna_recv_fd(int sock, void *buf, uint64_t len, int *cell, int *msg_flags)
{
    if ((!buf && len) || len > (uint64_t)SSIZE_MAX || !cell || *cell >= 0 || !msg_flags)
        return -EINVAL;
    struct iovec iov = {buf, (size_t)len};
    /* Room for the one fd and for what a receiver may have asked for beside it:
     * SO_PASSCRED puts the sender's credentials on every message, SO_PASSPIDFD a
     * pidfd too, SO_PASSSEC a security label. Without it the kernel drops the fd
     * it has no room for (MSG_CTRUNC) and the handoff looks like two fds. */
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(struct ucred)) +
                   CMSG_SPACE(sizeof(int)) + CMSG_SPACE(LUNA_SECURITY_LABEL_ROOM)];
    } control;
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.bytes;
    msg.msg_controllen = sizeof control.bytes;
    /* The fd the kernel installs is stored and noted while forks wait, so that a
     * child forked meanwhile never has it unnoted: the receive itself never waits
     * under that lock (MSG_DONTWAIT); a blocking socket waits for its message
     * outside it, only once a receive said there is nothing yet (EAGAIN). Tried
     * first, the receive also refuses at once what cannot receive at all, as a
     * blocking recvmsg does: a listening socket (EINVAL), whose poll would
     * wait for a client to connect. */
    int flags = fcntl(sock, F_GETFL); /* failed: taken as blocking, and the wait says why */
    int blocking = flags < 0 || (flags & O_NONBLOCK) == 0;
    int shut = 0;
    ssize_t n;
    for (;;) {
        luna_cells_lock();
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n >= 0)
            break; /* still under the lock: the fd is stored below */
        int err = errno;
        luna_cells_unlock();
        if (!blocking || err != EAGAIN)
            return -err;
        if (shut) {
            /* Nothing left on a socket shut down for reading: the end, as a
             * blocking recvmsg says (a datagram socket's poll says readable
             * for ever: waiting again would spin). */
            *msg_flags = 0;
            return 0;
        }
        /* nothing yet, or another reader of the socket took the message: wait */
        int rc = wait_readable(sock, &shut);
        if (rc < 0)
            return rc; /* -EINTR too: the caller runs its signal handlers, then again */
    }
    *msg_flags = msg.msg_flags;
    /* Room for one fd: the kernel installs no more (MSG_CTRUNC says some were
     * dropped). Any fd beyond the first is closed all the same. */
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET ||
            (c->cmsg_type != SCM_RIGHTS && c->cmsg_type != SCM_PIDFD))
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (c->cmsg_type == SCM_PIDFD) {
                close(fd); /* the sender's pidfd (SO_PASSPIDFD): not ours to keep */
            } else if (*cell < 0) {
                luna_store_fd(cell, fd);
            } else {
                close(fd);
                *msg_flags |= MSG_CTRUNC;
            }
        }
    }
    luna_cells_unlock();
    return (int)n;
}

int luna_fd_release(int *cell)
{
    if (!cell)
        return -EINVAL;
    luna_cells_enter(cell);
    int fd = *cell, rc = 0; /* fd < 0: never filled, or released already */
    if (fd >= 0) {
        cell_forget(cell, fd);
        *cell = -1;
        rc = luna_close(fd);
    }
    luna_cells_leave(cell);
    return rc;
}
