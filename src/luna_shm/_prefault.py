"""The prefault reserve: unnamed files prepared in advance for ``create_wav_buffer``.

Why: a new tmpfs page is allocated and zeroed when it is first touched, and
through a mapping that costs about three times a writev of the same bytes
(Linux 6.18; the measurements are in benchmarks/profile_notes.md). Even a file
whose pages were all written once costs 0.5 us a page to map with MAP_POPULATE.
So the reserve keeps files whose pages are written *and* mapped, populated: a
call only names the file, cuts it to its length and writes the header.

Design, in the order a call meets it:

- Off until :func:`configure` turns it on (``prefault_wav_buffers``): the reserve
  holds RAM and a thread, which a library must not start behind a user's back.
- Files are kept per *key*: the directory (None for memfd buffers) and a size
  class (the length rounded up by at most 1/8, :func:`size_class`). A call takes
  a file of its key and cuts it to its exact length, the mapping's guarded
  range and view first (no guarded range of ours ever reaches past its file's
  end, which the SIGBUS guard would take for a cut); it never waits.
- Every call (hit or miss) marks its key as recently asked for and, once the
  buffer is made, wakes the refill thread, which waits 1 ms (the caller fills
  its buffer meanwhile) and prepares files (two C calls each, without the GIL)
  until every recent key holds ``per_size`` files,
  within ``max_bytes`` in all: the least recently asked keys give up theirs first.
- A RAM disk with less free space than twice a file's size gets no file from
  the thread, and every file is given back when a create lacks the space or
  fds (:func:`make_room`, :func:`retry_if_short`, used by the one creation
  owner, ``_newfile``): the reserve never makes a create fail that would succeed.
- Fork: the child starts with the reserve off, closes its copies of the
  parent's files and unmaps its copies of their mappings (the parent's files,
  names, mappings and flocks are untouched); the
  refill thread does not exist there. The before-fork hook waits for the file
  being prepared (so none is half-registered at the fork), for at most a second.
"""

from __future__ import annotations

import atexit as _atexit
import errno as _errno
import logging as _logging
import os as _os
import threading as _threading
import time as _time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from luna_shm import _lowlevel, placement

# The memfd name of anonymous buffers (as /proc/<pid>/fd/<n> shows it).
MEMFD_NAME = f"{placement.AUDIO_PREFIX}buffer"

_T = TypeVar("_T")

# What a create may run short of while the reserve holds it: RAM-disk space or memory
# (its files' pages), file descriptors (one per file).
SHORTAGE_ERRNOS = frozenset(
    {_errno.ENOSPC, _errno.EDQUOT, _errno.ENOMEM, _errno.EMFILE, _errno.ENFILE})

# Key of a kept file: (directory or None for a memfd, size class in bytes).
_Key = tuple[str | None, int]

_PAGE = _os.sysconf("SC_PAGESIZE")

# How long the refill thread waits after being woken before it prepares a file.
_SETTLE_SECONDS = 0.001

# The longest a create that lacks room waits for the file being prepared (a few ms at most
# unless the refill thread waits for a lock the create's caller holds).
_PREPARATION_WAIT = 1.0

# How many recently asked keys are remembered (those holding files are never forgotten).
_MAX_KEYS = 64


class Prepared(NamedTuple):
    """A file of the reserve: open, every page written, mapped whole and populated."""

    cell: _lowlevel.FdCell  # owns the open fd
    mapping: _lowlevel.Mapping  # writable, capacity bytes, filename None until named
    capacity: int


def size_class(length: int) -> int:
    """The capacity of the files kept for a buffer of length bytes: length rounded up
    to a multiple of max(4 KiB, 1/16 to 1/8 of it). A taken file is cut to length."""
    granule = max(_PAGE, 1 << max(0, length.bit_length() - 4))
    return -(-length // granule) * granule


@dataclass(frozen=True)
class PrefaultStats:
    """What the prefault reserve holds and did (see ``prefault_wav_buffers``).

    Attributes:
        enabled: the reserve is on in this process.
        max_bytes, per_size: its settings.
        files, bytes: prepared files held now, and their bytes (RAM in use).
        hits: buffers made from a prepared file (this and the next two are counted
            from the last time the reserve was turned on).
        misses: calls that found none and took the normal path (first call of a
            size, the thread not done yet, a full RAM disk, or the reserve off).
        failures: preparations that failed, and prepared files that could not be
            used (each also logged once on the ``luna_shm`` logger).
    """

    enabled: bool
    max_bytes: int
    per_size: int
    files: int
    bytes: int
    hits: int
    misses: int
    failures: int


class _Reserve:
    """The state of one process's reserve; every field is guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = _threading.Lock()
        self.wake = _threading.Condition(self.lock)
        # Held by the refill thread from the start of a preparation until the file is
        # registered (or closed): the before-fork hook takes it first.
        self.making = _threading.Lock()
        # A file is being prepared; idle is notified when it is kept or given back.
        self.preparing = False
        self.idle = _threading.Condition(self.lock)
        # Creates being retried after a shortage (hold_off): while any runs, no file is
        # prepared and one that was being prepared is given back when done.
        self.held_off = 0
        self.enabled = False
        self.max_bytes = 0
        self.per_size = 0
        self.ready: dict[_Key, list[Prepared]] = {}
        self.recent: OrderedDict[_Key, None] = OrderedDict()  # least recent first
        self.failed: set[_Key] = set()  # preparation failed: skipped until asked again
        self.held = 0
        self.hits = self.misses = self.failures = 0
        self.thread: _threading.Thread | None = None

    def items(self) -> list[Prepared]:
        return [item for items in self.ready.values() for item in items]

    def _take_all(self) -> list[Prepared]:
        """Under lock: every kept file, taken out of the reserve; the caller gives them
        back (give_back) once it has let go of the lock."""
        doomed = self.items()
        self.ready.clear()
        self.held = 0
        return doomed

    def _wait_for_preparation(self) -> None:
        """Under lock: wait until no file is being prepared, at most _PREPARATION_WAIT
        seconds: the thread may wait in turn for a lock the caller holds (a pool's,
        through a PooledWav that the garbage collector finalizes there)."""
        self.idle.wait_for(lambda: not self.preparing, _PREPARATION_WAIT)

    def stats(self) -> PrefaultStats:
        with self.lock:
            return PrefaultStats(self.enabled, self.max_bytes, self.per_size,
                                 len(self.items()), self.held, self.hits, self.misses,
                                 self.failures)

    # ---- the caller's side -----------------------------------------------------------

    def take(self, directory: str | None, length: int) -> Prepared | None:
        """A prepared file for a buffer of length bytes, or None; the caller owns it and
        calls refill() when done."""
        key = (directory, size_class(length))
        with self.lock:
            if not self.enabled:
                return None
            self.recent[key] = None
            self.recent.move_to_end(key)
            self.failed.discard(key)
            if len(self.recent) > _MAX_KEYS:
                for old in [k for k in self.recent if k != key and not self.ready.get(k)]:
                    if len(self.recent) <= _MAX_KEYS:
                        break
                    del self.recent[old]
                    self.failed.discard(old)
            items = self.ready.get(key)
            if items:
                self.hits += 1
                self.held -= key[1]
                return items.pop()
            self.misses += 1
        return None

    def refill(self) -> None:
        with self.lock:
            if self.enabled:
                self.wake.notify()

    def note_failure(self, message: str, key: str) -> None:
        with self.lock:
            self.failures += 1
        placement.log_once(message, _logging.INFO, key=key)

    # ---- the refill thread ---------------------------------------------------------------

    def _running(self) -> bool:
        return self.enabled and self.thread is _threading.current_thread()

    def _plan(self) -> tuple[_Key, list[_Key], int] | None:
        """Under lock, changing nothing: the key to prepare a file for (the most recently
        asked first), the less recently asked keys whose files make room for it within
        max_bytes, and the bytes held after that; None when there is nothing to do."""
        if self.held_off:
            return None
        for key in reversed(self.recent):
            capacity = key[1]
            if (key in self.failed or capacity > self.max_bytes
                    or len(self.ready.get(key, ())) >= self.per_size):
                continue
            victims, held = [], self.held
            for old in self.recent:  # least recent first, never the key itself
                if held + capacity <= self.max_bytes or old == key:
                    break
                if self.ready.get(old):
                    victims.append(old)
                    held -= len(self.ready[old]) * old[1]
            if held + capacity <= self.max_bytes:
                return key, victims, held
        return None

    def _next_job(self) -> tuple[_Key | None, list[Prepared]]:
        """Under lock: the planned key, and the files taken out to make room for it."""
        plan = self._plan()
        if plan is None:
            return None, []
        key, victims, held = plan
        evicted = [item for old in victims for item in self.ready.pop(old)]
        self.held = held
        return key, evicted

    def _prepare(self, key: _Key) -> Prepared | None:
        directory, capacity = key
        try:
            if directory is not None:
                info = _lowlevel.fs_probe(directory)
                free = info.bytes_free
                if not info.has_room(2 * capacity):
                    placement.log_once(
                        f"luna_shm: prefault reserve: {directory} has {free} bytes free, "
                        f"less than twice {capacity}: no file prepared there", _logging.INFO,
                        key=f"prefault reserve: {directory} short of room")
                    return None
            cell = _lowlevel.fd_cell()
            _lowlevel.prepare_file(directory, MEMFD_NAME, capacity, cell=cell)
            try:
                mapping = _lowlevel.Mapping(cell[0], capacity, writable=True, populate=True,
                                            private=True)  # until a buffer hands it out
            except BaseException:
                _lowlevel.release(cell)
                raise
            return Prepared(cell, mapping, capacity)
        except OSError as exc:
            self.note_failure(f"luna_shm: prefault reserve: a file of {capacity} bytes "
                              f"could not be prepared in {directory or 'memfd'}: {exc}",
                              f"prefault reserve: cannot prepare in {directory or 'memfd'} "
                              f"({exc.strerror})")
            return None

    def _fits(self, key: _Key) -> bool:
        """Under lock: one more file of key stays within per_size and max_bytes (which a
        configure may have lowered while the file was being prepared)."""
        return (len(self.ready.get(key, ())) < self.per_size
                and self.held + key[1] <= self.max_bytes)

    def _prepare_and_keep(self, key: _Key, evicted: list[Prepared]) -> None:
        """Give back what makes room, prepare a file of key and keep it, unless the reserve
        was turned off, a retried create holds it off, or its limits were lowered below it
        meanwhile: then it is given back before the caller says the preparation is done."""
        give_back(evicted)
        item = self._prepare(key)
        with self.lock:
            if item is None:
                self.failed.add(key)  # until it is asked for again
            elif self._running() and not self.held_off and self._fits(key):
                self.ready.setdefault(key, []).append(item)
                self.held += key[1]
                return
        if item is not None:
            give_back([item])  # the last reference goes with this frame: unmapped

    def hold_off(self) -> bool:
        """For a create retried after a shortage: no file is prepared until resume(); one
        being prepared is waited for (bounded) and given back; every kept file is given
        back. True when the reserve is on or held files: the retry may then succeed."""
        with self.lock:
            self.held_off += 1
            self._wait_for_preparation()
            doomed = self._take_all()
            worth_retrying = bool(doomed) or self.enabled
        give_back(doomed)
        return worth_retrying

    def make_room(self, directory: str, length: int) -> bool:
        """See the module's make_room."""
        with self.lock:
            self._wait_for_preparation()
            held_here = any(items and key[0] == directory for key, items in self.ready.items())
        try:
            if held_here and not _lowlevel.fs_probe(directory).has_room(length):
                with self.lock:
                    doomed = self._take_all()
                give_back(doomed)
            return _lowlevel.fs_probe(directory).has_room(length)
        except OSError:
            return False

    def resume(self) -> None:
        """The end of a hold_off: the refill thread may prepare files again."""
        with self.lock:
            self.held_off -= 1
            self.wake.notify()

    def run(self) -> None:
        """The refill thread's loop: prepare what _next_job says, until turned off.

        Locks are always taken in the order making, then lock (as the before-fork
        hook does); the thread waits for work holding neither.
        """
        while True:
            with self.making:
                with self.lock:
                    if not self._running():
                        return
                    key, evicted = self._next_job()
                    self.preparing = key is not None
                if key is not None:
                    try:
                        self._prepare_and_keep(key, evicted)
                    finally:
                        with self.lock:
                            self.preparing = False
                            self.idle.notify_all()
                    continue
            with self.lock:
                while self._running() and self._plan() is None:
                    self.wake.wait()
            # Woken by a call that just made its buffer: let it fill the buffer first. Zeroing
            # pages on the other CPU and taking the GIL between C calls now would slow it.
            _time.sleep(_SETTLE_SECONDS)

    # ---- settings ----------------------------------------------------------------------

    def configure(self, max_bytes: int, per_size: int) -> None:
        with self.lock:
            self.max_bytes, self.per_size = max_bytes, per_size
            if max_bytes == 0:
                return self._turn_off()
            if not self.enabled:  # counted from here on
                self.hits = self.misses = self.failures = 0
            self.enabled = True
            doomed: list[Prepared] = []
            for key, items in self.ready.items():  # over the new count of a size
                while len(items) > per_size:
                    doomed.append(items.pop())
                    self.held -= key[1]
            for key in list(self.recent):  # least recent first: over the new cap
                if self.held <= max_bytes:
                    break
                items = self.ready.pop(key, [])
                doomed += items
                self.held -= len(items) * key[1]
            if self.thread is None:
                thread = _threading.Thread(target=self.run, name="luna_shm-prefault",
                                           daemon=True)
                try:  # it waits for this lock before it looks at self.thread
                    thread.start()
                except BaseException:
                    # No thread (a pids limit): the reserve stays off, and a later call
                    # tries again; nothing was prepared, so nothing is held.
                    self.enabled = False
                    raise
                self.thread = thread
            self.wake.notify()
        give_back(doomed)
        return None

    def _turn_off(self) -> None:
        """Called holding lock: stop the thread, give back every file."""
        thread, self.thread = self.thread, None
        self.enabled = False
        doomed = self._take_all()
        self.recent.clear()
        self.failed.clear()
        self.wake.notify_all()
        self.lock.release()
        try:
            give_back(doomed)
            if thread is not None and thread is not _threading.current_thread():
                thread.join()
        finally:
            self.lock.acquire()


def give_back(items: list[Prepared]) -> None:
    """Unmap and close prepared files that nobody uses (unnamed: the kernel frees them).

    The mapping is unmapped when its last reference goes, here, in CPython at once.
    """
    for item in items:
        try:
            _lowlevel.release(item.cell)
        except OSError:
            pass
    items.clear()


_reserve = _Reserve()


def configure(max_bytes: int, per_size: int) -> None:
    """Turn the reserve on with these limits (max_bytes=0: off, every file given back)."""
    _reserve.configure(max_bytes, per_size)


def take(directory: str | None, length: int) -> Prepared | None:
    """A prepared file (in directory, or a memfd for None) of at least length bytes,
    mapped and populated; None when the reserve has none (or is off). The caller owns
    it (:func:`give_back` when unused). Never waits; call :func:`refill` when done."""
    return _reserve.take(directory, length)


def refill() -> None:
    """Wake the refill thread (if the reserve is on) to replace what calls took. Called
    when a create_wav_buffer call is done, so that preparing the next file (zeroing its
    pages on the other core, taking the GIL between its C calls) does not slow the call."""
    _reserve.refill()


def note_failure(message: str, key: str) -> None:
    """Count and log (once a key, INFO: see placement.log_once) a prepared file that
    could not be used."""
    _reserve.note_failure(message, key)


def retry_if_short(attempt: Callable[[], _T]) -> _T:
    """attempt(), and once more when it ran short of what the reserve holds (an errno of
    SHORTAGE_ERRNOS) while the reserve held files: the reserve never makes a create fail
    that would succeed without it. The retry waits for a file being prepared (bounded),
    gives back every file, and runs with the refill thread held off, so that it cannot
    take the space again in between; no lock of the reserve is held while it runs."""
    try:
        return attempt()
    except OSError as exc:
        return retry_after(exc, attempt)


def retry_after(failure: OSError, attempt: Callable[[], _T]) -> _T:
    """attempt() once more, its first try having raised failure, when that was a shortage
    (an errno of SHORTAGE_ERRNOS) while the reserve was on or held files (see
    retry_if_short); else raise failure."""
    if failure.errno in SHORTAGE_ERRNOS:
        # On: retried even when no file is held now: the thread may have held the space
        # at the failure, then given it up (its own file did not fit either).
        reserve = _reserve
        try:
            if reserve.hold_off():
                return attempt()
        finally:
            reserve.resume()
    try:
        raise failure
    finally:
        # failure's traceback holds this frame: without this, the cycle would keep what
        # the failed attempt referred to (a WavWriter's stream mapping, and so its file's
        # flock) alive until a garbage collection.
        del failure, attempt


def make_room(directory: str, length: int) -> bool:
    """Before a create of length bytes in directory, which lacked the room for it: wait
    for a file being prepared (kept or given up), and when the reserve holds files there
    and the room is still lacking, give every file back, so that the new file goes where
    it would have gone without the reserve. True when directory has the room now."""
    return _reserve.make_room(directory, length)


def stats() -> PrefaultStats:
    """What the reserve holds and did, in this process."""
    return _reserve.stats()


# ---- fork and exit -------------------------------------------------------------------------


# The reserve's locks each before-fork hook running in this thread took (making, then lock),
# innermost hook last, released after the fork in the parent. A hook waits for each at most
# _PREPARATION_WAIT seconds: a signal handler that forks (a daemon spawning a worker) may
# run while this very thread holds the reserve's lock (or while the refill thread, holding
# making, waits for that lock), and would otherwise wait for itself forever. A hook that a
# handler's fork runs inside another hook of this thread (the handler interrupted it) does
# not wait at all: the locks it would wait for are the interrupted hook's, and signals that
# came faster than the wait nested the hooks deeper for ever, while every other thread
# waited for the reserve. The child starts with a fresh reserve either way; at worst it
# keeps copies of the fds of a file not yet registered.
_taken_for_fork = _threading.local()


def _hooks_in_this_thread() -> list[list[_threading.Lock]]:
    levels: list[list[_threading.Lock]] | None = getattr(_taken_for_fork, "levels", None)
    if levels is None:
        levels = _taken_for_fork.levels = []
    return levels


def _before_fork() -> None:
    levels = _hooks_in_this_thread()
    nested = bool(levels)
    taken: list[_threading.Lock] = []
    levels.append(taken)
    for lock in (_reserve.making, _reserve.lock):
        if lock.acquire(timeout=0 if nested else _PREPARATION_WAIT):
            taken.append(lock)


def _after_fork_in_parent() -> None:
    levels = _hooks_in_this_thread()
    if levels:
        for lock in reversed(levels.pop()):
            lock.release()


def _after_fork_in_child() -> None:
    # The child's copies of the parent's files: closing them leaves the parent's files,
    # and the flocks their open file descriptions hold, as they are. The thread and the
    # held locks do not exist here: a fresh reserve, off.
    global _reserve
    _taken_for_fork.levels = []  # the parent's hooks' locks are the parent's reserve's
    parents, _reserve = _reserve, _Reserve()
    inherited = parents.items()
    parents.ready.clear()
    parents.thread = None
    give_back(inherited)


_os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                     after_in_child=_after_fork_in_child)
_atexit.register(lambda: _reserve.configure(0, 0))
