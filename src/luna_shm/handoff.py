"""send_wav / recv_wav: hand rendered audio to another process over a Unix socket.

The TTS-daemon pattern: a long-lived daemon renders speech into a
:class:`WavBuffer` (best an anonymous one: a memfd with no name anywhere, so a
crash leaks nothing) and passes its file descriptor to a client over a Unix
socket. The client maps the same memory read-only and gets a numpy array with
zero copies: no file name, no bytes through the socket, no cleanup.

The wire format is one message of the 8 bytes :data:`HANDOFF_HEADER` carrying
exactly one file descriptor (``SCM_RIGHTS``); the WAV itself is what the fd
holds. Any program that sends an fd of a WAV file with that header can talk
to :func:`recv_wav`.

Only a file that no process can shrink is mapped: a memfd sealed with
``F_SEAL_SHRINK`` (what an anonymous buffer is). Anything else that arrives
(an unsealed memfd, a named buffer's file) could be cut under the client's
array by the sender at any time, so the client gets a private copy instead:
a read-only array of its own, which nothing the sender does can change.
"""

from __future__ import annotations

import errno as _errno
import fcntl as _fcntl
import os as _os
import select as _select
import socket as _socket
import stat as _stat
import threading as _threading
import time as _time
import weakref as _weakref
from typing import Any

import numpy as np

from luna_shm import _lowlevel, formats
from luna_shm.buffer import WavBuffer
from luna_shm.errors import HandoffError, WavError

__all__ = ["HANDOFF_HEADER", "recv_wav", "send_wav"]

HANDOFF_HEADER = b"LUNAWAV1"

# recv_wav's default cap on the audio it takes: the header of a sparse file (no memory
# to its sender) may claim 4 GiB, which a receiver would copy into memory of its own.
# 1 GiB is 46 minutes of 48 kHz stereo float32, 6 hours of 24 kHz mono int16.
_DEFAULT_MAX_BYTES = 1 << 30

# poll's longest wait, in milliseconds (an int; about 24.8 days).
_POLL_MAX_MS = 2**31 - 1

class _Part:
    """A message being received: its header bytes so far, the cell that owns the fd that
    came with them (empty until one comes), and the first thing found wrong with it,
    raised once its header is all read, so that a stream stays in step."""

    __slots__ = ("cell", "error", "msg")

    def __init__(self) -> None:
        self.msg = b""
        self.cell: _lowlevel.FdCell = _lowlevel.fd_cell()
        self.error: Exception | None = None

    def wrong(self, error: Exception) -> None:
        """Note what is wrong with the message (the first thing only)."""
        if self.error is None:
            self.error = error


# Headers that came in part on a stream socket, the rest not yet (a non-blocking socket,
# its timeout ran out, a signal handler raised): the next recv_wav on the same socket
# object goes on with it, so that the fd is never lost and the stream stays in step. A
# socket that goes away takes its entry along, and the cell's destructor closes the fd.
_partial: _weakref.WeakKeyDictionary[_socket.socket, _Part] = _weakref.WeakKeyDictionary()
# Stream sockets where something else stood where a header belonged (what it was): where
# the peer's next message starts cannot be known, so nothing more is read from them.
_out_of_step: _weakref.WeakKeyDictionary[_socket.socket, bytes] = (
    _weakref.WeakKeyDictionary())
_partial_lock = _threading.Lock()


def _new_lock_in_child() -> None:
    # Another thread of the parent may have held the lock at the fork (in a recv_wav):
    # that thread does not exist in the child, whose every recv_wav would wait for it.
    global _partial_lock
    _partial_lock = _threading.Lock()


_os.register_at_fork(after_in_child=_new_lock_in_child)


def _check_unix(sock: object, who: str) -> _socket.socket:
    if not isinstance(sock, _socket.socket):
        hint = ""
        if type(sock) is int and 0 <= sock < 2**31:  # sock.fileno(), say
            hint = f" (a file descriptor? pass socket.socket(fileno={sock}))"
        raise TypeError(f"{who}: sock must be a socket.socket, got {_lowlevel.brief(sock)}"
                        f"{hint}")
    if sock.family != _socket.AF_UNIX:
        raise ValueError(
            f"{who}: sock must be an AF_UNIX socket (file descriptors travel only over "
            f"Unix sockets), got {sock.family!r}"
        )
    return sock


def send_wav(sock: _socket.socket, buf: WavBuffer) -> None:
    """Send buf's file descriptor and the handoff header over a Unix socket.

    The buffer stays open here; closing it after the call is fine: the
    receiver holds its own descriptor of the same memory. That memory is
    shared, not copied: render (and :meth:`WavBuffer.truncate`) before sending,
    and leave the samples alone afterwards, or the receiver sees the change.

    Args:
        sock: a connected AF_UNIX socket (stream, seqpacket or datagram).
        buf: an open WavBuffer, anonymous or named, with its samples rendered.

    Raises:
        TypeError: sock is not a socket, or buf is not a WavBuffer.
        ValueError: sock is not an AF_UNIX socket, or buf is closed.
        OSError: the send failed (BrokenPipeError when the peer is gone, EBADF
            for a closed socket); ESTALE when another process shrank buf's
            file (its samples are lost, see :attr:`WavBuffer.array`).
    """
    _check_unix(sock, "send_wav")
    if not isinstance(buf, WavBuffer):
        raise TypeError(f"send_wav: buf must be a WavBuffer, got {_lowlevel.brief(buf)}")
    buf.array  # noqa: B018  ValueError for a closed buffer, OSError(ESTALE) for a lost one
    # Under the buffer's lock: a close in another thread between our look at its
    # descriptor and the send would send a closed number, or another file's.
    sent = buf._use_fd(lambda fd: _socket.send_fds(sock, [HANDOFF_HEADER], [fd]))
    if sent < len(HANDOFF_HEADER):  # a stream socket took part of it: the fd went with it
        sock.sendall(HANDOFF_HEADER[sent:])


def _describe(fd: int) -> str:
    """What the received fd is, for error messages (``/memfd:... (deleted)``, a path)."""
    try:
        return f"received fd ({_os.readlink(f'/proc/self/fd/{fd}')})"
    except OSError:
        return "received fd"


def _readable(fd: int) -> bool:
    """True when fd was opened for reading (not O_WRONLY, not O_PATH)."""
    mode = _fcntl.fcntl(fd, _fcntl.F_GETFL)
    return not mode & _os.O_PATH and mode & _os.O_ACCMODE != _os.O_WRONLY


def _cannot_shrink(fd: int) -> bool:
    """True when no process can ever shrink fd's file: a memfd sealed with F_SEAL_SHRINK."""
    try:
        seals = _fcntl.fcntl(fd, _fcntl.F_GET_SEALS)
    except OSError:  # EINVAL: a file that has no seals at all
        return False
    return bool(seals & _fcntl.F_SEAL_SHRINK)


def _check_size(info: _lowlevel.WavInfo, dtype: np.dtype[Any], max_bytes: int | None
                ) -> None:
    """Raise HandoffError when the array of info's audio would pass max_bytes."""
    nbytes = info.frames * info.channels * dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        channels = _lowlevel.plural(info.channels, "channel")
        raise HandoffError(
            f"recv_wav: the received WAV holds {nbytes} bytes of audio ({info.frames} "
            f"frames of {channels}, {dtype}), more than max_bytes={max_bytes}; the file "
            "was not read"
        )


def _map_wav(fd: int, max_bytes: int | None) -> tuple[np.ndarray, int]:
    """Parse the WAV in fd and return a read-only array of its samples (fd stays open):
    a view of the sender's memory when its file cannot shrink, a private copy otherwise;
    HandoffError, before any of it is read, when that array would pass max_bytes."""
    name = _describe(fd)
    st = _lowlevel.fstat(fd, name)  # named like every later failure on this fd
    if not _stat.S_ISREG(st.st_mode):
        raise WavError(f"{name}: not a regular file, so not a WAV buffer")
    try:
        info = _lowlevel.wav_parse_fd(fd, st.st_size, name)
    except OSError as exc:
        if exc.errno == _errno.EBADF and not _readable(fd):
            raise WavError(f"{name}: not open for reading (the sender opened it "
                           "write-only or O_PATH)") from None
        raise
    dtype = formats.dtype_of(info)
    _check_size(info, dtype, max_bytes)
    count = info.frames * info.channels
    if info.bits == 24:  # no numpy type for packed 24-bit: int32, unpacked as it is read
        # (in cache-sized chunks: max_bytes bounds all the memory the copy takes)
        samples = np.empty(count, dtype=dtype)
        _lowlevel.read_decoded_into(fd, info, samples, name)
        samples.flags.writeable = False
    elif count and not _cannot_shrink(fd):
        # The sender may cut this file at any time (ftruncate of an unsealed
        # memfd, a named file): a mapping would read zeros from then on,
        # silently. A copy is the truth at the time of the hand-off; a file
        # that shrinks during the copy raises WavError.
        samples = np.empty(count, dtype=dtype)
        _lowlevel.read_into(fd, info.data_offset, samples, name)
        samples.flags.writeable = False
    elif count:
        mapping = _lowlevel.Mapping(fd, info.data_offset + info.data_bytes, writable=False,
                                    populate=False, filename=name)
        samples = np.frombuffer(mapping.view, dtype=dtype, count=count, offset=info.data_offset)
    else:
        samples = np.empty(0, dtype=dtype)
        samples.flags.writeable = False
    shape = (info.frames,) if info.channels == 1 else (info.frames, info.channels)
    return samples.reshape(shape), info.samplerate


def recv_wav(sock: _socket.socket, *, max_bytes: int | None = _DEFAULT_MAX_BYTES
             ) -> tuple[np.ndarray, int]:
    """Receive a WAV handed over with :func:`send_wav` and map it with zero copies.

    Args:
        sock: a connected AF_UNIX socket (``SO_PASSCRED``, ``SO_PASSPIDFD`` or
            ``SO_PASSSEC`` on it are fine: what they add to the message is dropped).
        max_bytes: the largest array this takes (its ``nbytes``; default 1 GiB, None:
            no limit). A peer's header may claim 4 GiB of a sparse file that costs it
            nothing, and a copy of it would cost the receiver 4 GiB: a daemon that
            receives from clients it does not trust sets what it can afford.

    Returns:
        ``(data, samplerate)``: data is a read-only array of shape (frames,) or
        (frames, channels). It views the sender's memory with zero copies when
        the fd is a memfd sealed against shrinking (an anonymous
        :class:`WavBuffer`); any other fd (an unsealed memfd, a named file),
        which the sender could shrink under a mapping, is copied into an
        array of the receiver's own. 24-bit audio comes back as int32, a copy.
        The received descriptor is closed before this returns; a mapping
        lives as long as the array.

    Raises:
        TypeError, ValueError: (at the call) sock is not an AF_UNIX socket, or
            max_bytes is not None or an int >= 0 (naming what was passed).
        EOFError: the peer closed the socket before sending anything (or sock was
            shut down for reading). An empty datagram or packet from a live peer is
            no end: a HandoffError (no file descriptor), and the next call goes on.
        HandoffError: the message carried no file descriptor, more than one, or
            not the handoff header (a ValueError); on a datagram or seqpacket
            socket, also a message longer than the header; the WAV's array would
            be larger than max_bytes (nothing of it was read). On a stream the
            header is read whole first (its fd may come with any part of it), so
            the next call reads the next message; but where something else stood
            in place of a header, where the next message starts cannot be known:
            that call and every later one on the socket object raise HandoffError
            saying the stream is out of step (close it), and read nothing more.
        WavError: the received file is not a WAV file we can read (not open
            for reading, too), or it shrank while it was being copied.
        TimeoutError: sock has a timeout and the message did not come within it
            (the timeout bounds the whole call, as ``sock.sendall``'s does, also
            when the header comes in parts).
        BlockingIOError: sock is non-blocking and nothing has come yet, or its
            ``SO_RCVTIMEO`` ran out first (as ``sock.recv``). Both also when a
            stream's header came in part and the rest not yet: the next recv_wav
            on the same socket object goes on with it (an fd that came is kept,
            never lost; it is closed with the socket object). So does a call that
            any other exception cut short there (a signal handler's).
        OSError: the receive or the mapping failed (EBADF for a closed socket;
            at once, as ``sock.recv``, EINVAL or ENOTCONN for a listening one);
            EMFILE when this process had no fd free for the one sent (the kernel
            drops it: that WAV is lost).
    """
    _check_unix(sock, "recv_wav")
    if max_bytes is not None:
        max_bytes = formats.check_int("max_bytes", max_bytes)
    part = _resume(sock)
    timeout = sock.gettimeout()
    deadline = None if timeout is None else _time.monotonic() + timeout  # for the whole call
    try:
        _receive_header(sock, part, timeout, deadline)
    except (BlockingIOError, TimeoutError) as exc:
        if not _kept(sock, part):
            raise
        raise type(exc)(
            _errno.EAGAIN if isinstance(exc, BlockingIOError) else _errno.ETIMEDOUT,
            f"recv_wav: {len(part.msg)} of the {len(HANDOFF_HEADER)} header bytes came, "
            f"{'with the' if part.cell[0] >= 0 else 'no'} file descriptor yet; the rest has "
            "not come yet (the next recv_wav on this socket goes on with it)") from None
    except BaseException:  # a signal handler's exception, say: the retry goes on too
        _kept(sock, part)
        raise
    try:
        return _map_wav(_checked_fd(sock, part), max_bytes)
    finally:
        _lowlevel.release(part.cell)


def _resume(sock: _socket.socket) -> _Part:
    """The message that a recv_wav on sock left part-read, or a new one; HandoffError
    when sock is out of step."""
    with _partial_lock:
        misread = _out_of_step.get(sock)
        part = _partial.pop(sock, None)
    if misread is not None:
        raise HandoffError(
            f"recv_wav: this stream socket is out of step since a message began {misread!r} "
            f"where the handoff header {HANDOFF_HEADER!r} belonged: where later messages "
            "start cannot be known; close it")
    return _Part() if part is None else part


def _kept(sock: _socket.socket, part: _Part) -> bool:
    """After a receive was cut short: keep part for the next recv_wav on sock when it is a
    stream header begun and not whole (True); else close its fd, if one came (False)."""
    if 0 < len(part.msg) < len(HANDOFF_HEADER) and sock.type == _socket.SOCK_STREAM:
        with _partial_lock:
            _partial[sock] = part
        return True
    _lowlevel.release(part.cell)
    return False


def _receive_header(sock: _socket.socket, part: _Part, timeout: float | None,
                    deadline: float | None) -> None:
    """Receive into part until its header is whole: one message on a datagram or packet
    socket; on a stream, as many receives as the peer split the header into (its fd may
    come with any part), until 8 bytes or the end of the stream. What is wrong with the
    message is noted in part, to raise once the header is all read."""
    want = len(HANDOFF_HEADER)
    while True:
        # Room for one fd per receive: once one came, another goes into a spare cell.
        cell = part.cell if part.cell[0] < 0 else _lowlevel.fd_cell()
        data, flags = _receive(sock, want - len(part.msg), cell, timeout, deadline)
        part.msg += data
        if cell is not part.cell:
            if cell[0] >= 0 or flags & _socket.MSG_CTRUNC:
                part.wrong(_more_than_one())
            _lowlevel.release(cell)
        elif flags & _socket.MSG_CTRUNC:
            part.wrong(_lost_descriptor(sock) if cell[0] < 0 else _more_than_one())
        if flags & _socket.MSG_TRUNC:  # a datagram or packet longer than the header
            part.wrong(HandoffError(
                f"recv_wav: not a luna_shm WAV handoff: the message is longer than the "
                f"{want}-byte header (it starts {data!r})"))
        if not data or len(part.msg) >= want or sock.type != _socket.SOCK_STREAM:
            return


def _more_than_one() -> HandoffError:
    return HandoffError("recv_wav: the message carried more than one file descriptor")


def _checked_fd(sock: _socket.socket, part: _Part) -> int:
    """The fd of a message whose header was all read; the error of one that is wrong (a
    stream where something else stood where a header belonged is out of step from now on:
    see _resume)."""
    msg, fd = part.msg, int(part.cell[0])
    if not msg and fd < 0 and part.error is None and _at_end(sock):
        raise EOFError("recv_wav: the peer closed the socket without sending a WAV")
    step = ""
    if sock.type == _socket.SOCK_STREAM and len(msg) == len(HANDOFF_HEADER) \
            and msg != HANDOFF_HEADER:
        with _partial_lock:
            _out_of_step[sock] = msg
        step = ("; this stream is out of step (where its next message starts cannot be "
                "known): close it")
    elif part.error is not None:
        raise part.error
    if fd < 0:
        raise HandoffError(
            f"recv_wav: the message carried no file descriptor (got {msg!r}); "
            f"the peer must send with send_wav{step}"
        )
    if msg != HANDOFF_HEADER:
        raise HandoffError(
            f"recv_wav: not a luna_shm WAV handoff: header {msg!r}, "
            f"expected {HANDOFF_HEADER!r}{step}"
        )
    return fd


def _at_end(sock: _socket.socket) -> bool:
    """After a receive of nothing: True when that was sock's end, False when a live peer
    of a datagram or packet socket sent an empty message (no end: the next message is
    still to come, so it is a HandoffError, not an EOFError a server takes for the end).
    A receive of nothing on a stream is its end; on the others it is one when sock is shut
    down for reading or its packet peer closed (poll's POLLRDHUP, POLLHUP)."""
    if sock.type == _socket.SOCK_STREAM:
        return True
    ends = _select.POLLRDHUP | _select.POLLHUP
    waiting = _select.poll()
    waiting.register(sock, ends)
    return any(events & ends for _, events in waiting.poll(0))


def _lost_descriptor(sock: _socket.socket) -> Exception:
    """Why the kernel passed a message's fd on to nobody (MSG_CTRUNC, no fd received):
    an OSError when this process cannot open one more fd (EMFILE, ENFILE), which is
    almost always it; else a HandoffError (a security module may refuse fds)."""
    lost = "recv_wav: the peer's file descriptor could not be received"
    try:
        _os.close(_os.dup(sock.fileno()))
    except OSError as exc:
        return OSError(exc.errno, f"{lost}: {exc.strerror} (the WAV it sent is lost)")
    return HandoffError(f"{lost}: the kernel dropped it (MSG_CTRUNC)")


def _receive(sock: _socket.socket, want: int, cell: _lowlevel.FdCell, timeout: float | None,
             deadline: float | None) -> tuple[bytes, int]:
    """One message of at most want bytes and the fd passed with it (into cell), waiting as
    sock.recv would, but up to deadline (the call's, from sock's timeout, when it has one:
    TimeoutError), up to its SO_RCVTIMEO or not at all for a non-blocking socket
    (BlockingIOError). Returns (the bytes, the message flags)."""
    buf = bytearray(want)
    while True:
        got = _lowlevel.recv_fd(sock.fileno(), buf, cell)
        if got is not None:
            return bytes(buf[:got[0]]), got[1]
        if timeout == 0:
            raise BlockingIOError(_errno.EAGAIN, "recv_wav: nothing to receive yet")
        if deadline is None and _os.get_blocking(sock.fileno()):
            # A blocking receive said EAGAIN: the socket's own SO_RCVTIMEO ran out (as
            # sock.recv, give up; waiting on would ignore it for ever).
            raise BlockingIOError(_errno.EAGAIN, "recv_wav: nothing came within the "
                                  "socket's receive timeout (SO_RCVTIMEO)")
        # poll, not select: select refuses an fd of 1024 or more.
        waiting = _select.poll()
        waiting.register(sock, _select.POLLIN)
        if deadline is None:  # a blocking socket whose fd was made non-blocking: wait
            waiting.poll()
            continue
        left = deadline - _time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        # At most poll's longest wait (a socket timeout of 25 days or more made poll
        # raise OverflowError at once): past it, the next turn waits again.
        waiting.poll(min(left * 1000, _POLL_MAX_MS))
