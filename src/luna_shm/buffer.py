"""WavBuffer: a WAV file that already exists and *is* a numpy array.

The file is created safely, its whole size reserved up front (a full RAM disk
raises ENOSPC now, never SIGBUS later), its header written, and it is mapped:
``buf.array`` is a writable view of the samples, so whatever renders into the
array writes the WAV with zero copies. ``anonymous=True`` uses a memfd: no
name in any directory, freed by the kernel when the last holder goes.
"""

from __future__ import annotations

import errno as _errno
import os as _os
from typing import Any

import numpy as np

from luna_shm import _lowlevel, _newfile, _prefault, formats, placement
from luna_shm._prefault import PrefaultStats
from luna_shm._resource import FileResource

__all__ = ["PrefaultStats", "WavBuffer", "create_wav_buffer", "prefault_stats",
           "prefault_wav_buffers"]

class WavBuffer(FileResource):
    """A mapped WAV file whose samples are the numpy array ``array``.

    Attributes:
        path: the file's path; for an anonymous buffer ``/proc/<pid>/fd/<n>``,
            which other processes of the same user can open while it lives.
        samplerate, channels, frames, dtype: what the WAV holds.
        anonymous: True for a memfd buffer.

    Threads may share one buffer: :meth:`truncate` and :meth:`close` take turns,
    and ``array`` in one thread while another closes the buffer returns the array
    (its mapping lives as long as the array does) or raises ``ValueError``.
    """

    _mapping: _lowlevel.Mapping | None = None
    _array: np.ndarray | None = None

    def __init__(
        self,
        frames: int,
        samplerate: int,
        channels: int = 1,
        dtype: Any = "int16",
        *,
        path: str | _os.PathLike[str] | None = None,
        anonymous: bool = False,
    ) -> None:
        self.frames = formats.check_frames(frames)
        self.samplerate = formats.check_samplerate(samplerate)
        self.channels = formats.check_channels(channels)
        self.dtype = formats.check_dtype(dtype)
        self.anonymous = formats.check_flag("anonymous", anonymous)
        self._spec = formats.spec_for(formats.natural_subtype(self.dtype), self.samplerate,
                                      self.channels)
        formats.check_frames_fit(self.frames, self._spec)
        data_bytes = self.frames * self.channels * self.dtype.itemsize
        padded = data_bytes + (data_bytes & 1)
        # Under 8 bytes of audio, an empty JUNK chunk follows it: truncate(0) must leave a
        # tail that readers skip, never a few stray bytes after a data size of 0, which
        # reads as a streaming writer's unfinished header (the bytes as samples).
        self._junk = 8 if 0 < padded < 8 else 0
        header = _lowlevel.wav_header(self._spec, data_bytes, self._junk)
        self._header_len = len(header)
        self._length = len(header) + padded + self._junk

        if anonymous:
            if path is not None:
                raise ValueError("an anonymous buffer has no path: pass path=None")
            if not _lowlevel.HAS_MEMFD:
                raise OSError(_errno.ENOSYS, "memfd_create is not available on this platform")
        try:
            if anonymous:
                name, cell = self._open_prepared(None, header) or _prefault.retry_if_short(
                    lambda: self._open_memfd(header))
            else:
                name, cell = self._open_named(path, header)
            self._own(cell, name)
            # A forked child (a multiprocessing worker) that kept the open file (or the
            # mapping) would keep the flock: the file would stay "in use" to every cleanup
            # after this process closed the buffer, or died, for as long as the child lives.
            self._let_go_at_fork()
        finally:
            if path is None:  # only now: preparing the next file must not slow this call
                _prefault.refill()

    def _open_memfd(self, header: bytes) -> tuple[str, _lowlevel.FdCell]:
        cell = _lowlevel.fd_cell()  # until the buffer that lets go of it exists
        fd = _lowlevel.memfd(_prefault.MEMFD_NAME, cell=cell)
        name = f"/proc/{_os.getpid()}/fd/{fd}"
        try:
            self._open(fd, name, header)
        except OSError as exc:
            _lowlevel.release(cell)
            raise _newfile.explain_full_disk(exc, name) from None
        except BaseException:
            _lowlevel.release(cell)
            raise
        return name, cell

    def _open_named(self, path: str | _os.PathLike[str] | None,
                    header: bytes) -> tuple[str, _lowlevel.FdCell]:
        """Create and map the file; a new temp file that the RAM disk refuses goes to disk."""
        if path is None:
            chosen = placement.current()
            if chosen.in_ram and chosen.directory == chosen.ram_dir and _lowlevel.HAS_O_TMPFILE:
                prepared = self._open_prepared(chosen.directory, header)
                if prepared is not None:
                    return prepared
            return _newfile.with_disk_fallback(
                lambda on_disk: self._open_destination(None, header, on_disk))
        return _prefault.retry_if_short(lambda: self._open_destination(path, header, False))

    def _open_prepared(self, directory: str | None,
                       header: bytes) -> tuple[str, _lowlevel.FdCell] | None:
        """Make the buffer from a file of the prefault reserve (a memfd when directory is
        None), or return None: the reserve had none, or the one taken failed (given back,
        counted and logged: the caller takes the normal path)."""
        prepared = _prefault.take(directory, self._length)
        if prepared is None:
            return None
        fd = prepared.cell[0]
        if directory is None:
            name = f"/proc/{_os.getpid()}/fd/{fd}"
        else:  # named last, once cut and given its header (see _open_destination)
            name = _newfile.new_name_in(directory)
        try:
            self._open(fd, name, header, prepared=prepared.mapping)
            if directory is not None:
                name = _newfile.publish(_newfile.NewFile(name, prepared.cell, False, ".wav",
                                                         placement.AUDIO_PREFIX))
                assert self._mapping is not None
                self._mapping.filename = name
            return name, prepared.cell
        except BaseException as exc:
            self._mapping = self._array = None
            _lowlevel.release(prepared.cell)  # never named: the kernel frees it
            if not isinstance(exc, OSError):
                raise
            _prefault.note_failure(f"luna_shm: a prepared buffer file could not be used "
                                   f"({exc}): made a new one",
                                   f"a prepared buffer file could not be used ({exc.strerror})")
            return None

    def _open_destination(self, path: str | _os.PathLike[str] | None, header: bytes,
                          on_disk: bool) -> tuple[str, _lowlevel.FdCell]:
        """One try at making and mapping the file (a new temp file: unnamed until it is
        reserved, given its header and mapped, so that a process killed on the way
        leaves no headerless file under a temp name); on failure nothing of it is left
        and an OSError names the file's final path."""
        dest = _newfile.open_destination(path, size_hint=self._length, on_disk=on_disk)
        try:
            # Errors name dest.path, the path given, even while the file is a hidden
            # new one beside it (dest.partial) that replaces the file there once made.
            self._open(dest.fd, dest.path, header)
            final = _newfile.finish_destination(dest)
            assert self._mapping is not None
            self._mapping.filename = final  # errors name the final path
            return final, dest.cell
        except OSError as exc:
            self._mapping = self._array = None
            _newfile.discard(dest)
            raise _newfile.explain_full_disk(exc, dest.path) from None
        except BaseException:
            self._mapping = self._array = None
            _newfile.discard(dest)
            raise

    def _open(self, fd: int, name: str, header: bytes, *,
              prepared: _lowlevel.Mapping | None = None) -> None:
        """Reserve, write the header, map; or, given the populated mapping of a prepared
        file (every page allocated already), cut it to the exact length and adopt it."""
        if prepared is not None:
            # The guarded range first, so that it never reaches past the file's end.
            prepared.filename = name
            prepared.cut(self._length)
            _lowlevel.set_length(fd, self._length, name)
            prepared.view[: self._header_len] = header
        else:
            _lowlevel.reserve(fd, self._length, name)
            _lowlevel.write_at(fd, 0, header, name)
        if self.anonymous:
            _lowlevel.seal_shrink(fd, name)
        # Private until array hands it out: a child forked before that gets zeros there,
        # and so never the file's flock (see Mapping.share).
        self._mapping = prepared or _lowlevel.Mapping(fd, self._length, writable=True,
                                                      populate=True, filename=name,
                                                      private=True)
        if self._junk:
            self._mapping.view[self._length - 8 : self._length] = b"JUNK\0\0\0\0"
        _lowlevel.lock(fd, exclusive=False, wait=True, filename=name)
        count = self.frames * self.channels
        flat = np.frombuffer(self._mapping.view, dtype=self.dtype, count=count,
                             offset=self._header_len)
        self._array = flat.reshape(self._shape(self.frames))

    def _shape(self, frames: int) -> tuple[int, ...]:
        return (frames,) if self.channels == 1 else (frames, self.channels)

    @property
    def array(self) -> np.ndarray:
        """The samples: a writable view of shape (frames,) or (frames, channels).

        Raises:
            ValueError: the buffer is closed.
            OSError: ``OSError(ESTALE, ..., path)``: another process cut the file
                (``open(path, "wb")``, ``soundfile.write``, ``os.truncate``) while it
                was mapped here, and this process touched a page that was gone.
                Instead of dying of SIGBUS, it had the mapping replaced with zero
                pages: what was written to the array since is lost. Make a new
                buffer. A rewrite that put at least as many bytes back before any
                such touch is not seen: the array shows the new bytes. An anonymous
                buffer (a memfd sealed against shrinking) cannot be cut at all.
        """
        # Read once each: a close in another thread drops both (array first) at any
        # point in here, and an array taken is safe to hand out (it keeps its mapping).
        array, mapping = self._array, self._mapping
        self._check_open()
        if array is None or mapping is None:  # closed since the reads
            raise ValueError("I/O operation on closed WavBuffer")
        mapping.check()
        mapping.share()  # a child forked from now on keeps the caller's array
        return array

    def truncate(self, frames: int) -> None:
        """Shorten the WAV to its first ``frames`` frames (the audio came out shorter).

        The header is fixed at once. The file keeps its length, named or
        anonymous: the unused tail becomes a ``JUNK`` chunk that readers skip
        (a tail under 8 bytes is left past the RIFF chunk's end, which readers
        ignore; a buffer of under 8 bytes of audio has a JUNK chunk from the start,
        so that no stray byte follows a data size of 0). A file is never shrunk
        under the processes that mapped it.

        Raises:
            TypeError, ValueError: frames is not an int from 0 to :attr:`frames`,
                or the buffer is closed.
            OSError: ESTALE when the file shrank under this buffer (see :attr:`array`),
                or another process cut or rewrote it in place (any other length) with
                no page of ours lost: its header is not ours to write then, and the
                mapping is replaced with zeros, so that ``array`` raises too.
        """
        self._check_open()  # a closed buffer says so before a bad frames does
        new_frames = formats.check_frames(frames)
        # Under the buffer's lock: a close in another thread closes the descriptor.
        self._use_fd(lambda fd: self._truncate(new_frames))

    def _truncate(self, new_frames: int) -> None:
        """truncate, under the lock, on the open buffer."""
        assert self._mapping is not None and self._array is not None
        self._mapping.check_file(self._fd, self._length)
        if new_frames > self.frames:
            raise ValueError(f"cannot grow a buffer: frames={_lowlevel.brief(new_frames)} > "
                             f"{self.frames}")
        data_bytes = new_frames * self.channels * self.dtype.itemsize
        end = self._header_len + data_bytes + (data_bytes & 1)
        view = self._mapping.view
        tail = self._length - end
        if tail < 8:
            tail = 0  # too small for a chunk: left past the RIFF's end
        view[: self._header_len] = _lowlevel.wav_header(self._spec, data_bytes, tail)
        if data_bytes & 1:
            view[end - 1] = 0
        if tail:
            view[end : end + 8] = b"JUNK" + (tail - 8).to_bytes(4, "little")
        self.frames = new_frames
        self._array = self._array[:new_frames]
        self._mapping.check_file(self._fd, self._length)  # cut by another process meanwhile

    def close(self) -> None:
        """Unmap (once no array views it) and close the file; calling it again does
        nothing. Waits for a truncate in progress (called by a signal handler that
        interrupted this thread's truncate, it closes the buffer as that returns).

        In a forked child this closes only the child's copy of the descriptor.
        """
        super().close()

    def _release(self) -> None:
        # The mapping itself lives on while the user's arrays view it.
        self._array = None
        self._mapping = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<WavBuffer {self.path!r} {state}: {self.frames} frames, {self.channels} ch, "
                f"{self.samplerate} Hz, {self.dtype}>")


def create_wav_buffer(
    frames: int,
    samplerate: int,
    channels: int = 1,
    dtype: Any = "int16",
    *,
    path: str | _os.PathLike[str] | None = None,
    anonymous: bool = False,
) -> WavBuffer:
    """Create a WAV file of ``frames`` frames whose samples are a writable numpy array.

    Args:
        frames: length in frames, >= 0, at most what a 4 GiB WAV holds.
        samplerate: frames per second, 1 to 2**32-1.
        channels: 1 to 65535.
        dtype: uint8, int16, int32, float32 or float64 (None is refused).
        path: where; None makes a new temp audio file on the RAM disk.
        anonymous: a memfd with no name in any directory (path must be None).

    Returns:
        The open :class:`WavBuffer`; close it (or use ``with``) when done.

    Raises:
        TypeError, ValueError: bad arguments, named in the message (frames too long
            for a 4 GiB WAV is a ValueError giving the limit).
        OSError: ENOSPC when the space cannot be reserved (nothing is left behind).
    """
    return WavBuffer(frames, samplerate, channels, dtype, path=path, anonymous=anonymous)


def prefault_wav_buffers(max_bytes: int = 8 * 1024 * 1024, *, per_size: int = 2) -> None:
    """Keep files ready whose pages are already faulted in, so that ``create_wav_buffer``
    (a new temp file, ``path=None``, or ``anonymous=True``) returns sooner.

    A new RAM-disk page is allocated and zeroed when first touched; through a mapping
    that costs about three times a write of the same bytes. With the reserve on, a
    background thread (a daemon, one per process) prepares unnamed files of the sizes
    recently asked for (O_TMPFILE files in the RAM dir for named buffers, memfds for
    anonymous ones), every page allocated and written once. A call takes one, gives it
    its fresh ``luna_audio_<uuid4 hex>.wav`` name (``linkat``), cuts it to the exact
    length and maps it: a 500 KB buffer is writable in about a quarter of the time a
    new file takes. The thread then prepares the next one. A call never waits for the
    thread: with no prepared file of its size (the first call of a size, calls faster
    than the thread refills, a full RAM disk) it makes a new file as before. The buffer
    is the same either way: same name, size, contents, lock and errors.

    Why an explicit call and a thread: the reserve holds memory (up to ``max_bytes``,
    counted against the RAM disk or, for memfds, the process's memory) and a thread,
    which a library must not start by itself; the thread is what keeps the reserve
    full off the caller's path, call after call. Call this once at start-up.

    Limits: files of at most ``per_size`` per size class (a size rounded up by at most
    1/8; a taken file is cut to the exact size), ``max_bytes`` in all, the least
    recently asked sizes giving way first. A file is prepared in the RAM dir only while
    it has at least twice the file's size free, and a create that runs out of space
    first gives the reserve's space back and tries again. Given paths (``path=...``)
    and the disk fallback dir are never served from the reserve; neither are named
    buffers without ``O_TMPFILE``.

    Fork: a forked child starts with the reserve off (it never uses or frees the
    parent's files) and without the thread; call this again there if it needs one.

    Args:
        max_bytes: the most bytes the prepared files may hold together; 0 turns the
            reserve off, stops the thread and frees every prepared file.
        per_size: how many files to keep ready of each size class, >= 1.

    Raises:
        TypeError, ValueError: a bad argument, named in the message.
        RuntimeError: the thread cannot be started (a pids limit): the reserve stays
            off, and a later call tries again.
    """
    _prefault.configure(formats.check_int("max_bytes", max_bytes),
                        formats.check_int("per_size", per_size, minimum=1))


def prefault_stats() -> PrefaultStats:
    """What the prefault reserve of this process holds and did (see
    :func:`prefault_wav_buffers`): files and bytes held, hits, misses, failures."""
    return _prefault.stats()
