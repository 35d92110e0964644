/* luna_shm.h - the C layer of luna_shm: safe temp files, RAM-disk probing,
 * mappings and WAV headers.
 *
 * Conventions: every exported function returns >= 0 on success and -errno on
 * failure, unless its comment says otherwise. WAV format problems return
 * -LUNA_EFORMAT and leave a static, human-readable reason in the info struct.
 *
 * Every function checks its own size arithmetic instead of trusting its
 * caller: an offset that cannot be a file position (above INT64_MAX) is
 * -EINVAL, and a size or a sum of sizes that passes what a file, a WAV or
 * the address space can hold is -EFBIG, before any byte is touched.
 */
#ifndef LUNA_SHM_H
#define LUNA_SHM_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>

/* Compile-time capabilities, read once by the Python layer. LUNA_NO_MEMFD and
 * LUNA_NO_O_TMPFILE build the fallbacks on Linux too (make test-c does). */
#if defined(__linux__) && defined(MFD_CLOEXEC) && !defined(LUNA_NO_MEMFD)
#define LUNA_HAS_MEMFD 1
#else
#define LUNA_HAS_MEMFD 0
#endif

#if defined(O_TMPFILE) && !defined(LUNA_NO_O_TMPFILE)
#define LUNA_HAS_O_TMPFILE 1
#else
#define LUNA_HAS_O_TMPFILE 0
#endif

/* @cffi-cdef-begin: from here to @cffi-cdef-end, this header is the cffi cdef
 * (csrc/build.py reads it): only declarations, structs and integer #defines. */

/* Outside the errno range: "the bytes are not a WAV file we can read". */
#define LUNA_EFORMAT 4096

/* ---- files.c: safe creation and opening ---------------------------------- */

/* Fd cells. A call below that makes an fd for Python takes an int *cell:
 * NULL, or an empty cell (-1), into which it stores the new fd before it
 * returns it; a cell that holds an fd is refused (-EINVAL). Python makes the
 * cell, with luna_fd_release as its destructor (cffi's ffi.gc), before the
 * call: the fd has an owner from the moment it exists, and a signal handler
 * that raises as the call returns (where a signal that came during the call
 * runs) cannot lose it. A fork waits while a cell is filled or emptied (the
 * fd made and stored; the cell cleared and the fd closed), so that a child's
 * cells name exactly the fds it has (luna_recv_fd waits for its message
 * first, and only the receive that does not block holds forks back).
 * A forked child closes every fd a call stored into a cell that was not
 * emptied before the fork, and empties the cell, at once (pthread_atfork):
 * a child holds no file of ours, nor its flock, that the parent's threads
 * were using, unless luna_fd_keep_in_child said otherwise. Fds from 1,048,576
 * on are not noted, and stay in a child. */

/* Close the fd in *cell, if any, and empty the cell: a second call does
 * nothing. Returns 0 or -errno (-EINVAL for NULL). */
int luna_fd_release(int *cell);

/* Let a forked child keep the fd in *cell (a directory that an object the
 * child goes on using opens files in): a child forked from now on has it and
 * the cell as they are. Nothing for an empty cell. Returns 0 or -EINVAL for
 * NULL. */
int luna_fd_keep_in_child(int *cell);

/* A second fd of fd's open file (close-on-exec; it shares the file's flock),
 * stored into *cell (which must be given, and empty) before it is returned.
 * Returns the new fd or -errno (-EINVAL for a NULL cell or one that holds an
 * fd, -EBADF, -EMFILE). */
int luna_dup(int fd, int *cell);

/* One recvmsg (MSG_CMSG_CLOEXEC) of at most len bytes into buf on socket
 * sock, with room for one fd passed along (SCM_RIGHTS): stored into *cell
 * (which must be empty) before the call returns. Credentials, a pidfd and a
 * security label that the receiver asked for (SO_PASSCRED, SO_PASSPIDFD,
 * SO_PASSSEC) have room beside it and are dropped (a pidfd is closed). Stores
 * the message flags in *msg_flags (MSG_TRUNC: a datagram longer than len;
 * MSG_CTRUNC: more than one fd came, the others were closed). Returns the bytes received (0 at
 * the end of a stream, and on a socket shut down for reading once nothing is left
 * in it, as a blocking recvmsg: a datagram one's too) or -errno (-EAGAIN when a non-blocking socket has
 * nothing, or when a blocking one's SO_RCVTIMEO ran out first, -EINTR when
 * a signal came first; -EINVAL for NULL pointers, a cell that holds an fd, or
 * len past SSIZE_MAX; the receive's own errno at once, as a blocking recvmsg:
 * -EINVAL for a listening socket). A blocking socket is read with MSG_DONTWAIT
 * and waited on with poll only while that finds nothing yet. */
int luna_recv_fd(int sock, void *buf, uint64_t len, int *cell, int *msg_flags);

/* openat(dir_fd, path, flags | O_CLOEXEC, mode), retried on EINTR, for a file
 * Python opens as it would with os.open: the fd is stored into *cell (which
 * must be given, and empty) before it is returned. dir_fd may be AT_FDCWD
 * (-100). Returns the fd or -errno (-EINVAL for a NULL path or cell, a cell
 * that holds an fd, or mode bits outside 07777). */
int luna_open_at(int dir_fd, const char *path, int flags, unsigned int mode, int *cell);

/* Create path exclusively: O_RDWR|O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC with the
 * given mode. Returns the fd (also in *cell), or -errno (-EEXIST when the name
 * is taken, whatever sits there: file, symlink, FIFO or directory, but
 * -EISDIR for a path that ends in "/", taken or not; -EINVAL when mode has
 * bits outside 07777 or cell holds an fd). */
int luna_create_excl(const char *path, unsigned int mode, int *cell);

/* Open path for writing a whole new content without following a symlink in
 * the last component: creates it (O_EXCL, so *created tells whether this call
 * made it), or opens the regular file there read-write, untouched, and stores
 * its size in *old_size. Returns the fd (also in *cell), or -errno (-EISDIR,
 * -EINVAL for a FIFO or device, or a cell that holds an fd). */
int luna_open_for_write(const char *path, unsigned int mode, int *created,
                        uint64_t *old_size, int *cell);

/* Create path (in directory dir) with a shared flock already held before the
 * name appears (O_TMPFILE + flock + linkat), so that a concurrent cleanup can
 * never take it for abandoned. Falls back to create + flock where O_TMPFILE
 * is not supported. Returns the fd (also in *cell), or -errno (-EEXIST when
 * the name is taken, -EINVAL when mode has bits outside 07777 or cell holds
 * an fd). */
int luna_create_locked(const char *dir, const char *path, unsigned int mode, int *cell);

/* A new unnamed file (O_TMPFILE) in dir, of exactly mode, with a shared flock held:
 * fill it, then give it its name with luna_link_unnamed, so that the name never
 * shows the file before its content (a process killed meanwhile leaves nothing).
 * Returns the fd (also in *cell), or -errno (-EOPNOTSUPP where dir has no
 * O_TMPFILE, -EINVAL when mode has bits outside 07777 or cell holds an fd). */
int luna_create_unnamed_locked(const char *dir, unsigned int mode, int *cell);

/* Open a regular file read-only (O_NONBLOCK so a FIFO never hangs us), and
 * report its size. Returns the fd (also in *cell), -errno (-EISDIR for a
 * directory, -EINVAL for a cell that holds an fd), or -LUNA_EFORMAT for
 * anything else that is not a regular file (FIFO, device, socket: also
 * one that open() refuses with ENXIO). */
int luna_open_regular(const char *path, uint64_t *size, int *cell);

/* What luna_pin_shared found: whether the shared flock is held, and the file's
 * fstat after the attempt (an entry evicted meanwhile has st_nlink 0). */
struct luna_pinned {
    int locked;         /* 1: our shared flock; 0: another open file holds an exclusive one */
    uint32_t mode;      /* st_mode */
    uint64_t nlink;
    uint64_t size;
    int64_t mtime_ns;   /* st_mtim in nanoseconds */
};

/* A cache hit's pin in one call: open path read-only (O_NOFOLLOW, so a symlink
 * is never followed; O_NONBLOCK, so a FIFO never hangs us) into *cell (given,
 * empty), try a shared flock without waiting, then fstat it into *out. The fd
 * stays in *cell when it is a regular file, locked or not (out->locked says:
 * the caller waits for a busy lock itself, then fstats again). Returns the fd,
 * -LUNA_EFORMAT for anything that is not a regular file (the cell emptied),
 * or -errno (the cell emptied: -ENOENT, -ELOOP for a symlink, -EMFILE, the
 * flock's -ENOLCK; -EINVAL for NULL pointers or a cell that holds an fd). */
int luna_pin_shared(const char *path, int *cell, struct luna_pinned *out);

/* Take a shared (exclusive=0) or exclusive (exclusive=1) flock, waiting for
 * it when wait=1. Returns 0, -EWOULDBLOCK (wait=0) when another open file
 * holds a conflicting lock, -EINTR (wait=1) when a signal interrupted the
 * wait (the caller runs its handlers and calls again), or -errno. */
int luna_lock(int fd, int exclusive, int wait);

/* Close fd. Returns 0 or -errno. */
int luna_close(int fd);

/* ---- fsinfo.c: where a directory lives ---------------------------------- */

struct luna_fs_info {
    uint64_t fs_type;      /* statfs f_type */
    uint64_t dev_major;    /* st_dev of the directory, split */
    uint64_t dev_minor;
    uint64_t bytes_free;   /* statvfs f_bavail * f_frsize: what we may use */
    uint64_t bytes_total;  /* statvfs f_blocks * f_frsize */
    uint64_t files_free;   /* statvfs f_favail: new files this user may still make */
    uint64_t files_total;  /* statvfs f_files: 0 when inodes have no limit (ramfs) */
    uint32_t mode;         /* st_mode of the path itself (lstat) */
    uint32_t uid;          /* st_uid of the path itself (lstat) */
    int32_t is_symlink;    /* the path itself is a symbolic link */
    int32_t is_dir;        /* the path is a directory (not through a link) */
    int32_t is_ram_fs;     /* f_type is tmpfs or ramfs */
    int32_t is_mount_point;/* the directory is the root of a mount */
    int32_t writable;      /* access(W_OK|X_OK) succeeded */
    int32_t write_errno;   /* why not, when writable is 0 (EROFS, EACCES...) */
};

/* Probe path without following a final symlink. When the path is a symlink
 * or not a directory, only mode/uid/is_symlink/is_dir are filled.
 * Returns 0 or -errno (-ENOENT when it does not exist). */
int luna_fs_probe(const char *path, struct luna_fs_info *out);

/* ---- mapping.c: space, mappings, anonymous files ------------------------- */

/* Reserve [offset, offset+len) with posix_fallocate so that later page faults
 * cannot fail: a full RAM disk is -ENOSPC now, never SIGBUS later. Returns 0
 * or -errno (-EINVAL for offset > INT64_MAX, -EFBIG when offset + len passes
 * it). */
int luna_reserve(int fd, uint64_t offset, uint64_t len);

/* Set the file length. Returns 0 or -errno (-EFBIG for len > INT64_MAX). */
int luna_set_length(int fd, uint64_t len);

/* A shared mapping and its SIGBUS guard (guard.c). The caller makes it (all
 * zero) and gives it to the C call that maps, which fills it in before it
 * returns: a Python owner (cffi's ffi.gc with luna_mapping_release) exists
 * before the mapping does, so no Python code runs between the mmap and its
 * owner, where a signal handler that raises would lose it. addr NULL:
 * nothing mapped. */
struct luna_mapping {
    void *addr;
    uint64_t len;
    int guard; /* for luna_guard_broken */
};

/* Map len bytes of fd shared, read-only or writable; populate=1 pre-faults
 * the pages (MAP_POPULATE). Registers the mapping with the SIGBUS guard and
 * stores it into *m. Returns the guard id (>= 0), or -errno (-EINVAL for a
 * NULL m, an m that holds a mapping already, len 0 or past SIZE_MAX; -ENOMEM
 * when the guard's registry is full; nothing stays mapped then). */
int luna_map(int fd, uint64_t len, int writable, int populate, struct luna_mapping *m);

/* Make m's guard watch only its first len bytes (0 < len <= m->len), before
 * the file is cut to len: a guarded range that reaches past its file's end
 * would count as broken when the guard checks its last byte (a SIGBUS raised
 * by another handler). The pages past len stay mapped until
 * luna_mapping_release (m->len is unchanged) and must never be touched: a
 * fault there is not the guard's. Returns 0 or -EINVAL (NULL or unmapped m, a
 * len outside (0, m->len], a mapping the guard broke already). */
int luna_mapping_cut(struct luna_mapping *m, uint64_t len);

/* Whether m (a mapping of the whole of fd's file, size bytes long when it was
 * made) is still what it was: 0 when its guard saw no fault and fstat says
 * the file is still size bytes long. A file another process cut or rewrote
 * (os.truncate, open(path, "wb"), soundfile.write, shorter or longer) loses
 * no page the caller touches as long as its first pages stay: no fault tells
 * the guard. Such an m is broken here as the guard breaks it on a fault (its
 * pages become zeros, luna_guard_broken says 1), so that nothing more written
 * through it reaches the other program's file. Returns 0, 1 (broken: before,
 * or now), or -errno (-EINVAL for a NULL or unmapped m, fstat's errno,
 * -ENOMEM when the zero pages cannot be mapped). */
int luna_mapping_check_size(struct luna_mapping *m, int fd, uint64_t size);

/* Unregister m's guard, then unmap it, and clear m->addr: a second call (or
 * one for an m that never mapped) does nothing. Returns 0 or -errno (-EINVAL
 * for NULL). */
int luna_mapping_release(struct luna_mapping *m);

/* In a forked child, for a mapping that only its parent uses: its pages become
 * anonymous zeros, as a broken mapping's (luna_guard_broken says 1), so that
 * the child no longer holds the file, nor the file's flock. m still owns the
 * range (luna_mapping_release unmaps the zeros). Returns 0 (nothing for an m
 * that holds no mapping), -EINVAL for NULL, or -ENOMEM (no zero pages). */
int luna_mapping_let_go(struct luna_mapping *m);

/* luna_mapping_release(m), shaped as the destructor of the address a view was
 * given (ffi.gc calls it with that address; Python binds m ahead of it with
 * functools.partial): the views keep the address, the address keeps m. */
int luna_mapping_release_view(struct luna_mapping *m, void *view);

/* memfd_create(name, MFD_CLOEXEC|MFD_ALLOW_SEALING). Returns the fd (also in
 * *cell), or -errno (-ENOSYS when the platform has no memfd, -EINVAL when
 * cell holds an fd). */
int luna_memfd(const char *name, int *cell);

/* Seal a memfd against shrinking (F_SEAL_SHRINK), so that no process can
 * truncate it under a reader's mapping. Returns 0 or -errno (-ENOSYS without
 * memfd). */
int luna_seal_shrink(int fd);

/* Give the unnamed file fd the name path (linkat through /proc/self/fd; where
 * that finds no /proc, linkat with AT_EMPTY_PATH, which needs CAP_DAC_READ_SEARCH
 * before Linux 6.10). Returns 0 or -errno (-EEXIST when path exists, -ENOENT when
 * its directory is gone or, with no /proc, the kernel refuses AT_EMPTY_PATH). */
int luna_link_unnamed(int fd, const char *path);

/* ---- prefault.c: files prepared in advance ------------------------------ */

/* A new unnamed file of len bytes whose pages are all allocated
 * (posix_fallocate) and written once with zeros, so that mapping it later
 * with MAP_POPULATE faults in no new page. dir != NULL: an O_TMPFILE file in
 * dir, mode 0600, holding a shared flock (give it a name with
 * luna_link_unnamed); dir == NULL: a memfd called memfd_name, sealable.
 * On failure nothing is left (the file never had a name). Returns the fd
 * (also in *cell), or -errno: -EOPNOTSUPP (no O_TMPFILE there), -ENOSYS (no
 * memfd), -ENOSPC (no room), -EINVAL (len 0, both dir and memfd_name NULL,
 * or a cell that holds an fd), -EFBIG (len > INT64_MAX). */
int luna_prepare_file(const char *dir, const char *memfd_name, uint64_t len, int *cell);

/* ---- guard.c: no SIGBUS from our mappings ---------------------------------- */

/* Returns 1 when guard's mapping was replaced with zeros (its file shrank
 * under it), 0 when it is intact, -EINVAL for an unknown id. One atomic
 * load: no system call. */
int luna_guard_broken(int guard);

/* ---- wav_format.c: headers ---------------------------------------------- */

#define LUNA_WAVE_FORMAT_PCM 1
#define LUNA_WAVE_FORMAT_IEEE_FLOAT 3
#define LUNA_WAVE_FORMAT_EXTENSIBLE 0xFFFE

/* Largest header luna_wav_header writes (RIFF + fmt EXTENSIBLE + fact + pad
 * chunk + data chunk header). */
#define LUNA_WAV_MAX_HEADER 128

struct luna_wav_spec {
    uint32_t samplerate;
    uint16_t channels;
    uint16_t format;       /* LUNA_WAVE_FORMAT_PCM or _IEEE_FLOAT */
    uint16_t bits;         /* 8, 16, 24, 32 (PCM) or 32, 64 (float) */
};

/* Write into out (LUNA_WAV_MAX_HEADER bytes) the header for data_bytes of
 * audio followed by a skippable chunk of tail_bytes (0, or >= 8: a slot's
 * unused space). The data starts at an offset that is a multiple of the
 * sample size (of 2 for 24-bit samples: RIFF chunks start at even offsets,
 * and no 3-byte alignment is needed to read them). Returns the header length
 * (= data offset), -EINVAL for a spec we do not write (or a tail_bytes that
 * is odd or 1..7), or -EFBIG when data_bytes, tail_bytes or the whole file
 * would pass 4 GiB. */
int luna_wav_header(uint8_t *out, const struct luna_wav_spec *spec,
                    uint64_t data_bytes, uint64_t tail_bytes);

/* Format a pool slot of slot_len bytes (mapped at slot) as a complete WAV:
 * the header for data_bytes of audio at the start, the pad byte, and a JUNK
 * chunk covering the rest of the slot. The samples themselves are not
 * touched. Returns the header length (= data offset), -EFBIG when the audio
 * does not fit or the slot's unused rest passes 4 GiB (no JUNK chunk can
 * cover it), or -EINVAL (a bad spec, an odd tail, slot_len > SIZE_MAX); the
 * slot is untouched on failure. */
int luna_wav_format_slot(uint8_t *slot, uint64_t slot_len,
                         const struct luna_wav_spec *spec, uint64_t data_bytes);

/* Copy data_bytes of samples (already in the file's encoding) into a pool
 * slot after the header, then format the slot as luna_wav_format_slot does:
 * a whole pooled write in one call. Returns the header length, or -EFBIG /
 * -EINVAL as luna_wav_format_slot, checked before any byte is copied: the
 * slot is untouched on failure. */
int luna_wav_fill_slot(uint8_t *slot, uint64_t slot_len,
                       const struct luna_wav_spec *spec, const void *data,
                       uint64_t data_bytes);

/* ---- wav_parse.c: reading headers --------------------------------------- */

struct luna_wav_info {
    uint32_t samplerate;
    uint16_t channels;
    uint16_t format;        /* resolved: PCM or IEEE_FLOAT, even if EXTENSIBLE */
    uint16_t bits;          /* container bits per sample: 8,16,24,32,64 */
    uint16_t block_align;
    int32_t extensible;
    uint64_t data_offset;
    uint64_t data_bytes;    /* whole frames only */
    uint64_t frames;
    uint64_t file_size;
    const char *error;      /* static reason when -LUNA_EFORMAT is returned */
    int32_t stream_state;   /* LUNA_STREAM_*: a live.c state chunk before data
                               (then data_bytes is what its size field counts,
                               0 included, never "to the end of the file") */
};

/* Parse a WAV held whole in buf[0..len). Never reads outside buf.
 * Returns 0, -LUNA_EFORMAT with out->error set, or -EINVAL when buf is NULL
 * and len is not 0. */
int luna_wav_parse_buffer(const uint8_t *buf, uint64_t len,
                          struct luna_wav_info *out);

/* Parse the WAV in fd (file_size bytes long) with pread: its first 512 bytes
 * in one call, then only the chunk headers and fmt chunk that lie past them.
 * Returns 0, -LUNA_EFORMAT (also when the file
 * ends before file_size), -EFBIG for file_size > INT64_MAX, or -errno. */
int luna_wav_parse_fd(int fd, uint64_t file_size, struct luna_wav_info *out);

/* Open path, check it is a regular file and parse it. Returns the open fd
 * (also in *cell), -LUNA_EFORMAT (out->error set; also for a file that holds
 * less than its size says, as /proc and /sys files do) or -errno (-EINVAL for
 * a cell that holds an fd); closes the fd on failure. */
int luna_wav_open(const char *path, struct luna_wav_info *out, int *cell);

/* How much of a file luna_wav_open reads at once: enough for the headers of
 * nearly every real WAV (parsing costs one system call), and for the whole of
 * a short one. */
#define LUNA_WAV_PREFIX_BYTES 4096

/* A WAV opened to be read once (luna_wav_open_held): its parsed header and
 * the first bytes of the file as the one read of them found them. */
struct luna_wav_file {
    struct luna_wav_info info;
    uint64_t held;          /* bytes of the file's start in prefix */
    uint8_t prefix[LUNA_WAV_PREFIX_BYTES];
    int fd;                 /* the open file, owned (as an fd cell); -1: none */
};

/* A struct luna_wav_file of size bytes (at least its size; else NULL) with
 * no fd, for cffi's ffi.new_allocator; luna_wav_file_free closes its fd, if
 * any, and frees it. So the struct owns the fd luna_wav_open_held stores in
 * it from the moment it exists, however the Python code between the open
 * and the read is cut short. */
void *luna_wav_file_new(size_t size);
void luna_wav_file_free(void *f);

/* luna_wav_open, keeping what its first read found in f->prefix: a short
 * file's samples are then in memory already (luna_wav_read_held). Fills f
 * (f needs no clearing but f->fd = -1) and stores the fd in f->fd. On any
 * failure f->fd stays -1 and f->held is 0; f->info may be partly written:
 * read it only after success or -LUNA_EFORMAT (f->info.error says why).
 * Returns the open fd, -LUNA_EFORMAT or -errno, as luna_wav_open (also
 * -EINVAL for a NULL f or one that holds an fd). */
int luna_wav_open_held(const char *path, struct luna_wav_file *f);

/* Copy n bytes of samples from f->info.data_offset into dst: from f->prefix
 * when they lie in it (no system call), else with luna_read_at on f->fd; then
 * close f->fd whatever happened (f->fd = -1). Returns 0, -ENODATA when the
 * file ended first (it shrank under us), -EINVAL for a NULL f or an f->held
 * past the prefix, or -errno (as luna_read_at, or the close's). */
int luna_wav_read_held(struct luna_wav_file *f, void *dst, uint64_t n);

/* Open and parse path as luna_wav_open does, then map [0, data end)
 * read-only into *m with luna_map and close the fd (the mapping keeps the
 * file). Returns luna_map's guard id (>= 0), -LUNA_EFORMAT or -errno. */
int luna_wav_map(const char *path, struct luna_wav_info *out, struct luna_mapping *m);

/* Parse the WAV in fd (file_size bytes) as luna_wav_parse_fd does, then map
 * [0, data end) read-only into *m with luna_map (a cache entry opened and
 * flocked before: the fd stays open). Returns luna_map's guard id (>= 0),
 * -LUNA_EFORMAT or -errno (-EINVAL for NULL pointers or an *m in use). */
int luna_wav_map_fd(int fd, uint64_t file_size, struct luna_wav_info *out,
                    struct luna_mapping *m);

/* ---- wav_io.c: moving bytes ---------------------------------------------- */

/* Write header + data (+ pad byte) to fd at its current position with one
 * writev (looping only on short writes). Returns 0 or -errno (-EINVAL for a
 * spec we do not write, -EFBIG past 4 GiB). */
int luna_write_wav_fd(int fd, const struct luna_wav_spec *spec,
                      const void *data, uint64_t data_bytes);

/* What luna_write_wav_path returns, without writing, when path holds a file
 * with content and tmp_path is NULL: replace it with luna_write_wav_atomic. */
#define LUNA_WRITE_REPLACE 1

/* Write a whole WAV to path (in directory dir): a new or empty file is
 * written in place; a file with content is replaced through tmp_path as by
 * luna_write_wav_atomic, so that readers who mapped it keep it whole (with
 * tmp_path NULL, nothing is written and LUNA_WRITE_REPLACE returned: the
 * caller makes a name only when one is needed; dir may then be NULL). On
 * failure nothing half-written is left: a file this call created is removed,
 * an existing one is as it was. Returns 0, LUNA_WRITE_REPLACE or -errno
 * (-EINVAL for a tmp_path without a dir). */
int luna_write_wav_path(const char *dir, const char *path,
                        const char *tmp_path,
                        const struct luna_wav_spec *spec,
                        const void *data, uint64_t data_bytes);

/* Write a whole WAV so that it appears under path (in directory dir) at once:
 * an unnamed O_TMPFILE file (or, where that is not possible, tmp_path created
 * exclusively) is written, given the name tmp_path, and renamed over path
 * (a regular file or a symlink there is replaced). The new file is 0600, or
 * has the permission bits (0777) of the regular file of this user
 * that it replaces. On failure nothing new is left. A child that another
 * thread forks meanwhile closes its copy of the new file's fd at once (it
 * would hold the file's lock for as long as it lived). Returns 0 or -errno (-EINVAL for a FIFO, socket or device at path,
 * before anything is written; -EISDIR for a directory). */
int luna_write_wav_atomic(const char *dir, const char *path,
                          const char *tmp_path,
                          const struct luna_wav_spec *spec,
                          const void *data, uint64_t data_bytes);

/* Read exactly n bytes at offset into dst. A dst in a luna_shm mapping whose
 * file another process cut (the kernel answers EFAULT there, no SIGBUS) is
 * broken by the guard, as a fault would break it, and read into again from
 * the start; so are the sources of the writes of this file (read from where
 * they stopped: zeros from the lost page on, as numpy reads them). Returns 0,
 * -ENODATA when the file ended first (it shrank under us), -EINVAL for
 * offset > INT64_MAX, -EFBIG when offset + n passes it, or -errno. */
int luna_read_at(int fd, uint64_t offset, void *dst, uint64_t n);

/* Write exactly n bytes at offset. Returns 0 or -errno (-EINVAL for
 * offset > INT64_MAX, -EFBIG when offset + n passes it). */
int luna_write_at(int fd, uint64_t offset, const void *src, uint64_t n);

/* Streaming: append n bytes of audio to a WAV whose data currently holds
 * *data_bytes bytes at data_offset, then fix the header so that its sizes
 * cover exactly what is there: by a store into header_map (the file's first
 * page, mapped shared: no system call) or, when header_map is NULL, by a
 * pwrite. Updates *data_bytes. On failure the header still describes the WAV
 * it was and the file is cut back to it (should that ftruncate fail too, the
 * stray bytes lie past the RIFF end, where readers stop). header_guard (< 0:
 * none) is header_map's SIGBUS guard: when the mapping is broken after the
 * store, another process cut the file and the sizes went to zeros, not to the
 * file. Returns 0 or -errno (-ESTALE then, with *data_bytes counting the
 * samples, which went in; -ESTALE also, before anything is written, when
 * header_map no longer holds the header stored last (another process rewrote
 * the file in place, or cut the page: zeros) or the file is shorter than
 * data_offset + *data_bytes: another process cut it below the samples appended
 * so far, and a write would extend it over a hole of zeros; -EFBIG when *data_bytes + n passes 4 GiB or wraps, -EINVAL when
 * data_offset is not where spec's header ends). */
int luna_stream_append(int fd, uint8_t *header_map, int header_guard,
                       const struct luna_wav_spec *spec, uint64_t data_offset,
                       uint64_t *data_bytes, const void *data, uint64_t n);

/* ---- convert.c: sample conversion in one pass ---------------------------- */

/* No pointer given to these functions needs any alignment (read_wav views of
 * a mapped file start wherever the file's data does). count above
 * SIZE_MAX / 8 (a buffer that cannot exist) is refused with -EFBIG before any
 * byte is touched. */

/* Pack the top 24 bits of each of count int32 samples (native byte order) at
 * src, little-endian, 3 bytes each, into dst. Returns 0 or -EFBIG. */
int luna_pack_s24(const void *src, uint8_t *dst, uint64_t count);

/* Unpack count 3-byte little-endian samples into int32 (native byte order)
 * with the sample in the top 24 bits (as libsndfile returns them). Returns 0
 * or -EFBIG. */
int luna_unpack_s24(const uint8_t *src, void *dst, uint64_t count);

/* Convert count float32 (src_is_double=0) or float64 samples in [-1, 1] to
 * PCM of dst_bits (8: unsigned, 16, 24: packed 3 bytes, 32) in one pass:
 * scaled by the target's largest positive value, clipped to its range,
 * rounded to nearest with ties to even; NaN becomes 0 (silence), +-inf the
 * extremes. Returns 0, -EINVAL for another dst_bits, or -EFBIG. */
int luna_float_to_pcm(const void *src, int src_is_double, void *dst,
                      int dst_bits, uint64_t count);

/* ---- decode.c: convert-on-read ------------------------------------------- */

/* What luna_decode makes of the samples (the caller's numpy dtype). */
#define LUNA_DECODE_INT16 1
#define LUNA_DECODE_INT32 2
#define LUNA_DECODE_FLOAT32 3
#define LUNA_DECODE_FLOAT64 4

/* Read count samples stored as (src_format, src_bits) at offset of fd and
 * decode them into dst as luna_decode does, in cache-sized chunks (one pass
 * over dst). Returns 0, -EINVAL (as luna_decode, or offset > INT64_MAX), -EFBIG,
 * -ENODATA when the file ends first, or -errno. */
int luna_read_decode(int fd, uint64_t offset, int src_format, int src_bits,
                     void *dst, int dst_type, uint64_t count);

/* ---- live.c: live streams ------------------------------------------------ */

/* The state of a stream a WavWriter writes, kept in a "JUNK" chunk before
 * "data" whose body is "lsst" + "live" | "done" | "fail". Files without it
 * (any other writer) are LUNA_STREAM_NONE. */
#define LUNA_STREAM_NONE 0
#define LUNA_STREAM_LIVE 1
#define LUNA_STREAM_DONE 2
#define LUNA_STREAM_FAIL 3

/* What luna_watch_wait saw (bits). */
#define LUNA_WATCH_CHANGED 1   /* written to, or its attributes changed */
#define LUNA_WATCH_CLOSED 2    /* a process closed it after writing */
#define LUNA_WATCH_GONE 4      /* removed or renamed */
#define LUNA_WATCH_NAMED 8     /* directory: a name appeared in it */

/* Write into out (LUNA_WAV_MAX_HEADER bytes) the header luna_wav_header
 * writes, with the state chunk (state: LUNA_STREAM_LIVE/DONE/FAIL) before
 * "data" and the data aligned as there. Returns the header length, -EINVAL
 * (bad spec or state) or -EFBIG (as luna_wav_header). */
int luna_live_header(uint8_t *out, const struct luna_wav_spec *spec,
                     uint64_t data_bytes, int state);

/* Store state into the state chunk of a live header mapped at header_map
 * (header_len bytes), after a release fence: whoever sees it sees every
 * store before it. Returns 0, or -EINVAL (no state chunk, bad state). */
int luna_live_set_state(uint8_t *header_map, uint64_t header_len, int state);

/* An inotify fd (non-blocking, close-on-exec) watching path: a file for
 * writes, closes after writing, attribute changes, removal and renames, or
 * (directory=1) a directory for names that appear. Returns the fd (also in
 * *cell: see luna_fd_release) or -errno (-ENOENT, -ENOTDIR, -EMFILE when out
 * of inotify instances, -EINVAL for NULL path or a cell that holds an fd). */
int luna_watch_open(const char *path, int directory, int *cell);

/* An inotify fd (non-blocking, close-on-exec) with no watch yet, for
 * luna_watch_add. Returns the fd (also in *cell) or -errno (-EMFILE when out
 * of inotify instances, -EINVAL for a cell that holds an fd). */
int luna_watch_new(int *cell);

/* Add path (followed: /proc/self/fd/N watches that open file's inode) to
 * watch_fd, for writes and truncation by anyone, attribute and link-count
 * changes (a rename over it, an unlink), removal and renames. Mapped writes
 * and reads make no event. Returns the watch descriptor (>= 0) or -errno
 * (-EINVAL for NULL, -EBADF, -ENOENT, -ENOSPC when out of watches...). */
int luna_watch_add(int watch_fd, const char *path);

/* Wait up to timeout_ms (-1: forever, 0: do not wait) for events on a
 * luna_watch_open fd and drain them all. Returns the LUNA_WATCH_* bits seen
 * (0 on timeout or when a signal interrupted the wait), or -errno (-EINVAL
 * for an fd that reads 0 bytes: no inotify fd ever does). */
int luna_watch_wait(int fd, int timeout_ms);

/* The hot path of a follower of a live WavWriter stream, in one call: wait as
 * luna_watch_wait and store fd's size in *file_size; when the only event was a
 * write (and the file holds bytes past offset), store the data size that the
 * header holds (the 4 bytes before data_offset, when the 4 before them still
 * say "data": else nothing is read) in *data_bytes and read the
 * whole blocks (block bytes each) of fd from offset up to the end of the data
 * that size counts, never past it nor the file's end, at most cap bytes, into
 * dst, storing how many in *got (0 when none were read, also when the file
 * shrank meanwhile; *data_bytes is 0 when it was not read). Bytes past the
 * header's count are not the writer's yet: luna_stream_append stores the sizes
 * after the samples, and another process may have appended. Returns the
 * LUNA_WATCH_* bits or -errno (-EINVAL for block 0, a NULL pointer, a
 * data_offset outside [20, LUNA_WAV_MAX_HEADER] or an offset before it). */
int luna_watch_read(int watch_fd, int timeout_ms, int fd, uint64_t data_offset,
                    uint64_t offset, uint32_t block, void *dst, uint64_t cap,
                    uint64_t *file_size, uint64_t *data_bytes, uint64_t *got);

/* The hot path of AudioPool.write_wav (pool.c): if guard's mapping is whole
 * and watch_fd (skipped when < 0) has no event queued, fill slot as
 * luna_wav_fill_slot does. Call it holding the pool's lock. Returns the
 * header length (> 0); 0 when the watch had an event, or could not be read
 * (drained: nothing was written, the caller must check the slot's name);
 * -ESTALE when the mapping is broken, also when it broke during the write;
 * -EINVAL for an unknown guard, or -EFBIG/-EINVAL as luna_wav_fill_slot. */
int luna_pool_fill(int guard, int watch_fd, uint8_t *slot, uint64_t slot_len,
                   const struct luna_wav_spec *spec, const void *data, uint64_t data_bytes);

/* Whether no process has the file open for writing, asked with a read
 * lease taken and dropped at once (fd must be open read-only). Returns 1
 * (nobody writes), 0 (someone has it open for writing), or -errno: -EACCES
 * when we neither own the file nor have CAP_LEASE, -EINVAL where the
 * filesystem has no leases. */
int luna_writers_gone(int fd);

/* @cffi-cdef-end */

#endif /* LUNA_SHM_H */
