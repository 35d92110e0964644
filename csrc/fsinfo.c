/* fsinfo.c - is a directory a usable RAM disk? */
#include "luna_shm.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#ifndef TMPFS_MAGIC
#define TMPFS_MAGIC 0x01021994
#endif
#ifndef RAMFS_MAGIC
#define RAMFS_MAGIC 0x858458f6
#endif

int luna_fs_probe(const char *path, struct luna_fs_info *out)
{
    struct stat st, parent;
    struct statfs sfs;
    struct statvfs svfs;
    char parent_path[PATH_MAX];

    *out = (struct luna_fs_info){0};
    if (lstat(path, &st) != 0)
        return -errno;
    out->mode = (uint32_t)st.st_mode;
    out->uid = (uint32_t)st.st_uid;
    out->is_symlink = S_ISLNK(st.st_mode);
    out->is_dir = S_ISDIR(st.st_mode);
    if (!out->is_dir)
        return 0;

    if (statfs(path, &sfs) != 0 || statvfs(path, &svfs) != 0)
        return -errno;
    out->fs_type = (uint64_t)(unsigned long)sfs.f_type;
    out->is_ram_fs = out->fs_type == (uint64_t)TMPFS_MAGIC ||
                     out->fs_type == (uint64_t)RAMFS_MAGIC;
    out->dev_major = major(st.st_dev);
    out->dev_minor = minor(st.st_dev);
    out->bytes_free = (uint64_t)svfs.f_bavail * (uint64_t)svfs.f_frsize;
    out->bytes_total = (uint64_t)svfs.f_blocks * (uint64_t)svfs.f_frsize;
    out->files_free = (uint64_t)svfs.f_favail;
    out->files_total = (uint64_t)svfs.f_files;

    /* A mount root sits on another device than its parent, or is "/". */
    if (snprintf(parent_path, sizeof parent_path, "%s/..", path) >=
        (int)sizeof parent_path)
        return -ENAMETOOLONG;
    if (stat(parent_path, &parent) != 0)
        return -errno;
    out->is_mount_point = parent.st_dev != st.st_dev ||
                          parent.st_ino == st.st_ino;

    /* access() reports EROFS for a read-only mount even to root. */
    if (access(path, W_OK | X_OK) == 0) {
        out->writable = 1;
    } else {
        out->write_errno = errno;
    }
    return 0;
}
