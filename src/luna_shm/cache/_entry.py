"""What a look-up hands out: a CachedAudio, pinned (a shared flock) while held, and the
CacheStats of a cache.
"""

from __future__ import annotations

import os as _os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from luna_shm import _lowlevel, _resource
from luna_shm._resource import FileResource
from luna_shm.cache._files import remove_unstored
from luna_shm.wav import mapped_samples


@dataclass(frozen=True)
class CacheStats:
    """What :meth:`AudioCache.stats` counts (the counters are shared by all processes)."""

    entries: int
    bytes: int
    max_bytes: int
    pinned: int
    hits: int
    misses: int
    evictions: int
    renders: int
    spills: int
    reloads: int
    disk_entries: int
    disk_bytes: int


class CachedAudio(FileResource):
    """A cache entry pinned while held: never evicted, by any process, until released.

    Attributes:
        key: the entry's key.
        path: the entry's file: a complete WAV, or the stored encoded file.
        stored: False for audio that was rendered but not stored (larger than the
            cache's bound, or every entry pinned): path is then a file of its own
            in the cache directory, removed once no one holds it.
        live: reserved for issue 11 (always False here): True will mean the entry is
            still being rendered and :meth:`blocks` follows it as it grows.

    Use it in ``with`` or call :meth:`release` (the same as ``close()``). Threads may
    share one: a release in one thread while another reads :attr:`array` leaves the
    reader with the array or ``ValueError`` (closed).
    """

    key: str = ""
    stored: bool = True
    live: bool = False
    _array: np.ndarray | None = None
    _samplerate: int | None = None

    _size: int = -1

    def __init__(self, cell: _lowlevel.FdCell, path: str, key: str, *, stored: bool = True,
                 size: int = -1) -> None:
        self.key = key
        self.stored = stored
        self._size = size
        self._own(cell, path)
        # A forked child that kept the pin would keep the entry from eviction, discard and
        # clear (in every process) after this process released it, for as long as it lives.
        self._let_go_at_fork()

    @property
    def is_wav(self) -> bool:
        """True for a WAV entry (array and samplerate work), False for encoded audio."""
        return self.path.endswith(".wav")

    def _load(self) -> tuple[np.ndarray, int]:
        """(array, samplerate), mapped on first use."""
        self._check_open()  # before the lock: a forked child never waits for it
        if not self.is_wav:
            raise ValueError(f"{self.path} holds encoded audio, not a WAV: read its bytes "
                             "(read_bytes) or hand its path to a decoder")
        with self._lock:
            self._begin_use()  # first: a handler may run at any call from here on
            try:
                self._check_open()  # released by another thread meanwhile
                array, samplerate = self._array, self._samplerate
                if array is None or samplerate is None:
                    self._map()
                    array, samplerate = self._array, self._samplerate
            finally:
                self._uses -= 1  # here, before any call: see Resource._end_use
                self._end_use()
        assert array is not None and samplerate is not None
        return array, samplerate

    def _map(self) -> None:
        """Parse and map the file (under the lock, open)."""
        # Parsed and mapped through the pinned descriptor: no second open, and the very
        # file our flock holds (a put of the same key may have renamed a newer one over
        # the name meanwhile).
        size = self._size if self._size >= 0 else _lowlevel.fstat(self._fd, self.path).st_size
        mapping, info = _lowlevel.Mapping.of_wav_fd(self._fd, size, self.path)
        samples = mapped_samples(mapping, info)
        self._array = samples if info.channels == 1 else samples.reshape(-1, info.channels)
        self._samplerate = info.samplerate

    @property
    def array(self) -> np.ndarray:
        """The samples: a read-only zero-copy view of the entry, shaped like read_wav's.

        Raises:
            ValueError: the entry is encoded audio, or was released.
            WavError: the file is not a WAV we can read.
        """
        array = self._array  # read once: a release in another thread drops it
        return array if array is not None else self._load()[0]

    @property
    def samplerate(self) -> int:
        """The entry's sample rate (WAV entries)."""
        samplerate = self._samplerate
        return samplerate if samplerate is not None else self._load()[1]

    def read_bytes(self) -> bytes:
        """The whole file's bytes (for encoded entries: the MP3, Opus... as stored)."""
        # Under the entry's lock: a release in another thread closes the descriptor.
        return self._use_fd(lambda fd: _os.pread(fd, _os.fstat(fd).st_size, 0))

    def blocks(self) -> Iterator[np.ndarray]:
        """The audio as blocks of frames, in order.

        A CachedAudio is always a complete entry, so this yields the whole array once;
        to play an entry while another caller still renders it, use
        :meth:`AudioCache.follow`.
        """
        yield self.array

    def release(self) -> None:
        """Unpin the entry (the same as :meth:`close`); calling it again does nothing.

        An array taken from :attr:`array` stays valid: its mapping keeps the file.
        """
        self.close()

    def _release(self) -> None:
        self._array = None
        if not self.stored and self._pid == _resource.current_pid:
            remove_unstored(self._fd, self.path, self.key)

    def __repr__(self) -> str:
        state = "released" if self.closed else "pinned"
        return f"<CachedAudio {self.key!r} {self.path!r} {state}>"
