"""The WavWriter a render streams into: it makes room on the RAM disk before a chunk
that may not fit, and leaves the stream's end to the render's return.
"""

from __future__ import annotations

import os as _os
from collections.abc import Callable

from luna_shm import _lowlevel, _resource
from luna_shm.writer import WavWriter


class RenderWriter(WavWriter):
    """The WavWriter a render streams into: before a chunk that the RAM disk may have no
    room for, the cache's own unpinned entries make room (make_room, see
    AudioCache._room_on_ram_disk). A render cannot simply be run again, so the room is
    looked at before the write (fstatvfs), only when what was free at the last look,
    less what was written since, may not hold the chunk: another process that fills the
    RAM disk meanwhile still ends the render with ENOSPC.

    While render(writer) runs (rendering, set by AudioCache._render), close() and abort()
    end the render's writing but not its stream: whether the stream ends as finished or
    as failed is known only when render returns. A render that closes its writer (``with
    writer:``) and then raises must not have shown its followers a finished stream of
    audio that is never stored; they learn that it failed (StreamAbandoned)."""

    make_room: Callable[[int], bool] | None = None
    _free = 0
    rendering = False
    _closed_by_render = False

    @property
    def closed(self) -> bool:
        return self._closed_by_render or super().closed

    @property
    def aborted(self) -> bool:
        """True once abort() ended the stream as failed (also a ``with writer:`` block
        left by an exception): the render failed, whatever it returns."""
        return self._end_state == _lowlevel.STREAM_FAIL

    def _check_open(self) -> None:
        if self._closed_by_render:
            raise ValueError("I/O operation on closed WavWriter")
        super()._check_open()

    def close(self) -> None:
        if self.rendering and self._pid == _resource.current_pid:
            with self._lock:  # waits for a write in progress, as WavWriter.close does
                self._closed_by_render = True
            return
        self._closed_by_render = False
        super().close()

    def write(self, chunk: object) -> None:
        nbytes = int(getattr(chunk, "nbytes", 0))
        if self.make_room is not None and nbytes + ROOM_MARGIN > self._free:
            self._free = _lowlevel.room_on(self.fileno())
            if nbytes + ROOM_MARGIN > self._free:
                self.make_room(nbytes)
                self._free = _lowlevel.room_on(self.fileno())
        super().write(chunk)
        self._free -= nbytes


# Room for a file's header and its last, partly filled page, beyond its samples.
ROOM_MARGIN = 2 * _os.sysconf("SC_PAGE_SIZE")
