"""WavWriter: a WAV file that grows chunk by chunk (streaming TTS).

After every :meth:`WavWriter.write` the header's sizes cover exactly the
samples that are in the file, so a player that opens it mid-stream reads a
correct WAV of what is there. Each chunk costs one system call: the samples
(straight from the array's memory), then the header, which is a store into
its shared mapping, not a system call.
"""

from __future__ import annotations

import os as _os
from typing import Any

from luna_shm import _lowlevel, formats, temp_audio
from luna_shm._resource import FileResource

__all__ = ["WavWriter"]


class WavWriter(FileResource):
    """Append audio chunks to a WAV file whose header is valid after each one.

    Args:
        path: where to write; None makes a new temp audio file on the RAM disk.
        samplerate: frames per second.
        channels: 1 to 65535.
        dtype: the chunks' sample type: uint8, int16, int32, float32 or float64.
    """

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
        header = _lowlevel.wav_header(self._spec, 0)
        self._data_offset = len(header)
        self._data_bytes = 0
        dest = temp_audio.open_destination(path)
        try:
            _lowlevel.write_at(dest.fd, 0, header, dest.partial or dest.path)
            # The header is rewritten after every chunk: through a shared
            # mapping of its page that costs a memory store, not a system call.
            self._header: _lowlevel.Mapping | None = _lowlevel.Mapping(
                dest.fd, len(header), writable=True, populate=True, filename=dest.path)
            temp_audio.finish_destination(dest)
        except OSError as exc:
            temp_audio.discard(dest)
            raise temp_audio.explain_full_disk(exc, dest.path) from None
        except BaseException:
            temp_audio.discard(dest)
            raise
        self._own(dest.fd, dest.path)

    @property
    def frames(self) -> int:
        """Frames written so far."""
        return self._data_bytes // (self.channels * self.dtype.itemsize)

    def write(self, chunk: object) -> None:
        """Append chunk, shape (frames,) for mono or (frames, channels), of the writer's dtype.

        Raises:
            TypeError: the chunk's dtype is not the writer's.
            ValueError: the chunk's shape does not match the channel count, or
                the file would pass 4 GiB.
            OSError: the write failed; the file keeps exactly the chunks before.
        """
        self._check_open()
        array = formats.check_audio(chunk)
        if array.dtype != self.dtype:
            raise TypeError(f"chunk dtype {array.dtype} does not match the writer's {self.dtype}")
        chunk_channels = formats.channels_of(array)
        if chunk_channels != self.channels:
            raise ValueError(
                f"chunk has {chunk_channels} channel(s) (shape {array.shape}); the writer "
                f"has {self.channels}"
            )
        if self._data_bytes + array.nbytes > 0xFFFFFFFF - self._data_offset:
            raise ValueError("data too large for a WAV file (the limit is 4 GiB)")
        if array.nbytes == 0:
            return  # nothing to append (the C writer reports a 0-byte write as EIO)
        try:
            self._data_bytes = _lowlevel.stream_append(
                self._fd, self._header, self._spec, self._data_offset, self._data_bytes, array,
                self.path)
        except OSError as exc:
            raise temp_audio.explain_full_disk(exc, self.path) from None

    def _release(self) -> None:
        self._header = None  # unmapped once nothing refers to it

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<WavWriter {self.path!r} {state}: {self.frames} frames written>"


