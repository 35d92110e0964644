"""Follow a WAV file while it is written: play while it renders.

``follow_wav`` yields each new block of frames as soon as it is in the file,
``afollow_wav`` is its asyncio form, and ``iter_wav_stream`` yields bytes for a
pipe or an HTTP response. Any number of followers, in any processes, follow one
file; none of them costs the writer anything.

How a follower knows what the writer is doing (see README, "Play while it
renders"):

- A :class:`~luna_shm.WavWriter` holds a shared flock on its file for its whole
  life and keeps a state chunk in its header ("JUNK" "lsst" + "live", "done" or
  "fail"). close() stores "done" (abort() "fail") before the lock goes. So: state
  "done" = finished; "fail" = aborted; "live" with the lock free = the writer
  died (the kernel drops the flock of a killed process; nothing could write
  "done") -- known at once, no timeout. So is "live" after a close event with the
  file open for writing nowhere (a read lease): another process may hold the lock
  then (a waiter of a cache's render takes it as the writer dies).
- Any other writer (sox, espeak-ng, ffmpeg, a shell redirect): the stream ends
  when no process has the file open for writing, asked with a read lease
  (F_SETLEASE), after inotify reports a close-after-write.
- Waiting: inotify on the file (writes, close after writing), armed before the
  file's state is read, so that no change between the two is missed. An idle
  follower sleeps in poll(); it uses no CPU.

A follower belongs to the process that started iterating it: a forked child closes
its copies of the follower's fds at the fork (they would keep a removed file's RAM,
and the inotify instance, for as long as the child lives), and iterating the
parent's follower there raises RuntimeError naming the parent.
"""

from __future__ import annotations

import asyncio as _asyncio
import errno as _errno
import fcntl as _fcntl
import os as _os
import time as _time
from collections.abc import Generator, Iterator
from typing import Literal, NamedTuple, TypeVar

import numpy as np

from luna_shm import _lowlevel, _resource, formats
from luna_shm.errors import StreamAbandoned, WavError

__all__ = ["AsyncFollower", "afollow_wav", "follow_wav", "iter_wav_stream"]

_T = TypeVar("_T")

# A block is at most this many bytes (a follower that starts after a long
# stream is written gets it in pieces of bounded size).
_MAX_BLOCK_BYTES = 1 << 20

# After inotify reports a close-after-write, the kernel drops the writer's
# flock a few instructions later (in the same final fput): how long we give it,
# looking again after the first step, then twice as long each time. (Another
# process that merely opens and closes the file makes the same event.)
_LOCK_RELEASE_GRACE = 0.5
_LOCK_RELEASE_FIRST_STEP = 0.001

# Another program's stream: the kernel reports its close (IN_CLOSE_WRITE) before it
# stops counting that descriptor as open for writing, and the file system's release runs
# in between (ext4 and xfs write out a rewritten file's delayed blocks there), so a read
# lease asked for at the event can be refused although the writer is gone; no event
# follows. How long we keep asking after a close event, from the first step on, twice as
# long each time.
_WRITERS_GONE_GRACE = 2.0

# A live stream's lock held exclusively by another process (a cleanup or another
# follower testing it; a writer holds it shared): whether the writer lives cannot be
# told until that process lets go, which makes no event. Look again after the first
# step, twice as long each time, up to the longest, while it holds the lock.
_LOCK_CONTENDED_MAX = 0.1

# While a live stream's file holds bytes its header does not count yet, the sizes
# come by a store into the writer's mapped header page, which makes no event:
# look again after this long, twice as long each time, up to the longest.
_UNCOUNTED_RECHECK = 0.0005
_UNCOUNTED_RECHECK_MAX = 0.05


class _Range(NamedTuple):
    """The core tells its driver: bytes [offset, offset + nbytes) of the file are new."""

    fd: int
    info: _lowlevel.WavInfo
    offset: int
    nbytes: int


class _Wait(NamedTuple):
    """The core asks its driver to wait for events on fd, at most timeout seconds.

    With prefetch, the driver may also read, in the same C call as the wait, the whole
    frames that a write adds from prefetch.offset on (at most prefetch.nbytes): the hot
    path of a live stream, one Python-to-C crossing from wake-up to array.
    """

    fd: int
    timeout: float | None
    prefetch: _Range | None = None


class _Woken(NamedTuple):
    """What the driver sends back after a wait: the events, and the frames it read."""

    bits: int
    block: np.ndarray | None = None
    nbytes: int = 0
    file_size: int = -1  # the file's size after the wait, when the driver read a block
    data_bytes: int = -1  # the data size the header held then, when the driver read a block


class _Held(NamedTuple):
    """The core hands back a block the driver read after a wait, now in order."""

    block: np.ndarray


_NOTHING = _Woken(0)

_Step = Generator[_Wait | _Range | _Held, _Woken | None, None]


def _follow_path(path: str | _os.PathLike[str]) -> str:
    """path as a str; ValueError for "": its ENOENT would read as "not created yet", and
    the follower would wait for a file that no name can ever give."""
    path_str = _lowlevel.path_argument(path)
    if not path_str:
        raise ValueError(f"path must not be empty, got {path_str!r}")
    return path_str


def _timed_out(path: str, timeout: float) -> TimeoutError:
    return TimeoutError(_errno.ETIMEDOUT, f"no new audio for {timeout:g} s", path)


def _can_lock(fd: int, *, exclusive: bool) -> bool:
    """True when the file's lock can be taken now (exclusive, or shared); a lock taken to
    test it is let go at once."""
    if not _lowlevel.lock(fd, exclusive=exclusive, wait=False):
        return False
    _fcntl.flock(fd, _fcntl.LOCK_UN)
    return True


def _lock_is_free(fd: int) -> bool:
    """True when no live WavWriter holds the file (we can take its lock exclusively)."""
    return _can_lock(fd, exclusive=True)


def _lock_held_exclusively(fd: int) -> bool:
    """True when another open file holds the lock exclusively (a cleanup or a follower
    testing it): then a failed exclusive test says nothing of the writer, which holds it
    shared. Asked only after such a test failed."""
    return not _can_lock(fd, exclusive=False)


def _check_owner(owner: int, what: str, path: str) -> None:
    """RuntimeError naming the owner when a forked child iterates its parent's follower
    (whose fds it closed at the fork)."""
    if owner != _resource.current_pid:
        raise _resource.inherited_error(f"{what} {path!r}", owner)


def _open_watched(path: str) -> tuple[_lowlevel.FdCell, _lowlevel.FdCell]:
    """Open path read-only and watch it; the fd cells of (the file, the watch). The watch
    is armed before the caller reads anything, so that no write after that goes unseen."""
    opened, watch = _lowlevel.fd_cell(), _lowlevel.fd_cell()
    fd = _lowlevel.open_regular(path, cell=opened)
    try:
        # Through /proc the watch is on the very file we opened, even if the
        # name has been replaced since.
        _lowlevel.watch_open(f"/proc/self/fd/{fd}", directory=False, cell=watch,
                             filename=path)
    except FileNotFoundError:  # no /proc
        _lowlevel.watch_open(path, directory=False, cell=watch)
    return opened, watch


def _available(info: _lowlevel.WavInfo, file_size: int) -> int:
    """Bytes of whole frames after the data offset that a follower may read now.

    Of a live WavWriter stream, only what its header counts: the writer appends the
    samples first (inotify tells us), then stores the new sizes into its mapped header
    page (no event). Bytes past the count are an append whose sizes are still to come,
    or another process's, which the writer's next append writes over: never frames.
    """
    if info.stream_state != _lowlevel.STREAM_LIVE:
        return info.data_bytes
    counted = min(info.data_bytes, max(file_size - info.data_offset, 0))
    return counted - counted % info.block_align


def _uncounted(data_offset: int, counted: int, file_size: int) -> bool:
    """True when the file holds bytes past the data (and pad byte) its header counts."""
    return file_size > data_offset + counted + (counted & 1)


def _check_counted(path: str, counted: int, delivered: int) -> None:
    """Raise WavError when a stream's header counts less audio than was followed: a live
    WavWriter's, or another program's whose header said "to the end of the file" while
    the follower read bytes that the finished header leaves out (libsndfile appends a
    LIST chunk, then writes the sizes): they were handed out as audio."""
    if counted < delivered:
        raise WavError(f"{path}: the stream's header went back under its follower (it "
                       f"counts {counted} bytes of audio, {delivered} were read)")


def _check_not_cut(fd: int, path: str, data_offset: int, counted: int, size: int) -> int:
    """size, or the file's size now when the live stream's header counts more audio than
    size holds (the count may be newer than size: the writer stores it after the
    samples). WavError when the file ends before the counted audio: another process cut
    it, and the writer's next append would extend it over a hole of zeros."""
    if size >= data_offset + counted:
        return size
    size = _os.fstat(fd).st_size
    if size < data_offset + counted:
        raise WavError(f"{path}: the stream was cut under its follower (its header counts "
                       f"{counted} bytes of audio, the file holds "
                       f"{max(size - data_offset, 0)})")
    return size


def _layout(info: _lowlevel.WavInfo) -> dict[str, object]:
    """What stays the same for a stream's whole life: its format, where its data starts,
    and whether a WavWriter writes it (a state chunk)."""
    return {"samplerate": info.samplerate, "channels": info.channels, "format": info.format,
            "bits": info.bits, "data offset": info.data_offset,
            "state chunk": info.stream_state != _lowlevel.STREAM_NONE}


def _check_same_stream(path: str, first: _lowlevel.WavInfo, info: _lowlevel.WavInfo) -> None:
    """Raise WavError when info's header is not the followed stream's: another process
    rewrote the file in place (soundfile.write over it), and its bytes are other audio."""
    was, now = _layout(first), _layout(info)
    if was != now:
        changed = ", ".join(f"{key} {was[key]} -> {now[key]}" for key in was
                            if was[key] != now[key])
        raise WavError(f"{path}: the stream was rewritten under its follower ({changed})")


def _parse(fd: int, size: int, path: str) -> _lowlevel.WavInfo:
    """The file's header; of a WavWriter's stream (live, done or failed), with the data
    size its header field holds: bytes past it were never the writer's audio. (A 0 with a
    RIFF that ends at the data is "to the end of the file" only in other programs'
    streams.)"""
    info = _lowlevel.wav_parse_fd(fd, size, path)
    if info.stream_state == _lowlevel.STREAM_NONE:
        return info
    counted = _counted_bytes(fd, info.data_offset)
    if counted is None:  # rewritten since the parse: the next look parses it again
        return info
    return info._replace(data_bytes=counted)


def _counted_bytes(fd: int, data_offset: int) -> int | None:
    """The data size a live stream's header holds now (the 4 bytes before its data), or
    None when the 4 bytes before those no longer say "data": another process rewrote
    the file in place (or cut it), and what lies there is no count of ours."""
    chunk = _os.pread(fd, 8, data_offset - 8)
    if chunk[:4] != b"data":
        return None
    return int.from_bytes(chunk[4:], "little")


def _core(path: str, timeout: float | None) -> _Step:
    """The follower, as a generator of _Range (new bytes), _Held (a block the driver read)
    and _Wait (block until the driver sends a _Woken): shared by the sync and async forms."""
    fd = watch = -1  # the fds in these cells, as plain ints
    opened = watching = None
    try:
        last_progress = _time.monotonic()

        def wait_left() -> float | None:
            if timeout is None:
                return None
            left = last_progress + timeout - _time.monotonic()
            if left <= 0:
                raise _timed_out(path, timeout)
            return left

        # 1. The file: wait for it to appear when it does not exist yet.
        directory = _os.path.dirname(path) or "."
        while fd < 0:
            try:
                opened, file_watch = _open_watched(path)
            except FileNotFoundError:
                if watch < 0:
                    watching = _lowlevel.fd_cell()
                    watch = _lowlevel.watch_open(directory, directory=True, cell=watching,
                                                 filename=path)
                    continue  # armed: look again before waiting
                yield _Wait(watch, wait_left())
                continue
            if watching is not None:
                _lowlevel.release(watching)
            watching, fd, watch = file_watch, opened[0], file_watch[0]

        delivered = data_offset = 0  # bytes of data already handed out, and where from
        last_block = 4096  # bytes of the last block: what the next one likely holds
        announced = False  # the first parse is handed out once (iter_wav_stream's header)
        closed_seen = False  # inotify saw a close after writing since we last looked
        asked_writers = False  # a foreign stream: asked once whether anyone writes it
        recheck = 0.0  # > 0: the file holds bytes the header does not count; look again then
        grace_until = 0.0  # > 0: a writer closed; look for its lock (or write access) to go
        grace_step = 0.0  # the next look at that lock, this many seconds on
        contended = 0.0  # > 0: another process holds the lock exclusively; look again then
        info: _lowlevel.WavInfo | None = None
        first: _lowlevel.WavInfo | None = None  # the header the follower started with

        def sleep() -> _Wait:
            """Wait for events; on a live WavWriter's stream, read what comes at once."""
            nonlocal recheck, grace_until, grace_step
            left = wait_left()
            if contended:
                left = contended if left is None else min(left, contended)
            if recheck:
                left = recheck if left is None else min(left, recheck)
                recheck = min(recheck * 2, _UNCOUNTED_RECHECK_MAX)
            if grace_until:
                # A wait, not a sleep: afollow_wav's event loop runs on meanwhile, and
                # the timeout (in left) still holds.
                step = min(grace_step, grace_until - _time.monotonic())
                if step > 0:
                    left = step if left is None else min(left, step)
                    grace_step *= 2
                else:
                    grace_until = 0.0
            if (info is None or info.stream_state != _lowlevel.STREAM_LIVE
                    or info.block_align < 2 or info.bits == 24):
                return _Wait(watch, left)
            cap = max(min(last_block, _MAX_BLOCK_BYTES) // info.block_align, 1) * info.block_align
            return _Wait(watch, left, _Range(fd, info, data_offset + delivered, cap))

        def note_uncounted(counted: int, size: int) -> None:
            """Look again soon while the file holds bytes that the header does not count."""
            nonlocal recheck
            if not _uncounted(data_offset, counted, size):
                recheck = 0.0
            elif not recheck:
                recheck = _UNCOUNTED_RECHECK

        def ranges(start: int, end: int) -> Iterator[_Range]:
            assert info is not None
            step = max(_MAX_BLOCK_BYTES // info.block_align, 1) * info.block_align
            for at in range(start, end, step):
                yield _Range(fd, info, at, min(step, end - at))

        woken: _Woken | None = _NOTHING
        while True:
            bits, held, held_bytes, known_size, known_counted = woken or _NOTHING
            woken = _NOTHING
            if held is not None:
                yield _Held(held)
                delivered += held_bytes
                last_block = held_bytes
                last_progress = _time.monotonic()
            if bits & _lowlevel.WATCH_CLOSED:
                closed_seen = True
            # After a prefetch the C call has just taken the size; a write since then
            # has queued an event, so the next wait returns at once.
            size = known_size if held is not None else _os.fstat(fd).st_size
            if delivered and size < data_offset + delivered:
                raise WavError(f"{path}: the stream shrank under its follower ({delivered} "
                               f"bytes of audio were read, the file now holds "
                               f"{max(size - data_offset, 0)})")
            if (bits == _lowlevel.WATCH_CHANGED and info is not None
                    and info.stream_state == _lowlevel.STREAM_LIVE and info.block_align > 1
                    and (counted := (known_counted if held is not None
                                     else _counted_bytes(fd, data_offset))) is not None):
                # The hot path: a live WavWriter appended. The new frames are those
                # the header's data size counts (see _available), read from its field
                # alone. A state change comes with a close event, and a field that is
                # no longer after "data" (None: another process rewrote the file) is
                # no count of ours: both take the full path below.
                _check_counted(path, counted, delivered)
                size = _check_not_cut(fd, path, data_offset, counted, size)
                note_uncounted(counted, size)
                in_file = min(counted, size - data_offset)
                end = data_offset + in_file - in_file % info.block_align
                start = data_offset + delivered
                if end > start:
                    for rng in ranges(start, end):
                        yield rng
                        delivered += rng.nbytes
                    last_block = end - start
                    last_progress = _time.monotonic()
                if held is not None or end > start:
                    woken = yield sleep()
                    continue
            try:
                info = _parse(fd, size, path) if size else None
            except WavError:
                if info is not None and info.stream_state == _lowlevel.STREAM_LIVE:
                    # A live stream's header that no longer fits the file: its count
                    # passes the file's end (cut), or was stored after our size.
                    counted = _counted_bytes(fd, data_offset)
                    if counted is not None:
                        _check_not_cut(fd, path, data_offset, counted, size)
                info = None
            if info is None:
                # Not a WAV (yet): an empty placeholder, or a header being written.
                if size and _lock_is_free(fd) and _lowlevel.writers_gone(fd) is not False:
                    _lowlevel.wav_parse_fd(fd, _os.fstat(fd).st_size, path)  # raises
                if not size and _os.pread(fd, 1, 0):
                    if _os.fstat(fd).st_size:
                        continue  # a writer filled the empty file meanwhile: look again
                    # Its size says empty, yet it reads: a /proc or /sys file, which no
                    # write ever makes a WAV (and inotify never reports).
                    raise WavError(f"{path}: not a WAV file that is being written: its size "
                                   "is 0 but it holds bytes (a /proc or /sys file?)")
                woken = yield sleep()
                continue
            if first is None:
                first = info
            _check_same_stream(path, first, info)
            data_offset = info.data_offset
            if info.stream_state == _lowlevel.STREAM_LIVE:
                _check_counted(path, info.data_bytes, delivered)
                size = _check_not_cut(fd, path, data_offset, info.data_bytes, size)
                note_uncounted(info.data_bytes, size)
            else:
                recheck = 0.0
                if info.stream_state == _lowlevel.STREAM_NONE:
                    _check_counted(path, info.data_bytes, delivered)
            if not announced:
                announced = True
                yield _Range(fd, info, info.data_offset, 0)
            end = info.data_offset + _available(info, size)
            start = info.data_offset + delivered
            if end > start:
                for rng in ranges(start, end):
                    yield rng
                    delivered += rng.nbytes
                last_block = end - start
                last_progress = _time.monotonic()
                continue  # look again before sleeping: the stream may be over
            # Nothing new: is the stream over?
            state = info.stream_state
            if state == _lowlevel.STREAM_DONE:
                return
            if state == _lowlevel.STREAM_FAIL:
                raise StreamAbandoned(f"{path}: the writer aborted the stream after "
                                      f"{delivered // info.block_align} frames")
            if state == _lowlevel.STREAM_LIVE:
                if _lock_is_free(fd) or ((closed_seen or grace_until)
                                         and _lowlevel.writers_gone(fd) is True):
                    # The lock free, or, after a close, the file open for writing
                    # nowhere: another process can hold the lock when the writer dies
                    # (a waiter of a cache's render takes it then, as the kernel grants
                    # it) for longer than the grace below, stopped there; nothing that
                    # happens after it lets go makes an event on the file.
                    again = _parse(fd, _os.fstat(fd).st_size, path)
                    _check_same_stream(path, info, again)
                    if again.stream_state == _lowlevel.STREAM_LIVE:
                        if _available(again, _os.fstat(fd).st_size) > delivered:
                            continue  # the last frames first, then the verdict
                        raise StreamAbandoned(
                            f"{path}: the writer died (it let go of the file and never "
                            f"marked the end) after {delivered // info.block_align} frames")
                    continue  # it closed just now: read its final state
                if closed_seen:
                    # A writer closed: if it was the WavWriter, its flock goes a
                    # moment after the close event (same final fput). Look again
                    # soon for that moment (sleep() waits in short steps).
                    closed_seen = False
                    grace_until = _time.monotonic() + _LOCK_RELEASE_GRACE
                    grace_step = _LOCK_RELEASE_FIRST_STEP
                if _lock_held_exclusively(fd):
                    # Not the writer's lock (it holds it shared): a cleanup or another
                    # follower that tests it, stopped or slow meanwhile. Its release
                    # makes no event, and the writer may have died: look again soon.
                    contended = (min(contended * 2, _LOCK_CONTENDED_MAX) if contended
                                 else _LOCK_RELEASE_FIRST_STEP)
                else:
                    contended = 0.0  # a live writer holds it: sleep until an event
            else:
                # Another program's stream: over once nobody has it open for writing.
                if closed_seen or not asked_writers or grace_until:
                    if closed_seen or not asked_writers:
                        # Ask again soon: the kernel may still count a writer whose close
                        # it reported, now or before this follower watched the file.
                        grace_until = _time.monotonic() + _WRITERS_GONE_GRACE
                        grace_step = _LOCK_RELEASE_FIRST_STEP
                    closed_seen = False
                    asked_writers = True
                    gone = _lowlevel.writers_gone(fd)
                    if gone is None:
                        # The kernel will not say (not our file, no CAP_LEASE): a
                        # close after writing ends a stream whose header is final.
                        gone = not _streaming_header(fd, info)
                    if gone:
                        # What the writer appended after our last look, before it closed,
                        # is in the file now: hand that out first, then ask again.
                        now = _os.fstat(fd).st_size
                        again = _parse(fd, now, path)
                        _check_same_stream(path, info, again)
                        _check_counted(path, again.data_bytes, delivered)
                        if _available(again, now) > delivered:
                            asked_writers = False
                            continue
                        return
            woken = yield sleep()
    except OSError as exc:
        if exc.filename is not None:  # ours, named already (TimeoutError, ...)
            raise
        # os.fstat, os.pread, flock, a lease's fcntl: calls on the fd alone
        raise _lowlevel.named(exc, path) from None
    finally:
        for owned in (watching, opened):
            if owned is not None:
                _lowlevel.release(owned)


def _streaming_header(fd: int, info: _lowlevel.WavInfo) -> bool:
    """True when the header's data size is one of the "until the end" placeholders."""
    field = _os.pread(fd, 4, info.data_offset - 4)
    size = int.from_bytes(field, "little")
    return size in (0, 0xFFFFFFFF, 0x7FFFFFFF) or size > info.file_size


def _block(rng: _Range, path: str) -> np.ndarray:
    """The frames of rng as a new array shaped like read_wav's result."""
    info = rng.info
    count = rng.nbytes // (info.bits // 8)
    if info.bits == 24:
        raw = np.empty(rng.nbytes, np.uint8)
        _lowlevel.read_into(rng.fd, rng.offset, raw, path)
        samples = _lowlevel.unpack_s24(raw, count)
    else:
        samples = np.empty(count, formats.dtype_of(info))
        _lowlevel.read_into(rng.fd, rng.offset, samples, path)
    return samples if info.channels == 1 else samples.reshape(-1, info.channels)


def follow_wav(path: str | _os.PathLike[str], *,
               timeout: float | None = None) -> Iterator[np.ndarray]:
    """Yield the frames of a WAV file as they are written, until its writer finishes.

    Works whether it starts before the file exists (it waits for the name to
    appear), before the first chunk, mid-stream or after the end. Each block is a
    new array (never a view of the file, so a truncation cannot crash the
    follower), shaped like ``read_wav``'s result; together the blocks are every
    frame of the file, in order, exactly once. Waiting costs no CPU (inotify).

    Args:
        path: the WAV file: one a WavWriter writes, or any other program's
            streaming WAV (data size 0, 0xFFFFFFFF or 0x7FFFFFFF: read to the end).
        timeout: at most this many seconds without a new frame (None or infinity: no
            limit; numpy numbers are taken).

    Returns:
        An iterator of numpy arrays, (frames,) for mono or (frames, channels).

    Raises:
        StreamAbandoned: the WavWriter was killed or aborted (after the frames it
            wrote were yielded).
        TimeoutError: no new frame for timeout seconds (names the file).
        WavError: the file is not a WAV we can read, or shrank while followed, or
            another process cut a live stream below the audio its header counts, or
            rewrote the file in place (another format, data offset, or writer).
        OSError: the file or its directory cannot be opened or watched.
        RuntimeError: a forked child iterates the follower its parent started (the
            child closed its copies of the follower's fds at the fork).
        TypeError, ValueError: (at the call) path is not a path or is empty, or timeout
            is not None or a number of seconds >= 0.
    """
    path_str = _follow_path(path)
    limit = formats.check_timeout(timeout)
    return _Follower(_follow_sync(path_str, limit), "follow_wav", path_str)


class _Follower(_resource.OwnedHere, Iterator[_T]):
    """What follow_wav and iter_wav_stream return: their generator, behind an owner check.

    The check runs before the generator is resumed, because a child forked while another
    thread of its parent was inside the generator inherits it marked "running", and
    Python would refuse it there with "generator already executing" (ValueError) before
    any of our code ran. It belongs to the process that started iterating it.
    """

    __slots__ = ("_owner", "_path", "_steps", "_what")

    def __init__(self, steps: Generator[_T, None, None], what: str, path: str) -> None:
        self._steps = steps
        self._what = what
        self._path = path
        self._owner: int | None = None

    def __iter__(self) -> _Follower[_T]:
        return self

    def __next__(self) -> _T:
        if self._owner is None:
            self._owner = _resource.current_pid
        else:
            _check_owner(self._owner, self._what, self._path)
        return next(self._steps)

    def close(self) -> None:
        """Stop following and close the follower's fds now, as a generator's close().
        In a forked child, which closed its copies at the fork, it does nothing."""
        if self._owner is None or self._owner == _resource.current_pid:
            self._steps.close()

    def __repr__(self) -> str:
        return f"<{self._what} {self._path!r}>"


def _wake(wait: _Wait, timeout: float | None) -> _Woken:
    """Wait as the core asks (at most timeout seconds), reading a prefetch at once."""
    rng = wait.prefetch
    if rng is None:
        return _Woken(_lowlevel.watch_wait(wait.fd, timeout))
    info = rng.info
    dtype = formats.dtype_of(info)
    dest = np.empty(rng.nbytes // dtype.itemsize, dtype)
    bits, got, size, counted = _lowlevel.watch_read(wait.fd, timeout, rng.fd, info.data_offset,
                                                    rng.offset, info.block_align, dest)
    if not got:
        return _Woken(bits)
    block = dest[:got // dtype.itemsize]
    return _Woken(bits, block if info.channels == 1 else block.reshape(-1, info.channels), got,
                  size, counted)


def _follow_sync(path: str, timeout: float | None) -> Generator[np.ndarray, None, None]:
    core = _core(path, timeout)
    try:
        step = next(core)
        while True:
            if isinstance(step, _Wait):
                step = core.send(_wake(step, step.timeout))
            elif isinstance(step, _Held):
                yield step.block
                step = next(core)
            else:
                if step.nbytes:
                    yield _block(step, path)
                step = next(core)
    except StopIteration:
        return
    finally:
        core.close()


def afollow_wav(path: str | _os.PathLike[str], *,
                timeout: float | None = None) -> AsyncFollower:
    """The asyncio form of :func:`follow_wav`: ``async for block in afollow_wav(path)``.

    The wait is registered with the running loop (``loop.add_reader`` on the
    inotify fd): no thread per follower. Reading a block is one ``pread``.
    Same arguments, blocks and exceptions as :func:`follow_wav`.

    Returns:
        An :class:`AsyncFollower`: an async iterator of numpy arrays that is also an
        async context manager (``async with afollow_wav(path) as blocks:``) and has
        ``aclose()``; leaving it mid-stream (``break`` and dropping it, the ``with``
        block, ``aclose()``) closes its fds at once, as a ``follow_wav`` generator's.
    """
    path_str = _follow_path(path)
    limit = formats.check_timeout(timeout)
    return AsyncFollower(path_str, limit)


class AsyncFollower(_resource.OwnedHere):
    """What :func:`afollow_wav` returns (call that: it checks the arguments): the blocks
    of a live WAV, for ``async for``.

    It owns the follower's fds (the file's and its inotify watch's) from its first
    ``__anext__`` until the stream ends, an exception comes out of it, or it is closed:
    by ``close()``/``aclose()`` (idempotent), by leaving ``async with``, or by being
    dropped (a ``break`` out of ``async for afollow_wav(...)``): at once in every case,
    not at a later loop turn (an async generator's ``aclose`` is scheduled by the
    event loop's finalizer hook) nor at a gc cycle. A follower in the middle of its wait
    cannot be closed from another task (RuntimeError, as an async generator's aclose):
    cancel the task that iterates it, which closes it.
    """

    _core: _Step | None = None  # None: not opened yet and never to be, or closed
    _busy = False  # an __anext__ is running (waiting on the loop, most of the time)
    _loop: _asyncio.AbstractEventLoop | None = None  # the loop of the last __anext__

    def __init__(self, path: str, timeout: float | None) -> None:
        self._path = path
        self._owner = _resource.current_pid
        self._started = False
        # A generator that opens nothing before its first step; its finally closes the
        # fds, also when this object is dropped (the generator goes with it).
        self._core = _core(path, timeout)

    def __aiter__(self) -> AsyncFollower:
        return self

    async def __anext__(self) -> np.ndarray:
        core = self._core
        if self._started:  # first: a forked child may inherit _busy set by a parent's task
            _check_owner(self._owner, "afollow_wav", self._path)
        if self._busy:
            raise RuntimeError(f"afollow_wav {self._path!r} is already being iterated "
                               "(by another task)")
        if core is None:
            raise StopAsyncIteration
        self._busy = True
        self._loop = _asyncio.get_running_loop()
        try:
            self._started = True
            block = await self._next_block(core)
        except BaseException:  # the follower ends with its error (CancelledError too)
            self._close_core()
            raise
        finally:
            self._busy = False
        if block is None:  # the stream is over
            self._close_core()
            raise StopAsyncIteration
        return block

    async def _next_block(self, core: _Step) -> np.ndarray | None:
        """Drive the core to its next block, awaiting the loop for each wait it asks;
        None when the stream is over (a StopIteration may not leave a coroutine)."""
        try:
            step = next(core)
            while True:
                if isinstance(step, _Wait):
                    await _readable(step.fd, step.timeout)
                    step = core.send(_wake(step, 0))
                elif isinstance(step, _Held):
                    return step.block
                elif step.nbytes:
                    return _block(step, self._path)
                else:
                    step = next(core)
        except StopIteration:
            return None

    def _close_core(self) -> None:
        core, self._core = self._core, None
        if core is not None:
            core.close()

    def close(self) -> None:
        """Stop following: close the file and watch fds now (idempotent).

        In a forked child it only lets go of the child's copy (whose fds the child closed
        at the fork): a task of the parent may have been in the middle of it then.

        A task whose loop was closed while it waited in ``__anext__`` can never run
        again (nor be cancelled): the follower is closed all the same.

        Raises:
            RuntimeError: another task is in the middle of ``__anext__`` on it, on a
                loop that is not closed.
        """
        if self._started and self._owner != _resource.current_pid:
            self._core = None  # never run here: it may be marked running by the parent
            return
        if self._busy:
            loop = self._loop
            if loop is None or not loop.is_closed():
                raise RuntimeError(f"afollow_wav {self._path!r} cannot be closed while "
                                   "another task iterates it: cancel that task")
            # Closed under a waiting task: a closed loop never runs it again, and has
            # no watch left on our fds (its selector is gone), so nothing resumes the
            # core: its fds go now, not once that task is collected.
            self._busy = False
        self._close_core()

    async def aclose(self) -> None:
        """``close()``, for ``contextlib.aclosing`` and code written for async generators."""
        self.close()

    async def __aenter__(self) -> AsyncFollower:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._core is None else "open"
        return f"<AsyncFollower {self._path!r} {state}>"


async def _readable(fd: int, timeout: float | None) -> None:
    """Wait until fd is readable, at most timeout seconds (None: no limit).

    ``asyncio.timeout``, not ``asyncio.wait_for``: on CPython 3.11, wait_for returns
    normally when a cancellation comes in the same loop turn as the wake-up
    (gh-86296), and a cancelled consumer would go on iterating.
    """
    loop = _asyncio.get_running_loop()
    ready: _asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        async with _asyncio.timeout(timeout):
            await ready
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)


def streamed_wav_header(info: _lowlevel.WavInfo) -> bytes:
    """A WAV header for info's audio whose RIFF and data sizes are 0xFFFFFFFF."""
    spec = _lowlevel.WavSpec(info.samplerate, info.channels, info.format, info.bits)
    header = bytearray(_lowlevel.wav_header(spec, 0))
    header[4:8] = b"\xff\xff\xff\xff"
    header[-4:] = b"\xff\xff\xff\xff"
    return bytes(header)


def iter_wav_stream(path: str | _os.PathLike[str], *, header: Literal["wav", "raw"] = "wav",
                    chunk_frames: int | None = None,
                    timeout: float | None = None) -> Iterator[bytes]:
    """Follow a live (or finished) WAV as bytes for a pipe or an HTTP response.

    Args:
        path: the WAV file, as for :func:`follow_wav`.
        header: "wav" yields first one WAV header whose RIFF and data sizes are
            0xFFFFFFFF (the streamed-WAV convention players accept), then the
            samples; "raw" yields the samples alone (``aplay -t raw``, wyoming).
        chunk_frames: None yields the samples as they arrive; a number yields
            pieces of exactly that many frames (the last one may be shorter: at the
            end of the stream, and before the error that ends it, so that every frame
            read is yielded, as by follow_wav).
        timeout: as for :func:`follow_wav`.

    Returns:
        An iterator of bytes: the header (with "wav"), then little-endian samples
        as they are in the file (24-bit stays packed).

    Raises:
        ValueError: header is not "wav" or "raw", or chunk_frames is not >= 1.
        TypeError: chunk_frames is not an int (numpy integers are).
        StreamAbandoned, TimeoutError, WavError, OSError: as for :func:`follow_wav`.
    """
    path_str = _follow_path(path)
    if header not in ("wav", "raw"):
        raise ValueError(f"header must be 'wav' or 'raw', got {_lowlevel.brief(header)}")
    piece_frames = (None if chunk_frames is None
                    else formats.check_int("chunk_frames", chunk_frames, minimum=1))
    limit = formats.check_timeout(timeout)
    return _Follower(_stream_bytes(path_str, header == "wav", piece_frames, limit),
                     "iter_wav_stream", path_str)


def _stream_bytes(path: str, with_header: bool, chunk_frames: int | None,
                  timeout: float | None) -> Generator[bytes, None, None]:
    core = _core(path, timeout)
    pending = bytearray()
    piece = 0
    sent_header = not with_header
    try:
        step = next(core)
        while True:
            if isinstance(step, _Wait):
                step = core.send(_Woken(_lowlevel.watch_wait(step.fd, step.timeout)))
                continue
            assert isinstance(step, _Range)  # no prefetch asked for: no _Held
            if not sent_header:
                yield streamed_wav_header(step.info)
                sent_header = True
            if not step.nbytes:
                step = next(core)
                continue
            data = _os.pread(step.fd, step.nbytes, step.offset)
            if len(data) != step.nbytes:
                raise WavError(f"{path}: file shrank while it was being read")
            if chunk_frames is None:
                yield data
            else:
                piece = chunk_frames * step.info.block_align
                pending += data
                while len(pending) >= piece:
                    yield bytes(pending[:piece])
                    del pending[:piece]
            step = next(core)
    except StopIteration:
        if pending:
            yield bytes(pending)
        return
    except (WavError, OSError):
        # StreamAbandoned, TimeoutError, a shrunk file...: the frames already read are
        # the stream's. follow_wav yields every one of them before its error, so the
        # short last piece comes before this one's (else the frames a writer wrote
        # before it died or aborted would be lost to a caller who asked for pieces).
        if pending:
            yield bytes(pending)
        raise
    finally:
        core.close()
