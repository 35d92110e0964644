"""A tier: one directory of entries (the RAM tier or the disk tier) with its lock file,
which serialises the changes to its set of entries (across processes by flock, across
threads by a mutex) and holds the counters every process of the cache shares.
"""

from __future__ import annotations

import errno as _errno
import fcntl as _fcntl
import os as _os
import stat as _stat
import struct as _struct
import threading as _threading
import time as _time
import warnings as _warnings
import weakref as _weakref
from collections.abc import Callable
from typing import Any

from luna_shm import _lowlevel, _newfile
from luna_shm.cache._files import (
    LIVE,
    LIVE_START,
    LOCK_NAME,
    OUTCOME,
    PART,
    PART_NAME,
    UNSTORED_NAME,
    dir_name,
    entry_name,
    lock_by,
    note_owner,
    open_private_dir,
    open_regular,
    raise_named,
    regular_head,
    rmdir_quietly,
    stale_live,
    supersede,
    token,
    unlink_quietly,
)
from luna_shm.cache._keys import KEY

# The lock file also holds the shared counters: little-endian uint64s, read and written
# under the lock. "bytes" is the committed bytes of the tier, kept so that a commit that
# fits costs no directory scan; it is only ever too high (it grows before a rename and
# shrinks after an unlink), and every scan (at open, and whenever it says "full" and the
# last scan's queue cannot make room) sets it to the truth again: so the bound holds even
# after a kill -9 between the two (too high, it only keeps the tier below its bound).
# "encoded" goes from 0 to 1 once encoded audio is stored (it widens every look-up).
COUNTERS = ("bytes", "hits", "misses", "evictions", "renders", "spills", "reloads",
            "encoded")
_COUNTERS_FORMAT = _struct.Struct(f"<{len(COUNTERS)}Q")
# How many times a tier's open starts again when another process removed its empty
# directory in the middle of it (see Tier.__init__).
OPEN_ATTEMPTS = 10


# The tiers and caches whose thread locks (and pending counts) a forked child makes anew
# at once, before any of its threads can take them.
made_anew_in_child: _weakref.WeakSet[Any] = _weakref.WeakSet()


def _make_anew_in_child() -> None:
    for each in list(made_anew_in_child):
        each._after_fork_in_child()


_os.register_at_fork(after_in_child=_make_anew_in_child)


class TierLock:
    """``with tier.locked():``: a class, not a contextlib generator, which a signal
    handler that raises as it yields would leave suspended holding both locks (until
    collected: a cleanup that takes the lock meanwhile, in the same thread, hangs).

    Left open: a handler that raises in the instant after the mutex's acquire()
    returns leaves the mutex held (no Python-level __enter__ can close that window;
    a ``with`` on a lock does, in C, but this one also takes a flock).

    The mutex is reentrant only so that a thread can tell that it holds it (a signal
    handler that interrupted one of its locked sections: see AudioCache.close); it is
    never taken twice: a second ``with tier.locked():`` in the thread that holds it
    raises RuntimeError. (Granted, its flock would be a no-op, and its exit would let go
    of the flock under the section it interrupted; waiting, it would wait for itself.)"""

    __slots__ = ("deadline", "exclusive", "tier")

    def __init__(self, tier: Tier, exclusive: bool, deadline: float | None) -> None:
        self.tier = tier
        self.exclusive = exclusive
        self.deadline = deadline

    def __enter__(self) -> None:
        tier = self.tier
        lock_path = tier.path(LOCK_NAME)
        if tier.held_here():
            raise RuntimeError(f"AudioCache {tier.cache_name!r} was called from inside one "
                               "of its own calls in this thread, which holds the "
                               f"{tier.what}'s lock (by a signal handler that interrupted "
                               "it?): only close() may be called there")
        if self.deadline is None:
            tier.thread_lock.acquire()
        elif not tier.thread_lock.acquire(timeout=max(0.0, self.deadline - _time.monotonic())):
            raise TimeoutError(_errno.ETIMEDOUT, f"timed out waiting for the {tier.what}'s "
                               "lock (another thread holds it)", lock_path)
        if tier.pid != _os.getpid():
            # Under the thread lock, which the child made anew (_after_fork_in_child):
            # one thread of a forked child opens the child's lock fd, and the others use
            # it. (Two that both did closed each other's fd, or left one holding a flock
            # on an fd nobody would unlock: the child hung.) On failure only the thread
            # lock is let go: an unlock through the inherited fd would be the parent's.
            try:
                tier._after_fork()
            except BaseException:
                tier.thread_lock.release()
                raise
        try:  # whatever raises from here on (a handler, right after the flock is granted)
            # Checked under the mutex, which close() takes too: a cache that another
            # thread closed meanwhile has no lock file, and its number may be another
            # file's by now (a flock or a counter written there would be that file's).
            tier.check_open()
            lock_by(tier.lock_fd, exclusive=self.exclusive, deadline=self.deadline,
                    what=f"the {tier.what}'s lock (another process holds it)", path=lock_path)
            # Everything done under the lock goes by path: a directory swapped for a
            # symlink (or another directory) since the open would be followed there.
            tier.check_in_place()
        except BaseException:
            tier.release()
            raise

    def __exit__(self, *exc: object) -> None:
        self.tier.release()


class Tier:
    """One directory of entries (the RAM tier, or the disk tier) and its lock.

    A tier whose lock file cannot be opened for writing (a read-only mount, a lock file
    of mode 0444: a monitoring view) opens it read-only, as flock works on any open
    file: it can be looked at (stats, entries, get), and whatever would change it raises
    write_error's errno naming the lock file (check_writable), before touching anything.
    """

    # Why the lock file was opened read-only (EACCES, EPERM or EROFS), else None.
    write_error: OSError | None = None
    # What to call once the thread that holds the lock lets go of it: a close that a
    # signal handler asked for while it interrupted that thread's locked section, or
    # that another thread's close() could not wait for (see AudioCache.close). Read and
    # run after the mutex is let go (see release).
    close_after: Callable[[], None] | None = None

    def __init__(self, parent: str, name: str, max_bytes: int, what: str) -> None:
        self.cache_name = name
        self.name = dir_name(name)
        self.directory = f"{parent}/{self.name}"
        self.max_bytes = max_bytes
        self.what = what
        # Another process may remove the empty directory in the middle of our open (its
        # destroy(), or its own open that made it and failed to make the lock file): the
        # open starts again, from the mkdir. Bounded: a directory that keeps going is an
        # error of its own, never a loop for ever.
        for _ in range(OPEN_ATTEMPTS):
            if self._open(parent):
                break
        else:
            raise removed_each_time(what, self.directory)
        self.pid = _os.getpid()
        self.thread_lock = _threading.RLock()  # reentrant only to say who holds it
        made_anew_in_child.add(self)

    def _open(self, parent: str) -> bool:
        """One try at the open: the directory (made when missing), then the lock file in
        it (made when missing). True when open; False when another process removed the
        directory meanwhile (nothing is held then, and nothing removed: it is gone)."""
        opened = open_private_dir(parent, self.name, self.what)
        if opened is None:
            return False
        dir_cell, self.made = opened
        try:
            st = _os.fstat(dir_cell[0])
            self.identity = (st.st_dev, st.st_ino)
            self.lock_cell = _lowlevel.fd_cell()  # owns lock_fd
            try:
                self.lock_fd = self._open_lock(LOCK_NAME, dir_cell[0], self.lock_cell)
                if (self.write_error is None
                        and _os.fstat(self.lock_fd).st_size < _COUNTERS_FORMAT.size):
                    # The shared counters' page, reserved now: a new lock file has none,
                    # and on a full disk their first write (at the open, or mid-spill or
                    # mid-removal for the disk tier) would fail after the tier had
                    # changed. Only while they were never written: on a filesystem
                    # without fallocate the C library writes zeros where it reads them,
                    # which could race with a counters write of another process.
                    _lowlevel.reserve(self.lock_fd, _COUNTERS_FORMAT.size)
            except BaseException as exc:
                _lowlevel.release(self.lock_cell)
                self.lock_fd = -1
                if isinstance(exc, FileNotFoundError) and self._removed(dir_cell[0]):
                    # An O_CREAT open in a removed directory: ENOENT. Its path is
                    # another's by now (or nothing): not ours to remove.
                    return False
                # Only an empty directory goes: a lock file made here stays, as another
                # process may have opened it since (or be about to make it in this
                # directory, through its own open of the directory): an unlinked lock
                # file would split the cache's lock in two. Its counters page is reserved
                # by the next open.
                if self.made:
                    rmdir_quietly(self.directory)
                if isinstance(exc, OSError):  # named by dir_fd: say where
                    raise _newfile.explain_full_disk(
                        OSError(exc.errno, exc.strerror), self.path(LOCK_NAME)) from exc
                raise
        finally:
            _lowlevel.release(dir_cell)
        return True

    def _removed(self, dir_fd: int) -> bool:
        """True when the directory open as dir_fd was removed: it has no link left, or
        the tier's path names another file or nothing."""
        if _os.fstat(dir_fd).st_nlink == 0:
            return True
        try:
            st = _os.lstat(self.directory)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self.identity

    def lock_removed(self) -> bool:
        """True when the tier's lock file has no name left: unlinked (a destroy() of
        another process unlinks it, then removes the directory), or another file renamed
        over it. A tier whose directory was moved away keeps its lock file's name."""
        return self.lock_fd >= 0 and _os.fstat(self.lock_fd).st_nlink == 0

    def _after_fork_in_child(self) -> None:
        """Right after a fork, in the child: a thread lock of its own (a thread of the
        parent may have held the parent's at the fork, and does not exist here), and a
        lock fd of its own at once (_after_fork). The inherited fd shares the parent's
        open file description, with the flock a parent thread may hold right now: kept by
        a child that never uses the cache, it would keep that flock for as long as the
        child lives once the parent is killed, and every process of the cache would wait.
        When the reopen fails (the directory was removed), the first locked call tries
        again, under the thread lock, and raises."""
        self.thread_lock = _threading.RLock()
        self.close_after = None  # a parent thread's, which does not exist here
        if self.lock_fd < 0:  # closed
            return
        try:
            self._after_fork()
        except OSError:
            pass

    def path(self, name: str) -> str:
        return f"{self.directory}/{name}"

    def _open_lock(self, name: str, dir_fd: int | None, cell: _lowlevel.FdCell) -> int:
        """Open the lock file (name, relative to dir_fd when given) into cell, kept by a
        forked child (which opens its own from it, see _after_fork): read-write, made if
        missing; read-only, with write_error set, when write access is refused. A refused
        read-only open raises the first refusal."""
        fd = self._open_lock_file(name, dir_fd, cell)
        _lowlevel.keep_in_child(cell)
        return fd

    def _open_lock_file(self, name: str, dir_fd: int | None, cell: _lowlevel.FdCell) -> int:
        try:
            return _lowlevel.open_at(name, _os.O_RDWR | _os.O_CREAT | _os.O_NOFOLLOW,
                                     dir_fd=dir_fd, cell=cell)
        except OSError as exc:
            if exc.errno not in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
                raise
            refused = exc
        try:
            fd = _lowlevel.open_at(name, _os.O_RDONLY | _os.O_NOFOLLOW, dir_fd=dir_fd,
                                   cell=cell)
        except OSError:
            raise refused from None
        code = refused.errno or _errno.EACCES
        self.write_error = OSError(code, f"the {self.what} can only be looked at here: its "
                                   "lock file could not be opened for writing "
                                   f"({_os.strerror(code)})", self.path(LOCK_NAME))
        return fd

    def check_writable(self) -> None:
        """Raise (the errno that refused write access, naming the lock file) when the
        tier was opened read-only; see the class docstring."""
        error = self.write_error
        if error is not None:
            raise OSError(error.errno, error.strerror, error.filename)

    def check_open(self) -> None:
        """ValueError once the tier was closed (its cache closed or destroyed)."""
        if self.lock_fd < 0:
            raise ValueError(f"I/O operation on closed AudioCache {self.cache_name!r}")

    def in_place(self) -> bool:
        """True while directory names the directory this tier opened, and its lock file
        the file whose flock we take (nobody moved, removed or replaced them)."""
        try:
            self.check_in_place()
        except OSError:
            return False
        return True

    def check_in_place(self) -> None:
        """Raise unless the tier is in place (see in_place): FileNotFoundError when the
        directory is gone, PermissionError when another file has its name (a symlink to
        someone's own directory, say), whose files are then never touched."""
        try:
            st = _os.lstat(self.directory)
        except FileNotFoundError:
            raise FileNotFoundError(_errno.ENOENT, f"the {self.what} directory was removed "
                                    "after the cache opened", self.directory) from None
        if (st.st_dev, st.st_ino) != self.identity or not _stat.S_ISDIR(st.st_mode):
            kind = ("a symbolic link" if _stat.S_ISLNK(st.st_mode) else
                    "another directory" if _stat.S_ISDIR(st.st_mode) else "not a directory")
            raise PermissionError(_errno.EPERM, f"refusing the {self.what} directory: it was "
                                  f"replaced after the cache opened (it is now {kind})",
                                  self.directory)
        if self.lock_fd >= 0 and not _newfile.still_named(self.lock_fd, self.path(LOCK_NAME)):
            raise PermissionError(_errno.EPERM, f"refusing the {self.what} directory: its "
                                  "lock file was removed or replaced after the cache opened",
                                  self.path(LOCK_NAME))

    def _after_fork(self) -> None:
        # The parent's lock fd shares its open file description with the parent:
        # a flock on it would not exclude the parent. Open our own, and close our copy
        # of the parent's (the parent's flock stays: it holds its own descriptor).
        self.check_in_place()  # before an O_CREAT by path
        cell = _lowlevel.fd_cell()
        fd = self._open_lock(self.path(LOCK_NAME), None, cell)
        inherited, self.lock_cell, self.lock_fd = self.lock_cell, cell, fd
        _lowlevel.release(inherited)
        self.pid = _os.getpid()

    def locked(self, exclusive: bool = True, deadline: float | None = None) -> TierLock:
        """Hold the tier's lock (``with tier.locked():``): across threads (a mutex) and
        processes (a flock). deadline (time.monotonic()), when given, bounds the wait:
        TimeoutError (ETIMEDOUT) naming the lock file."""
        return TierLock(self, exclusive, deadline)

    def held_here(self) -> bool:
        """True when this very thread holds the tier's lock (its mutex): a signal handler
        that runs now interrupted one of the thread's locked sections. Asked of the
        mutex itself, which records its owner as acquire() takes it, so that the answer
        is right in the instant after acquire() returns too (an owner we recorded
        ourselves would not be yet: a handler can run there)."""
        return bool(self.thread_lock._is_owned())  # type: ignore[attr-defined]

    def release(self) -> None:
        """Let go of the tier's lock (unlocking a flock not held is harmless); then make
        the close a signal handler asked for meanwhile (close_after), if any."""
        try:
            if self.lock_fd >= 0:  # else closed: no flock to let go of
                _fcntl.flock(self.lock_fd, _fcntl.LOCK_UN)
        finally:
            self.thread_lock.release()
            # Read after the mutex is let go, never before: a close in another thread
            # that sets it after our read finds the mutex free, and closes by itself
            # (see AudioCache.close); a handler that runs from here on does too. Cleared
            # only when we take it to run: a None stored back could erase one that
            # another thread set meanwhile, for the next holder to run. Run twice (read
            # by two threads), the close does nothing the second time.
            then = self.close_after
            if then is not None:
                self.close_after = None
                then()

    def counters(self) -> list[int]:
        """The shared counters (under the lock)."""
        raw = _os.pread(self.lock_fd, _COUNTERS_FORMAT.size, 0)
        if len(raw) < _COUNTERS_FORMAT.size:
            return [0] * len(COUNTERS)
        return list(_COUNTERS_FORMAT.unpack(raw))

    def add(self, deltas: dict[str, int], values: list[int] | None = None) -> list[int]:
        """Add deltas to the shared counters (under the lock); the new values. values:
        the counters as the caller read them under this very hold of the lock (saves
        a read). The one pwrite is the only change: cut short before it, nothing was."""
        self.check_writable()
        values = self.counters() if values is None else list(values)
        for i, name in enumerate(COUNTERS):
            values[i] = max(0, values[i] + deltas.get(name, 0))
        _os.pwrite(self.lock_fd, _COUNTERS_FORMAT.pack(*values), 0)
        return values

    def set_bytes(self, total: int) -> None:
        """Record the committed bytes a scan found (under the lock)."""
        self.check_writable()
        values = self.counters()
        values[0] = total
        _os.pwrite(self.lock_fd, _COUNTERS_FORMAT.pack(*values), 0)

    def entries(self) -> list[tuple[str, _os.stat_result]]:
        """(name, lstat) of each committed entry (call under the lock for a consistent view)."""
        found = []
        with _os.scandir(self.directory) as scan:
            for item in scan:
                if entry_name(item.name) is None:
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if _stat.S_ISREG(st.st_mode):
                    found.append((item.name, st))
        return found

    def remove_if_unpinned(self, name: str, only: int | None = None) -> bool:
        """Unlink name under its exclusive flock, taken without waiting; False when held,
        or when name is gone or not a regular file (nothing of ours to remove). An entry's
        bytes leave the shared count (under the lock). Any other failure to open it
        (EMFILE, EACCES...) raises, naming it: "pinned" would be a lie.

        only, an fd of a file a caller judged stale (expired, unreadable) and then let go
        of: unlink name only while it still names that file. Another process may have
        stored a fresh entry under the name since, which is not the caller's to remove
        (entry names change only under the lock: checked under it, the answer holds)."""
        self.check_writable()
        path = self.path(name)
        if only is not None and not _newfile.still_named(only, path):
            return False
        cell = _lowlevel.fd_cell()  # its exclusive lock: never a child's
        fd = open_regular(path, cell)  # a symlink or FIFO of that name is not ours
        if fd is None:
            return False
        try:
            if not _lowlevel.lock(fd, exclusive=True):
                return False
            if not _newfile.still_named(fd, path):
                return False
            size = _os.fstat(fd).st_size
            try:
                _os.unlink(path)
            except FileNotFoundError:
                # Its owner removed it after dropping its lock (a render's partial):
                # gone all the same, and not by us (its bytes were never ours to count).
                return False
        finally:
            _lowlevel.release(cell)
        if entry_name(name) is not None:
            self.add({"bytes": -size})
        return True

    def kind(self, name: str) -> str | None:
        """What name is to the cache: "entry", "live" (a render), "part" or "unstored"
        (in flight), "note" (an outcome note), or None when it is not the cache's (any
        other shape, or not a regular file). The one test that sweep() and leftovers()
        share: a file the cache did not make is never removed, whatever it is named."""
        path = self.path(name)
        if entry_name(name) is not None:
            kind = "entry"
        elif PART_NAME.fullmatch(name):
            kind = "part"
        elif UNSTORED_NAME.fullmatch(name):
            kind = "unstored"
        elif name.endswith(LIVE) and KEY.fullmatch(name[:-len(LIVE)]):
            # "song.live" is key-shaped too: the WAV header of a render tells them apart.
            head = regular_head(path, 128)
            return "live" if head is not None and LIVE_START.match(head) else None
        elif name.endswith(OUTCOME) and KEY.fullmatch(name[:-len(OUTCOME)]):
            # A note is also checked inside: "<inode> <pid> " at its start.
            return "note" if note_owner(path) is not None else None
        else:
            return None
        try:
            st = _os.lstat(path)
        except FileNotFoundError:
            return None
        return kind if _stat.S_ISREG(st.st_mode) else None

    def sweep(self) -> int:
        """Remove leftovers no live process holds: partials, stale .live files, outcome
        notes older than a minute, unstored audio (each by its exact shape, see kind).
        Under the lock."""
        self.check_writable()
        removed = 0
        now = _time.time()
        with _os.scandir(self.directory) as scan:
            names = [item.name for item in scan]
        for name in names:
            if entry_name(name) is not None:
                continue  # entries are evicted, never swept: no lstat of each (see kind)
            kind = self.kind(name)
            if kind in ("part", "unstored"):
                removed += self.remove_if_unpinned(name)
            elif kind == "note":
                try:
                    if now - _os.lstat(self.path(name)).st_mtime > 60:
                        _os.unlink(self.path(name))
                except FileNotFoundError:
                    pass
            elif kind == "live" and stale_live(self.path(name)):
                removed += 1
        return removed

    def part_path(self, name: str) -> str:
        """A new in-flight name for name, of the shape sweeps know (see kind): a name for
        a file made elsewhere (an unnamed one, linked here) or by new_part."""
        return self.path(f".{name}.{token()}{PART}")

    def new_part(self, name: str) -> tuple[str, _lowlevel.FdCell]:
        """A new in-flight file for name: (path, its fd cell) with a shared flock held from
        before its name appeared, so that no sweep (in any process) removes it while we
        live."""
        self.check_writable()
        path = self.part_path(name)
        cell = _lowlevel.fd_cell()  # flocked: a child must not keep it
        _lowlevel.create_locked(self.directory, path, cell=cell)
        return path, cell

    def written_part(self, name: str, write: Callable[[int, str], None]
                     ) -> tuple[str, _lowlevel.FdCell]:
        """A new in-flight file for name (see new_part) that write(fd, path) filled: (path,
        its fd cell). On failure nothing is left, and an OSError that names no file (os.write,
        os.sendfile) names the partial (ENOSPC: with the full RAM disk's hint)."""
        path, cell = self.new_part(name)
        try:
            write(cell[0], path)
        except BaseException as exc:
            _lowlevel.release(cell)
            unlink_quietly(path)
            raise_named(exc, path)
            raise
        return path, cell

    def undo(self) -> None:
        """Close, and remove the directory again when this tier made it (an AudioCache
        whose construction failed leaves nothing of its own).

        Another process can have opened the same cache in the moment since the mkdir:
        the directory is removed only when no one holds its lock and nothing but the
        lock file is in it (a process that opened it between our mkdir and now would
        find its files gone: an OSError, in a window of microseconds, never data lost).
        And only while it is still in place: another process may have removed it (its
        destroy() of the empty cache) and a third made it anew, whose lock file and
        directory are not ours.
        """
        try:
            if (self.made and _lowlevel.lock(self.lock_fd, exclusive=True)
                    and self.in_place()):
                with _os.scandir(self.directory) as scan:
                    alone = [item.name for item in scan] == [LOCK_NAME]
                if alone:
                    unlink_quietly(self.path(LOCK_NAME))
                    rmdir_quietly(self.directory)
        finally:
            # No thread uses a tier whose cache is not made yet; and a call cut short
            # inside the mutex's open window (see TierLock) leaves it held for ever.
            self.close(wait=False)

    def leftovers(self) -> tuple[list[str], list[str]]:
        """What keeps the directory after a clear (under the lock): (the outcome notes of
        failed renders, ours to remove; every other name but the lock file, each with
        why it stays: a pinned entry, a render or write in flight, a file not ours)."""
        notes: list[str] = []
        kept: list[str] = []
        why = {"entry": "pinned", "live": "being rendered", "part": "in use",
               "unstored": "in use", None: "not the cache's"}
        with _os.scandir(self.directory) as scan:
            names = [item.name for item in scan if item.name != LOCK_NAME]
        for name in names:
            kind = self.kind(name)
            if kind == "note":
                notes.append(name)
            elif kind is not None or _os.path.lexists(self.path(name)):  # else: just gone
                kept.append(f"{name} ({why[kind]})")
        return notes, sorted(kept)

    def close(self, *, wait: bool = True, deadline: float | None = None) -> bool:
        """Close the lock file; again does nothing. Under the mutex, so that no thread
        holding the tier's lock has its lock file closed under it (see TierLock). Never
        called by the thread that holds it (AudioCache.close makes such a close wait
        for the lock to be let go: see close_after). True once closed; False when
        another thread held the mutex until deadline (time.monotonic(); None: no
        limit), and the file is still open.

        wait=False (the leak finalizer, a failed construction) closes it without the
        mutex: no thread uses the tier (the cache is collected, or was never made), or it
        is interpreter exit, when a daemon thread may hold the mutex for ever (or a call
        cut short in its open window left it held). In a forked child the
        mutex may be held by a thread that was not copied: the child's copy of the file
        is closed without it."""
        if not wait or self.pid != _os.getpid():
            self._close_file()
            return True
        if deadline is None:
            with self.thread_lock:  # in C: no handler runs between the acquire and the try
                self._close_file()
            return True
        if not self.thread_lock.acquire(timeout=max(0.0, deadline - _time.monotonic())):
            return False
        try:
            self._close_file()
        finally:
            self.thread_lock.release()
        return True

    def _close_file(self) -> None:
        if self.lock_fd >= 0:
            self.lock_fd = -1
            _lowlevel.release(self.lock_cell)


def removed_each_time(what: str, directory: str) -> FileNotFoundError:
    """The error of an open that found its directory removed by another process each of
    OPEN_ATTEMPTS times (see Tier.__init__ and open_tier)."""
    return FileNotFoundError(_errno.ENOENT, f"the {what} directory was removed by another "
                             f"process each of the {OPEN_ATTEMPTS} times it was opened (is "
                             "a process destroying the cache over and over?)", directory)


def open_tier(parent: str, name: str, max_bytes: int, what: str, deadline: float | None,
              first: Callable[[Tier], object]) -> Tier:
    """A Tier (see Tier) with first(tier) done under its lock, which the lock's wait
    bounds by deadline (time.monotonic(); None: no bound): the work of the open (the
    sweep of a killed process's leftovers). A tier opened read-only skips it (looked at,
    never changed). On failure the tier is undone (see Tier.undo) and the error raised.

    Another process can remove the tier's directory between our open of its lock file
    and our lock: its destroy() of the empty cache unlinks the lock file and removes the
    directory. Under the lock the tier is then found out of place (FileNotFoundError for
    the directory, or PermissionError for the lock file: see TierLock), though the cache
    was never opened: the open starts again, at most OPEN_ATTEMPTS times, as the tier's
    own open does. That tier is closed, not undone: its directory is gone, and its path
    may name another process's new one by now."""
    for _ in range(OPEN_ATTEMPTS):
        tier = Tier(parent, name, max_bytes, what)
        if tier.write_error is not None:
            return tier
        try:
            with tier.locked(deadline=deadline):
                first(tier)
            return tier
        except OSError:
            if not tier.lock_removed():
                tier.undo()
                raise
            tier.close(wait=False)
        except BaseException:
            tier.undo()
            raise
    raise removed_each_time(what, f"{parent}/{dir_name(name)}")


def remove_stale(tier: Tier, name: str, fd: int, deadline: float | None = None) -> bool:
    """Remove tier's entry name, which a look-up found stale (expired, or not a WAV it
    can read) through fd, unless it is pinned or name no longer names that file; True
    when removed. The look-up's own shared flock on fd goes first (it would refuse the
    removal); fd stays open, so the check under the lock compares with that very file.

    Why not by name alone: between the look-up letting go of the file and the lock,
    another process can store a fresh entry under the name, which is not stale.
    A tier opened read-only removes nothing: the look-up passes the entry by."""
    if tier.write_error is not None:
        return False
    _fcntl.flock(fd, _fcntl.LOCK_UN)
    with tier.locked(deadline=deadline):
        return tier.remove_if_unpinned(name, only=fd)


def remove_or_supersede(tier: Tier, name: str) -> None:
    """Remove tier's entry name, which a newer entry of its key replaces; one a caller
    holds (a reload copying it, a hit) is superseded instead, so that no look-up ever
    takes it again and the first that finds it unheld removes it (under the lock)."""
    if not tier.remove_if_unpinned(name):
        supersede(tier.path(name))


def warn_leak(tiers: list[Tier], name: str, owner_pid: int) -> None:
    # Counters not yet written out are lost (they need the lock, which a finalizer must
    # not wait for); the entries themselves are all on disk already.
    if owner_pid == _os.getpid():
        _warnings.warn(f"unclosed AudioCache {name!r}", ResourceWarning, stacklevel=2)
    for tier in tiers:
        try:
            tier.close(wait=False)
        except OSError:
            pass
