"""AudioPool and PooledWav: lending slots to callers (taking, waiting or growing, checking
that a slot is still its own file), writing audio into them, and giving them back.
"""

from __future__ import annotations

import errno as _errno
import os as _os
import threading as _threading
import time as _time
import warnings as _warnings
import weakref as _weakref
from collections.abc import Callable
from typing import Any, Self

import numpy as np

from luna_shm import (
    _lowlevel,
    _newfile,
    _prefault,
    _resource,
    encoding,
    formats,
    placement,
)
from luna_shm.placement import AUDIO_PREFIX
from luna_shm.pool._slot_files import (
    POOL_MARK,
    Lease,
    Slot,
    check_memory,
    check_prefix,
    check_slot_file,
    close_slot,
    close_slots,
    new_watch,
    prepare_slot,
    reclaim_dead_pool_files,
    restore_marker,
    slot_length,
)

_WHEN_BUSY = ("wait", "grow")
# A pooled write of at most this many bytes, written as it is, is copied under the pool's
# lock together with its slot's checks, in one C call (luna_pool_fill): what a small write
# costs is its crossings into C, while a large copy under the lock would keep other
# threads from the free slots for as long as it takes.
_FILL_UNDER_LOCK_BYTES = 16384


def _unreleased(pool: AudioPool, slot: Slot | None, lease: Lease | None, path: str,
                owner_pid: int) -> None:
    # A PooledWav dropped without release() (from its __del__). In a forked child it
    # does nothing, and nothing leaked once the pool is closed (its close released
    # every slot).
    if owner_pid != _resource.current_pid or pool.closed or slot is None:
        return
    pool._give_back(slot, lease)  # first: warnings may be errors (-W error)
    _warnings.warn(f"unreleased PooledWav {path!r}: its slot goes back to the pool",
                   ResourceWarning, stacklevel=2)


def _waker(pool_ref: _weakref.ReferenceType[AudioPool]
            ) -> Callable[[_weakref.ReferenceType[Lease]], None]:
    """The callback of a slot's lease reference: when a lease dies still holding its slot
    (a call cut short by a signal handler that raised, between taking the slot and
    handing it over or inside release()), wake the threads that wait for a slot, so
    that they find it (_reclaim_lost). Otherwise only a later call would: a thread
    already waiting without a timeout slept on for ever beside a free slot. A slot given
    back drops its reference (slot.lease = None) before the lease dies, and a reference
    that dies first never calls back: the normal path never comes here."""
    def lease_died(_ref: _weakref.ReferenceType[Lease]) -> None:
        pool = pool_ref()
        # In a forked child the lock may be held by a thread that was not copied.
        if pool is None or pool._pid != _resource.current_pid:
            return
        with pool._lock:  # reentrant: the lease may die where this thread holds it
            pool._cond.notify_all()
    return lease_died


class PooledWav(_resource.Resource):
    """A WAV held in a pool slot: ``path`` is a complete WAV file, ``array`` its samples.

    Release it (or leave its ``with`` block) when the consumer is done with the
    file: the slot is then reused, under the same path, for another WAV. One
    dropped without ``release()`` goes back to the pool when it is collected,
    with a ``ResourceWarning``.

    ``array`` raises once the PooledWav is released, but an array taken before
    still views the slot's memory, like any buffer pool's: after the release the
    next holder's audio shows through it. Copy what you keep (``array.copy()``),
    or hand audio in with the copy-in :meth:`AudioPool.write_wav`.
    """

    _pool: AudioPool | None = None
    _lease: Lease | None = None
    _slot: Slot | None = None  # None once released (see release)

    # Made on every pool write: its __init__ sets only what it must, with writable passed
    # by position (a keyword costs 0.1 us, a fifth of the object).
    def __init__(self, pool: AudioPool, slot: Slot, lease: Lease, spec: _lowlevel.WavSpec,
                 frames: int, offset: int, writable: bool) -> None:
        self._pool = pool
        self._slot = slot
        self._lease = lease
        self._spec = spec
        self.path = slot.path
        self.frames = frames
        self._offset = offset
        self._writable = writable
        slot.array = None  # made on first use: most callers want the path
        # Not _track(): a PooledWav is made on every pool write, and a __del__ costs
        # nothing to set up where a weakref.finalize costs about 1 us (its leak check
        # needs only what the object holds anyway: the pool and the slot).
        self._pid = _resource.current_pid

    def __del__(self) -> None:
        pool = self._pool
        if pool is not None:  # dropped without release()
            _unreleased(pool, self._slot, self._lease, self.path, self._pid)

    @property
    def samplerate(self) -> int:
        """Frames per second."""
        return self._spec.samplerate

    @property
    def channels(self) -> int:
        """Samples per frame."""
        return self._spec.channels

    def _name(self) -> str:
        return f"PooledWav {self.path!r}"

    def _check_held(self) -> Slot:
        """The held slot; ValueError once released, RuntimeError in a forked child."""
        slot = self._slot
        if self._pool is None or slot is None:
            raise ValueError("PooledWav was released")
        self._check_ours()
        return slot

    @property
    def array(self) -> np.ndarray:
        """The samples in the slot (writable for :meth:`AudioPool.acquire`).

        Raises:
            ValueError: released (arrays taken before still alias the slot).
            OSError: ESTALE: another process cut the slot's file while it was
                mapped and this process touched a lost page (its mapping now holds
                zeros, see :attr:`WavBuffer.array`); the pool drops the slot when
                released. Once released, the pool's inotify watch sees any change
                to the file, a same-length rewrite too, before the slot is reused.
        """
        slot = self._check_held()
        slot.mapping.check()
        array = slot.array
        if array is None:
            dtype = formats.view_dtype(self._spec)
            if dtype is None:
                raise ValueError("24-bit samples have no numpy view: read the file with read_wav")
            view = slot.mapping.view if self._writable else slot.readonly
            flat = np.frombuffer(view, dtype=dtype, count=self.frames * self.channels,
                                 offset=self._offset)
            # Handed out: a child forked from now on keeps the caller's array (and so the
            # slot's file) as it is, for as long as it keeps the array.
            slot.mapping.share()
            array = slot.array = flat.reshape((self.frames,) if self.channels == 1 else
                                              (self.frames, self.channels))
        return array

    @property
    def released(self) -> bool:
        """True once the slot went back to the pool."""
        return self._pool is None

    @property
    def closed(self) -> bool:
        """The same as :attr:`released`."""
        return self._pool is None

    def truncate(self, frames: int) -> None:
        """Shorten the WAV to its first frames (the audio came out shorter).

        Raises:
            TypeError, ValueError: frames is not an int from 0 to :attr:`frames`, or
                the PooledWav was released.
            OSError: ESTALE: another process cut or rewrote the slot's file (see
                :attr:`array`; a rewrite that lost none of our pages too: its header
                is not ours to write).
        """
        slot = self._check_held()
        pool = self._pool
        new_frames = formats.check_frames(frames)
        if new_frames > self.frames:
            raise ValueError(f"cannot grow a pooled WAV: frames={_lowlevel.brief(new_frames)} "
                             f"> {self.frames}")
        if pool is None:
            raise ValueError("PooledWav was released")
        # Under the pool's lock, a use of the pool: a close() in another thread, or in a
        # signal handler of this one, closes the slot's fd (the number may be another
        # file's by the time we fstat it: a wrong size would zero our mapping), and a
        # release() in another thread may hand the slot to the next holder, whose header
        # this must never write.
        with pool._lock:
            pool._begin_use()  # first: a handler may run at any call from here on
            try:
                if self._slot is not slot:
                    raise ValueError("PooledWav was released")
                self._truncate(slot, new_frames)
            finally:
                pool._uses -= 1  # here, before any call: see Resource._end_use
                pool._end_use()

    def _truncate(self, slot: Slot, new_frames: int) -> None:
        """truncate, in a use of the pool, on the held slot."""
        check_slot_file(slot)
        frame_bytes = self._spec.channels * self._spec.bits // 8
        slot.mapping.format_slot(self._spec, new_frames * frame_bytes)
        check_slot_file(slot)
        self.frames = new_frames
        array = slot.array  # read once: a release() in another thread drops it
        if array is not None and self._slot is slot:
            slot.array = array[:new_frames]

    def release(self) -> None:
        """Give the slot back to the pool; calling it again does nothing.

        In a forked child this only marks the child's copy released: the slot
        belongs to the parent's pool.
        """
        # The lease first, into a local: if the rest is cut short (a signal handler that
        # raises), it dies with this frame and the pool finds the slot again.
        lease, self._lease = self._lease, None
        pool, self._pool = self._pool, None
        # A released handle kept by the caller must not keep the slot's mapping (a whole
        # slot of RAM) alive once the pool is closed: only arrays taken from it do.
        slot, self._slot = self._slot, None
        if slot is not None and pool is not None:
            slot.array = None
        if pool is not None and slot is not None and self._pid == _resource.current_pid:
            pool._give_back(slot, lease)

    def close(self) -> None:
        """The same as :meth:`release` (so that every luna_shm resource closes alike)."""
        self.release()

    def __enter__(self) -> Self:
        """Start a ``with`` block that releases the slot at its end.

        Raises:
            ValueError: already released (a block using it could only fail later).
        """
        self._check_held()
        return self

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<PooledWav {self.path!r} {state}: {self.frames} frames, {self.samplerate} Hz>"


def _close_unclosed(pool_ref: _weakref.ReferenceType[AudioPool], slots: list[Slot],
                    watch_cell: _lowlevel.FdCell, anonymous: bool, owner_pid: int) -> None:
    # The finalizer of a pool never closed: run when it is collected, or at interpreter
    # exit while it still lives, for daemon threads that may still use it. A live pool
    # is closed for real, under its lock: they get "AudioPool is closed", never a slot
    # whose file is gone, and no slot file is made again after this cleanup.
    pool = pool_ref()
    if pool is None:
        close_slots(slots, watch_cell, anonymous, True, owner_pid)
        return
    pool.close()
    if owner_pid == _resource.current_pid:
        _warnings.warn("unclosed AudioPool", ResourceWarning, stacklevel=2)


class AudioPool(_resource.Resource):
    """Reusable, pre-faulted WAV slots for writing and reading audio with no page faults.

    Args:
        slots: how many slots to make up front (>= 1).
        max_bytes: the largest audio (data chunk bytes) one slot holds.
        anonymous: memfd slots (no name in a directory; paths are /proc/<pid>/fd/<n>).
        prefix: file name prefix of named slots: one or more letters, digits,
            '_' or '-' (the files are ``<prefix>pool_<32 hex>.wav``).
        when_busy: "wait" for a slot to be released (up to timeout seconds, then
            TimeoutError), or "grow" by a new slot.
        timeout: seconds to wait in "wait" mode (an int, a float or a numpy number,
            >= 0); None, infinity, or more than ``threading.TIMEOUT_MAX`` (about 292
            years) waits forever.

    A pool belongs to the process that made it: in a forked child its methods
    raise ``RuntimeError``, and the child's copies of the slots' descriptors and
    mappings and of the inotify fd are closed right at the fork (the parent's slot
    files stay as they are, and its ``close()`` or death frees them while the child
    lives; an array the child keeps holds its slot's file).

    Raises:
        ValueError, TypeError: bad arguments.
        OSError: the slots cannot be made (ENOSPC when the RAM disk is too small):
            ENOSPC up front, naming the numbers, when they exceed the free space of
            the RAM disk and the fallback dir together (ENOMEM: anonymous slots
            beyond the machine's memory).
    """

    _slots: list[Slot]
    _closed = True
    _watch_fd = -1  # the fd in _watch_cell, as a plain int for the hot path
    _watch_cell: _lowlevel.FdCell = None

    def __init__(
        self,
        slots: int = 8,
        max_bytes: int = 2 * 1024 * 1024,
        *,
        anonymous: bool = False,
        prefix: str = AUDIO_PREFIX,
        when_busy: str = "wait",
        timeout: float | None = None,
    ) -> None:
        slots = formats.check_int("slots", slots, minimum=1)
        max_bytes = formats.check_int("max_bytes", max_bytes, minimum=1)
        anonymous = formats.check_flag("anonymous", anonymous)
        if slot_length(max_bytes) - 8 > formats.MAX_WAV_BYTES:  # the RIFF covers the slot
            raise ValueError(f"max_bytes must fit a WAV file (< 4 GiB), got "
                             f"{_lowlevel.brief(max_bytes)}")
        if not isinstance(when_busy, str) or when_busy not in _WHEN_BUSY:
            error = ValueError if isinstance(when_busy, str) else TypeError
            raise error(f"when_busy must be 'wait' or 'grow', got {_lowlevel.brief(when_busy)}")
        self.timeout = formats.check_timeout(timeout)
        check_prefix(prefix)
        if anonymous and not _lowlevel.HAS_MEMFD:
            raise OSError(_errno.ENOSYS, "memfd_create is not available on this platform")
        self.max_bytes = max_bytes
        self.anonymous = bool(anonymous)
        self.when_busy = when_busy
        self._prefix = prefix
        self._length = slot_length(max_bytes)
        # The hot path takes the lock with a C-level ``with self._lock``, without
        # Condition.__enter__'s Python frame. Reentrant: a garbage collection can run
        # anywhere the lock is held, and a dropped PooledWav's __del__ then gives its slot
        # back to this pool from the same thread.
        self._lock = _threading.RLock()
        self._cond = _threading.Condition(self._lock)
        self._slots = []
        # How many slots the pool keeps: a slot dropped (_drop) whose replacement could
        # not be made (a full RAM disk, no fd) is made again by a later call (_take).
        self._wanted = slots
        self._free: list[Slot] = []
        if not anonymous:
            reclaim_dead_pool_files(prefix)
            # Refused up front: slot after slot would fill the RAM disk, then the
            # fallback dir, before the last one failed.
            _newfile.check_room(slots, self._length, "slots")
        else:
            check_memory(slots, self._length)
        self._waiting = 0  # threads in _cond.wait: release() notifies only when some wait
        self._lease_died = _waker(_weakref.ref(self))  # see _waker
        self._let_go_at_fork()  # before the first fd: a child forked from here on drops it
        self._watch_cell = new_watch(self.anonymous)
        self._watch_fd = self._watch_cell[0]
        self._closed = False
        self._track(_close_unclosed, _weakref.ref(self), self._slots, self._watch_cell,
                    self.anonymous, _resource.current_pid)
        try:
            for _ in range(slots):
                self._free.append(self._new_slot())
        except BaseException:
            self.close()
            raise

    def _let_go(self) -> None:
        """In a forked child, right after the fork: close the child's copies of every
        slot's fd and of the inotify fd, and drop its mappings (see Slot.let_go). A
        child that never uses the pool then holds nothing of it: killed, the parent
        leaves slot files that the next pool reclaims (their flocks go with its last
        descriptor), whoever it forked. The pool stays the parent's: every use raises
        RuntimeError. Without the lock: a parent thread may have held it at the fork."""
        for slot in list(self._slots):
            slot.let_go()
        self._free = []
        self._watch_fd = -1
        if self._watch_cell is None:  # forked before the pool made its watch
            return
        try:
            _lowlevel.release(self._watch_cell)
        except OSError:
            pass

    def _new_slot(self) -> Slot:
        if self.anonymous:
            slot = _prefault.retry_if_short(self._new_anonymous_slot)
        else:
            # A RAM disk that refuses the slot (at its creation or its reservation)
            # sends it to the disk temp dir.
            slot = _newfile.with_disk_fallback(self._new_named_slot)
        if self._watch_fd >= 0:
            try:  # the open file itself, whatever its path names by now
                _lowlevel.watch_add(self._watch_fd, f"/proc/self/fd/{slot.fd}", slot.path)
                slot.watched = True
            except OSError:  # out of inotify watches, or no /proc: checked by stat
                pass
        self._slots.append(slot)
        return slot

    def _new_anonymous_slot(self) -> Slot:
        """One try at a memfd slot; on failure it is closed again."""
        cell = _lowlevel.fd_cell()  # until the pool's slot list holds it
        fd = _lowlevel.memfd(f"{self._prefix}{POOL_MARK}slot", cell=cell)
        return self._map_slot(cell, f"/proc/{_os.getpid()}/fd/{fd}")

    def _new_named_slot(self, on_disk: bool) -> Slot:
        """One try at a named slot file; on failure it is removed again (or never named).

        Where O_TMPFILE works, the file is made unnamed, zeroed, marked and formatted, and
        only then named: a pool killed while it makes a slot leaves nothing behind. A
        file named first and killed before its marker carried none, and so no later pool
        reclaimed it (a custom prefix is no cleanup_all_temp_audio's either)."""
        if _lowlevel.HAS_O_TMPFILE:
            slot = self._new_unnamed_slot(on_disk)
            if slot is not None:
                return slot
        # locked=True: the flock is held before the name appears, so a
        # concurrent cleanup never takes a new slot for a dead pool's file.
        path, cell = _newfile.create_temp_file(
            ".wav", f"{self._prefix}{POOL_MARK}", size_hint=self._length, locked=True,
            on_disk=on_disk)
        return self._map_slot(cell, path, named=True)

    def _new_unnamed_slot(self, on_disk: bool) -> Slot | None:
        """A slot made as an unnamed file (O_TMPFILE, flocked), prepared, then linked under
        a fresh slot name; None when the directory has no O_TMPFILE (EOPNOTSUPP)."""
        directory = _newfile.directory_for(self._length, on_disk)
        prefix = f"{self._prefix}{POOL_MARK}"
        path = _newfile.new_name_in(directory, ".wav", prefix)
        cell = _lowlevel.fd_cell()  # flocked: until the pool's slot list holds it
        try:
            _lowlevel.prepare_file(directory, "", self._length, cell=cell)
        except OSError as exc:
            if exc.errno == _errno.EOPNOTSUPP:
                return None
            # Named as the file it would have been: with_disk_fallback moves a slot the
            # RAM disk refused (ENOSPC, ...) to the fallback dir by its directory.
            raise OSError(exc.errno, exc.strerror, path) from None
        slot = self._map_slot(cell, path)
        try:
            try:
                _lowlevel.link_unnamed(slot.fd, path)
            except FileExistsError:
                path = _newfile.name_unnamed_file(slot.fd, directory, ".wav", prefix)
        except BaseException:
            close_slot(slot, unlink=False)
            raise
        slot.path = slot.mapping.filename = path
        return slot

    def _map_slot(self, cell: _lowlevel.FdCell, path: str, *, named: bool = False) -> Slot:
        """Reserve, map and prepare (see prepare_slot) a new slot file (or memfd) whose
        fd is in cell; on failure release it and, when named, remove the file at path."""
        fd = cell[0]
        try:
            _lowlevel.lock(fd, exclusive=False, filename=path)
            _lowlevel.reserve(fd, self._length, path)
            if self.anonymous:
                _lowlevel.seal_shrink(fd, path)
            # Private until a holder's array is made from it (PooledWav.array): a child
            # forked before gets zeros there, and so never the slot file's flock.
            mapping = _lowlevel.Mapping(fd, self._length, writable=True, populate=True,
                                        filename=path, private=True)
            slot = Slot(cell, path, mapping)
        except BaseException:
            _lowlevel.release(cell)
            if named:
                _os.unlink(path)
            raise
        try:
            prepare_slot(slot)
        except BaseException:
            close_slot(slot, unlink=named)
            raise
        return slot

    @property
    def slots(self) -> int:
        """How many slots the pool has (it can grow in "grow" mode)."""
        return len(self._slots)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def __enter__(self) -> Self:
        """Start a ``with`` block that closes the pool at its end.

        Raises:
            ValueError: the pool is closed (as a closed WavBuffer or WavWriter does:
                a block using it could only fail later, further from the cause).
            RuntimeError: called in a forked child of the pool's process.
        """
        if self._closed:
            raise ValueError("I/O operation on closed AudioPool")
        self._check_ours()
        return self

    def _check_fits(self, nbytes: int) -> None:
        """ValueError when nbytes of audio do not fit a slot."""
        if nbytes > self.max_bytes:
            raise ValueError(
                f"{_lowlevel.brief(nbytes)} bytes of audio do not fit a slot of this pool "
                f"(max_bytes={self.max_bytes}); make the pool with a larger max_bytes")

    def _take(self, nbytes: int, lease: Lease) -> Slot:
        """A free slot (waiting for one, or growing the pool, as when_busy says; making
        again one the pool lost, see _wanted), held by lease from the moment it leaves
        the free list."""
        # Before the lock: in a forked child it may be held by a thread that was not copied.
        self._check_ours()
        self._check_fits(nbytes)
        deadline = None
        ref = _weakref.ref(lease, self._lease_died)
        with self._lock:
            while True:
                # A use of the pool (its watch and slot fds), but not the wait below:
                # a close in another thread must not wait for that.
                self._begin_use()  # first: a handler may run at any call from here on
                try:
                    slot = self._take_now(ref)
                finally:
                    self._uses -= 1  # here, before any call: see Resource._end_use
                    self._end_use()
                if slot is not None:
                    return slot
                if deadline is None and self.timeout is not None:
                    deadline = _time.monotonic() + self.timeout
                remaining = None if deadline is None else deadline - _time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"all {len(self._slots)} slots stayed busy for {self.timeout} s")
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1

    def _take_now(self, ref: _weakref.ReferenceType[Lease]) -> Slot | None:
        """In a use of the pool: a slot held by ref (free, or made: see _take), or None
        when the caller must wait for a release."""
        while True:
            if self._closed:
                raise ValueError("AudioPool is closed")
            if self._free or self._reclaim_lost():
                slot = self._free.pop()
                slot.lease = ref
                if self._intact(slot):
                    return slot
                # Its file was shrunk (its mapping now holds zeros), or its path now
                # names another file (or none): forget the slot; the next turn takes
                # another one or makes a fresh one.
                self._drop(slot)
                continue
            if self.when_busy == "grow":
                return self._new_held_slot(ref)
            if len(self._slots) < self._wanted:  # no release brings a dropped slot back
                made = self._make_again(ref)
                if made is not None:
                    return made
            return None

    def _new_held_slot(self, ref: _weakref.ReferenceType[Lease]) -> Slot:
        """Under the lock: a new slot, held by the lease ref names."""
        slot = self._new_slot()
        slot.lease = ref
        return slot

    def _make_again(self, ref: _weakref.ReferenceType[Lease]) -> Slot | None:
        """Under the lock: a new slot, held by ref, in place of one the pool dropped; None
        when it cannot be made now (a full RAM disk, no fd left) while the pool has other
        slots, whose release the caller then waits for. With no slot left, the error is
        raised: nothing else could end the wait."""
        try:
            return self._new_held_slot(ref)
        except OSError as exc:
            if not self._slots:
                raise
            placement.log_once(f"luna_shm: an AudioPool slot could not be made again "
                               f"({exc.strerror}): waiting for a busy one instead")
            return None

    def _intact(self, slot: Slot) -> bool:
        """Whether a free slot may be handed out (under the pool's lock): its mapping whole and,
        when named, its path still its own file at full length. The name is checked with
        a stat only when the watch saw an event since that slot's last check (any event
        unverifies every slot) or does not watch it."""
        if slot.mapping.broken:
            return False
        if self.anonymous:
            return True
        if self._watch_fd >= 0 and not _lowlevel.watch_quiet(self._watch_fd):
            self._unverify_all()
        elif slot.verified:
            return True
        named = slot.still_named()
        if named:
            restore_marker(slot)
        slot.verified = named and slot.watched
        return named

    def _unverify_all(self) -> None:
        """The watch had an event (under the pool's lock): every slot's name is checked
        again."""
        for each in self._slots:
            each.verified = False

    def _drop(self, slot: Slot) -> None:
        """Forget a slot that must not be handed out again. Its own file goes (the pool
        made it, whoever cut it since); another file at its path, renamed over it, is
        left alone."""
        self._slots.remove(slot)
        close_slot(slot, unlink=not self.anonymous)

    def _give_back(self, slot: Slot, lease: Lease | None) -> None:
        """Return slot, which lease held, to the free list. Nothing when lease no longer
        holds it (given back already, or found by _reclaim_lost after lease died)."""
        with self._lock:
            ref = slot.lease
            if ref is None or ref() is not lease or lease is None:
                return
            slot.lease = None
            if not self._closed:
                self._free.append(slot)
                if self._waiting:
                    self._cond.notify()

    def _reclaim_lost(self) -> bool:
        """Under the lock, with no free slot: put back every slot whose lease died without
        giving it back (see Lease); True if any."""
        found = False
        for slot in self._slots:
            ref = slot.lease
            if ref is not None and ref() is not None:
                continue
            # Asked of the list itself, with no call between the test and the append: a
            # signal handler that uses the pool (the lock is reentrant) may have run at
            # the call above, and must not make us add a slot twice.
            if slot not in self._free:
                slot.lease = None
                self._free.append(slot)
                found = True
        return found

    def write_wav(self, data: object, samplerate: int, *, subtype: str | None = None
                  ) -> PooledWav:
        """Copy (or convert, see :func:`luna_shm.write_wav`) audio into a free slot.

        The recommended way to fill a pool: the caller's array stays its own, and
        nothing outside the pool aliases the slot.

        Returns:
            A :class:`PooledWav` whose ``path`` is the complete WAV and whose
            ``array`` is a read-only view of the samples in the slot.

        Raises:
            ValueError: the audio is larger than max_bytes, or the pool is closed.
            TimeoutError: every slot stayed busy for timeout seconds ("wait" mode).
            RuntimeError: called in a forked child of the pool's process.
        """
        spec = encoding.planned_spec(data, samplerate, subtype)
        if spec is not None:
            assert isinstance(data, np.ndarray)
            if data.nbytes <= _FILL_UNDER_LOCK_BYTES:
                pooled = self._write_small(data, spec)
                if pooled is not None:
                    return pooled
        enc = encoding.plan(data, samplerate, subtype, self._check_fits)  # before a copy
        lease = Lease()
        for attempt in range(2):
            slot = self._take(enc.nbytes, lease)
            try:
                if enc.conversion == "none":  # the common case: one C call, memcpy + header
                    offset = slot.mapping.fill_slot(enc.spec, enc.array)
                else:
                    offset = _lowlevel.wav_header_size(enc.spec)
                    encoding.encode_into(enc, slot.byte_view[offset : offset + enc.nbytes])
                    slot.mapping.format_slot(enc.spec, enc.nbytes)
                if attempt:
                    slot.mapping.check()  # shrunk again while we wrote: give up
            except BaseException:
                self._give_back(slot, lease)
                raise
            if not slot.mapping.broken:
                break
            self._give_back(slot, lease)  # shrunk while we wrote: _take drops it
        return PooledWav(self, slot, lease, enc.spec, enc.array.shape[0], offset, False)

    def _write_small(self, data: np.ndarray, spec: _lowlevel.WavSpec) -> PooledWav | None:
        """write_wav's hot path (see _FILL_UNDER_LOCK_BYTES): a small WAV written as it is
        into the last free slot when that slot needs no check of its name, with one C call.
        None leaves every other case (no free slot, an event on the watch, a broken mapping,
        a closed pool) to the general path, the slot still free."""
        if self._pid != _resource.current_pid or data.nbytes > self.max_bytes:
            return None  # the general path raises
        lease = Lease()
        ref = _weakref.ref(lease, self._lease_died)
        with self._lock:
            # A use (see _begin_use and _end_use), counted inline on this hot path: the
            # two method calls cost about 0.1 us, a fortieth of the whole write.
            self._uses += 1  # first: a handler may run at any call from here on
            try:
                if self._closed or not self._free or not (self._free[-1].verified
                                                          or self.anonymous):
                    return None
                # Taken off the list before the C call: a __del__ run by a collection in
                # it may give another slot back meanwhile.
                slot = self._free.pop()
                slot.lease = ref
                try:
                    offset = slot.mapping.pool_fill(self._watch_fd, spec, data)
                except BaseException:
                    self._give_back(slot, lease)
                    raise
                if offset <= 0:
                    if offset == 0:  # the watch's events are drained: no slot verified now
                        self._unverify_all()
                    self._give_back(slot, lease)  # the general path checks it (or drops it)
                    return None
            finally:
                self._uses -= 1  # here, before any call: see Resource._end_use
                if self._close_after and not self._uses:
                    self._close_after = False
                    self._close_now()
        return PooledWav(self, slot, lease, spec, data.shape[0], offset, False)

    def acquire(self, frames: int, samplerate: int, channels: int = 1,
                dtype: Any = "int16") -> PooledWav:
        """A slot formatted as a WAV of frames frames, with a writable zero-copy ``array``.

        A TTS model renders straight into ``array``; the file is complete as soon
        as it has. Use :meth:`PooledWav.truncate` when the audio came out shorter.
        The array aliases the slot: do not use it after :meth:`PooledWav.release`.

        Raises:
            ValueError: the audio is larger than max_bytes, or the pool is closed.
            TimeoutError: every slot stayed busy for timeout seconds ("wait" mode).
            RuntimeError: called in a forked child of the pool's process.
        """
        count = formats.check_frames(frames)
        rate = formats.check_samplerate(samplerate)
        nchannels = formats.check_channels(channels)
        sample_dtype = formats.check_dtype(dtype)
        spec = formats.spec_for(formats.natural_subtype(sample_dtype), rate, nchannels)
        formats.check_frames_fit(count, spec)  # names a huge count briefly, as WavBuffer does
        lease = Lease()
        slot = self._take(count * nchannels * sample_dtype.itemsize, lease)
        try:
            offset = slot.mapping.format_slot(spec, count * nchannels * sample_dtype.itemsize)
        except BaseException:
            self._give_back(slot, lease)
            raise
        return PooledWav(self, slot, lease, spec, count, offset, True)

    def close(self) -> None:
        """Remove the slot files and release the pool; calling it again does nothing.

        Waits for a use of the pool in another thread (a take, a truncate); called by a
        signal handler that interrupted this thread's use, it refuses every later use
        at once and closes the files as that use ends. Arrays taken from the pool stay
        valid: their mapping lives as long as they do. In a forked child only the
        child's copies of the descriptors are closed.
        """
        if self._pid != _resource.current_pid:
            if not self._closed:
                self._closed = True
                self._untrack()
                close_slots(self._slots, self._watch_cell, self.anonymous, False, self._pid)
            return
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            self._untrack()
            if self._uses:
                # A signal handler that interrupted this thread's use of the pool (the
                # lock is reentrant): the fds close as that use ends (_end_use).
                self._close_after = True
                return
            self._close_now()

    def _close_now(self) -> None:
        """Close the slot fds (removing the files) and the watch, under the lock: a
        holder's truncate() in another thread checks its slot's fd under it, and must
        never find the number closed (or another file's). The free list stays whole
        until then: a use that a handler's close interrupted may be about to take from
        it (the pool's _closed stops every later use)."""
        self._free.clear()
        self._watch_fd = -1
        close_slots(self._slots, self._watch_cell, self.anonymous, False, self._pid)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AudioPool {state}: {len(self._slots)} slots of {self.max_bytes} bytes>"
