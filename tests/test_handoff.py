"""send_wav / recv_wav: a WavBuffer handed to another process over a Unix socket."""

from __future__ import annotations

import errno
import hashlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from helpers import FILL_FD_TABLE, LIBRARY_PATH, call_with_deadline
from luna_shm import WavError, create_wav_buffer, get_temp_audio_path, write_wav
from luna_shm._lowlevel import HAS_MEMFD
from luna_shm.errors import HandoffError
from luna_shm.handoff import HANDOFF_HEADER, recv_wav, send_wav

RATE = 16000

SENDER = """
    import sys, socket
    import numpy as np
    from luna_shm import create_wav_buffer
    from luna_shm.handoff import send_wav
    fd, frames, channels, dtype, anonymous = sys.argv[1:]
    sock = socket.socket(fileno=int(fd))
    with create_wav_buffer(int(frames), 16000, int(channels), dtype,
                           anonymous=anonymous == "1") as buf:
        buf.array[:] = (np.arange(buf.array.size) % 1000 - 500).reshape(buf.array.shape)
        send_wav(sock, buf)
        print(buf.path)
"""

RECEIVER = """
    import sys, socket, hashlib
    from luna_shm.handoff import recv_wav
    sock = socket.socket(fileno=int(sys.argv[1]))
    data, rate = recv_wav(sock)
    print(rate, data.shape, data.dtype, data.flags.writeable, data.flags.owndata,
          hashlib.sha256(data.tobytes()).hexdigest())
"""


def expected_samples(frames: int, channels: int, dtype: str) -> np.ndarray:
    shape = (frames,) if channels == 1 else (frames, channels)
    return (np.arange(frames * channels) % 1000 - 500).reshape(shape).astype(dtype)


def run_child(body: str, sock: socket.socket, *args: str) -> subprocess.CompletedProcess[str]:
    """Run python code in a child process that gets sock's fd as its first argument."""
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body), str(sock.fileno()), *args],
        pass_fds=[sock.fileno()], capture_output=True, text=True, env=env, timeout=60,
    )


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_memfd = pytest.mark.skipif(not HAS_MEMFD, reason="no memfd_create on this platform")
BUFFER_KINDS = [pytest.param(True, id="anonymous", marks=needs_memfd),
                pytest.param(False, id="named")]


# ---- two processes ---------------------------------------------------------------------


@pytest.mark.parametrize("anonymous", BUFFER_KINDS)
@pytest.mark.parametrize(("channels", "dtype"), [(1, "int16"), (2, "float32"), (3, "int32")])
def test_a_buffer_rendered_in_another_process_arrives_intact(
        private_dirs, pair, anonymous: bool, channels: int, dtype: str) -> None:
    ours, theirs = pair
    done = run_child(SENDER, theirs, "4000", str(channels), dtype, "1" if anonymous else "0")
    assert done.returncode == 0, done.stderr
    data, rate = recv_wav(ours)
    assert rate == RATE
    np.testing.assert_array_equal(data, expected_samples(4000, channels, dtype))
    assert data.dtype == np.dtype(dtype)


@needs_memfd
def test_an_anonymous_buffer_outlives_the_sender_process_and_leaves_no_file(
        private_dirs, pair) -> None:
    ours, theirs = pair
    done = run_child(SENDER, theirs, "8000", "1", "int16", "1")
    assert done.returncode == 0, done.stderr  # the sender has exited and closed its buffer
    assert done.stdout.startswith("/proc/")
    data, _ = recv_wav(ours)
    np.testing.assert_array_equal(data, expected_samples(8000, 1, "int16"))
    assert os.listdir(private_dirs.ram) == [] and os.listdir(private_dirs.fallback) == []


@pytest.mark.parametrize("anonymous", BUFFER_KINDS)
def test_a_buffer_sent_from_this_process_is_read_by_a_child_process(
        private_dirs, pair, anonymous: bool) -> None:
    ours, theirs = pair
    samples = expected_samples(5000, 2, "int16")
    with create_wav_buffer(5000, RATE, 2, "int16", anonymous=anonymous) as buf:
        buf.array[:] = samples
        send_wav(ours, buf)
        path = buf.path
    done = run_child(RECEIVER, theirs)
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256(samples.tobytes()).hexdigest()
    assert done.stdout.split() == [str(RATE), "(5000,", "2)", "int16", "False", "False", digest]
    if not anonymous:
        os.unlink(path)


# ---- what the receiver gets -----------------------------------------------------------------


@needs_memfd
def test_the_received_array_is_a_read_only_view_of_the_senders_memory(pair) -> None:
    ours, theirs = pair
    with create_wav_buffer(100, RATE, anonymous=True) as buf:
        send_wav(ours, buf)
        data, _ = recv_wav(theirs)
        assert not data.flags.writeable and not data.flags.owndata
        buf.array[7] = 1234  # no copy was made: the receiver sees the sender's write
        assert data[7] == 1234


@needs_memfd
def test_the_received_descriptor_is_closed_once_mapped(pair) -> None:
    ours, theirs = pair
    with create_wav_buffer(100, RATE, anonymous=True) as buf:
        send_wav(ours, buf)
    before = open_fds()
    data, _ = recv_wav(theirs)
    assert open_fds() == before
    assert len(data) == 100


@pytest.mark.parametrize("anonymous", BUFFER_KINDS)
def test_a_buffer_closed_as_it_is_sent_is_sent_whole_never_another_file(
        private_dirs, pair, anonymous) -> None:
    # A close that lands between send_wav's look at the buffer's descriptor and the send
    # (another thread's, or a signal handler's in this one: here a profile hook, at the
    # call of socket.send_fds) closed the descriptor, and a file opened meanwhile under
    # its number was sent in the buffer's place. The close now waits for the send.
    audio = np.arange(800, dtype=np.int16)
    other = os.path.join(private_dirs.ram, "other.wav")
    write_wav(other, np.full(50, 7, np.int16), 8000)
    buf = create_wav_buffer(len(audio), 16000, anonymous=anonymous)
    buf.array[:] = audio
    number = buf.fileno()
    cut_in: list[bool] = []

    def hook(frame, event, arg) -> None:
        if event == "call" and frame.f_code.co_name == "send_fds" and not cut_in:
            buf.close()
            try:
                os.fstat(number)
                cut_in.append(False)  # the close waits for the send
            except OSError:  # closed: another file takes the number meanwhile
                fd = os.open(other, os.O_RDONLY)  # the lowest free number: often it
                if fd != number:
                    os.dup2(fd, number)
                    os.close(fd)
                cut_in.append(True)

    sys.setprofile(hook)
    try:
        send_wav(pair[0], buf)
    finally:
        sys.setprofile(None)
        if cut_in == [True]:
            os.close(number)
    received, rate = recv_wav(pair[1])
    assert (rate, received.tolist()) == (16000, audio.tolist())  # not the other file's
    assert cut_in == [False]
    assert buf.closed  # as the send returned


@needs_memfd
def test_a_truncated_anonymous_buffer_arrives_with_its_new_length(pair) -> None:
    ours, theirs = pair
    with create_wav_buffer(1000, RATE, anonymous=True) as buf:
        buf.array[:] = np.arange(1000)
        buf.truncate(600)
        send_wav(ours, buf)
    data, _ = recv_wav(theirs)
    np.testing.assert_array_equal(data, np.arange(600, dtype=np.int16))


def test_an_empty_buffer_arrives_as_an_empty_read_only_array(private_dirs, pair) -> None:
    ours, theirs = pair
    with create_wav_buffer(0, RATE) as buf:
        send_wav(ours, buf)
        path = buf.path
    data, rate = recv_wav(theirs)
    assert (data.shape, rate, data.flags.writeable) == ((0,), RATE, False)
    os.unlink(path)


def send_file(sock: socket.socket, path: str, header: bytes = HANDOFF_HEADER) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        socket.send_fds(sock, [header], [fd])
    finally:
        os.close(fd)


def test_a_24_bit_wav_written_elsewhere_arrives_as_int32(private_dirs, pair) -> None:
    ours, theirs = pair
    samples = np.array([-(2**31), -256, 0, 256, 2**31 - 256], dtype=np.int32)
    path = write_wav(None, samples, RATE, subtype="PCM_24")
    send_file(ours, path)
    data, _ = recv_wav(theirs)
    np.testing.assert_array_equal(data, samples)
    assert not data.flags.writeable
    os.unlink(path)


# ---- errors -------------------------------------------------------------------------------


def test_recv_after_the_peer_closed_the_socket_raises_eoferror(pair) -> None:
    ours, theirs = pair
    ours.close()
    with pytest.raises(EOFError, match="peer closed the socket"):
        recv_wav(theirs)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM],
                         ids=["stream", "seqpacket", "dgram"])
def test_recv_on_a_socket_shut_down_for_reading_raises_eoferror(kind: int) -> None:
    # shutdown(SHUT_RD) is how a thread blocked in a receive is woken to stop. A datagram
    # socket shut down so is always readable to poll while a receive that does not wait
    # finds nothing: recv_wav spun there at 100% CPU for ever (a blocking recv returns 0).
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    with ours, theirs:
        theirs.shutdown(socket.SHUT_RD)
        with pytest.raises(EOFError, match="peer closed the socket"):
            call_with_deadline(lambda: recv_wav(theirs), deadline=10)


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM],
                         ids=["seqpacket", "dgram"])
def test_an_empty_packet_from_a_live_peer_is_a_handoff_error_not_the_end(private_dirs,
                                                                        kind: int) -> None:
    # A receive of 0 bytes is the end of a stream, but on a datagram or packet socket it
    # may be an empty message from a peer still there: recv_wav said EOFError "the peer
    # closed the socket", which a daemon serving a datagram socket takes for its end,
    # while the next message was still to come.
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    with ours, theirs, create_wav_buffer(4, RATE) as buf:
        buf.array[:] = [1, 2, 3, 4]
        ours.send(b"")
        send_wav(ours, buf)
        with pytest.raises(HandoffError, match=r"no file descriptor \(got b''\)"):
            call_with_deadline(lambda: recv_wav(theirs), deadline=10)
        data, rate = call_with_deadline(lambda: recv_wav(theirs), deadline=10)
        assert (data.tolist(), rate) == ([1, 2, 3, 4], RATE)
        if kind == socket.SOCK_SEQPACKET:  # a packet peer that goes is still the end
            ours.close()
            with pytest.raises(EOFError, match="peer closed the socket"):
                call_with_deadline(lambda: recv_wav(theirs), deadline=10)


def test_a_receiver_blocked_on_a_datagram_socket_is_woken_by_its_shutdown() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        outcome: list[BaseException] = []

        def receive() -> None:
            try:
                recv_wav(theirs)
            except BaseException as exc:
                outcome.append(exc)

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        while receiver.is_alive() and not _blocked_in_poll(receiver):
            time.sleep(0.01)
        theirs.shutdown(socket.SHUT_RD)
        receiver.join(10)
        assert not receiver.is_alive(), "recv_wav went on waiting after the shutdown"
        assert len(outcome) == 1 and isinstance(outcome[0], EOFError), outcome


def _blocked_in_poll(thread: threading.Thread) -> bool:
    """True when thread sleeps in poll (the kernel function its /proc wchan names)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/wchan") as f:
            return "poll" in f.read()
    except OSError:
        return False


def test_recv_of_a_message_without_a_descriptor_raises_handoff_error(pair) -> None:
    ours, theirs = pair
    ours.sendall(b"hello there")
    with pytest.raises(HandoffError, match="carried no file descriptor"):
        recv_wav(theirs)


def test_recv_of_a_descriptor_with_a_foreign_header_raises_and_closes_it(
        private_dirs, pair) -> None:
    ours, theirs = pair
    path = write_wav(None, np.zeros(10, np.int16), RATE)
    send_file(ours, path, header=b"SOMEWAV!")
    before = open_fds()
    with pytest.raises(HandoffError, match="not a luna_shm WAV handoff"):
        recv_wav(theirs)
    assert open_fds() == before
    os.unlink(path)


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM],
                         ids=["seqpacket", "datagram"])
def test_recv_of_a_packet_longer_than_the_header_raises_and_closes_its_descriptor(
        private_dirs, kind) -> None:
    # On a stream the bytes after the header stay for the next recv; a packet is read
    # whole or not at all, so the extra bytes would be dropped unseen.
    path = write_wav(None, np.zeros(10, np.int16), RATE)
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    with ours, theirs:
        send_file(ours, path, header=HANDOFF_HEADER + b"extra")
        before = open_fds()
        with pytest.raises(HandoffError, match=r"longer than the 8-byte header "
                                               r"\(it starts b'LUNAWAV1'\)"):
            recv_wav(theirs)
        assert open_fds() == before
    os.unlink(path)


def test_recv_of_two_descriptors_in_one_message_raises_handoff_error(
        private_dirs, pair) -> None:
    ours, theirs = pair
    path = write_wav(None, np.zeros(10, np.int16), RATE)
    fd1, fd2 = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
    socket.send_fds(ours, [HANDOFF_HEADER], [fd1, fd2])
    os.close(fd1)
    os.close(fd2)
    before = open_fds()
    with pytest.raises(HandoffError, match="more than one file descriptor"):
        recv_wav(theirs)
    assert open_fds() == before
    os.unlink(path)


SO_PASSPIDFD = getattr(socket, "SO_PASSPIDFD", 76)  # Linux 6.5; Python 3.13 names it


def _ask_for(sock: socket.socket, option: int) -> None:
    """Turn on a receive option of sock; skip when this kernel does not know it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, 1)
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
        pytest.skip(f"this kernel has no socket option {option} ({exc.strerror})")


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM],
                         ids=["stream", "seqpacket", "datagram"])
@pytest.mark.parametrize("options", [[socket.SO_PASSCRED], [SO_PASSPIDFD],
                                     [socket.SO_PASSCRED, SO_PASSPIDFD]],
                         ids=["SO_PASSCRED", "SO_PASSPIDFD", "both"])
def test_recv_on_a_socket_that_asks_for_the_peers_credentials_receives_the_wav(
        private_dirs, kind, options) -> None:
    # A daemon checks who is on the other end with SO_PASSCRED (or SO_PASSPIDFD): every
    # message then carries the sender's credentials (and a pidfd) beside the WAV's fd.
    # Neither is a second WAV, and the pidfd the kernel installs is closed, not leaked.
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    with ours, theirs:
        for option in options:
            _ask_for(theirs, option)
        with create_wav_buffer(10, RATE) as buf:
            buf.array[:] = np.arange(10)
            send_wav(ours, buf)
        before = open_fds()
        data, rate = recv_wav(theirs)
        assert rate == RATE
        assert data.tolist() == list(range(10))
        del data
        assert open_fds() == before


def test_recv_of_a_file_that_is_not_a_wav_raises_wav_error_naming_it(
        private_dirs, pair) -> None:
    ours, theirs = pair
    path = get_temp_audio_path(".mp3")
    with open(path, "wb") as f:
        f.write(b"ID3\x04" + b"\0" * 100)
    send_file(ours, path)
    with pytest.raises(WavError, match=f"received fd \\({path}\\): "):
        recv_wav(theirs)
    os.unlink(path)


def test_recv_of_a_pipe_raises_wav_error_not_a_regular_file(pair) -> None:
    ours, theirs = pair
    r, w = os.pipe()
    try:
        socket.send_fds(ours, [HANDOFF_HEADER], [r])
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(WavError, match="not a regular file"):
        recv_wav(theirs)


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_PATH], ids=["O_WRONLY", "O_PATH"])
def test_recv_of_a_descriptor_not_open_for_reading_raises_wav_error_saying_so(
        private_dirs, pair, flags) -> None:
    # The file is a good WAV, but the peer opened it write-only (or O_PATH): reading it
    # fails with EBADF, which must not read as "your socket is closed".
    ours, theirs = pair
    path = write_wav(None, np.zeros(10, np.int16), RATE)
    fd = os.open(path, flags)
    try:
        socket.send_fds(ours, [HANDOFF_HEADER], [fd])
    finally:
        os.close(fd)
    before = open_fds()
    with pytest.raises(WavError, match=f"received fd \\({path}\\): not open for reading"):
        recv_wav(theirs)
    assert open_fds() == before
    os.unlink(path)


FULL_FD_TABLE_RECEIVER = """
import errno, os, resource, socket, sys
from luna_shm.errors import HandoffError
from luna_shm.handoff import recv_wav
sock = socket.socket(fileno=int(sys.argv[1]))
""" + FILL_FD_TABLE + """
try:
    recv_wav(sock)
except HandoffError as exc:
    print("HandoffError", exc)
except OSError as exc:
    print("OSError", errno.errorcode[exc.errno], exc.strerror)
"""


def test_recv_in_a_process_out_of_descriptors_raises_emfile_not_two_descriptors(
        private_dirs, pair) -> None:
    # The kernel cannot install the passed fd (the table is full), drops it and sets
    # MSG_CTRUNC, which must not read as "more than one file descriptor".
    ours, theirs = pair
    with create_wav_buffer(10, RATE) as buf:
        send_wav(ours, buf)
    done = run_child(FULL_FD_TABLE_RECEIVER, theirs)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OSError EMFILE recv_wav: the peer's file descriptor "
                                  "could not be received: Too many open files"), done.stdout


def test_recv_on_a_closed_socket_raises_oserror(pair) -> None:
    _, theirs = pair
    theirs.close()
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        recv_wav(theirs)
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET],
                         ids=["stream", "seqpacket"])
def test_recv_on_a_listening_socket_raises_at_once_as_recv_does(kind: int) -> None:
    # The listening socket passed where the accepted connection belonged: sock.recv
    # refuses it at once (EINVAL, ENOTCONN); recv_wav waited for a client to connect
    # (poll says a listening socket is readable then), for ever when none came.
    address = f"\0luna_shm_test_listening_{os.getpid()}_{kind}"  # abstract: no file
    with socket.socket(socket.AF_UNIX, kind) as server:
        server.bind(address)
        server.listen()
        with pytest.raises(OSError) as expected:
            server.recv(8)
        try:
            with pytest.raises(OSError) as info:
                call_with_deadline(lambda: recv_wav(server), deadline=10)
        finally:  # a recv_wav still waiting is woken by a client, and then gives up
            with socket.socket(socket.AF_UNIX, kind) as client:
                client.connect(address)
    assert info.value.errno == expected.value.errno


def test_recv_waits_as_the_socket_says_up_to_its_timeout_or_not_at_all(private_dirs,
                                                                        pair) -> None:
    # recv_wav receives in C (so that the fd is owned the moment it arrives), but waits as
    # socket.recv does: a timeout raises TimeoutError, a non-blocking socket
    # BlockingIOError, and a wait ends when the message comes.
    ours, theirs = pair
    theirs.settimeout(0.2)
    with pytest.raises(TimeoutError, match="timed out"):
        recv_wav(theirs)
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError) as info:
        recv_wav(theirs)
    assert info.value.errno == errno.EAGAIN
    theirs.settimeout(30)
    with create_wav_buffer(10, RATE) as buf:
        buf.array[:] = np.arange(10)
        sender = threading.Timer(0.1, send_wav, (ours, buf))
        sender.start()
        data, rate = recv_wav(theirs)
        sender.join()
    assert (data.tolist(), rate) == (list(range(10)), RATE)


@pytest.mark.parametrize("seconds", [30 * 86400, 1e9])
def test_recv_on_a_socket_with_a_timeout_of_weeks_waits_for_the_message_as_recv_does(
        private_dirs, pair, seconds: float) -> None:
    # A timeout past poll's longest wait (2**31 - 1 ms, about 24.8 days) made recv_wav
    # raise OverflowError("timeout is too large") at once, where sock.recv waits.
    ours, theirs = pair
    theirs.settimeout(seconds)
    with create_wav_buffer(3, RATE) as buf:
        buf.array[:] = [4, 5, 6]
        sender = threading.Timer(0.2, send_wav, (ours, buf))
        sender.start()
        try:
            data, rate = call_with_deadline(lambda: recv_wav(theirs), deadline=30)
        finally:
            sender.join()
    assert (data.tolist(), rate) == ([4, 5, 6], RATE)


def test_recv_on_a_socket_with_so_rcvtimeo_gives_up_when_it_expires_as_recv_does(
        pair) -> None:
    # A receive timeout set on the socket itself (not settimeout): sock.recv raises
    # BlockingIOError when it expires; recv_wav waited for ever.
    _, theirs = pair
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200_000))
    with pytest.raises(BlockingIOError) as info:
        call_with_deadline(lambda: recv_wav(theirs), deadline=30)
    assert info.value.errno == errno.EAGAIN
    assert "SO_RCVTIMEO" in str(info.value)


def test_threads_waiting_on_one_blocking_socket_each_receive_a_message(private_dirs) -> None:
    # recv_wav waits for a blocking socket's message outside the fork lock (poll), then
    # receives it without waiting: threads that poll wakes for a message only one of them
    # gets must wait on for the next, not report a timeout (some of the messages
    # below woke such a thread: it raised BlockingIOError "SO_RCVTIMEO" when this call
    # gave up on the first EAGAIN).
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    received: list[list[int]] = []
    errors: list[Exception] = []

    def receive() -> None:
        while True:
            try:
                received.append(recv_wav(theirs)[0].tolist())
            except EOFError:  # the sender is done
                return
            except Exception as exc:  # reported by the test
                errors.append(exc)

    threads = [threading.Thread(target=receive) for _ in range(8)]
    with theirs, create_wav_buffer(3, RATE, dtype="int16") as buffer:
        buffer.array[:] = [1, 2, 3]
        for thread in threads:
            thread.start()
        with mine:
            for _ in range(500):
                time.sleep(0.0005)  # one message at a time, to the threads waiting
                send_wav(mine, buffer)
            deadline = time.monotonic() + 30
            while len(received) < 500 and time.monotonic() < deadline:
                time.sleep(0.01)  # every message received, before the end of the stream
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert received == [[1, 2, 3]] * 500


def test_recv_on_a_socket_whose_fd_is_past_1024_waits_and_receives(private_dirs,
                                                                    pair) -> None:
    # select() refuses fds of 1024 or more; a daemon with many clients has such sockets.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2001:
        pytest.skip(f"RLIMIT_NOFILE's hard limit is {hard}: no fd 2000 here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    ours, theirs = pair
    high = socket.socket(fileno=os.dup2(theirs.fileno(), 2000))
    try:
        high.settimeout(30)
        with create_wav_buffer(10, RATE) as buf:
            buf.array[:] = np.arange(10)
            sender = threading.Timer(0.1, send_wav, (ours, buf))
            sender.start()
            data, rate = recv_wav(high)
            sender.join()
        assert (data.tolist(), rate) == (list(range(10)), RATE)
    finally:
        high.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_send_of_a_closed_buffer_raises_value_error(private_dirs, pair) -> None:
    ours, _ = pair
    buf = create_wav_buffer(10, RATE, anonymous=HAS_MEMFD)
    path = buf.path
    buf.close()
    with pytest.raises(ValueError, match="closed WavBuffer"):
        send_wav(ours, buf)
    if not HAS_MEMFD:
        os.unlink(path)


@pytest.mark.parametrize(("thing", "named"), [
    (b"RIFF", "b'RIFF'"), (3, "3"), (None, "None"),
    (np.zeros((3, 2), np.int16), "a numpy array of shape (3, 2) and dtype int16"),
])
def test_send_of_anything_but_a_wav_buffer_raises_type_error_naming_it(pair, thing,
                                                                      named) -> None:
    ours, _ = pair
    with pytest.raises(TypeError) as info:
        send_wav(ours, thing)
    assert str(info.value) == f"send_wav: buf must be a WavBuffer, got {named}"


@pytest.mark.parametrize("function", [recv_wav, lambda sock: send_wav(sock, None)],
                         ids=["recv_wav", "send_wav"])
@pytest.mark.parametrize(("thing", "named"), [
    (None, "None"), ("/run/tts.sock", "'/run/tts.sock'"), (2.5, "2.5"),
    (7, "7 (a file descriptor? pass socket.socket(fileno=7))"),
])
def test_a_socket_argument_that_is_no_socket_raises_type_error_naming_it(
        function, thing, named) -> None:
    with pytest.raises(TypeError, match=r"_wav: sock must be a socket\.socket, got ") as info:
        function(thing)
    assert str(info.value).endswith(f"got {named}")


def test_send_over_a_socket_that_is_not_unix_raises_value_error(private_dirs) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet, \
            create_wav_buffer(10, RATE) as buf:
        with pytest.raises(ValueError, match=r"^send_wav: sock must be an AF_UNIX socket"):
            send_wav(inet, buf)
        os.unlink(buf.path)


def test_send_after_the_peer_closed_raises_broken_pipe_error(private_dirs, pair) -> None:
    ours, theirs = pair
    theirs.close()
    with create_wav_buffer(10, RATE) as buf:
        with pytest.raises(BrokenPipeError):
            send_wav(ours, buf)
        os.unlink(buf.path)


# ---- a peer that claims more audio than a receiver takes ----------------------------------

HUGE_SPARSE_SENDER = """
    import os, socket, struct, sys
    sock = socket.socket(fileno=int(sys.argv[1]))
    data = 0xFFFFFFD0  # int16 mono: 2 GiB frames, 4 GiB of audio, all holes
    header = (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt "
              + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
              + b"data" + struct.pack("<I", data))
    fd = os.memfd_create("huge", 0)  # no seals: recv_wav copies it
    os.write(fd, header)
    os.ftruncate(fd, len(header) + data)  # sparse: costs the sender nothing
    socket.send_fds(sock, [b"LUNAWAV1"], [fd])
    sock.recv(1)  # keep the file until the receiver is done
"""

CAPPED_RECEIVER = """
    import os, resource, socket, sys
    from luna_shm.errors import HandoffError
    from luna_shm.handoff import recv_wav
    # An address space of 2 GiB: the old receiver's 4 GiB array is a MemoryError here,
    # never 4 GiB of this shared machine's memory.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    sock = socket.socket(fileno=int(sys.argv[1]))
    before = len(os.listdir("/proc/self/fd"))
    try:
        recv_wav(sock)
    except HandoffError as exc:
        print("refused:", exc)
    except MemoryError:
        print("allocated")
    print("fds", len(os.listdir("/proc/self/fd")) - before)
"""


@needs_memfd
def test_recv_of_a_sparse_file_claiming_4_gib_refuses_before_allocating(pair) -> None:
    # A peer's unsealed sparse memfd whose header claims 4 GiB made recv_wav allocate
    # (and fill) a 4 GiB copy: a hostile or buggy client could make a daemon take it.
    ours, theirs = pair
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    sender = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HUGE_SPARSE_SENDER), str(ours.fileno())],
        pass_fds=[ours.fileno()], env=env)
    try:
        received = run_child(CAPPED_RECEIVER, theirs)
    finally:
        theirs.sendall(b"x")
        sender.wait(timeout=60)
    assert received.returncode == 0, received.stderr
    assert received.stdout.splitlines() == [
        "refused: recv_wav: the received WAV holds 4294967248 bytes of audio (2147483624 "
        "frames of 1 channel, int16), more than max_bytes=1073741824; the file was not "
        "read",
        "fds 0",
    ]


SPARSE_24_BIT_SENDER = """
    import os, socket, struct, sys
    sock = socket.socket(fileno=int(sys.argv[1]))
    frames = 64 << 20  # 24-bit mono: 192 MiB packed, 256 MiB as int32, all holes
    data = frames * 3
    header = (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt "
              + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 48000, 3, 24)
              + b"data" + struct.pack("<I", data))
    fd = os.memfd_create("pcm24", 0)
    os.write(fd, header)
    os.ftruncate(fd, len(header) + data)
    socket.send_fds(sock, [b"LUNAWAV1"], [fd])
    sock.recv(1)
"""

RECEIVER_WITH_ROOM_FOR_THE_ARRAY_ALONE = """
    import os, resource, socket, sys
    import numpy as np
    from luna_shm.handoff import recv_wav
    sock = socket.socket(fileno=int(sys.argv[1]))
    array_bytes = (64 << 20) * 4
    with open("/proc/self/status") as status:
        now = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
    # Room for the int32 array and 64 MiB more, not for a 192 MiB packed copy beside it.
    limit = now + array_bytes + (64 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        data, rate = recv_wav(sock, max_bytes=array_bytes)
    except MemoryError:
        print("allocated more than the array")
    else:
        print(data.dtype, data.shape, rate, int(np.count_nonzero(data)))
"""


@needs_memfd
def test_recv_of_24_bit_audio_takes_no_more_memory_than_its_int32_array(pair) -> None:
    # max_bytes bounds the array recv_wav returns; 24-bit audio was read whole as packed
    # bytes, then unpacked, so a receiver needed 1.75x max_bytes for a moment. It is now
    # decoded as it is read, in cache-sized chunks.
    ours, theirs = pair
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    sender = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SPARSE_24_BIT_SENDER), str(ours.fileno())],
        pass_fds=[ours.fileno()], env=env)
    try:
        received = run_child(RECEIVER_WITH_ROOM_FOR_THE_ARRAY_ALONE, theirs)
    finally:
        theirs.sendall(b"x")
        sender.wait(timeout=60)
    assert received.returncode == 0, received.stderr
    assert received.stdout.splitlines() == ["int32 (67108864,) 16000 0"]


@pytest.mark.parametrize("anonymous", BUFFER_KINDS)
def test_recv_takes_audio_up_to_max_bytes_and_refuses_one_byte_less(
        private_dirs, pair, anonymous) -> None:
    ours, theirs = pair
    with create_wav_buffer(100, RATE, 2, "int16", anonymous=anonymous) as buf:
        buf.array[:] = 7
        send_wav(ours, buf)
        before = open_fds()
        with pytest.raises(HandoffError, match=r"holds 400 bytes of audio \(100 frames of 2 "
                                               r"channels, int16\), more than max_bytes=399"):
            recv_wav(theirs, max_bytes=399)
        assert open_fds() == before
        send_wav(ours, buf)
        data, _ = recv_wav(theirs, max_bytes=400)
        assert data.shape == (100, 2) and (data == 7).all()
        send_wav(ours, buf)
        data, _ = recv_wav(theirs, max_bytes=None)
        assert data.shape == (100, 2)


@pytest.mark.parametrize(("max_bytes", "error", "message"), [
    (-1, ValueError, "max_bytes must be >= 0, got -1"),
    (1.5, TypeError, "max_bytes must be an int, got 1.5"),
    (True, TypeError, "max_bytes must be an int, got True"),
    ("1", TypeError, "max_bytes must be an int, got '1'"),
])
def test_recv_with_a_max_bytes_that_is_no_size_raises_naming_it_and_leaves_the_message(
        private_dirs, pair, max_bytes, error, message) -> None:
    ours, theirs = pair
    path = write_wav(None, np.arange(10, dtype=np.int16), RATE)
    send_file(ours, path)
    with pytest.raises(error, match=message):
        recv_wav(theirs, max_bytes=max_bytes)
    data, _ = recv_wav(theirs)  # the handoff is still there for a call that can take it
    np.testing.assert_array_equal(data, np.arange(10))
    os.unlink(path)


# ---- a header split across two sends ------------------------------------------------------

SPLITTING_SENDER = """
    import os, socket, sys
    sock = socket.socket(fileno=int(sys.argv[1]))
    first, second, half = sys.argv[2:]
    fd = os.open(first, os.O_RDONLY)
    if half == "first":  # the fd comes with the first half of the header, or the second
        socket.send_fds(sock, [b"LUNA"], [fd])
    else:
        sock.sendall(b"LUNA")
    sock.recv(1)  # the receiver has looked meanwhile
    if half == "first":
        sock.sendall(b"WAV1")
    else:
        socket.send_fds(sock, [b"WAV1"], [fd])
    os.close(fd)
    fd = os.open(second, os.O_RDONLY)
    socket.send_fds(sock, [b"LUNAWAV1"], [fd])  # the next message, as send_wav sends it
"""


def wait_readable(sock: socket.socket) -> None:
    waiting = select.poll()
    waiting.register(sock, select.POLLIN)
    assert waiting.poll(60_000), "the sender sent nothing"


def start_sender(script: str, sock: socket.socket, *args: str) -> subprocess.Popen[bytes]:
    """A sender process that gets sock's fd as its first argument."""
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script),
                             str(sock.fileno()), *args], pass_fds=[sock.fileno()], env=env)


def stop_sender(sender: subprocess.Popen[bytes]) -> None:
    """Kill the sender if it still runs (a test that failed before it was done)."""
    if sender.poll() is None:
        sender.kill()
        sender.wait()


@pytest.mark.parametrize("half", ["first", "second"], ids=["fd-first", "fd-second"])
@pytest.mark.parametrize("wait", ["non-blocking", "timeout"])
def test_a_header_split_across_two_sends_never_loses_its_descriptor(private_dirs, pair,
                                                                     wait, half) -> None:
    # The fd came with the first half; the rest, not there yet, made recv_wav raise
    # BlockingIOError (or TimeoutError) and close the fd: the caller's next call got the
    # second half alone ("no file descriptor"), and the WAV was lost. A hand-made sender
    # that put the fd on the second half got HandoffError("no file descriptor") for the
    # first half, then HandoffError(header b'WAV1') for the second: the WAV was lost too.
    ours, theirs = pair
    theirs.settimeout(0 if wait == "non-blocking" else 0.05)
    first = write_wav(None, np.arange(10, dtype=np.int16), RATE)
    second = write_wav(None, np.arange(5, dtype=np.int16), RATE)
    sender = start_sender(SPLITTING_SENDER, ours, first, second, half)
    try:
        wait_readable(theirs)
        before = open_fds()
        with pytest.raises(BlockingIOError if wait == "non-blocking" else TimeoutError,
                           match="4 of the 8 header bytes came"):
            recv_wav(theirs)
        theirs.sendall(b"g")  # a byte to the sender: now it sends the rest
        theirs.settimeout(60)
        data, rate = recv_wav(theirs)
        np.testing.assert_array_equal(data, np.arange(10))
        assert rate == RATE
        np.testing.assert_array_equal(recv_wav(theirs)[0], np.arange(5))  # in step
        assert open_fds() == before  # the kept fd, closed once mapped
        assert sender.wait(timeout=60) == 0
    finally:
        stop_sender(sender)
        os.unlink(first)
        os.unlink(second)


def test_a_split_header_whose_peer_closes_raises_and_closes_the_kept_descriptor(
        private_dirs, pair) -> None:
    ours, theirs = pair
    theirs.setblocking(False)
    path = write_wav(None, np.zeros(10, np.int16), RATE)
    before = open_fds()
    send_file(ours, path, header=b"LUNA")
    with pytest.raises(BlockingIOError, match="4 of the 8 header bytes"):
        recv_wav(theirs)
    assert open_fds() == before + 1  # kept for the next call
    ours.close()
    with pytest.raises(HandoffError, match=r"header b'LUNA', expected b'LUNAWAV1'"):
        recv_wav(theirs)
    assert open_fds() == before - 1  # ours closed, the kept fd too
    os.unlink(path)


def test_a_header_whose_first_half_carried_two_descriptors_leaves_the_stream_in_step(
        private_dirs, pair) -> None:
    # HandoffError came as soon as the first half came, with two fds: the second half
    # stayed in the stream, and the next recv_wav read it glued to the next message's
    # first half (b'WAV1LUNA', taking and closing that message's fd); so did every call
    # after it, and no WAV on the socket was ever received again.
    ours, theirs = pair
    first = write_wav(None, np.zeros(10, np.int16), RATE)
    second = write_wav(None, np.arange(5, dtype=np.int16), RATE)
    fds = [os.open(first, os.O_RDONLY) for _ in range(2)]
    socket.send_fds(ours, [b"LUNA"], fds)
    for fd in fds:
        os.close(fd)
    ours.sendall(b"WAV1")
    for _ in range(2):
        send_file(ours, second)
    before = open_fds()
    with pytest.raises(HandoffError, match="more than one file descriptor"):
        recv_wav(theirs)
    assert open_fds() == before
    for _ in range(2):
        np.testing.assert_array_equal(recv_wav(theirs)[0], np.arange(5))
    assert open_fds() == before
    os.unlink(first)
    os.unlink(second)


@pytest.mark.parametrize("header", [b"SOMEWAV!", HANDOFF_HEADER + b"!"],
                         ids=["foreign", "one-byte-too-long"])
def test_a_stream_out_of_step_raises_saying_so_and_takes_no_later_message(
        private_dirs, pair, header) -> None:
    # The bytes where a handoff header belonged were something else: where the peer's
    # next message starts cannot be known. Each later call read 8 bytes across two
    # messages (b'!LUNAWAV', b'1LUNAWAV'...), took and closed the fd of each, and said
    # only "not a luna_shm WAV handoff"; now they say the stream is out of step and take
    # nothing.
    ours, theirs = pair
    path = write_wav(None, np.zeros(10, np.int16), RATE)
    for message in (header, HANDOFF_HEADER, HANDOFF_HEADER):
        send_file(ours, path, header=message)
    before = open_fds()
    if header == b"SOMEWAV!":
        with pytest.raises(HandoffError, match=r"header b'SOMEWAV!', expected b'LUNAWAV1'; "
                                               r"this stream is out of step"):
            recv_wav(theirs)
    else:
        recv_wav(theirs)  # its header is whole: the extra byte cannot be seen yet
        with pytest.raises(HandoffError, match=r"header b'!LUNAWAV', expected b'LUNAWAV1'; "
                                               r"this stream is out of step"):
            recv_wav(theirs)
    waiting = theirs.recv(64, socket.MSG_PEEK)
    for _ in range(2):
        with pytest.raises(HandoffError, match=r"recv_wav: this stream socket is out of step "
                                               r"since .* close it"):
            recv_wav(theirs)
    assert theirs.recv(64, socket.MSG_PEEK) == waiting  # nothing more taken
    assert open_fds() == before
    os.unlink(path)


STALLING_SENDER = """
    import os, signal, socket, sys
    sock = socket.socket(fileno=int(sys.argv[1]))
    fd = os.open(sys.argv[2], os.O_RDONLY)
    socket.send_fds(sock, [b"LUNA"], [fd])
    os.kill(os.getpid(), signal.SIGSTOP)  # stalls mid-message, until SIGCONT
    sock.sendall(b"WAV1")
    fd = os.open(sys.argv[3], os.O_RDONLY)
    socket.send_fds(sock, [b"LUNAWAV1"], [fd])  # the next message, as send_wav sends it
"""


class Interrupted(Exception):
    """What the test's SIGALRM handler raises: a caller's own deadline."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted


@pytest.mark.parametrize("wait", ["timeout", "signal"])
def test_a_receive_given_up_mid_message_goes_on_with_it_when_retried(private_dirs, pair,
                                                                    wait) -> None:
    # The sender stalls (SIGSTOP) after the first half of a header, with its fd. The
    # receiver gives up: its socket's timeout runs out, or its own deadline (a SIGALRM
    # handler that raises) cuts the wait. The retry must take the rest of that message,
    # then the next one. With the handler's exception, the fd was closed and the rest of
    # the header left in the stream: the retry raised HandoffError ("no file descriptor").
    ours, theirs = pair
    first = write_wav(None, np.arange(10, dtype=np.int16), RATE)
    second = write_wav(None, np.arange(5, dtype=np.int16), RATE)
    sender = start_sender(STALLING_SENDER, ours, first, second)
    old_handler = signal.signal(signal.SIGALRM, _interrupt)
    try:
        _, status = os.waitpid(sender.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)  # mid-message: the first half and the fd are sent
        before = open_fds()
        if wait == "timeout":
            theirs.settimeout(0.2)
            with pytest.raises(TimeoutError, match="4 of the 8 header bytes came"):
                recv_wav(theirs)
        else:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(Interrupted):
                recv_wav(theirs)
        assert open_fds() == before + 1  # the fd that came, kept for the retry
        os.kill(sender.pid, signal.SIGCONT)
        theirs.settimeout(60)
        np.testing.assert_array_equal(recv_wav(theirs)[0], np.arange(10))
        np.testing.assert_array_equal(recv_wav(theirs)[0], np.arange(5))
        assert open_fds() == before
        assert sender.wait(timeout=60) == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if sender.poll() is None:
            os.kill(sender.pid, signal.SIGCONT)
        stop_sender(sender)
        os.unlink(first)
        os.unlink(second)


TRICKLING_SENDER = """
    import os, socket, sys, time
    sock = socket.socket(fileno=int(sys.argv[1]))
    fd = os.open(sys.argv[2], os.O_RDONLY)
    sock.recv(1)  # the receiver is in recv_wav
    socket.send_fds(sock, [b"L"], [fd])
    for byte in b"UNAWAV1":  # each byte well within the receiver's timeout of the last
        time.sleep(0.15)
        sock.sendall(bytes([byte]))
"""


def test_a_header_that_trickles_in_raises_timeout_error_after_the_sockets_timeout(
        private_dirs, pair) -> None:
    # Each part of a header was waited for with the socket's whole timeout again: a peer
    # that sends a byte every 0.15 s held a recv_wav with a 0.5 s timeout for 1.05 s (8
    # bytes could hold it for 8 timeouts). The timeout bounds the whole call, as
    # socket.sendall's does; the retry goes on with the part that came.
    ours, theirs = pair
    path = write_wav(None, np.arange(10, dtype=np.int16), RATE)
    sender = start_sender(TRICKLING_SENDER, ours, path)
    try:
        theirs.settimeout(0.5)
        before = open_fds()
        theirs.sendall(b"g")
        with pytest.raises(TimeoutError, match=r"\d of the 8 header bytes came"):
            recv_wav(theirs)
        theirs.settimeout(60)
        np.testing.assert_array_equal(recv_wav(theirs)[0], np.arange(10))
        assert open_fds() == before
        assert sender.wait(timeout=60) == 0
    finally:
        stop_sender(sender)
        os.unlink(path)
