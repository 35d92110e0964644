"""AudioCache: the policy over the tiers: look-ups, puts, renders and their waiters and
followers, eviction, spills to the disk tier and reloads from it.
"""

from __future__ import annotations

import collections as _collections
import errno as _errno
import functools as _functools
import os as _os
import stat as _stat
import threading as _threading
import time as _time
import weakref as _weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from luna_shm import _lowlevel, _newfile, _resource, encoding, formats, placement
from luna_shm.cache._entry import CachedAudio, CacheStats
from luna_shm.cache._files import (
    ENCODED_SUFFIXES,
    ENTRY_SUFFIXES,
    LIVE,
    LOCK_NAME,
    OUTCOME,
    SUPERSEDED,
    UNSTORED,
    check_cache_name,
    is_pinned,
    is_render_file,
    lock_by,
    note_owner,
    open_regular,
    raise_named,
    regular_head,
    remove_dead_live,
    stale_live,
    token,
    unlink_quietly,
)
from luna_shm.cache._keys import check_key
from luna_shm.cache._render_writer import ROOM_MARGIN, RenderWriter
from luna_shm.cache._tier import (
    COUNTERS,
    Tier,
    made_anew_in_child,
    open_tier,
    remove_or_supersede,
    remove_stale,
    warn_leak,
)
from luna_shm.errors import LunaShmError, WavError
from luna_shm.follow import follow_wav
from luna_shm.writer import WavWriter

_T = TypeVar("_T")
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_DISK_MAX_BYTES = 1024 * 1024 * 1024
# close()'s wait for the cache's lock to write its counts out, when none is given (and at
# the end of a `with` block): ample for a holder that is working, bounded for one that
# is stopped. The CLI's default --timeout is the same.
CLOSE_TIMEOUT = 10.0
_NOT_STATS = ("bytes", "encoded")
# The .live files of the renders that each thread is running now (AudioCache._render),
# with its pid: a render that asks the cache for its own key (get_or_render, follow) in
# that thread would wait for itself for ever (see _check_not_own_render).
_RENDERING = _threading.local()


def _own_renders() -> set[tuple[int, str]]:
    """The (pid, .live path) of the renders running in this thread (see _RENDERING)."""
    renders: set[tuple[int, str]] | None = getattr(_RENDERING, "renders", None)
    if renders is None:
        renders = _RENDERING.renders = set()
    return renders


def _check_not_own_render(key: str, live: str, call: str) -> None:
    """RuntimeError when this thread is inside the render of the file live (key's): it
    would wait for the render it is running, for ever (or until its timeout, and then
    blame "another caller"). A forked child of the render is not the render's thread:
    it may wait for its parent's render like any other process."""
    if (_resource.current_pid, live) in _own_renders():
        raise RuntimeError(f"{call} of {key!r} was called from inside the render of "
                           f"{key!r} in this thread: it would wait for itself for ever "
                           "(write the audio into the writer instead)")


class RenderError(LunaShmError, RuntimeError):
    """The render of a key that this caller waited for failed (in this or another process)."""


def _check_bytes(what: str, value: object, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    return formats.check_int(what, value, minimum=1)


def _check_ttl(ttl: object) -> float:
    """ttl as float seconds > 0 (formats.check_seconds, which also takes numpy numbers)."""
    try:
        seconds = formats.check_seconds("ttl", ttl, optional=True)
    except ValueError:
        seconds = 0.0  # negative or NaN: the message below says what ttl must be
    if not seconds > 0:
        raise ValueError(f"ttl must be None or > 0 seconds, got {_lowlevel.brief(ttl)}")
    return seconds


def _deadline(timeout: object) -> float | None:
    """The time.monotonic() by which a wait of timeout seconds ends (None: no limit);
    timeout checked as formats.check_timeout does (TypeError, ValueError naming it)."""
    limit = formats.check_timeout(timeout)
    return None if limit is None else _time.monotonic() + limit


def _sweep_and_count(tier: Tier) -> None:
    """The RAM tier's work at the open (under its lock): remove the leftovers of killed
    processes, and set its byte count to the truth."""
    tier.sweep()
    tier.set_bytes(sum(st.st_size for _, st in tier.entries()))


# The bytes of a render's outcome note allocated when the render begins (one page: the
# pid, the inode and the first 4 KB of the error's text, where the RAM disk fills up).
_OUTCOME_RESERVED = 4096


class _Replaced(Exception):
    """A reload's source on the disk tier stopped being the key's newest audio during
    the copy (see AudioCache._commit): the copy is not stored."""


def _still_newest(source: CachedAudio) -> bool:
    """True while the pinned disk entry source is still its key's entry: named by its
    path and not superseded by a newer entry of another type."""
    return (_newfile.still_named(source.fileno(), source.path)
            and _stat.S_IMODE(_os.fstat(source.fileno()).st_mode) != SUPERSEDED)


class AudioCache(_resource.OwnedHere):
    """A bounded cache of rendered audio on the RAM disk, shared by this user's processes.

    Args:
        name: the cache's name: 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '-'.
            Every process of this user that opens the same name shares the entries.
        max_bytes: the RAM tier never holds more committed bytes than this (an entry
            being rendered aside); least recently used entries go first.
        ttl: seconds an entry stays valid after it was stored (an int or float, numpy
            ones too, > 0; NaN is refused); None (or infinity) keeps it.
        disk_dir: a directory for a second tier, kept across restarts: entries evicted
            from RAM spill there (within disk_max_bytes) and a RAM miss reloads them.
            Not the RAM dir itself (a ValueError).
        disk_max_bytes: the disk tier's bound (default 1 GiB).
        timeout: seconds to wait for the cache's locks at the open (it removes the
            leftovers of killed processes and counts its bytes under them), as for
            :meth:`stats`; None waits as long as it takes.

    Raises:
        TypeError, ValueError: a bad name, size, ttl, disk_dir or timeout, named in the
            message.
        TimeoutError: timeout passed while another process held a lock of the cache
            (stopped or stuck there), ETIMEDOUT, naming its lock file; nothing is left
            of the open.
        PermissionError: the cache directory is a symlink, belongs to another user
            or lets others in.
        OSError: the directory cannot be made or opened. Another process that removes
            the empty directory in the middle of the open (its destroy(), or its own
            open that made the directory and failed) is no error: the open starts
            again and makes it anew. Only when it is removed so each of 10 times:
            FileNotFoundError (ENOENT) naming the directory.
    """

    _finalizer: _weakref.finalize  # type: ignore[type-arg]

    def __init__(self, name: str = "default", *, max_bytes: int = DEFAULT_MAX_BYTES,
                 ttl: float | None = None, disk_dir: str | _os.PathLike[str] | None = None,
                 disk_max_bytes: int | None = None, timeout: float | None = None) -> None:
        self.name = check_cache_name(name)
        self.max_bytes = _check_bytes("max_bytes", max_bytes) or 0
        self.ttl = None if ttl is None else _check_ttl(ttl)
        disk_max = _check_bytes("disk_max_bytes", disk_max_bytes, optional=True)
        deadline = _deadline(timeout)
        disk_text = None
        if disk_dir is not None:
            disk_text = _lowlevel.path_argument(disk_dir, "a str or os.PathLike[str]",
                                                name="disk_dir")
            if not disk_text:
                raise ValueError("disk_dir must name a directory, got ''")
            _check_not_the_ram_dir(disk_text, placement.current().directory)
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._counts_lock = _threading.Lock()
        self._counts_pid = _resource.current_pid
        made_anew_in_child.add(self)
        self._encoded = False
        # The RAM entries the last eviction scan did not come to: (name, inode, atime_ns),
        # least recently used first (see _evict_queued). Used under the RAM lock only.
        self._victims: _collections.deque[tuple[str, int, int]] = _collections.deque()
        # Each tier's leftovers of killed processes go at the open, under its lock (a
        # tier opened read-only is looked at, never changed: see Tier): the RAM tier's
        # byte count is set to the truth there too, the disk tier's spills in flight go.
        # A failed constructor leaves nothing it made (a directory that was there
        # before, and may be in use, stays): open_tier undoes its own tier.
        ram = open_tier(placement.current().directory, name, self.max_bytes, "cache",
                        deadline, _sweep_and_count)
        disk: Tier | None = None
        try:
            if disk_text is not None:
                disk = open_tier(_os.path.abspath(disk_text), name,
                                 disk_max or DEFAULT_DISK_MAX_BYTES, "disk cache", deadline,
                                 Tier.sweep)
        except BaseException:
            ram.undo()
            raise
        self._ram, self._disk = ram, disk
        tiers = [ram] if disk is None else [ram, disk]
        self._finalizer = _weakref.finalize(self, warn_leak, tiers, name, _os.getpid())

    @property
    def directory(self) -> str:
        """The RAM tier's directory."""
        return self._ram.directory

    @property
    def closed(self) -> bool:
        """True once :meth:`close` or :meth:`destroy` ran: every other method raises then."""
        return self._ram.lock_fd < 0

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on closed AudioCache {self.name!r}")

    # ---- counters ------------------------------------------------------------------

    def _count(self, what: str, n: int = 1) -> None:
        if self._counts_pid != _resource.current_pid:
            self._forget_parent_counts()
        with self._counts_lock:
            self._counts[what] += n

    def _after_fork_in_child(self) -> None:
        self._forget_parent_counts()

    def _forget_parent_counts(self) -> None:
        """In a forked child: the counts not yet written out are the parent's, which
        it will write itself; start from zero (with a lock of our own: another thread
        of the parent may have held its lock at the fork)."""
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._counts_lock = _threading.Lock()
        self._counts_pid = _resource.current_pid

    def _counts_pending(self) -> bool:
        """True when this process counted something not yet written out."""
        return self._counts_pid == _resource.current_pid and any(self._counts.values())

    def _flush_counts(self) -> dict[str, int]:
        """Add this process's counts to the shared ones; the totals. Under the RAM lock.
        (Hits and misses are counted here first: a hit takes no lock.) A cache opened
        read-only writes nothing: the totals add this process's counts, kept."""
        if self._counts_pid != _resource.current_pid:
            self._forget_parent_counts()
        if self._ram.write_error is not None:
            with self._counts_lock:
                mine = [self._counts[name] for name in COUNTERS]
            shared = self._ram.counters()
            return {name: shared[i] + mine[i] for i, name in enumerate(COUNTERS)}
        shared = self._ram.counters()
        pending: dict[str, int] | None = None
        try:
            with self._counts_lock:
                pending, self._counts = self._counts, dict.fromkeys(COUNTERS, 0)
            return dict(zip(COUNTERS, self._ram.add(pending, shared), strict=True))
        except BaseException:
            # Cut short: by a signal handler's exception (one that calls the cache in
            # this locked section raises RuntimeError), or a failed write. The counts
            # taken out and not written stay this process's, for the next write-out or
            # the close. Whether they were written is read back from the file: nobody
            # else writes it while we hold the lock, and our write changes it (pending
            # counts are positive), so it still holds what we read only if we did not.
            if pending is not None and self._ram.counters() == shared:
                self._keep_counts(pending)
            raise

    def _keep_counts(self, pending: dict[str, int]) -> None:
        """Give back counts a write-out took and did not write (see _flush_counts)."""
        with self._counts_lock:
            for name, n in pending.items():
                self._counts[name] += n

    def _suffixes(self) -> tuple[str, ...]:
        """The entry suffixes to look for: ".wav" alone until encoded audio was stored
        in this cache (by any process), so that a miss costs one failed open."""
        if not self._encoded:  # one pread, no lock: the flag only ever goes from 0 to 1
            offset = 8 * COUNTERS.index("encoded")
            fd = self._ram.lock_fd
            self._ram.check_open()  # closed by another thread since the call began
            try:
                self._encoded = _os.pread(fd, 8, offset) not in (b"", bytes(8))
            except OSError as exc:
                # Closed by another thread after we read the number (a number reused
                # meanwhile by another file only makes look-ups try every suffix, never
                # a wrong hit).
                if exc.errno == _errno.EBADF:
                    self._ram.check_open()
                raise _lowlevel.named(exc, self._ram.path(LOCK_NAME)) from None
        return ENTRY_SUFFIXES if self._encoded else (".wav",)

    # ---- look-ups ------------------------------------------------------------------

    def _open_entry(self, tier: Tier, key: str, deadline: float | None = None
                    ) -> CachedAudio | None:
        """Pin the committed entry of key in tier, or None (missing, evicted, expired).
        deadline (time.monotonic()) bounds the waits for the entry's lock and the
        tier's: TimeoutError (ETIMEDOUT) naming the file."""
        for suffix in ENTRY_SUFFIXES:
            path = tier.path(key + suffix)
            # Opened and flocked shared in one C call (the hit's hot path), into a cell
            # before the CachedAudio that lets go of it at a fork exists: a child forked
            # meanwhile must not keep the pin.
            cell = _lowlevel.fd_cell()
            pinned = _lowlevel.pin_shared(path, cell)  # a symlink or FIFO: not an entry
            if pinned is None:
                if suffix == ".wav" and tier is self._ram and len(self._suffixes()) == 1:
                    return None  # no encoded audio in this cache: one open decides
                continue
            locked, nlink, mode, size, mtime_ns = pinned
            fd = cell[0]
            try:
                if not locked:
                    # An evictor holds the exclusive lock around a spill and an unlink, a
                    # renderer from its commit until its entry is pinned: waiting is
                    # brief, unless that process is stopped or stuck (deadline bounds it).
                    lock_by(fd, exclusive=False, deadline=deadline,
                            what=f"the lock of the entry of {key!r} (another process holds it)",
                            path=path)
                    st = _lowlevel.fstat(fd, path)
                    nlink, mode, size, mtime_ns = (st.st_nlink, st.st_mode, st.st_size,
                                                   st.st_mtime_ns)
                if nlink == 0:  # evicted before we had the lock
                    _lowlevel.release(cell)
                    continue
                if _stat.S_IMODE(mode) == SUPERSEDED:  # the key has a newer entry
                    remove_stale(tier, key + suffix, fd, deadline)
                    _lowlevel.release(cell)
                    continue
                if self._expired(mtime_ns / 1e9, _time.time()):
                    remove_stale(tier, key + suffix, fd, deadline)
                    _lowlevel.release(cell)
                    continue
                try:
                    _os.utime(fd, ns=(_time.time_ns(), mtime_ns))  # the LRU clock
                except OSError as exc:
                    # A cache on a file system remounted read-only still serves its
                    # hits (its LRU clock stops); anything else names the entry.
                    if exc.errno != _errno.EROFS:
                        raise_named(exc, path)
                        raise
            except BaseException:
                _lowlevel.release(cell)
                raise
            return CachedAudio(cell, path, key, size=size)
        return None

    def get(self, key: str, *, timeout: float | None = None) -> CachedAudio | None:
        """The entry of key, pinned until released, or None on a miss.

        A RAM miss with a disk tier reloads the entry from disk into RAM.

        Args:
            key: see :func:`cache_key`.
            timeout: seconds to wait for the locks a hit takes (an int or float, numpy
                ones too, >= 0; 0 does not wait); None or infinity waits as long as it
                takes. Another process holds an entry's lock for an instant (a renderer
                storing it, an eviction): only one that is stopped or stuck there makes
                a get wait, and a server that must answer bounds that wait.

        Raises:
            TypeError, ValueError: key is not a key (see :func:`cache_key`), or a bad
                timeout (NaN is refused).
            TimeoutError: timeout passed while another process held the entry's lock,
                or a lock of the cache that a reload takes (to store its copy, to make
                room on a full RAM disk, to spill the entry it evicts to the disk tier),
                ETIMEDOUT, naming the file.
        """
        self._check_open()
        check_key(key)
        return self._get(key, _deadline(timeout))

    def _get(self, key: str, deadline: float | None) -> CachedAudio | None:
        """get(), its waits bounded by deadline (time.monotonic(); None: no bound)."""
        found = self._find(key, deadline)
        self._count("hits" if found is not None else "misses")
        return found

    def _find(self, key: str, deadline: float | None) -> CachedAudio | None:
        """The look-up of get() (a RAM hit, or a reload from the disk tier), uncounted."""
        found = self._open_entry(self._ram, key, deadline)
        if found is None and self._disk is not None:
            found = self._reload(key, deadline)
        return found

    def __contains__(self, key: str) -> bool:
        """True when key has a RAM entry that :meth:`get` would hand out (a regular file,
        not expired, not replaced); a disk-tier entry is not looked at."""
        self._check_open()
        return self._present(check_key(key))

    # ---- storing -------------------------------------------------------------------

    def _make_room(self, size: int, deadline: float | None = None, replacing: str = "",
                   replaced: int = 0) -> bool:
        """Under the RAM lock: make size more bytes fit (the shared count grows by them);
        False when they cannot (nothing is stored then). A cache that looks full evicts
        from the queue of its last scan (see _evict_queued); when that is not enough it
        is scanned: expired entries go, then the least recently used unpinned ones.
        deadline bounds the spills' waits for the disk tier's lock (see _evict).

        replacing: the entry name the new file is about to be renamed over, of replaced
        bytes (0: none). Those bytes leave the count with the rename (the caller lowers
        it then), so they are room already: that entry is never evicted for it (the
        rename replaces it, held or not), and no other entry goes to make room that the
        replacement itself frees (a put over a held entry of its key was kept unstored,
        and one over an unheld entry evicted another key first when that was older)."""
        tier = self._ram
        if size > tier.max_bytes:
            return False
        total = tier.counters()[0] - replaced
        if total + size > tier.max_bytes:
            total = self._evict_queued(total, size, deadline, replacing)
        if total + size > tier.max_bytes:
            total = self._evict_scanned(size, deadline, replacing, replaced)
            tier.set_bytes(total)
            total -= replaced
            if total + size > tier.max_bytes:
                return False
        tier.add({"bytes": size})  # before the rename: too high, never too low
        return True

    def _evict_scanned(self, size: int, deadline: float | None = None, replacing: str = "",
                       replaced: int = 0) -> int:
        """Scan the RAM tier (under its lock) and evict until size more bytes fit: expired
        entries first, then the least recently used unpinned ones; the committed bytes
        left. The entries it did not come to are queued, oldest first, for the next
        commits that find the cache full (_evict_queued): a full cache is scanned once
        per queue, not once per commit (a scan of 10,000 entries takes tens of ms).
        replacing, of replaced bytes: see _make_room (counted in what it returns, never
        evicted, and its bytes taken as room)."""
        tier = self._ram
        tier.sweep()  # unstored audio a killed process never released, too
        now = _time.time()
        kept = []
        for name, st in tier.entries():
            expired = self._expired(st.st_mtime, now)
            if expired and name != replacing and tier.remove_if_unpinned(name):
                continue
            kept.append((name, st))
        total = sum(st.st_size for _, st in kept)
        kept.sort(key=lambda item: item[1].st_atime_ns)
        tried = 0
        for name, st in kept:
            if total - replaced + size <= tier.max_bytes:
                break
            tried += 1
            if name != replacing and self._evict(name, deadline):
                total -= st.st_size
        self._victims = _collections.deque(
            (name, st.st_ino, st.st_atime_ns) for name, st in kept[tried:])
        return total

    def _evict_queued(self, total: int, size: int, deadline: float | None = None,
                      replacing: str = "") -> int:
        """Evict the entries the last scan queued, oldest first, until size more bytes
        fit in total (the shared count, lowered by what goes); the new total.

        Exactly LRU, across processes: an entry is evicted only while it is the very file
        the scan saw (inode) with the access time it saw. One used since (a hit, in any
        process, sets its atime), replaced or gone leaves the queue: what a scan did not
        see, or saw changed, was stored or used after every entry still queued."""
        tier = self._ram
        queue = self._victims
        now = _time.time()
        while queue and total + size > tier.max_bytes:
            name, ino, atime_ns = queue.popleft()
            if name == replacing:  # the commit's rename replaces it (see _make_room)
                continue
            try:
                st = _os.lstat(tier.path(name))
            except FileNotFoundError:
                continue
            if (st.st_ino, st.st_atime_ns) != (ino, atime_ns):
                continue
            if self._expired(st.st_mtime, now):
                if tier.remove_if_unpinned(name):  # it lowers the shared count itself
                    total -= st.st_size
            elif self._evict(name, deadline):
                tier.add({"bytes": -st.st_size})
                total -= st.st_size
        return total

    def _evict(self, name: str, deadline: float | None = None) -> bool:
        """Evict one RAM entry (spilling it to disk first); False when it is pinned.

        A spill that fails leaves the entry evicted all the same (a warning logged: the
        disk tier is a second chance, not a copy every entry must have), except one
        that timed out waiting for the disk tier's lock (deadline, the caller's): that
        TimeoutError is the caller's, and the entry stays."""
        path = self._ram.path(name)
        cell = _lowlevel.fd_cell()  # its exclusive lock: never a child's
        fd = open_regular(path, cell)
        if fd is None:
            return not _os.path.lexists(path)  # gone; else not an entry: never ours to evict
        try:
            if not _lowlevel.lock(fd, exclusive=True, filename=path) \
                    or not _newfile.still_named(fd, path):
                return False
            if self._disk is not None and \
                    _stat.S_IMODE(_lowlevel.fstat(fd, path).st_mode) != SUPERSEDED:
                try:
                    self._spill(fd, path, deadline)
                except TimeoutError:
                    raise
                except OSError as exc:
                    placement.logger.warning("luna_shm: could not spill %s to %s: %s",
                                             path, self._disk.directory, exc)
            _os.unlink(path)
            self._count("evictions")
            return True  # the caller recounts the bytes
        finally:
            _lowlevel.release(cell)

    def _copy_in(self, tier: Tier, src_fd: int, src_path: str, *, sync: bool
                 ) -> tuple[str, _lowlevel.FdCell]:
        """Copy src_fd (the entry at src_path, in the other tier) to a new locked partial
        of the same name in tier: (its path, its fd cell); mtime kept."""
        st = _lowlevel.fstat(src_fd, src_path)

        def copy(fd: int, part: str) -> None:
            offset = 0
            while offset < st.st_size:
                # sendfile, not copy_file_range: that one refuses RAM -> disk (EXDEV)
                # on the kernels that are still common.
                sent = _os.sendfile(fd, src_fd, offset, st.st_size - offset)
                if sent == 0:
                    break
                offset += sent
            _os.utime(fd, ns=(_time.time_ns(), st.st_mtime_ns))
            if sync:
                _os.fsync(fd)

        return tier.written_part(_os.path.basename(src_path), copy)

    def _spill(self, src_fd: int, src_path: str, deadline: float | None = None) -> None:
        """Copy the RAM entry at src_path (open as src_fd) to the disk tier and store it
        there; deadline bounds the wait for the disk tier's lock. On failure the copy goes."""
        disk = self._disk
        assert disk is not None
        size = _lowlevel.fstat(src_fd, src_path).st_size
        if size > disk.max_bytes:
            return
        name = _os.path.basename(src_path)
        part, part_cell = self._copy_in(disk, src_fd, src_path, sync=True)
        try:
            self._store_on_disk(disk, part, name, size, deadline)
        except BaseException:
            unlink_quietly(part)  # still ours: our flock kept every sweep off it
            raise
        finally:
            _lowlevel.release(part_cell)

    def _store_on_disk(self, disk: Tier, part: str, name: str, size: int,
                       deadline: float | None = None) -> None:
        with disk.locked(deadline=deadline):
            key = name.rpartition(".")[0]
            for suffix in ENTRY_SUFFIXES:  # one entry per key: a spilled WAV of a key
                if key + suffix != name:    # now stored as MP3 must not win over it
                    remove_or_supersede(disk, key + suffix)
            entries = [(n, st) for n, st in disk.entries() if n != name]
            total = sum(st.st_size for _, st in entries)
            entries.sort(key=lambda item: item[1].st_atime_ns)
            for victim, st in entries:
                if total + size <= disk.max_bytes:
                    break
                if disk.remove_if_unpinned(victim):
                    total -= st.st_size
            if total + size > disk.max_bytes:
                _os.unlink(part)
                return
            _os.rename(part, disk.path(name))
        self._count("spills")

    def _reload(self, key: str, deadline: float | None) -> CachedAudio | None:
        """Copy key's disk entry back into RAM and pin it there; None when there is none.

        The disk copy stays pinned until the commit, which stores the RAM copy only while
        that disk copy is still the key's newest audio (see _commit): a put, or a spill
        of another type, in another process during the copy made it old."""
        disk = self._disk
        assert disk is not None
        for _ in range(3):  # a third replacement during our copies: a miss
            held = self._open_entry(disk, key, deadline)
            if held is None:
                return None
            with held:
                name = _os.path.basename(held.path)
                part, cell = self._with_room(
                    _lowlevel.fstat(held.fileno(), held.path).st_size,
                    _functools.partial(self._copy_in, self._ram, held.fileno(), held.path,
                                       sync=False), deadline)
                try:
                    entry = self._commit(key, part, name, cell, source=held,
                                         deadline=deadline)
                except _Replaced:
                    found = self._open_entry(self._ram, key, deadline)  # a put's, if any
                    if found is not None:
                        return found
                    continue
            self._count("reloads")
            return entry
        return None

    def _commit(self, key: str, part_path: str, name: str, cell: _lowlevel.FdCell, *,
                source: CachedAudio | None = None, deadline: float | None = None
                ) -> CachedAudio:
        """Pin the complete file at part_path and give it the entry name under the lock;
        when it does not fit, keep it as unstored audio. The caller's file is consumed.
        Unless it was reloaded from the disk tier, the key's disk entries go: one entry
        per key, and a spill of an older one must not come back after a restart; kept
        unstored, its RAM entries go too (see _drop_older).
        cell holds an fd open on it that holds its flock (it becomes the entry's): every
        caller has one (the partial it wrote, the render's pin), so no lock is waited for
        here but the tiers'; on failure it is released and the file removed.

        source: the pinned disk entry a reload copied part_path from. Every change of a
        key's disk entries happens under the RAM lock (a commit drops them, an eviction
        spills), so checked under it, "source is still named and not superseded" means
        no newer audio of the key was stored since the copy began; else _Replaced is
        raised (nothing stored, the file removed). deadline bounds the wait for the
        lock, and the waits for the disk tier's: the spills', and the removal of the
        key's disk copies (a reload for a get with a timeout, a put with one). Past it,
        TimeoutError, and the key's entries are as they were."""
        fd = cell[0]
        try:
            st = _os.fstat(fd)
            size = st.st_size
            # Stored now is used now: the LRU clock (atime) of a render would otherwise be
            # when its file was made, before every hit during the render, and the next
            # eviction would take the entry just stored. mtime (the TTL clock) is kept.
            _os.utime(fd, ns=(_time.time_ns(), st.st_mtime_ns))
            final = self._ram.path(name)
            with self._ram.locked(deadline=deadline):
                if source is not None and not _still_newest(source):
                    raise _Replaced(source.path)
                self._flush_counts()
                # The key's entry of this type (a render's too: an expired entry someone
                # holds is there), which the rename replaces: its bytes are room already.
                foreign = self._foreign(name)
                replaced = 0 if foreign else self._named_size(name)
                if not foreign and self._make_room(size, deadline, name, replaced):
                    # The key's disk copies go before the rename, never after: killed
                    # between the two, an older copy would outlive the new entry (an
                    # eviction that cannot spill, a reboot) and come back in its place.
                    # First of all changes: the wait for the disk tier's lock is the one
                    # a deadline cuts short here, and then the key's entries are as they
                    # were (the bytes made room for leave the count again).
                    if self._disk is not None and source is None:
                        try:
                            self._drop_from_disk(key, deadline)
                        except TimeoutError:
                            self._ram.add({"bytes": -size})
                            raise
                    if name != key + ".wav" and not self._suffixes()[1:]:
                        self._ram.add({"encoded": 1})
                        self._encoded = True
                    for suffix in self._suffixes():  # one entry per key, whatever its type
                        if key + suffix != name:  # held: it stays, superseded
                            remove_or_supersede(self._ram, key + suffix)
                    _os.rename(part_path, final)
                    # The old entry leaves the count (a pinned one lives on unnamed) after
                    # the rename, never before: killed between the two, the count would be
                    # too low, and later commits would fill the tier past its bound.
                    if replaced:
                        self._ram.add({"bytes": -replaced})
                    return CachedAudio(cell, final, key)
                if source is None:
                    # Kept unstored, it still replaces the key's older audio (a put
                    # "replacing any", a render after a miss): a later get must not
                    # return what the caller replaced. Disk first, as for a stored one.
                    self._drop_older(key, deadline)
            suffix = name[len(key):]
            unstored = self._ram.path(f".{key}.{token()}{UNSTORED}{suffix}")
            _os.rename(part_path, unstored)
            return CachedAudio(cell, unstored, key, stored=False)
        except BaseException as exc:
            _lowlevel.release(cell)
            unlink_quietly(part_path)
            raise_named(exc, part_path)  # os.utime on an fd names no file
            raise

    def _drop_from_disk(self, key: str, deadline: float | None = None) -> None:
        """Remove key's disk-tier entries, older than the one about to be stored in RAM
        (under the RAM lock: RAM, then disk, as a spill takes them). One the disk tier
        cannot remove (a read-only or failing disk) stays, with a warning logged: the new
        entry is stored, and its caller gets it, not an OSError that says otherwise.
        deadline bounds the wait for the disk tier's lock: TimeoutError (ETIMEDOUT)
        naming its lock file, raised (the caller stores nothing then)."""
        disk = self._disk
        assert disk is not None
        try:
            with disk.locked(deadline=deadline):
                for suffix in ENTRY_SUFFIXES:
                    remove_or_supersede(disk, key + suffix)
        except TimeoutError:
            raise
        except OSError as exc:
            placement.logger.warning("luna_shm: could not remove the older entry of %r from "
                                     "the disk tier %s (a restart may bring it back): %s",
                                     key, disk.directory, exc)

    def _drop_older(self, key: str, deadline: float | None = None) -> None:
        """Under the RAM lock: remove key's entries of every type, older than audio of
        the key that a commit keeps unstored (it does not fit), from the disk tier, then
        from RAM; one a caller holds is superseded instead, as a commit of another type
        does (its holder reads on; no look-up takes it again). deadline bounds the wait
        for the disk tier's lock (see _drop_from_disk): past it, nothing was removed."""
        if self._disk is not None:
            self._drop_from_disk(key, deadline)
        for suffix in self._suffixes():
            remove_or_supersede(self._ram, key + suffix)

    def _foreign(self, name: str) -> bool:
        """True when something that is not a regular file (a symlink, a FIFO, a directory:
        never the cache's) has the entry name: a commit keeps its audio unstored rather
        than rename over it."""
        try:
            return not _stat.S_ISREG(_os.lstat(self._ram.path(name)).st_mode)
        except FileNotFoundError:
            return False

    def _named_size(self, name: str) -> int:
        """The size of the RAM entry name, 0 when there is none (under the lock)."""
        try:
            return _os.lstat(self._ram.path(name)).st_size
        except FileNotFoundError:
            return 0

    def put(self, key: str, data: object, samplerate: int, *,
            subtype: str | None = None, timeout: float | None = None) -> CachedAudio:
        """Store data as key's WAV entry (replacing any) and return it pinned.

        Args:
            key: see :func:`cache_key`.
            data, samplerate, subtype: as for :func:`luna_shm.write_wav`.
            timeout: seconds to wait for the cache's locks, in all, as for :meth:`stats`
                (a TTS server's put must not hang on a process stopped holding them).

        Returns:
            The entry; ``stored`` is False when it is larger than max_bytes or every
            other entry is pinned (the audio is still there until released). It
            replaces the key's older entries all the same: they leave both tiers (one a
            caller holds stays readable to it, and is never looked up again), and the
            next :meth:`get` of key is a miss.

        Raises:
            TypeError, ValueError: a bad key, data, samplerate, subtype or timeout; data
                with no frames (as for get_or_render and put_bytes, empty audio is never
                cached).
            TimeoutError: timeout passed while another process held a lock of the cache,
                ETIMEDOUT, naming its lock file: nothing is left of the put, and the
                key's older entry is as it was.
            OSError: the RAM disk refused the file; nothing is left of it.
        """
        self._check_open()
        check_key(key)
        enc = encoding.plan(data, samplerate, subtype)
        if enc.nbytes == 0:
            raise ValueError(f"data has no frames (got {_lowlevel.brief(data)}): an empty "
                             "render is never cached")
        deadline = _deadline(timeout)
        def write(fd: int, part: str) -> None:
            _lowlevel.write_wav_fd(fd, enc.spec, encoding.data_chunk(enc), part)

        part, cell = self._new_part_written(key, enc.nbytes, write, deadline)
        return self._commit(key, part, key + ".wav", cell, deadline=deadline)

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview,
                  suffix: str = ".mp3", *, timeout: float | None = None) -> CachedAudio:
        """Store encoded audio (e.g. MP3 from a cloud TTS) as key's entry and return it pinned.

        Like :meth:`put`, it replaces the key's older entries, of every type, also when
        it is too large to store (``stored`` False).

        Args:
            key: see :func:`cache_key`.
            data: the encoded file's bytes: bytes, bytearray or a memoryview (one that is
                not contiguous is stored as its bytes in order, copied once).
            suffix: one of .mp3, .ogg, .opus, .flac, .aac, .m4a, .webm.
            timeout: seconds to wait for the cache's locks, as for :meth:`put`.

        Raises:
            TypeError: key, data, suffix or timeout of a wrong type (suffix: not a str).
            ValueError: a bad key, suffix or timeout; empty data.
            TimeoutError: as for :meth:`put`: nothing is left of it, the older entry
                stays as it was.
            OSError: the RAM disk refused the file; nothing is left of it.
        """
        self._check_open()
        check_key(key)
        if not isinstance(suffix, str):
            raise TypeError(f"suffix must be a str, one of {', '.join(ENCODED_SUFFIXES)}, "
                            f"got {_lowlevel.brief(suffix)}")
        if suffix not in ENCODED_SUFFIXES:
            raise ValueError(f"suffix must be one of {', '.join(ENCODED_SUFFIXES)}, "
                             f"got {suffix!r}")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes-like, got {_lowlevel.brief(data)}")
        view = memoryview(data)
        if not view.nbytes:
            raise ValueError("data is empty: an empty render is never cached")
        deadline = _deadline(timeout)
        # A strided view (a slice with a step, a transposed array) has no flat bytes of its
        # own to cast: its bytes, in order, are copied once.
        view = (view if view.c_contiguous else memoryview(view.tobytes())).cast("B")
        def write(fd: int, part: str) -> None:
            rest = view
            while rest:
                rest = rest[_os.write(fd, rest):]

        part, cell = self._new_part_written(key, view.nbytes, write, deadline)
        return self._commit(key, part, key + suffix, cell, deadline=deadline)

    def _new_part_written(self, key: str, nbytes: int, write: Callable[[int, str], None],
                          deadline: float | None = None) -> tuple[str, _lowlevel.FdCell]:
        """A new locked partial of key that write(fd, path) filled with about nbytes:
        (its path, its fd cell). When the RAM disk is full, the cache's own unpinned
        entries make room (see _room_on_ram_disk, whose waits deadline bounds) and it is
        written once more. On failure nothing is left, and the OSError names the partial
        (ENOSPC: with the full RAM disk's hint)."""
        return self._with_room(nbytes, _functools.partial(self._ram.written_part, key, write),
                               deadline)

    def _with_room(self, nbytes: int, attempt: Callable[[], _T],
                   deadline: float | None = None) -> _T:
        """attempt(), and once more when it failed for a full RAM disk (ENOSPC) and the
        cache's own unpinned entries made room for nbytes (see _room_on_ram_disk, whose
        waits deadline bounds)."""
        try:
            return attempt()
        except OSError as exc:
            if exc.errno != _errno.ENOSPC or not self._room_on_ram_disk(nbytes, deadline):
                raise
        return attempt()

    def _room_on_ram_disk(self, nbytes: int, deadline: float | None = None) -> bool:
        """Evict the least recently used unpinned entries (spilling them to the disk tier)
        until the file system under the cache has room for nbytes more; True when it has.

        max_bytes bounds the cache, not the RAM disk: with the default 256 MiB in a
        container whose /dev/shm is 64 MB, the cache's own entries fill it, and without
        this every later put would fail with ENOSPC while nothing is ever evicted.
        deadline (a call's with a timeout) bounds the waits for the locks of both tiers:
        TimeoutError (ETIMEDOUT) naming the lock file."""
        tier = self._ram
        needed = nbytes + ROOM_MARGIN

        def free() -> int:
            return _lowlevel.room_on(tier.directory)

        def room() -> bool:
            return free() >= needed

        with tier.locked(deadline=deadline):
            tier.sweep()  # unstored audio a killed process never released, too
            entries = sorted(tier.entries(), key=lambda item: item[1].st_atime_ns)
            if free() + sum(st.st_blocks * 512 for _, st in entries) < needed:
                return False  # even all of them would not do: keep them
            for name, _ in entries:
                if room():
                    break
                self._evict(name, deadline)
            tier.set_bytes(sum(st.st_size for _, st in tier.entries()))
            return room()

    # ---- single-flight rendering --------------------------------------------------

    def live_path(self, key: str) -> str | None:
        """The WAV of key being rendered now (valid after every chunk), or None.

        :meth:`follow` plays it while it renders; so does ``follow_wav`` of this path.
        """
        self._check_open()
        path = self._ram.path(check_key(key) + LIVE)
        return path if _os.path.exists(path) else None

    def follow(self, key: str, *, timeout: float | None = None) -> Iterator[np.ndarray]:
        """The audio of key as soon as it exists, in blocks of frames, in order.

        A stored entry gives its samples at once (one block, a copy). An entry that
        another caller (in any process) is rendering now is followed as it grows:
        each block as soon as the renderer wrote it (:func:`luna_shm.follow_wav` of
        the in-flight WAV), so a second caller of a sentence plays it while the first
        one still renders it.

        Args:
            key: a key from :func:`cache_key`.
            timeout: seconds to wait for the render's next block, or for a stored
                entry's locks as :meth:`get` (a number >= 0; None or infinity: no limit).

        Raises:
            TypeError, ValueError: a bad key or timeout (raised by the call itself).
            KeyError: key is neither stored nor being rendered now (at the first block).
            ValueError: the entry is encoded audio (see :meth:`put_bytes`).
            StreamAbandoned: the render failed or its process died (a WavError): the
                next :meth:`get_or_render` renders it again. Also when the caller whose
                render file was followed gave way before rendering anything (another
                caller had stored the key meanwhile): the next look-up finds the entry.
            TimeoutError: no new block for timeout seconds, or a lock held past it
                (see :meth:`get`).
            RuntimeError: called for key from inside key's own render, in the thread
                that runs it (the stream would wait for itself for ever).
        """
        self._check_open()
        check_key(key)
        return self._follow(key, formats.check_timeout(timeout))

    def _follow(self, key: str, limit: float | None) -> Iterator[np.ndarray]:
        # A render can end between the two looks (its file is renamed into the entry):
        # look again; a third time is another render, which we follow. One call counts
        # one miss at most (its first look that finds no entry), then a hit if a later
        # look finds one, as a caller that waits for a render does.
        missed = False
        for _ in range(3):
            entry = self._find(key, None if limit is None else _time.monotonic() + limit)
            if entry is not None:
                self._count("hits")
                with entry:
                    yield entry.array.copy()
                return
            if not missed:
                self._count("misses")
                missed = True
            live = self.live_path(key)
            if live is None:
                continue
            _check_not_own_render(key, live, "follow")
            cell = _lowlevel.fd_cell()  # a child must not keep it (nor its lock)
            fd = open_regular(live, cell)
            if fd is None:
                continue
            through = f"/proc/self/fd/{fd}"
            try:
                # Through the open file: the renderer's rename into the entry, or the
                # removal of a failed render, does not take it away from the follower.
                yield from follow_wav(through, timeout=limit)
            except (OSError, WavError) as exc:
                _name_the_live_file(exc, through, live)
                raise
            finally:
                _lowlevel.release(cell)
            return
        raise KeyError(f"{key!r} is neither in the cache nor being rendered")

    def get_or_render(self, key: str, render: Callable[[WavWriter], object], *,
                      samplerate: int, channels: int = 1, dtype: Any = "int16",
                      timeout: float | None = None) -> CachedAudio:
        """The entry of key; on a miss, render it once, whatever the number of callers.

        The first caller (in any process) calls ``render(writer)``, which writes the
        audio into a :class:`WavWriter` in the cache directory; the others wait
        for it (no CPU: a flock the kernel grants when the renderer ends) and get
        the same entry. A render that raises, writes no frames or aborts the writer is
        never stored: the renderer gets its exception, its waiters a
        :class:`RenderError` (a waiter that wakes only after the next render of the key
        began waits for that one).
        When the renderer's process dies, one waiter renders again.

        Args:
            key: see :func:`cache_key`.
            render: called with the writer; its return value is ignored. It may close
                the writer (``with writer:``): what it wrote is stored all the same. One
                that aborts it (``writer.abort()``, or a ``with writer:`` block left by
                an exception it then catches) failed: nothing is stored, as when it
                raises (the caller gets ``ValueError``). A
                child it forks that leaves it (``sys.exit``, an exception) leaves the
                render to the parent; one that returns from it gets ``RuntimeError``.
            samplerate, channels, dtype: the writer's format.
            timeout: seconds to wait for another caller's render, and for the locks a
                hit takes (see :meth:`get`), in all (an int or float, numpy ones too,
                >= 0; 0 does not wait); None or infinity waits as long as it runs. A
                caller that renders also bounds each wait for the cache's locks after
                its render began (room for its chunks, the store) by what was left of
                timeout then: the render's own time is not a wait.

        Returns:
            The entry, pinned (``stored`` False when it was too large to keep).

        Raises:
            TypeError, ValueError: a bad key, render (not callable), samplerate,
                channels, dtype or timeout (NaN is refused), checked before anything else.
                ValueError too when this caller's render wrote no frames or aborted its
                writer (nothing is stored).
            RenderError: the render this caller waited for failed.
            WavError: the stored entry is not a WAV we can read (another process
                truncated or overwrote it) and another caller holds it; unheld, it
                is removed (with a warning logged) and the key rendered again.
            TimeoutError: timeout passed while another caller rendered, or held the
                entry's lock (a renderer stopped while it stored the entry), or another
                process held the file this call needed (a sweep or a removal stopped
                while it held a render's unstored audio, or this caller's new render
                file), or the cache's lock when this caller's render was to be stored
                (the render failed then, as its waiters learn), ETIMEDOUT, naming the
                file.
            OSError: the RAM disk refused the entry.
            RuntimeError: called for key from inside key's own render, in the thread
                that runs it (it would wait for itself for ever); the render goes on
                (this error is raised into it).
            Whatever ``render`` raised, in the caller that ran it.
        """
        self._check_open()
        check_key(key)
        # Checked up front, hit or miss: a bad argument never depends on the cache's state.
        if not callable(render):
            raise TypeError(f"render must be a callable taking the WavWriter, got "
                            f"{_lowlevel.brief(render)}")
        formats.check_samplerate(samplerate)
        formats.check_channels(channels)
        formats.check_dtype(dtype)
        deadline = _deadline(timeout)
        live = self._ram.path(key + LIVE)
        while True:
            found = self._get(key, deadline)
            if found is not None and self._readable(found, deadline):
                return found
            writer, part = self._start_render(key, samplerate, channels, dtype, deadline)
            if writer is not None:
                return self._render(key, writer, part, render, deadline)
            _check_not_own_render(key, live, "get_or_render")
            outcome = self._wait(key, deadline)
            if outcome is not None:
                return outcome
            # Every pass, not only a wait, is bounded: whatever makes the loop go round
            # again (a render that keeps ending before we wait) never outlasts timeout.
            # Checked after a pass, not before the first: timeout=0 still looks (a hit,
            # or a render of our own: neither waits for anyone).
            if deadline is not None and _time.monotonic() > deadline:
                raise TimeoutError(_errno.ETIMEDOUT, "timed out waiting for another caller "
                                   f"to render {key!r}", live)

    def _readable(self, entry: CachedAudio, deadline: float | None) -> bool:
        """True when entry (a hit) can be read. A WAV entry that does not parse (another
        process truncated or overwrote it) is released and removed, and False returned
        for the caller to render the key again; when it cannot be removed (another
        caller holds it), its WavError is raised."""
        if not entry.is_wav:
            return True
        try:
            entry._load()  # the header parsed and the samples mapped, as .array would
        except WavError as exc:
            # Removed only while its name still names this very file (see remove_stale):
            # a fresh entry another process stored meanwhile is looked up, not removed.
            # Its disk-tier copy, if any, goes with the commit of the render that follows.
            held = _lowlevel.fd_cell()  # shares the entry's flock
            _lowlevel.dup(entry.fileno(), cell=held, filename=entry.path)
            entry.release()
            try:
                if remove_stale(self._ram, _os.path.basename(entry.path), held[0],
                                deadline):
                    placement.logger.warning("luna_shm: removed the unreadable cache entry "
                                             "%s (%s); rendering it again", entry.path, exc)
                    return False
                if _newfile.still_named(held[0], entry.path):
                    raise  # another caller holds it
                return False  # replaced (or removed) by another process: look again
            finally:
                _lowlevel.release(held)
        return True

    def _start_render(self, key: str, samplerate: int, channels: int, dtype: Any,
                      deadline: float | None = None) -> tuple[RenderWriter | None, str]:
        """Become key's renderer: a writer whose file is now key.live, exclusively locked.
        (None, "") when another live renderer has it. deadline bounds the waits of the
        room made on a full RAM disk for its file (see _with_room), and for the lock of
        that file: past it, TimeoutError naming the file, which is removed."""
        self._ram.check_writable()  # a cache opened read-only renders nothing
        live = self._ram.path(key + LIVE)
        for _ in range(8):
            part = self._ram.part_path(key)
            writer: RenderWriter | None = self._with_room(
                0, _functools.partial(RenderWriter, part, samplerate, channels, dtype),
                deadline)
            assert writer is not None
            try:
                # Nobody else knows the partial's name: the upgrade to exclusive is
                # immediate (unless a sweep holds it for a moment: then we wait, until
                # deadline at most; past it, the partial goes, in the finally below).
                lock_by(writer.fileno(), exclusive=True, deadline=deadline,
                        what=f"a sweep in another process to let go of the new render "
                        f"file of {key!r}", path=part)
                while True:
                    try:
                        _os.link(part, live)  # the election: one link wins
                    except FileNotFoundError:
                        # flock's upgrade drops the shared lock first: a sweep in another
                        # process took the partial in that moment. Make a new one.
                        break
                    except FileExistsError:
                        if stale_live(live):
                            continue  # its renderer died: link again
                        return None, ""
                    _os.unlink(part)
                    writer.path = live
                    if self._present(key):
                        # A renderer committed between our miss and our link (its rename
                        # took the .live name away): no second render, go and get it.
                        unlink_quietly(live)
                        return None, ""
                    done, writer = writer, None
                    return done, live
            finally:
                if writer is not None:
                    # Unlinked before the close drops its flock: a sweep never finds
                    # an unlocked partial of ours that we are about to remove. Its
                    # stream ends as failed, not finished: a follower may have opened it
                    # as key.live (between our link and _present), and a finished stream
                    # of no frames would be the audio of key to it (silence, "done").
                    unlink_quietly(part)
                    writer.abort()
        raise OSError(_errno.EAGAIN, "the render file kept vanishing", live)  # pragma: no cover

    def _present(self, key: str) -> bool:
        """True when key has a committed RAM entry that get() would hand out: a regular
        file, not expired (an expired one that a caller still holds cannot be removed,
        and a render replaces it, as a put would)."""
        now = _time.time()
        for suffix in self._suffixes():
            try:
                st = _os.lstat(self._ram.path(key + suffix))
            except FileNotFoundError:
                continue
            if (_stat.S_ISREG(st.st_mode) and not self._expired(st.st_mtime, now)
                    and _stat.S_IMODE(st.st_mode) != SUPERSEDED):
                return True
        return False

    def _expired(self, mtime: float, now: float) -> bool:
        """True when an entry whose mtime (seconds) is mtime was stored more than ttl
        seconds before now (its mtime is the TTL clock)."""
        return self.ttl is not None and now - mtime > self.ttl

    def _render(self, key: str, writer: RenderWriter, live: str,
                render: Callable[[WavWriter], object], deadline: float | None = None
                ) -> CachedAudio:
        """Run render into writer (whose file is key.live, exclusively locked), store the
        result, then let the waiters go: by then the entry, or the outcome, is there.

        deadline (the caller's timeout) bounds the waits for the cache's locks that come
        after the render began: the room made for its chunks, the commit. The render's
        own time is the caller's code, not a wait, so each of those waits gets what was
        left of the timeout when the render began (past it, TimeoutError naming the lock
        file: the render fails, as for any failed commit).

        The render may close the writer (``with writer:`` is common): the cache takes what
        it needs before calling it, a second descriptor of the same open file (pin), which
        shares the writer's flock and keeps it after the writer closes. So the waiters
        sleep on until the entry is stored (or the render failed), and the entry stays
        pinned for our caller."""
        self._count("renders")
        owner = _resource.current_pid
        ino = _lowlevel.fstat(writer.fileno(), writer.path).st_ino
        # A note an earlier render of key left goes now, before a waiter can read it: a
        # filesystem that reuses inode numbers (ext4) may have given our file the number
        # it names. Late waiters of that render wait for this one instead.
        note = self._ram.path(key + OUTCOME)
        if note_owner(note) is not None:  # a note; anything else of that name is not ours
            unlink_quietly(note)
        left = None if deadline is None else max(0.0, deadline - _time.monotonic())

        def wait_until() -> float | None:
            return None if left is None else _time.monotonic() + left

        writer.make_room = lambda nbytes: self._room_on_ram_disk(nbytes, wait_until())
        reserved = self._reserve_outcome()
        # A helper the render forks (a multiprocessing worker of the engine) must not keep
        # the exclusive flock: the waiters would sleep while it lives, after this process
        # failed or died (the writer lets go of its own fd at a fork). A cell: a forked
        # child closes its copy at once, from the moment the dup fills it.
        pin = _lowlevel.fd_cell()
        try:
            _lowlevel.dup(writer.fileno(), cell=pin, filename=live)  # EMFILE names it
            writer.rendering = True
            own = (owner, live)
            _own_renders().add(own)
            try:
                render(writer)
            finally:
                _own_renders().discard(own)
                writer.rendering = False
            if _resource.current_pid != owner:
                raise RuntimeError(
                    f"a child forked inside the render of {key!r} returned from it: the "
                    f"render belongs to process {owner}; end the child with os._exit()")
            if writer.aborted:
                # Its stream says "failed" (to its followers, and in the file's header
                # for ever): stored, it would be an entry that follow_wav refuses, and
                # the followers of the render would have been told it failed.
                raise ValueError(f"the render of {key!r} aborted its writer (abort(), or "
                                 "a `with writer:` block left by an exception): not cached")
            if writer.frames == 0:  # after a close too: the frames its file holds
                raise ValueError(f"the render of {key!r} wrote no frames: not cached")
            entry = self._commit(key, live, key + ".wav", pin, deadline=wait_until())
            if not entry.stored:
                self._write_outcome(key, ino, "unstored " + entry.path, reserved)
        except BaseException as exc:
            if _resource.current_pid != owner:
                # A child forked inside render that leaves it (sys.exit unwinds its copy
                # of our stack): the render, its file, its note and its waiters are the
                # parent's, which goes on rendering.
                raise
            self._write_outcome(key, ino, f"{type(exc).__name__}: {exc}", reserved)
            # Our file, through the pin, or the writer when the dup failed (a failed
            # commit released the pin, and removed the file, itself).
            held = pin[0] if pin[0] >= 0 else -1 if writer.closed else writer.fileno()
            if held >= 0 and _newfile.still_named(held, live):
                unlink_quietly(live)
            # Its followers (AudioCache.follow) raise StreamAbandoned, after a render that
            # closed the writer too (its close left the stream live, see RenderWriter).
            writer.abort()
            _lowlevel.release(pin)  # the last descriptor: the waiters wake to the note
            raise
        finally:
            if reserved is not None:  # no note was written: it goes, unnamed
                _lowlevel.release(reserved)
        # Exclusive -> shared on the open file: the waiters wake now, and find the entry.
        _lowlevel.lock(entry.fileno(), exclusive=False, filename=entry.path)
        writer.close()
        return entry

    def _reserve_outcome(self) -> _lowlevel.FdCell | None:
        """An unnamed (O_TMPFILE) file in the RAM tier for the render's outcome note, its
        first page allocated before the render begins: a render that fails because the
        RAM disk filled up can still tell its waiters (else they found no note, and
        rendered the key again instead of raising RenderError). Unnamed, it goes with a
        render that needs no note, and with a renderer that is killed: nothing is left
        to sweep. It costs a miss about 25 us (an open, a flock, an fallocate and a
        close), against the render's own milliseconds. None where there is no room even
        now, or no O_TMPFILE: the note is then tried at the end, as _write_outcome does
        without one."""
        cell = _lowlevel.fd_cell()
        try:
            _lowlevel.create_unnamed_locked(self._ram.directory, cell=cell)
            _lowlevel.reserve(cell[0], _OUTCOME_RESERVED, self._ram.directory)
        except OSError:
            _lowlevel.release(cell)
            return None
        except BaseException:
            _lowlevel.release(cell)
            raise
        return cell

    def _write_outcome(self, key: str, ino: int, text: str,
                       reserved: _lowlevel.FdCell | None) -> None:
        """Leave key's outcome note for the waiters of the render of file ino: written
        into reserved (see _reserve_outcome), which is released, or into a new file when
        there is none. On a RAM disk too full for the whole text, what fits in the
        reserved page is written; when nothing can be, the waiters render again."""
        path = self._ram.path(key + OUTCOME)
        data = f"{ino} {_os.getpid()} {text}".encode("utf-8", "replace")
        unnamed = reserved is not None
        if reserved is not None:
            part = self._ram.part_path(key)  # the name it is linked to
        else:
            try:
                part, reserved = self._ram.new_part(key)
            except OSError:
                return
        try:
            try:
                written = _os.pwrite(reserved[0], data, 0)
            except OSError:  # past the reserved page, on a full RAM disk
                written = _os.pwrite(reserved[0], data[:_OUTCOME_RESERVED], 0)
            # What was written (a full RAM disk cuts it short), in whole characters; the
            # reserve's zeros past it are no part of it.
            data = data[:written].decode("utf-8", "ignore").encode("utf-8")
            _os.ftruncate(reserved[0], len(data))
            if unnamed:
                _lowlevel.link_unnamed(reserved[0], part)
            _os.rename(part, path)
        except OSError:
            unlink_quietly(part)
        finally:
            _lowlevel.release(reserved)

    def _wait(self, key: str, deadline: float | None) -> CachedAudio | None:
        """Wait for key's renderer: None to look again (it stored the entry, died, or was
        done before we looked), unstored audio, or RenderError when the render failed.
        deadline bounds every wait for a lock (the render's file, then its unstored
        audio): TimeoutError (ETIMEDOUT) naming the file."""
        live = self._ram.path(key + LIVE)
        cell = _lowlevel.fd_cell()
        fd = open_regular(live, cell)
        if fd is None:
            try:
                regular = _stat.S_ISREG(_os.lstat(live).st_mode)
            except FileNotFoundError:
                return None
            if regular:
                return None  # a new render's, since our open: look again
        if fd is None or not is_render_file(fd):
            # Not a render's file, so no render ends it: waiting (or electing again)
            # would go on for ever. Never ours to remove either.
            _lowlevel.release(cell)
            raise FileExistsError(_errno.EEXIST, f"cannot render {key!r}: a file that is "
                                  "not the cache's has the name of its render", live)
        try:
            ino = _lowlevel.fstat(fd, live).st_ino
            # A caller that wants audio before the render ends uses follow() instead.
            # The renderer holds an exclusive flock until the entry is stored (or it
            # failed, or died): the kernel grants our shared one then, no polling.
            lock_by(fd, exclusive=False, deadline=deadline,
                    what=f"another caller to render {key!r}", path=live)
            if _newfile.still_named(fd, live):
                # A renderer that ends renames or removes its .live file before it
                # lets go of the lock: still named, it died. Remove it (exclusive, so
                # that no other waiter is between its lock and this check) and let
                # the loop elect a new renderer. The other waiters hold it for a
                # moment only, unless one is stopped there: deadline bounds that too.
                lock_by(fd, exclusive=True, deadline=deadline,
                        what=f"the other waiters of the dead render of {key!r} to let "
                        "go of its file", path=live)
                remove_dead_live(fd, live)
                return None
            outcome = self._read_outcome(key, ino)
        finally:
            _lowlevel.release(cell)
        if outcome is None:
            return None
        pid, text = outcome
        if text.startswith("unstored "):
            path = text[len("unstored "):]
            held = _lowlevel.fd_cell()  # flocked below: never a child's
            if open_regular(path, held) is None:
                return None
            try:
                # Its renderer holds it shared (as we will) until it lets go of it; then
                # a sweep, or that release's own removal of audio no one holds, takes it
                # exclusively for a moment, unless stopped there: deadline bounds that.
                lock_by(held[0], exclusive=False, deadline=deadline,
                        what=f"the unstored audio of the render of {key!r} (another "
                        "process holds it)", path=path)
                # Opened but not yet locked, it was no one's: its removal may have come
                # first. Audio whose path names nothing is no answer (a player given
                # the path fails): look again, which renders the key here.
                named = _newfile.still_named(held[0], path)
            except BaseException:
                _lowlevel.release(held)
                raise
            if not named:
                _lowlevel.release(held)
                return None
            return CachedAudio(held, path, key, stored=False)
        raise RenderError(f"rendering {key!r} failed in process {pid}: {text}")

    def _read_outcome(self, key: str, ino: int) -> tuple[str, str] | None:
        """(pid, text) that the renderer of the file ino left for its waiters, or None.
        The waiter holds that file open, so no later file has its inode number; a note
        of an earlier file with that number was removed when this file's render began
        (or, if it died first, with its .live name)."""
        head = regular_head(self._ram.path(key + OUTCOME), 1 << 16)  # never a FIFO's open
        try:
            owner, pid, text = (head or b"").decode("utf-8").split(" ", 2)
        except ValueError:
            return None
        return (pid, text) if owner == str(ino) else None

    # ---- removal and stats ---------------------------------------------------------

    def discard(self, key: str, *, timeout: float | None = None) -> bool:
        """Remove key's entry from both tiers unless it is pinned; True if one was removed.

        Args:
            key: see :func:`cache_key`.
            timeout: seconds to wait for the cache's locks, as for :meth:`stats`.

        Raises:
            TypeError, ValueError: key is not a key (see :func:`cache_key`), or a bad
                timeout.
            TimeoutError: timeout passed while another process held a lock of the cache,
                ETIMEDOUT, naming its lock file; nothing was removed (both tiers' locks
                are taken before anything is: a RAM entry gone while its disk copy stays
                would come back at the next get).
            OSError: an entry could not be opened to take its lock (EMFILE, ...), naming
                it (never a False as if it were pinned).
        """
        self._check_open()
        check_key(key)
        deadline = _deadline(timeout)
        with self._ram.locked(deadline=deadline):  # RAM, then disk, as a spill takes them
            if self._disk is None:
                return self._discard_from(self._ram, key)
            with self._disk.locked(deadline=deadline):
                in_ram = self._discard_from(self._ram, key)
                return self._discard_from(self._disk, key) or in_ram

    @staticmethod
    def _discard_from(tier: Tier, key: str) -> bool:
        """Remove key's unpinned entries of every type from tier (under its lock); True
        if one was removed."""
        removed = False
        for suffix in ENTRY_SUFFIXES:
            removed |= tier.remove_if_unpinned(key + suffix)
        return removed

    def clear(self, *, timeout: float | None = None) -> int:
        """Remove every unpinned entry (both tiers) and leftovers; return how many entries.

        Args:
            timeout: seconds to wait for the cache's locks, as for :meth:`stats`.

        Raises:
            TimeoutError: timeout passed while another process held a lock of the cache,
                ETIMEDOUT, naming its lock file (the entries removed before stay removed).
        """
        self._check_open()
        return self._clear(_deadline(timeout))

    def _clear(self, deadline: float | None) -> int:
        """clear(), its waits for the locks bounded by deadline (None: no bound)."""
        removed = 0
        for tier in (self._ram, self._disk):
            if tier is None:
                continue
            with tier.locked(deadline=deadline):
                for name, _ in tier.entries():
                    removed += tier.remove_if_unpinned(name)
                tier.sweep()
        return removed

    def destroy(self, *, timeout: float | None = None) -> None:
        """Clear the cache and remove its directories (when no entry is pinned), then close.

        Meant for when no other process uses the cache (tests, examples, uninstall).
        It removes only what it knows as the cache's own: entries, the notes that failed
        renders leave for their waiters, leftovers no process holds, and the lock file.

        Args:
            timeout: seconds to wait for the cache's locks, in all, as for :meth:`stats`.

        Raises:
            TypeError, ValueError: a bad timeout.
            TimeoutError: timeout passed while another process held a lock of the cache
                (or another thread's call held it, waiting for such a process), ETIMEDOUT,
                naming its lock file: the cache stays open (the entries removed before
                stay removed, as for :meth:`clear`), unless a process or a thread took a
                lock after the directories were found empty (see below).
            OSError: ENOTEMPTY when an entry is still pinned, a render or a write is in
                flight (in any process), or a directory holds a file that is not the
                cache's: the message names them, nothing but unpinned entries was
                removed and the cache stays open (release and call again). Any other
                OSError, or a process or thread that uses the cache meanwhile, leaves
                the cache closed: the directories may then still be there. A call of
                another thread that holds a lock of the cache past timeout then closes
                it as it lets go of the lock, as for :meth:`close` (``closed`` is False
                until then).
            ValueError: the cache is closed.
        """
        self._check_open()
        deadline = _deadline(timeout)
        self._clear(deadline)
        tiers = [tier for tier in (self._ram, self._disk) if tier is not None]
        for tier in tiers:
            with tier.locked(deadline=deadline):
                _, kept = tier.leftovers()
            if kept:
                shown = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3
                                               else "")
                raise OSError(_errno.ENOTEMPTY, f"cannot destroy the {tier.what} "
                              f"{self.name!r}: {shown} (the cache stays open)", tier.directory)
        # Nothing is held: from here on the cache ends closed, whatever fails.
        self._finalizer.detach()
        try:
            for tier in tiers:
                with tier.locked(deadline=deadline):
                    notes, _ = tier.leftovers()
                    for note in notes:
                        unlink_quietly(tier.path(note))
                    unlink_quietly(tier.path(LOCK_NAME))
                # Closed before the rmdir (an open file that was unlinked can stay in
                # its directory: NFS keeps it as .nfsXXXX until it is closed), under the
                # mutex, which another thread's call may have taken since and hold past
                # deadline (waiting, with no timeout of its own, for a stopped process).
                if not tier.close(deadline=deadline):
                    raise TimeoutError(_errno.ETIMEDOUT, f"timed out waiting for the "
                                       f"{tier.what}'s lock (another thread holds it)",
                                       tier.path(LOCK_NAME))
                _os.rmdir(tier.directory)
        finally:
            # Bounded as close() is: a tier that such a call holds is closed as it lets
            # go of it (see _close_tiers).
            self._close_tiers(tiers, deadline)

    def stats(self, *, timeout: float | None = None) -> CacheStats:
        """Entries and bytes now (a consistent view, under the lock) and the shared counters.

        Args:
            timeout: seconds to wait for the cache's locks, in all (an int or float, numpy
                ones too, >= 0; 0 does not wait); None or infinity waits as long as it
                takes. Another process holds them for an instant (a commit, an
                eviction); one stopped or stuck there would keep a monitoring call
                waiting for ever.

        Raises:
            TypeError, ValueError: a bad timeout (NaN is refused).
            TimeoutError: timeout passed while another process held a lock of the cache,
                ETIMEDOUT, naming its lock file.
        """
        self._check_open()
        deadline = _deadline(timeout)
        with self._ram.locked(deadline=deadline):
            totals = self._flush_counts()
            entries = self._ram.entries()
            pinned = sum(1 for name, _ in entries if is_pinned(self._ram.path(name)))
        disk_entries: list[tuple[str, _os.stat_result]] = []
        if self._disk is not None:
            with self._disk.locked(deadline=deadline):
                disk_entries = self._disk.entries()
        return CacheStats(
            entries=len(entries), bytes=sum(st.st_size for _, st in entries),
            max_bytes=self.max_bytes, pinned=pinned,
            disk_entries=len(disk_entries), disk_bytes=sum(st.st_size for _, st in disk_entries),
            **{k: totals.get(k, 0) for k in COUNTERS if k not in _NOT_STATS},
        )

    def entries(self, *, timeout: float | None = None) -> list[tuple[str, str, _os.stat_result]]:
        """(key, path, lstat) of each RAM entry, least recently used first.

        Args:
            timeout: seconds to wait for the cache's lock, as for :meth:`stats`.

        Raises:
            TimeoutError: timeout passed while another process held the cache's lock,
                ETIMEDOUT, naming the lock file.
        """
        self._check_open()
        deadline = _deadline(timeout)
        with self._ram.locked(deadline=deadline):
            entries = self._ram.entries()
        entries.sort(key=lambda item: item[1].st_atime_ns)
        return [(name.rpartition(".")[0], self._ram.path(name), st) for name, st in entries]

    def close(self, *, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Write this process's counters out and close the lock files; again does nothing.
        Only counts to write out make it take the cache's lock (and wait for it).

        Args:
            timeout: seconds to wait for the cache's lock to write the counts out (an int
                or float, numpy ones too, >= 0; 0 does not wait); None or infinity waits
                as long as it takes. Past it, the cache closes all the same and this
                process's counts not yet written out (hits, misses... since its last
                locked call) are lost, with a warning logged naming the lock file: they
                are statistics, the entries are all stored already, and a daemon's
                shutdown must not hang on a process stopped or stuck holding the lock.
                The default (10 s) is also what the end of ``with AudioCache(...)``
                waits, which can pass no timeout. It bounds the wait for another
                thread's call that holds the lock too (one waiting, with no timeout of
                its own, for a stopped process): past it, the close is left to that call,
                and the cache closes as it lets go of the lock (``closed`` is False until
                then; a call of that thread that goes on to take a lock raises
                ``ValueError``, closed).

        Raises:
            TypeError, ValueError: a bad timeout (the cache stays open).
            OSError: the counts could not be written (the cache is closed all the same).

        Safe in a signal handler (a TTS daemon's SIGTERM handler): one that interrupted
        this very thread inside a call of the cache that holds its lock can neither take
        that lock (it would wait for itself for ever) nor close the lock file under the
        call (its flock would go with it). It returns at once, and the cache closes as
        that call lets go of the lock, counters written out (``closed`` is False until
        then; a failure to write them is logged, not raised into that call). A handler
        that then ends the process with ``os._exit()`` loses this process's counts not
        yet written out; the entries are all on disk already.
        """
        deadline = _deadline(timeout)  # first: a bad timeout leaves the cache as it was
        ram = getattr(self, "_ram", None)
        if ram is None or ram.lock_fd < 0:
            return
        tiers = [ram] if self._disk is None else [ram, self._disk]
        held = [tier for tier in tiers if tier.held_here()]
        if held:  # a handler inside this thread's locked section: see the docstring
            for tier in held:  # the inner lock (the disk's) goes first, then the RAM's
                tier.close_after = self._close_after_handler
            return
        self._finalizer.detach()
        timed_out: TimeoutError | None = None
        try:
            # Only counts to write out take the lock: with none (a monitoring process,
            # `luna-shm cache`), a process stopped holding it never keeps a close waiting.
            if _os.getpid() == ram.pid and self._counts_pending() and ram.in_place():
                try:
                    with ram.locked(deadline=deadline):
                        self._flush_counts()
                except TimeoutError as exc:
                    timed_out = exc
                except ValueError:
                    if not self.closed:
                        raise
                    # another thread closed it meanwhile
        finally:
            self._close_tiers(tiers, deadline)
        if timed_out is not None and self.closed:  # else handed over: they go out then
            with self._counts_lock:
                lost = ", ".join(f"{name}={n}" for name, n in self._counts.items() if n)
            placement.logger.warning("luna_shm: AudioCache %r closed without writing out "
                                     "this process's counts (%s): %s", self.name, lost,
                                     timed_out)

    def _close_tiers(self, tiers: list[Tier], deadline: float | None) -> None:
        """Close the tiers' lock files, in order, each under its mutex (see Tier.close).
        A tier whose mutex another thread holds past deadline (its call waits for a
        process stopped holding the lock) is left open, with the tiers after it (that
        call may go on to them): the close is handed to that tier's next holder, which
        makes it as it lets go (close_after), or made here if the mutex came free in the
        meantime."""
        for tier in tiers:
            if tier.close(deadline=deadline):
                continue
            tier.close_after = self._close_after_handler
            # The holder may have let go between our wait and the line above, and read
            # close_after before we set it: then the mutex is free now (or its next
            # holder reads close_after as it lets go).
            if not tier.close(deadline=_time.monotonic()):
                return

    def _close_after_handler(self) -> None:
        """The close a signal handler asked for (see close), made as the call it
        interrupted lets go of a lock: the close happens once no lock is held. Its
        failure to write the counters out is logged: raised, it would replace what the
        interrupted call returns, and that call did what it was asked."""
        try:
            self.close()
        except OSError as exc:
            placement.logger.warning("luna_shm: AudioCache %r closed without writing its "
                                     "counters out: %s", self.name, exc)

    def __enter__(self) -> AudioCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AudioCache {self.name!r} in {self.directory!r}, max {self.max_bytes} bytes>"


def _name_the_live_file(exc: OSError | WavError, through: str, live: str) -> None:
    """Raise exc again naming the .live file live where it names through, the
    /proc/self/fd path that follow() reads the render by (a number that means nothing to
    the caller, and is closed by the time it sees the error); else return, for the
    caller to re-raise exc as it is."""
    if isinstance(exc, OSError):
        if exc.filename != through:
            return
        named: BaseException = type(exc)(exc.errno, exc.strerror, live)
    else:
        text = str(exc)
        if not text.startswith(through):
            return
        named = type(exc)(live + text[len(through):])
    raise named.with_traceback(exc.__traceback__) from None


def _check_not_the_ram_dir(disk_dir: str, ram_dir: str) -> None:
    """ValueError naming disk_dir when it is the RAM dir itself (however named): the two
    tiers would be one directory with one lock file, which the first spill, holding the
    RAM tier's flock, would wait for through its second open for ever."""
    try:
        disk, ram = _os.stat(disk_dir), _os.stat(ram_dir)
    except OSError:
        return  # a missing disk_dir is reported by the tier that opens it
    if (disk.st_dev, disk.st_ino) == (ram.st_dev, ram.st_ino):
        raise ValueError(f"disk_dir must be another directory than the RAM dir {ram_dir!r} "
                         f"(the cache's first tier), got {disk_dir!r}")
