"""WavWriter: a WAV file that grows chunk by chunk (streaming TTS).

After every :meth:`WavWriter.write` the header's sizes cover exactly the
samples that are in the file, so a player that opens it mid-stream reads a
correct WAV of what is there. Each chunk costs one system call: the samples
(straight from the array's memory), then the header, which is a store into
its shared mapping, not a system call.
"""

from __future__ import annotations

import errno as _errno
import os as _os
from types import TracebackType
from typing import Any

import numpy as np

from luna_shm import _lowlevel, _newfile, _prefault, _resource, formats
from luna_shm._resource import FileResource

__all__ = ["WavWriter"]


class WavWriter(FileResource):
    """Append audio chunks to a WAV file whose header is valid after each one.

    Args:
        path: where to write; None makes a new temp audio file on the RAM disk (in
            the disk temp dir when the RAM disk refuses it: full, read-only).
        samplerate: frames per second.
        channels: 1 to 65535.
        dtype: the chunks' sample type: uint8, int16, int32, float32 or float64.

    Threads may share one writer: each :meth:`write` appends its whole chunk,
    and the header always covers exactly the chunks in the file. A forked
    child cannot use its parent's writer (``RuntimeError``), and closes its
    copies of the writer's file and mapping right at the fork: the stream's
    lock and its end stay the parent's (a follower learns at once that the
    parent died, even while a child it forked lives on).

    While it is open the file is a live stream that :func:`luna_shm.follow_wav`
    follows from any process; :meth:`close` ends it as finished, :meth:`abort`
    (or an exception out of its ``with`` block) as failed.
    """

    _stream: _lowlevel.Stream | None = None
    _end_state: int = _lowlevel.STREAM_DONE
    _closed_data_bytes: int = 0  # what the stream held when it was closed

    def __init__(
        self,
        path: str | _os.PathLike[str] | None,
        samplerate: int,
        channels: int = 1,
        dtype: Any = "int16",
    ) -> None:
        self.samplerate = formats.check_samplerate(samplerate)
        self.channels = formats.check_channels(channels)
        self.dtype = formats.check_dtype(dtype)
        self._spec = formats.spec_for(formats.natural_subtype(self.dtype), self.samplerate,
                                      self.channels)
        # A live stream's header: a state chunk ("live") before the data, set to
        # "done" by close() and "fail" by abort() (see luna_shm.follow).
        header = _lowlevel.live_header(self._spec, 0)
        self._data_offset = len(header)
        if path is None:
            # A RAM disk that refuses the new file, at its creation or at its header,
            # sends it to the disk temp dir; later chunks cannot move (see write).
            dest = _newfile.with_disk_fallback(lambda on_disk: self._start(None, header, on_disk))
        else:
            dest = self._start(path, header, False)
        self._own(dest.cell, dest.path)
        # A forked child (a multiprocessing worker) that kept the open file would keep
        # the flock and the last close: followers would never learn that this process
        # died, nor see the close event that ends the stream.
        self._let_go_at_fork()

    def _start(self, path: str | _os.PathLike[str] | None, header: bytes,
               on_disk: bool) -> _newfile.Destination:
        """Open the file and write its header (a new temp file: unnamed until then, so
        that a process killed on the way leaves no empty file under a temp name); on
        failure nothing is left and an OSError names the file."""
        dest = _newfile.open_destination(path, on_disk=on_disk)
        try:
            _lowlevel.write_at(dest.fd, 0, header, dest.path)  # the path given: see buffer
            # The header is rewritten after every chunk: through a shared
            # mapping of its page that costs a memory store, not a system call.
            # Private: never handed out, so a forked child's copy becomes zeros at the
            # fork, and no frame of a thread it lacks keeps the file's flock there.
            header_page = _lowlevel.Mapping(dest.fd, len(header), writable=True,
                                            populate=True, filename=dest.path, private=True)
            self._stream = _lowlevel.Stream(dest.fd, self._spec, header_page,
                                            self._data_offset)
            final = _newfile.finish_destination(dest)
        except OSError as exc:
            self._stream = None
            _newfile.discard(dest)
            raise _newfile.explain_full_disk(exc, dest.path) from None
        except BaseException:
            self._stream = None
            _newfile.discard(dest)
            raise
        header_page.filename = final  # errors name the final path
        return dest._replace(path=final)

    @property
    def frames(self) -> int:
        """Frames written so far (after close: the frames the file holds)."""
        data_bytes = self._closed_data_bytes if self._stream is None else self._stream.data_bytes
        return data_bytes // (self.channels * self.dtype.itemsize)

    def write(self, chunk: object) -> None:
        """Append chunk, shape (frames,) for mono or (frames, channels), of the writer's dtype.

        Raises:
            TypeError: the chunk's dtype is not the writer's.
            ValueError: the chunk's shape does not match the channel count, or
                the file would pass 4 GiB.
            OSError: the write failed; the file keeps exactly the chunks before.
                ESTALE when another process cut the file below those chunks (nothing
                is written: the chunk would land after a hole of zeros) or rewrote it
                in place (nothing is written: the file is the other program's now).
        """
        self._check_open()  # before the lock: a forked child never waits for it
        if (type(chunk) is np.ndarray and chunk.dtype == self.dtype
                and chunk.flags.c_contiguous and 0 < chunk.ndim <= 2
                and (chunk.shape[1] if chunk.ndim == 2 else 1) == self.channels):
            array = chunk  # the common case, checked in a few attribute reads
        else:
            array = self._checked(chunk)
        # The object's lock (see FileResource) around each append and around close: the
        # C append reads and then advances the data size, so two threads in it at once
        # would write their chunks at the same offset (the GIL is released during it).
        with self._lock:
            # The use first, then the look at the stream: a signal handler's close
            # between the two would otherwise close the descriptor under the append.
            self._begin_use()
            try:
                stream = self._stream
                if stream is None:  # closed by another thread, or a handler, meanwhile
                    raise ValueError("I/O operation on closed WavWriter")
                try:
                    stream.append(array, self.path)
                except OSError as exc:
                    self._append_failed(stream, array, exc)
            finally:
                self._uses -= 1  # here, before any call: see Resource._end_use
                self._end_use()

    def _append_failed(self, stream: _lowlevel.Stream, array: np.ndarray,
                       failure: OSError) -> None:
        """After a failed append (under the lock): append again when that can help, or
        raise the error the caller gets."""
        try:  # a failed append leaves the file as it was: try once more when the
            # prefault reserve held the space it lacked
            _prefault.retry_after(failure, lambda: stream.append(array, self.path))
            return
        except OSError as exc:
            failure = exc
        # EFBIG: the C refuses a chunk that would take the file past 4 GiB before it
        # writes anything (no check of ours on every chunk), and so does a file size
        # limit (RLIMIT_FSIZE) of this process when the write reaches it. The first is a
        # ValueError that says so.
        try:
            if failure.errno == _errno.EFBIG:
                formats.check_data_fits(stream.data_bytes + array.nbytes, self._spec,
                                        self._data_offset)
            raise _newfile.explain_full_disk(failure, self.path) from None
        finally:
            # failure's traceback holds this frame: without this, the cycle would
            # keep the stream's header mapping, and so the file and its flock,
            # after close(), until a garbage collection (followers and cleanups
            # would take the closed stream for a live one).
            del failure

    def _checked(self, chunk: object) -> np.ndarray:
        """chunk as an array the writer can append, or TypeError/ValueError saying why not
        (the 4 GiB limit too, before a strided chunk is copied)."""
        array = formats.audio_array(chunk, "chunk")
        if array.dtype.newbyteorder("<") != self.dtype:
            raise TypeError(f"chunk dtype {array.dtype} does not match the writer's {self.dtype}")
        chunk_channels = formats.channels_of(array)
        if chunk_channels != self.channels:
            raise ValueError(
                f"chunk has {_lowlevel.plural(chunk_channels, 'channel')} (shape "
                f"{array.shape}); the writer has {self.channels}"
            )
        stream = self._stream
        if stream is not None:
            formats.check_data_fits(stream.data_bytes + array.size * self.dtype.itemsize,
                                    self._spec, self._data_offset)
        return formats.contiguous_samples(array)

    def abort(self) -> None:
        """End the stream as failed: followers raise StreamAbandoned; the file keeps the
        frames written so far. Leaving the ``with`` block by an exception aborts too.
        Calling it on a closed writer does nothing."""
        self._end_state = _lowlevel.STREAM_FAIL
        self.close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def _release(self) -> None:
        # The end of the stream is recorded before the flock goes (when the fd
        # closes): a follower that finds the lock free and the state still "live"
        # knows the writer died. A store into the mapped header page: no system call.
        # Only the process that made the writer ends its stream: a forked child that
        # closes its copy must not tell the parent's followers that the stream is over.
        if self._stream is not None:
            self._closed_data_bytes = self._stream.data_bytes
            if self._pid == _resource.current_pid:
                self._stream.set_state(self._end_state)
        self._stream = None  # the header page is unmapped once nothing refers to it

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<WavWriter {self.path!r} {state}: {self.frames} frames written>"


