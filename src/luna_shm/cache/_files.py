"""The files of a cache directory: their names and shapes (entries, ``.live``, notes,
partials, unstored audio), and the small, careful ways the cache opens, reads, locks
and removes them: never following a symlink, never blocking on a FIFO, never touching a
file of another shape.
"""

from __future__ import annotations

import errno as _errno
import os as _os
import re as _re
import stat as _stat
import time as _time
from collections.abc import Callable
from typing import TypeVar

from luna_shm import _lowlevel, _newfile
from luna_shm.cache._keys import KEY

_T = TypeVar("_T")

DIR_PREFIX = "luna_cache-"
# Encoded entries (put_bytes): a small fixed table, so that a lookup is a few stats,
# never a directory scan. ".wav" is first: the common case costs one open.
ENCODED_SUFFIXES = (".mp3", ".ogg", ".opus", ".flac", ".aac", ".m4a", ".webm")
ENTRY_SUFFIXES = (".wav", *ENCODED_SUFFIXES)
LIVE = ".live"
OUTCOME = ".outcome"
_OUTCOME_START = _re.compile(rb"[0-9]{1,20} [0-9]{1,10} ")
# A .live file is a WavWriter's WAV: its header has the live-stream state chunk.
LIVE_START = _re.compile(rb"RIFF.{4}WAVE.{0,96}JUNK\x08\x00\x00\x00lsst", _re.DOTALL)
PART = ".part"
# The mode of an entry that a newer entry of its key, of another type, replaced while a
# caller held it (its holder's path must go on naming it): look-ups pass it by, and it
# goes once no one holds it. Entries are made 0600; only a commit makes one 0400.
SUPERSEDED = 0o400
UNSTORED = ".unstored"
LOCK_NAME = "lock"
# The exact shapes of the in-flight names (see token and Tier.new_part): a sweep and
# destroy() touch only these, never a user's "backup.part" or "x.unstored.txt".
_ANY_SUFFIX = "|".join(_re.escape(suffix) for suffix in ENTRY_SUFFIXES)
PART_NAME = _re.compile(rf"\.[A-Za-z0-9_-]{{1,128}}(?:{_ANY_SUFFIX})?\.[0-9a-f]{{24}}"
                        rf"{_re.escape(PART)}")
UNSTORED_NAME = _re.compile(rf"\.[A-Za-z0-9_-]{{1,128}}\.[0-9a-f]{{24}}"
                            rf"{_re.escape(UNSTORED)}(?:{_ANY_SUFFIX})")


def token() -> str:
    """A random name part for an in-flight file (names are also created exclusively):
    24 lowercase hex digits, the shape PART_NAME and UNSTORED_NAME look for."""
    return _os.urandom(12).hex()


def entry_name(name: str) -> tuple[str, str] | None:
    """(key, suffix) when name is a committed entry's file name, else None."""
    key, dot, suffix = name.rpartition(".")
    if not dot or f".{suffix}" not in ENTRY_SUFFIXES or not KEY.fullmatch(key):
        return None
    return key, f".{suffix}"


def open_private_dir(parent: str, name: str, what: str
                     ) -> tuple[_lowlevel.FdCell, bool] | None:
    """Make (0700) or open parent/name, refusing a symlink, another user's dir or an open one.
    (the fd cell of the directory, True when this call made it); None when another process
    removed the directory between the mkdir (that made it, or found it) and its open: the
    caller may try again."""
    path = f"{parent}/{name}"
    try:
        _os.mkdir(path, 0o700)
        made = True
    except FileExistsError:
        made = False
    cell = _lowlevel.fd_cell()
    try:
        fd = _lowlevel.open_at(path, _os.O_RDONLY | _os.O_DIRECTORY | _os.O_NOFOLLOW, cell=cell)
    except FileNotFoundError:
        # The mkdir found (or made) it, so the parent is there: another process removed
        # the directory since (a destroy(), or a failed open that had made it).
        return None
    except OSError as exc:
        if exc.errno in (_errno.ELOOP, _errno.ENOTDIR):
            kind = "a symbolic link" if _os.path.islink(path) else "not a directory"
            raise PermissionError(_errno.EPERM, f"refusing the {what} directory: it is {kind}",
                                  path) from None
        raise
    st = _os.fstat(fd)
    if st.st_uid != _os.geteuid():
        _lowlevel.release(cell)
        raise PermissionError(_errno.EPERM, f"refusing the {what} directory: it belongs to "
                              f"uid {st.st_uid}", path)
    if st.st_mode & 0o077:
        _lowlevel.release(cell)
        raise PermissionError(_errno.EPERM, f"refusing the {what} directory: mode "
                              f"{_stat.S_IMODE(st.st_mode):o} lets others in (want 700)", path)
    return cell, made


_CACHE_NAME = _re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def check_cache_name(name: object) -> str:
    """name when it can name a cache (its directory's last part); TypeError or ValueError
    naming what was passed otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {_lowlevel.brief(name)}")
    if not _CACHE_NAME.fullmatch(name):
        raise ValueError(f"name must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or "
                         f"'-' (not starting with '.'), got {name!r}")
    return name


def dir_name(name: str) -> str:
    """The name of the directory of this user's cache called name (in the RAM dir, and in
    a disk_dir): ``luna_cache-<uid>-<name>``."""
    return f"{DIR_PREFIX}{_os.geteuid()}-{name}"


def lock_by(fd: int, *, exclusive: bool, deadline: float | None, what: str,
            path: str) -> None:
    """Take fd's flock, waiting until deadline (time.monotonic()) at most; None waits as
    long as it takes. Past the deadline: TimeoutError (ETIMEDOUT) saying what it waited
    for and naming path. flock has no timeout of its own: a bounded wait polls, backing
    off from 0.5 ms to 20 ms (the holder of an entry's or the cache's lock lets go
    within microseconds, unless it is stopped or stuck, which is what the bound is for)."""
    if deadline is None:
        _lowlevel.lock(fd, exclusive=exclusive, wait=True, filename=path)
        return
    pause = 0.0005
    while not _lowlevel.lock(fd, exclusive=exclusive, filename=path):
        if _time.monotonic() >= deadline:
            raise TimeoutError(_errno.ETIMEDOUT, f"timed out waiting for {what}", path)
        _time.sleep(pause)
        pause = min(pause * 2, 0.02)


def is_render_file(fd: int) -> bool:
    """True when fd (a regular file) starts as a render's .live file: a WavWriter's WAV."""
    return LIVE_START.match(_os.pread(fd, 128, 0)) is not None


def stale_live(path: str) -> bool:
    """Remove path when it is a .live file no renderer holds (the renderer died); True if so.
    A file of that name that is not a render's (see Tier.kind) is never removed."""
    def remove_if_dead(fd: int) -> bool:
        if not is_render_file(fd) or not _lowlevel.lock(fd, exclusive=True):
            return False  # a renderer (or a waiter, for a moment) holds it
        remove_dead_live(fd, path)
        return True

    return use_regular(path, remove_if_dead, False)


def supersede(path: str) -> None:
    """Mark the held entry at path as replaced by a newer entry of its key, of another
    type (under the lock, before the newer one's rename): look-ups pass it by from now
    on, and the first that finds it unheld removes it. A holder's path still names it."""
    cell = _lowlevel.fd_cell()  # a held entry's file: never a child's
    fd = open_regular(path, cell)
    if fd is None:
        return
    try:
        if _newfile.still_named(fd, path):
            _os.fchmod(fd, SUPERSEDED)
    finally:
        _lowlevel.release(cell)


def remove_dead_live(fd: int, path: str) -> None:
    """Remove the .live file path (open as fd, exclusively locked: its renderer died) if
    it still has that name, and first any outcome note naming its inode: a note of an
    earlier render whose file had the same number, which the dead one never got to drop
    (see AudioCache._render). Its waiters then find neither, and elect a new renderer."""
    if not _newfile.still_named(fd, path):
        return
    note = path[:-len(LIVE)] + OUTCOME
    if note_owner(note) == _os.fstat(fd).st_ino:
        unlink_quietly(note)
    unlink_quietly(path)


def open_regular(path: str, cell: _lowlevel.FdCell) -> int | None:
    """Open path read-only into cell when it is a regular file; None (cell released) when
    it is gone, a symlink, or not a regular file: a FIFO named like an entry must not
    block the open (O_NONBLOCK), nor a symlink lead elsewhere (O_NOFOLLOW). Any other
    OSError is raised, naming path."""
    try:
        fd = _lowlevel.open_at(path, _os.O_RDONLY | _os.O_NOFOLLOW | _os.O_NONBLOCK, cell=cell)
    except OSError as exc:
        if exc.errno in (_errno.ENOENT, _errno.ELOOP):
            return None
        raise
    if not _stat.S_ISREG(_lowlevel.fstat(fd, path).st_mode):
        _lowlevel.release(cell)
        return None
    return fd


def use_regular(path: str, use: Callable[[int], _T], otherwise: _T) -> _T:
    """use(fd) of path opened read-only (then closed) when it is a regular file; otherwise
    when it is not one (gone, a symlink, a FIFO, a directory: see open_regular) or cannot
    be opened at all: the looks made through it (a note's owner, a pin, a dead render)
    take "cannot tell" for "no". A child forked meanwhile closes its copy of the fd at
    once: use may take the file's lock for a moment."""
    cell = _lowlevel.fd_cell()
    try:
        fd = open_regular(path, cell)
    except OSError:
        return otherwise
    if fd is None:
        return otherwise
    try:
        return use(fd)
    finally:
        _lowlevel.release(cell)


def remove_unstored(fd: int, path: str, key: str) -> None:
    """Remove the unstored audio open at fd when no one else holds it (an exclusive flock
    taken without waiting) and path still names it, with the note that pointed the
    render's waiters to it. Called as its holder lets go (a forked child's copy never):
    the RAM disk does not keep audio no one can look up."""
    if not _lowlevel.lock(fd, exclusive=True) or not _newfile.still_named(fd, path):
        return
    note = f"{_os.path.dirname(path)}/{key}{OUTCOME}"
    if note_owner(note) == _os.fstat(fd).st_ino:
        unlink_quietly(note)
    unlink_quietly(path)


def regular_head(path: str, size: int) -> bytes | None:
    """The first size bytes of path, or None when it is not a regular file (a symlink,
    a FIFO, a directory: opened without blocking and never followed) or is gone."""
    return use_regular(path, lambda fd: _os.pread(fd, size, 0), None)


def note_owner(path: str) -> int | None:
    """The inode number in an outcome note at path, or None when path is not a regular
    file that starts as _write_outcome writes one: "<inode> <pid> "."""
    head = regular_head(path, 48)
    start = None if head is None else _OUTCOME_START.match(head)
    return None if start is None else int(start.group().split()[0])


def is_pinned(path: str) -> bool:
    """True when someone holds path's flock (a holder's shared pin, a renderer's lock)."""
    return use_regular(path, lambda fd: not _lowlevel.lock(fd, exclusive=True), False)


def raise_named(exc: BaseException, path: str) -> None:
    """When exc is an OSError without a file name, raise it again naming path (os.write
    and os.sendfile name none, and an EFBIG or ENOSPC must say which file), as the file
    writers do (_newfile.explain_full_disk); else return, for the caller to re-raise exc
    as it is."""
    if isinstance(exc, OSError):
        named = _newfile.explain_full_disk(exc, path)
        if named is not exc:
            raise named.with_traceback(exc.__traceback__) from None


def rmdir_quietly(path: str) -> None:
    """Remove an empty directory; leave it when it is not empty or gone (OSError)."""
    try:
        _os.rmdir(path)
    except OSError:
        pass


def unlink_quietly(path: str) -> None:
    try:
        _os.unlink(path)
    except FileNotFoundError:
        pass
