"""AudioPool: reusable RAM-disk WAV slots whose pages are already allocated and mapped.

A fresh tmpfs file pays for every new page it touches (about 0.1 ms for the
125 pages of 500 KB on our machines); a slot pays once, when the pool starts.
``pool.write_wav(data, rate)`` then costs one copy (or one C conversion) into
memory that *is* the file, and no system call at all. Each slot is a complete,
valid WAV at every moment: the unused space after the audio is a ``JUNK``
chunk that readers skip.

Slots hold a shared flock for the pool's lifetime, so
:func:`cleanup_all_temp_audio` never removes a live pool's files, and a new
pool reclaims the slot files of pools whose process died.
"""

from __future__ import annotations

import errno as _errno
import os as _os
import threading as _threading
import time as _time
import weakref as _weakref
from types import TracebackType
from typing import Any, Self

import numpy as np

from luna_shm import _lowlevel, encoding, formats, placement, temp_audio
from luna_shm.placement import AUDIO_PREFIX

__all__ = ["AudioPool", "PooledWav"]

_PAGE = _os.sysconf("SC_PAGESIZE")
_HEADER_ROOM = 128  # >= LUNA_WAV_MAX_HEADER
_POOL_MARK = "pool_"
_WHEN_BUSY = ("wait", "grow")


class _Slot:
    """One pre-faulted file (or memfd) of a pool and its mapping."""

    __slots__ = ("bytes", "fd", "length", "mapping", "path", "readonly")

    def __init__(self, fd: int, path: str, mapping: _lowlevel.Mapping) -> None:
        self.fd = fd
        self.path = path
        self.mapping = mapping
        self.length = mapping.length
        self.bytes = np.frombuffer(mapping.view, dtype=np.uint8)
        self.readonly = mapping.view.toreadonly()


def _slot_length(max_bytes: int) -> int:
    # Room for the largest header, the audio, its pad byte and a tail chunk.
    need = _HEADER_ROOM + max_bytes + 1 + 8
    return -(-need // _PAGE) * _PAGE


class PooledWav:
    """A WAV held in a pool slot: ``path`` is a complete WAV file, ``array`` its samples.

    Release it (or leave its ``with`` block) when the consumer is done with the
    file: the slot is then reused, under the same path, for another WAV.
    """

    def __init__(self, pool: AudioPool, slot: _Slot, spec: _lowlevel.WavSpec, frames: int,
                 offset: int, *, writable: bool) -> None:
        self._pool: AudioPool | None = pool
        self._slot = slot
        self._spec = spec
        self.path = slot.path
        self.samplerate = spec.samplerate
        self.channels = spec.channels
        self.frames = frames
        self._frame_bytes = spec.channels * spec.bits // 8
        self._offset = offset
        self._writable = writable
        self._array: np.ndarray | None = None  # made on first use: most callers want the path

    @property
    def array(self) -> np.ndarray:
        """The samples in the slot (writable for :meth:`AudioPool.acquire`).

        Raises:
            ValueError: released.
            OSError: ESTALE: another process truncated or rewrote the slot's file
                while it was mapped (its mapping now holds zeros, see
                :attr:`WavBuffer.array`); the pool drops the slot when released.
        """
        if self._pool is None:
            raise ValueError("PooledWav was released")
        self._slot.mapping.check()
        if self._array is None:
            dtype = formats.view_dtype(self._spec)
            if dtype is None:
                raise ValueError("24-bit samples have no numpy view: read the file with read_wav")
            view = self._slot.mapping.view if self._writable else self._slot.readonly
            flat = np.frombuffer(view, dtype=dtype, count=self.frames * self.channels,
                                 offset=self._offset)
            self._array = flat.reshape((self.frames,) if self.channels == 1 else
                                       (self.frames, self.channels))
        return self._array

    @property
    def released(self) -> bool:
        """True once the slot went back to the pool."""
        return self._pool is None

    def truncate(self, frames: int) -> None:
        """Shorten the WAV to its first frames (the audio came out shorter)."""
        if self._pool is None:
            raise ValueError("PooledWav was released")
        new_frames = formats.check_frames(frames)
        if new_frames > self.frames:
            raise ValueError(f"cannot grow a pooled WAV: frames={new_frames} > {self.frames}")
        self._slot.mapping.check()
        self._slot.mapping.format_slot(self._spec, new_frames * self._frame_bytes)
        self._slot.mapping.check()
        self.frames = new_frames
        if self._array is not None:
            self._array = self._array[:new_frames]

    def release(self) -> None:
        """Give the slot back to the pool; calling it again does nothing."""
        pool, self._pool = self._pool, None
        self._array = None
        if pool is not None:
            pool._give_back(self._slot)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<PooledWav {self.path!r} {state}: {self.frames} frames, {self.samplerate} Hz>"


def _close_slots(slots: list[_Slot], anonymous: bool, leaked: bool) -> None:
    if leaked:
        import warnings

        warnings.warn("unclosed AudioPool", ResourceWarning, stacklevel=2)
    for slot in slots:
        if not anonymous:
            try:
                _os.unlink(slot.path)
            except FileNotFoundError:
                pass
        try:
            _lowlevel.close(slot.fd)
        except OSError:
            pass
    slots.clear()


def reclaim_dead_pool_files(prefix: str = AUDIO_PREFIX) -> int:
    """Remove slot files of pools whose process died (no lock held); return how many."""
    removed = 0
    mark = f"{prefix}{_POOL_MARK}"
    for directory in placement.our_dirs():
        removed += temp_audio.remove_unused_files(directory, mark)
    return removed


class AudioPool:
    """Reusable, pre-faulted WAV slots for writing and reading audio with no page faults.

    Args:
        slots: how many slots to make up front (>= 1).
        max_bytes: the largest audio (data chunk bytes) one slot holds.
        anonymous: memfd slots (no name in a directory; paths are /proc/<pid>/fd/<n>).
        prefix: file name prefix of named slots.
        when_busy: "wait" for a slot to be released (up to timeout seconds, then
            TimeoutError), or "grow" by a new slot.
        timeout: seconds to wait in "wait" mode; None waits forever.

    Raises:
        ValueError, TypeError: bad arguments.
        OSError: the slots cannot be made (ENOSPC when the RAM disk is too small).
    """

    _slots: list[_Slot]
    _closed = True

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
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an int >= 1, got {slots!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
        if max_bytes > 0xFFFFFFFF - _HEADER_ROOM - 16:
            raise ValueError(f"max_bytes must fit a WAV file (< 4 GiB), got {max_bytes!r}")
        if when_busy not in _WHEN_BUSY:
            raise ValueError(f"when_busy must be 'wait' or 'grow', got {when_busy!r}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        temp_audio._check_name_part("prefix", prefix)
        if anonymous and not _lowlevel.HAS_MEMFD:
            raise OSError(_errno.ENOSYS, "memfd_create is not available on this platform")
        self.max_bytes = max_bytes
        self.anonymous = bool(anonymous)
        self.when_busy = when_busy
        self.timeout = timeout
        self._prefix = prefix
        self._length = _slot_length(max_bytes)
        self._cond = _threading.Condition()
        self._slots = []
        self._free: list[_Slot] = []
        if not anonymous:
            reclaim_dead_pool_files(prefix)
        self._closed = False
        self._finalizer = _weakref.finalize(self, _close_slots, self._slots, self.anonymous, True)
        try:
            for _ in range(slots):
                self._free.append(self._new_slot())
        except BaseException:
            self.close()
            raise

    def _new_slot(self) -> _Slot:
        if self.anonymous:
            fd = _lowlevel.memfd(f"{self._prefix}{_POOL_MARK}slot")
            path = f"/proc/{_os.getpid()}/fd/{fd}"
        else:
            # locked=True: the flock is held before the name appears, so a
            # concurrent cleanup never takes a new slot for a dead pool's file.
            path, fd = temp_audio.create_temp_file(
                ".wav", f"{self._prefix}{_POOL_MARK}", size_hint=self._length, locked=True)
        try:
            _lowlevel.lock(fd, exclusive=False)
            _lowlevel.reserve(fd, self._length, path)
            if self.anonymous:
                _lowlevel.seal_shrink(fd)
            mapping = _lowlevel.Mapping(fd, self._length, writable=True, populate=True,
                                        filename=path)
        except BaseException:
            _lowlevel.close(fd)
            if not self.anonymous:
                _os.unlink(path)
            raise
        slot = _Slot(fd, path, mapping)
        slot.bytes[:] = 0  # touch every page once, now, not on the hot path
        mapping.format_slot(formats.spec_for("PCM_16", 16000, 1), 0)
        self._slots.append(slot)
        return slot

    @property
    def slots(self) -> int:
        """How many slots the pool has (it can grow in "grow" mode)."""
        return len(self._slots)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def _take(self, nbytes: int) -> _Slot:
        if nbytes > self.max_bytes:
            raise ValueError(
                f"{nbytes} bytes of audio do not fit a slot of this pool (max_bytes="
                f"{self.max_bytes}); make the pool with a larger max_bytes")
        deadline = None if self.timeout is None else _time.monotonic() + self.timeout
        with self._cond:
            while True:
                if self._closed:
                    raise ValueError("AudioPool is closed")
                if self._free:
                    slot = self._free.pop()
                    if not slot.mapping.broken:
                        return slot
                    self._drop(slot)  # its file was shrunk: never handed out again
                    return self._new_slot()
                if self.when_busy == "grow":
                    return self._new_slot()
                remaining = None if deadline is None else deadline - _time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"all {len(self._slots)} slots stayed busy for {self.timeout} s")
                self._cond.wait(remaining)

    def _drop(self, slot: _Slot) -> None:
        """Forget a slot whose file another process shrank (its mapping now holds zeros)."""
        self._slots.remove(slot)
        if not self.anonymous:
            try:  # only the file that is still this slot's, never one renamed over it
                if _os.path.samestat(_os.stat(slot.path), _os.fstat(slot.fd)):
                    _os.unlink(slot.path)
            except FileNotFoundError:
                pass
        _lowlevel.close(slot.fd)

    def _give_back(self, slot: _Slot) -> None:
        with self._cond:
            if not self._closed:
                self._free.append(slot)
                self._cond.notify()

    def write_wav(self, data: object, samplerate: int, *, subtype: str | None = None
                  ) -> PooledWav:
        """Copy (or convert, see :func:`luna_shm.write_wav`) audio into a free slot.

        Returns:
            A :class:`PooledWav` whose ``path`` is the complete WAV and whose
            ``array`` is a read-only view of the samples in the slot.
        """
        enc = encoding.plan(data, samplerate, subtype)
        for attempt in range(2):
            slot = self._take(enc.nbytes)
            try:
                if enc.conversion == "none":  # the common case: one C call, memcpy + header
                    offset = slot.mapping.fill_slot(enc.spec, enc.array)
                else:
                    offset = _lowlevel.wav_header_size(enc.spec)
                    encoding.encode_into(enc, slot.bytes[offset : offset + enc.nbytes])
                    slot.mapping.format_slot(enc.spec, enc.nbytes)
                if attempt:
                    slot.mapping.check()  # shrunk again while we wrote: give up
            except BaseException:
                self._give_back(slot)
                raise
            if not slot.mapping.broken:
                break
            self._give_back(slot)  # shrunk while we wrote: _take drops it
        return PooledWav(self, slot, enc.spec, enc.array.shape[0], offset, writable=False)

    def acquire(self, frames: int, samplerate: int, channels: int = 1,
                dtype: Any = "int16") -> PooledWav:
        """A slot formatted as a WAV of frames frames, with a writable zero-copy ``array``.

        A TTS model renders straight into ``array``; the file is complete as soon
        as it has. Use :meth:`PooledWav.truncate` when the audio came out shorter.
        """
        count = formats.check_frames(frames)
        rate = formats.check_samplerate(samplerate)
        nchannels = formats.check_channels(channels)
        sample_dtype = formats.check_dtype(dtype)
        spec = formats.spec_for(formats.natural_subtype(sample_dtype), rate, nchannels)
        slot = self._take(count * nchannels * sample_dtype.itemsize)
        offset = slot.mapping.format_slot(spec, count * nchannels * sample_dtype.itemsize)
        return PooledWav(self, slot, spec, count, offset, writable=True)

    def close(self) -> None:
        """Remove the slot files and release the pool; calling it again does nothing.

        Arrays taken from the pool stay valid: their mapping lives as long as they do.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._free.clear()
            self._cond.notify_all()
        self._finalizer.detach()
        _close_slots(self._slots, self.anonymous, False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AudioPool {state}: {len(self._slots)} slots of {self.max_bytes} bytes>"
