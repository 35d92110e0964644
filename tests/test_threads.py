"""One process, many threads: the public objects shared by the threads of a TTS server
(synthesis workers, a player, an HTTP server's workers), used and closed at once.

Each test lines its threads up with a barrier, repeats the race many times, and runs under
``call_with_deadline``, so that a deadlock fails the test instead of hanging the suite. The
interpreter's thread switch interval is cut to 10 us meanwhile: a switch between any two
bytecodes, which the default 5 ms makes rare, happens in most rounds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from helpers import LIBRARY_PATH, call_with_deadline
from luna_shm import (
    AudioCache,
    AudioPool,
    PooledWav,
    WavBuffer,
    WavWriter,
    create_wav_buffer,
    read_wav,
)
from luna_shm.cache import CachedAudio, RenderError
from luna_shm.pool import _slot_files

RATE = 16000


@pytest.fixture(autouse=True)
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every 10 us (the default is 5 ms) for the test's duration."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def run_together(*actions: Callable[[], None]) -> list[BaseException]:
    """Start one thread per action, release them at once, join them; what they raised."""
    barrier = threading.Barrier(len(actions))
    errors: list[BaseException] = []

    def run(action: Callable[[], None]) -> None:
        barrier.wait()
        try:
            action()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def closed_error(exc: BaseException, what: str) -> bool:
    """True for the error a use of a closed object must raise."""
    return isinstance(exc, ValueError) and str(exc) == f"I/O operation on closed {what}"


# ---- WavBuffer -------------------------------------------------------------------------


@pytest.mark.parametrize("anonymous", [False, True], ids=["named", "anonymous"])
def test_a_buffer_closed_while_other_threads_read_its_array_and_truncate_it_only_says_closed(
        ram, anonymous):
    def rounds() -> list[BaseException]:
        unexpected: list[BaseException] = []
        for _ in range(150):
            buf = create_wav_buffer(400, RATE, anonymous=anonymous)

            def fill(buf: WavBuffer = buf) -> None:
                for i in range(40):
                    buf.array[i] = i

            def shorten(buf: WavBuffer = buf) -> None:
                for frames in range(399, 359, -1):
                    buf.truncate(frames)

            errors = run_together(fill, shorten, buf.close)
            unexpected += [e for e in errors if not closed_error(e, "WavBuffer")]
            if not anonymous:
                read_wav(buf.path)  # the header is whole whatever the order was
                os.unlink(buf.path)
        return unexpected

    unexpected = call_with_deadline(rounds)
    assert unexpected == []


# ---- AudioPool -------------------------------------------------------------------------


def churn_descriptors() -> None:
    """Open and close files: a descriptor number another thread closed is soon reused."""
    for _ in range(60):
        fd = os.open("/dev/null", os.O_RDONLY)
        os.close(fd)


def test_a_pool_closed_while_a_holder_truncates_never_uses_a_closed_slot_descriptor(ram):
    def rounds() -> list[BaseException]:
        unexpected: list[BaseException] = []
        for _ in range(150):
            pool = AudioPool(2, 8192)
            held = pool.acquire(1000, RATE)
            held.array[:] = np.arange(1000, dtype=np.int16)

            def shorten(held: PooledWav = held) -> None:
                for frames in range(999, 899, -1):
                    held.truncate(frames)

            unexpected += run_together(shorten, pool.close, churn_descriptors)
            # Arrays taken from a pool stay valid after its close: the samples are intact
            # (a truncate that compared the slot with another file's size zeroed them).
            assert_array_equal(held.array, np.arange(held.frames, dtype=np.int16))
            held.release()
        return unexpected

    unexpected = call_with_deadline(rounds)
    assert unexpected == []


def test_a_holder_truncating_while_another_thread_releases_never_writes_the_next_holders_slot(
        ram):
    def rounds() -> list[BaseException]:
        unexpected: list[BaseException] = []
        with AudioPool(1, 8192) as pool:
            for _ in range(150):
                held = pool.acquire(1000, RATE)
                taken: list[PooledWav] = []

                def shorten(held: PooledWav = held) -> None:
                    for frames in range(999, 899, -1):
                        held.truncate(frames)

                def release_and_take(held: PooledWav = held,
                                     taken: list[PooledWav] = taken) -> None:
                    held.release()
                    taken.append(pool.acquire(500, RATE))

                errors = run_together(shorten, release_and_take)
                unexpected += [e for e in errors
                               if not (isinstance(e, ValueError)
                                       and str(e) == "PooledWav was released")]
                nxt = taken[0]
                # The next holder's file says what it acquired, whatever the order was.
                assert read_wav(nxt.path)[0].shape == (500,)
                nxt.release()
        return unexpected

    unexpected = call_with_deadline(rounds)
    assert unexpected == []


# ---- AudioCache ------------------------------------------------------------------------

AUDIO = np.arange(800, dtype=np.int16)


def render_audio(writer: WavWriter) -> None:
    writer.write(AUDIO)


def test_a_cache_closed_while_other_threads_use_it_only_says_closed_and_leaves_nothing(ram):
    def user(cache: AudioCache, first: int) -> Callable[[], None]:
        def use() -> None:
            for n in range(8):
                key = f"k{(first + n) % 5}"
                entry = cache.get(key)
                if entry is not None:
                    entry.release()
                cache.put(key, AUDIO, RATE).release()
                cache.put_bytes(key + "b", b"ID3 not audio", ".mp3").release()
                cache.get_or_render(key + "r", render_audio, samplerate=RATE).release()
                _ = key in cache  # another thread may have discarded it
                cache.discard(key)
                cache.stats()
                cache.entries()
        return use

    def rounds() -> list[BaseException]:
        unexpected: list[BaseException] = []
        for n in range(60):
            cache = AudioCache(f"shared{n % 3}")
            errors = run_together(*[user(cache, first) for first in range(4)], cache.close)
            closed = f"I/O operation on closed AudioCache {cache.name!r}"
            # A waiter of a render that the close cut short gets the render's error.
            unexpected += [e for e in errors
                           if not closed_error(e, f"AudioCache {cache.name!r}")
                           and not (isinstance(e, RenderError)
                                    and str(e).endswith(f"ValueError: {closed}"))]
        for n in range(3):
            AudioCache(f"shared{n}").destroy()  # ENOTEMPTY if a render or write was left
        return unexpected

    unexpected = call_with_deadline(rounds)
    assert unexpected == []


def test_an_entry_released_while_another_thread_loads_its_array_gives_the_audio_or_closed(
        ram):
    other = ram / "other.bin"
    other.write_bytes(b"RIFF" + bytes(5000))

    def churn_with_another_file() -> None:
        """Open and close another file: its descriptor takes a number just closed."""
        for _ in range(20):
            fd = os.open(other, os.O_RDONLY)
            os.close(fd)

    def rounds() -> list[BaseException]:
        unexpected: list[BaseException] = []
        with AudioCache("released") as cache:
            cache.put("key", AUDIO, RATE).release()
            for _ in range(300):
                entry = cache.get("key")
                assert entry is not None

                def load(entry: CachedAudio = entry) -> None:
                    assert_array_equal(entry.array, AUDIO)

                errors = run_together(load, entry.release, churn_with_another_file)
                unexpected += [e for e in errors if not closed_error(e, "CachedAudio")]
            cache.destroy()
        return unexpected

    unexpected = call_with_deadline(rounds)
    assert unexpected == []


def test_an_entry_released_while_another_thread_reads_its_bytes_gives_them_or_closed(ram):
    stored = b"ID3" + bytes(range(256)) * 8

    def rounds() -> list[BaseException]:
        unexpected: list[BaseException] = []
        with AudioCache("read_bytes") as cache:
            cache.put_bytes("key", stored, ".mp3").release()
            for _ in range(300):
                entry = cache.get("key")
                assert entry is not None

                def read(entry: CachedAudio = entry) -> None:
                    assert entry.read_bytes() == stored

                errors = run_together(read, entry.release, churn_descriptors)
                unexpected += [e for e in errors if not closed_error(e, "CachedAudio")]
            cache.destroy()
        return unexpected

    unexpected = call_with_deadline(rounds)
    assert unexpected == []


# ---- a signal handler that closes what its own thread is using -------------------------

HANDLER_CLOSES = {
    "WavWriter": """
        from luna_shm import WavWriter, read_wav
        chunk = np.ones(100, np.int16)
        def make():
            return WavWriter(None, 16000)
        def use(obj):
            for _ in range(3000):
                obj.write(chunk)
        def check(obj):
            assert read_wav(obj.path)[0].shape == (obj.frames,)
            os.unlink(obj.path)
    """,
    "WavBuffer": """
        from luna_shm import create_wav_buffer, read_wav
        def make():
            return create_wav_buffer(4000, 16000)
        def use(obj):
            for frames in range(3999, 0, -1):
                obj.truncate(frames)
        def check(obj):
            read_wav(obj.path)
            os.unlink(obj.path)
    """,
    "CachedAudio": """
        from luna_shm import AudioCache
        cache = AudioCache("handler")
        cache.put("key", np.ones(4000, np.int16), 16000).release()
        def make():
            return cache.get("key")
        def use(obj):
            obj.array  # parsed and mapped on first use
            for _ in range(3000):
                obj.read_bytes()
        def check(obj):
            assert cache.stats().pinned == 0  # the release happened
    """,
}


@pytest.mark.parametrize("kind", sorted(HANDLER_CLOSES))
def test_a_signal_handler_that_closes_an_object_its_thread_is_using_never_deadlocks(
        ram, kind):
    code = textwrap.dedent("""
        import os, signal
        import numpy as np
    """) + textwrap.dedent(HANDLER_CLOSES[kind]) + textwrap.dedent("""
        current = None
        def handler(signum, frame):
            current.close()
        signal.signal(signal.SIGALRM, handler)
        for turn in range(200):
            current = make()
            signal.setitimer(signal.ITIMER_REAL, 0.00005 * (1 + turn % 7))
            try:
                use(current)
            except ValueError as exc:
                assert "closed" in str(exc), exc
            signal.setitimer(signal.ITIMER_REAL, 0)
            current.close()
            assert current.closed
            check(current)
        print("done")
    """)
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    # A deadline for the child: a handler waiting for its own thread's lock hangs it.
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "done\n"


# ---- a close by a signal handler at each line of a guarded use -------------------------


class GuardedUse:
    """A use of an object's descriptor, and what its file must hold after it.

    make(cleanups) gives the object (and appends what undoes the rest); use(obj) is the
    use, whose lines are those of code (the function that guards it); check(obj,
    outcome, used) checks the file, used telling whether the use returned (True) or
    said "closed" (False).
    """

    def __init__(self, make, use, code, check):
        self.make, self.use, self.code, self.check = make, use, code, check


def _writer_holds(writer: WavWriter, outcome: object, used: bool) -> None:
    assert read_wav(writer.path)[0].shape == ((100,) if used else (0,))
    os.unlink(writer.path)


def _buffer_holds(buf: WavBuffer, outcome: object, used: bool) -> None:
    assert read_wav(buf.path)[0].tolist() == list(range(200 if used else 400))
    os.unlink(buf.path)


def _entry_read(entry: CachedAudio, outcome: object, used: bool) -> None:
    with open(entry.path, "rb") as f:
        whole = f.read()
    if used:
        assert outcome == whole


def _entry_mapped(entry: CachedAudio, outcome: object, used: bool) -> None:
    if used:
        assert np.asarray(outcome).tolist() == list(range(300))


def _cache_entry(cleanups: list[Callable[[], None]]) -> CachedAudio:
    """An entry of the cache that the first call makes (and the cleanups destroy)."""
    if not cleanups:
        cache = AudioCache("guarded")
        cleanups.append(cache.destroy)
        cache.put("key", np.arange(300, dtype=np.int16), RATE).release()
    destroy = cleanups[0]
    assert isinstance(destroy.__self__, AudioCache)  # type: ignore[attr-defined]
    return destroy.__self__.get("key")  # type: ignore[attr-defined]


def _numbered_buffer(cleanups: list[Callable[[], None]]) -> WavBuffer:
    buf = create_wav_buffer(400, RATE)
    buf.array[:] = np.arange(400, dtype=np.int16)
    return buf


GUARDED_USES = {
    "WavWriter.write": GuardedUse(
        lambda cleanups: WavWriter(None, RATE), lambda w: w.write(np.ones(100, np.int16)),
        WavWriter.write.__code__, _writer_holds),
    "WavBuffer.truncate": GuardedUse(
        _numbered_buffer, lambda b: b.truncate(200), WavBuffer._use_fd.__code__,
        _buffer_holds),
    "CachedAudio.read_bytes": GuardedUse(
        _cache_entry, lambda e: e.read_bytes(), CachedAudio._use_fd.__code__, _entry_read),
    "CachedAudio.array": GuardedUse(
        _cache_entry, lambda e: e.array, CachedAudio._load.__code__, _entry_mapped),
}


def _lines_traced(wanted: Callable[[Any], bool], action: Callable[[], object]
                  ) -> list[tuple[object, int]]:
    """The (code, line number) pairs that action runs in the code objects wanted(code)
    accepts, in order, each once."""
    seen: list[tuple[object, int]] = []

    def trace(frame, event, arg):
        if not wanted(frame.f_code):
            return None
        if event == "line" and (frame.f_code, frame.f_lineno) not in seen:
            seen.append((frame.f_code, frame.f_lineno))
        return trace

    sys.settrace(trace)
    try:
        action()
    finally:
        sys.settrace(None)
    return seen


def _lines_run(code, action: Callable[[], object]) -> list[int]:
    """The line numbers of code that action runs, in order, each once."""
    return [line for _, line in _lines_traced(lambda seen: seen is code, action)]


def _another_file_under(number: int, path: str, flags: int) -> bool:
    """After a close: when the descriptor number is closed, open path under it (as a busy
    process's next open would) and return True; False while number is still open."""
    try:
        os.fstat(number)
        return False
    except OSError:
        fd = os.open(path, flags)
        if fd != number:
            os.dup2(fd, number)
            os.close(fd)
        return True


def _signal_at(code, line: int, fired: list) -> Callable:
    """A trace function (sys.settrace) that raises SIGUSR2 once, when code reaches line,
    and appends the line to fired then."""

    def trace(frame, event, arg):
        if frame.f_code is not code:
            return None
        if event == "line" and frame.f_lineno == line and not fired:
            fired.append(line)
            signal.raise_signal(signal.SIGUSR2)
        return trace

    return trace


@pytest.mark.parametrize("kind", sorted(GUARDED_USES))
def test_a_close_by_a_signal_handler_at_any_line_of_a_use_closes_before_it_or_after_it(
        private_dirs, kind):
    # A signal handler that closes the object may run between any two lines of its use
    # (here at each line in turn: a trace hook raises SIGUSR2 there). The use must then
    # either say "closed" before it touches the descriptor, or run whole with the close
    # made as it ends; never go on with the descriptor closed under it (EBADF, or the
    # file opened meanwhile under its number).
    case = GUARDED_USES[kind]
    cleanups: list[Callable[[], None]] = []
    probe = case.make(cleanups)
    lines = _lines_run(case.code, lambda: case.use(probe))
    probe.close()
    assert len(lines) > 3
    for line in lines:
        obj = case.make(cleanups)
        raised: list[int] = []

        def close_here(signum, frame, obj=obj) -> None:
            obj.close()

        trace = _signal_at(case.code, line, raised)
        before = signal.signal(signal.SIGUSR2, close_here)
        sys.settrace(trace)
        try:
            outcome, used = case.use(obj), True
        except ValueError as exc:
            assert "closed" in str(exc), (line, exc)
            outcome, used = None, False
        finally:
            sys.settrace(None)
            signal.signal(signal.SIGUSR2, before)
        assert raised == [line]
        assert obj.closed, line
        case.check(obj, outcome, used)
        del outcome  # an array taken keeps its mapping, and so the entry's pin
    for cleanup in cleanups:
        cleanup()


def _ctrl_c_as_a_use_ends(use: Callable[[], object]) -> None:
    """Run use with a real SIGINT (KeyboardInterrupt) raised as a use's ``finally`` calls
    _end_use (the first such call), and check that use raised it."""
    def interrupt_as_the_use_ends(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "call" and frame.f_code.co_name == "_end_use":
            sys.settrace(None)
            signal.raise_signal(signal.SIGINT)  # the default handler: KeyboardInterrupt
        return None

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.settrace(interrupt_as_the_use_ends)
    try:
        with pytest.raises(KeyboardInterrupt):
            use()
    finally:
        sys.settrace(None)
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("kind", sorted(GUARDED_USES))
def test_a_ctrl_c_as_a_use_ends_leaves_the_object_closable(private_dirs, kind):
    # A Ctrl-C (a SIGINT handler that raises) that ran as a use's ``finally`` entered
    # _end_use, before its first line, left the count of uses up: every later close()
    # took itself for one asked inside a use, and left the fd (and its flock) open for
    # an end of use that never came, until a garbage collection. The count now goes
    # down in the ``finally`` itself, before any call a handler can run at.
    case = GUARDED_USES[kind]
    cleanups: list[Callable[[], None]] = []
    obj = case.make(cleanups)
    _ctrl_c_as_a_use_ends(lambda: case.use(obj))
    fd = obj.fileno()
    obj.close()
    assert obj.closed
    with pytest.raises(OSError):
        os.fstat(fd)  # closed, not left open for a collection
    for cleanup in cleanups:
        cleanup()


@pytest.mark.parametrize("use", ["acquire", "truncate"])
def test_a_ctrl_c_as_a_pool_use_ends_leaves_the_pool_closable(private_dirs, use):
    # As above, for the pool's uses (taking a slot; a held slot's truncate): the pool's
    # close() waited for ever, its slot files and fds kept.
    pool = AudioPool(2, 8192)
    held = pool.acquire(100, RATE)
    if use == "acquire":
        _ctrl_c_as_a_use_ends(lambda: pool.acquire(100, RATE))
    else:
        _ctrl_c_as_a_use_ends(lambda: held.truncate(50))
    pool.close()
    assert pool.closed
    assert [name for name in os.listdir(private_dirs.ram) if "pool_" in name] == []


# ---- a use by a signal handler inside a use of the same object --------------------------


class NestedUse:
    """One guarded use of an object, which a signal handler repeats inside it.

    make(cleanups) gives the object (as for GuardedUse); outer(obj) is the use
    interrupted (at the call of the function named ``at``, made from the function named
    ``within``); inner(obj) the use the first handler makes there; result(obj, outcome)
    checks what the outer use returned and what the object's file holds once all is over.
    """

    def __init__(self, make, outer, inner, at, within, result):
        self.make, self.outer, self.inner = make, outer, inner
        self.at, self.within, self.result = at, within, result


def _both_chunks(writer: WavWriter, outcome: object) -> None:
    # The handler's chunk went in first (it ran before the outer append), then the outer one.
    assert read_wav(writer.path)[0].tolist() == [2] * 50 + [1] * 100
    os.unlink(writer.path)


def _outer_truncate_last(buf: WavBuffer, outcome: object) -> None:
    assert read_wav(buf.path)[0].tolist() == list(range(200))
    os.unlink(buf.path)


def _entry_bytes(entry: CachedAudio, outcome: object) -> None:
    with open(entry.path, "rb") as f:
        assert outcome == f.read()  # the entry's bytes, not the other file's


NESTED_USES = {
    "WavWriter.write": NestedUse(
        lambda cleanups: WavWriter(None, RATE),
        lambda w: w.write(np.ones(100, np.int16)),
        lambda w: w.write(np.full(50, 2, np.int16)),
        "append", "write", _both_chunks),
    "WavBuffer.truncate": NestedUse(
        _numbered_buffer, lambda b: b.truncate(200), lambda b: b.truncate(300),
        "_truncate", "<lambda>", _outer_truncate_last),
    "CachedAudio.read_bytes": NestedUse(
        _cache_entry, lambda e: e.read_bytes(), lambda e: e.read_bytes(),
        "<lambda>", "_use_fd", _entry_bytes),
}


@pytest.mark.parametrize("kind", sorted(NESTED_USES))
def test_a_close_by_a_signal_handler_after_a_nested_use_waits_for_the_outer_use(
        private_dirs, kind):
    # A handler that runs inside a use of an object (here SIGUSR1's, raised by a profile
    # hook at the chosen call) and uses the object itself ended its own use by marking
    # the object not busy, though the outer use went on: a close by a second handler
    # (SIGUSR2's) then closed the descriptor under it, and the outer use failed, or
    # went to the file opened meanwhile under its number. The close now waits for the
    # outer use to end.
    case = NESTED_USES[kind]
    other = os.path.join(private_dirs.ram, "other.wav")
    with open(other, "wb") as f:
        f.write(b"not this file" * 100)
    cleanups: list[Callable[[], None]] = []
    obj = case.make(cleanups)
    number = obj.fileno()
    took_number: list[bool] = []

    def use_inside(signum, frame) -> None:
        case.inner(obj)

    def close_inside(signum, frame) -> None:
        obj.close()  # False: the close waits for the outer use
        took_number.append(_another_file_under(number, other, os.O_RDWR))

    def hook(frame, event, arg) -> None:
        if (event == "call" and not took_number and frame.f_code.co_name == case.at
                and frame.f_back.f_code.co_name == case.within):
            signal.raise_signal(signal.SIGUSR1)
            signal.raise_signal(signal.SIGUSR2)

    before = (signal.signal(signal.SIGUSR1, use_inside),
              signal.signal(signal.SIGUSR2, close_inside))
    sys.setprofile(hook)
    try:
        outcome = case.outer(obj)
    finally:
        sys.setprofile(None)
        signal.signal(signal.SIGUSR1, before[0])
        signal.signal(signal.SIGUSR2, before[1])
        if took_number == [True]:
            os.close(number)
    assert took_number == [False]
    assert obj.closed  # as the outer use ended
    with open(other, "rb") as f:
        assert f.read() == b"not this file" * 100
    case.result(obj, outcome)
    for cleanup in cleanups:
        cleanup()


def test_a_pool_closed_by_a_signal_handler_at_any_line_of_a_truncate_never_zeroes_the_audio(
        private_dirs):
    # A handler that closes the pool while its thread is in PooledWav.truncate (the
    # pool's lock is reentrant: it takes it at once) closed the slot's descriptor under
    # the truncate's look at its file: fstat of the closed number (EBADF), or of the file
    # opened meanwhile under it, whose other size made the truncate replace the slot's
    # mapping with zeros: the holder's array, valid after a close, lost its audio. The
    # close now waits for the truncate.
    audio = np.arange(1000, dtype=np.int16)
    other = os.path.join(private_dirs.ram, "other.wav")
    with open(other, "wb") as f:
        f.write(b"not this file")
    with AudioPool(1, 8192) as probe_pool:
        probe = probe_pool.acquire(1000, RATE)
        codes = (PooledWav.truncate.__code__, _slot_files.check_slot_file.__code__)
        lines = [(code, line) for code in codes
                 for line in _lines_run(code, lambda: probe.truncate(500))]
        probe.release()
    assert len(lines) > 5
    for code, line in lines:
        pool = AudioPool(1, 8192)
        held = pool.acquire(1000, RATE)
        kept = held.array
        kept[:] = audio
        number = pool._slots[0].fd
        raised: list[bool] = []

        def close_here(signum, frame, pool=pool, number=number, raised=raised) -> None:
            pool.close()  # False: not closed yet
            raised.append(_another_file_under(number, other, os.O_RDONLY))

        trace = _signal_at(code, line, [])
        before = signal.signal(signal.SIGUSR2, close_here)
        sys.settrace(trace)
        try:
            held.truncate(500)
        except ValueError as exc:
            assert "released" in str(exc) or "closed" in str(exc), (line, exc)
        finally:
            sys.settrace(None)
            signal.signal(signal.SIGUSR2, before)
            if raised == [True]:
                os.close(number)
        assert len(raised) == 1, (code.co_name, line)
        assert pool.closed
        # (past the first 500 frames, a truncate that ran writes its tail chunk)
        assert kept[:500].tolist() == audio[:500].tolist(), (code.co_name, line)
        held.release()
        del kept
    with open(other, "rb") as f:
        assert f.read() == b"not this file"


def _lines_in(files: tuple[str, ...], action: Callable[[], object]) -> list[tuple[object, int]]:
    """The (code, line number) pairs that action runs in the given source files, in
    order, each once."""
    return _lines_traced(lambda code: code.co_filename.endswith(files), action)


@pytest.mark.parametrize("path", ["first write", "hot path"])
def test_a_pool_closed_by_a_signal_handler_at_any_line_of_a_write_never_reads_another_fd(
        private_dirs, path):
    # A handler that closes the pool while its thread is in write_wav closed the pool's
    # inotify fd under the write's look at it (a slot is handed out only while the watch
    # is quiet): the write drained whatever had taken the number meanwhile, here a pipe
    # holding another part of the program's bytes. The close now waits for the write.
    data = np.arange(100, dtype=np.int16)

    def new_pool() -> AudioPool:
        pool = AudioPool(1, 8192)
        if path == "hot path":  # a slot verified by a first write: the one-call path
            pool.write_wav(data, RATE).release()
        return pool

    written: list[PooledWav] = []
    with new_pool() as probe_pool:
        lines = _lines_in(("luna_shm/pool/_audio_pool.py", "luna_shm/pool/_slot_files.py",
                           "luna_shm/_lowlevel.py"),
                          lambda: written.append(probe_pool.write_wav(data, RATE)))
        written.pop().release()
    assert len(lines) > 10
    fired = 0
    for code, line in lines:
        pool = new_pool()
        number = pool._watch_fd
        assert number >= 0
        pipes: list[tuple[int, int]] = []

        def close_here(signum, frame, pool=pool, number=number, pipes=pipes) -> None:
            pool.close()
            try:
                os.fstat(number)
            except OSError:  # closed: a pipe takes its number meanwhile
                read_end, write_end = os.pipe2(os.O_NONBLOCK)
                os.write(write_end, b"their bytes")
                if read_end != number:  # else it took the number by itself
                    os.dup2(read_end, number)
                pipes.append((read_end, write_end))

        done: list[int] = []

        trace = _signal_at(code, line, done)
        before = signal.signal(signal.SIGUSR2, close_here)
        sys.settrace(trace)
        try:
            pooled = pool.write_wav(data, RATE)
        except ValueError as exc:
            assert "closed" in str(exc), (code, line, exc)
            pooled = None
        finally:
            sys.settrace(None)
            signal.signal(signal.SIGUSR2, before)
        if not done:  # a line of the probe's that this write did not run (a cache's)
            pool.close()
        fired += bool(done)
        assert pool.closed
        if pooled is not None:
            assert pooled.array.tolist() == data.tolist()
            pooled.release()
        for read_end, write_end in pipes:
            try:
                left = os.read(number, 100)
            except BlockingIOError:
                left = b""
            for fd in {number, read_end, write_end}:
                os.close(fd)
            assert left == b"their bytes", (code.co_name, line)
    assert fired > 10

# A TTS daemon's SIGTERM handler closes its cache: the signal can come while the main
# thread is inside one of the cache's calls that holds its lock. The profile hook sends
# the signal at a call made under the lock (named in WHERE): the handler runs in os.kill.
CACHE_CLOSED_BY_A_HANDLER = """
import faulthandler, fcntl, json, os, signal, sys
import numpy as np
faulthandler.dump_traceback_later(20, exit=True)  # a handler waiting for its own lock
from luna_shm import AudioCache

where = sys.argv[1]
audio = np.ones(1000, np.int16)  # 2,044 bytes
# "spill": a RAM tier that one entry fills, and a disk tier.
disk = sys.argv[2] if where == "spill" else None
cache = AudioCache("handler", max_bytes=3000 if disk else 10**6, disk_dir=disk)
cache.put("first", audio, 16000).release()
cache.get("first").release()  # a hit, not yet written out to the shared counters
locks = [f"{cache.directory}/lock"]
if disk:
    locks.append(f"{disk}/luna_cache-{os.getuid()}-handler/lock")


def flocked(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


seen = {}


def handler(signum, frame):
    try:
        if where == "stats-in-the-handler":
            cache.stats()
        else:
            cache.close()
            seen["closed at once"] = cache.closed
            seen["locks kept"] = [flocked(path) for path in locks]
    except Exception as exc:
        seen["handler raised"] = f"{type(exc).__name__}: {exc}"
        raise


def under_the_lock(frame, event, arg):
    if event != "call" or seen.get("sent"):
        return
    tier = frame.f_locals.get("self")
    what = getattr(tier, "what", None)
    if ((where == "spill" and frame.f_code.co_name == "entries" and what == "disk cache")
            or (where != "spill" and frame.f_code.co_name == "counters")):
        seen["sent"] = True
        os.kill(os.getpid(), signal.SIGUSR1)


signal.signal(signal.SIGUSR1, handler)
sys.setprofile(under_the_lock)
try:
    if where in ("stats", "stats-in-the-handler"):
        seen["result"] = cache.stats().hits
    else:  # "put"; "spill": the put evicts "first", which spills to the disk tier
        cache.put("second", audio, 16000).release()
        seen["result"] = "stored"
except Exception as exc:
    seen["call raised"] = f"{type(exc).__name__}: {exc}"
finally:
    sys.setprofile(None)
seen["closed after the call"] = cache.closed
seen["locks free"] = [not flocked(path) for path in locks]
cache.close()
with AudioCache("handler", disk_dir=disk) as again:
    stats = again.stats()
    seen["hits"], seen["spills"] = stats.hits, stats.spills
print(json.dumps(seen))
"""


@pytest.mark.parametrize("where", ["put", "stats", "spill"])
def test_a_signal_handler_that_closes_the_cache_inside_its_locked_section_closes_as_it_ends(
        ram, tmp_path, where):
    done = subprocess.run(
        [sys.executable, "-c", CACHE_CLOSED_BY_A_HANDLER, where, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": LIBRARY_PATH}, capture_output=True, text=True,
        timeout=60)
    # Found in review: the handler's close waited for the lock its own thread held (a
    # plain mutex): the process hung for ever.
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen.pop("result") == (1 if where == "stats" else "stored")
    # The close waited for the call to let go of the lock (its lock files stayed
    # open and flocked under it), then closed the cache and wrote its hit out.
    locks = [True, True] if where == "spill" else [True]
    assert seen == {"sent": True, "closed at once": False, "locks kept": locks,
                    "closed after the call": True, "locks free": locks,
                    "hits": 1, "spills": 1 if where == "spill" else 0}


def test_a_signal_handler_that_calls_the_cache_inside_its_locked_section_gets_an_error(
        ram, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", CACHE_CLOSED_BY_A_HANDLER, "stats-in-the-handler",
         str(tmp_path)],
        env={**os.environ, "PYTHONPATH": LIBRARY_PATH}, capture_output=True, text=True,
        timeout=60)
    # Found in review: it waited for the lock its own thread held, for ever.
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    raised = ("RuntimeError: AudioCache 'handler' was called from inside one of its own "
              "calls in this thread, which holds the cache's lock (by a signal handler "
              "that interrupted it?): only close() may be called there")
    # The hit the interrupted stats() was writing out went out with the close (it was
    # lost: see the next test).
    assert seen == {"sent": True, "handler raised": raised, "call raised": raised,
                    "closed after the call": False, "locks free": [True], "hits": 1,
                    "spills": 0}


def _write_out_moments(codes: set[Any]) -> Callable:
    """A profile function's test (frame, event, arg) -> bool: True at each moment where
    CPython runs a pending signal handler inside the functions whose code is in codes:
    as a Python function they call begins ("call"), and as a C function they call
    returns ("c_return"). Not at "c_call": no handler runs between a C call's arguments
    and the call, and a raise there could skip the __exit__ of a ``with lock:`` (its
    lock then held for ever), which no handler can."""

    def at_moment(frame, event, arg) -> bool:
        if event == "c_return":
            return frame.f_code in codes
        return event == "call" and frame.f_back is not None and frame.f_back.f_code in codes

    return at_moment


def _signal_at_moment(moment: Callable, number: int) -> Callable:
    """A profile function that sends this process SIGUSR1 once, at the moment (counted
    from 0) that moment(frame, event, arg) picks as number."""
    passed = [0]

    def hook(frame, event, arg) -> None:
        if moment(frame, event, arg):
            if passed[0] == number:
                os.kill(os.getpid(), signal.SIGUSR1)
            passed[0] += 1

    return hook


def test_counts_whose_write_out_a_signal_handler_s_error_cuts_short_are_kept(
        private_dirs):
    # A handler that calls the cache while stats() holds its lock raises RuntimeError
    # there, by design. Raised inside the write-out of this process's counts, it lost
    # them: they had left this process and were never written. At each moment of the
    # write-out in turn, the hit counted before must go out once: now, or with the
    # next write-out (here the next stats()); never lost, never written twice.
    from luna_shm.cache._tier import Tier

    moment = _write_out_moments({AudioCache._flush_counts.__code__, Tier.add.__code__})
    with AudioCache("kept") as cache:
        cache.put("k", np.ones(100, np.int16), 16000).release()
        seen: list[tuple[str, str]] = []

        def probe(frame, event, arg) -> None:
            if moment(frame, event, arg):
                seen.append((event, getattr(arg, "__name__", frame.f_code.co_name)))

        sys.setprofile(probe)
        try:
            cache.stats()
        finally:
            sys.setprofile(None)
        assert ("call", "add") in seen and ("c_return", "pwrite") in seen, seen
        raised: list[tuple[str, str]] = []

        def handler(signum, frame) -> None:
            cache.stats()  # RuntimeError: only close() may be called there

        before = signal.signal(signal.SIGUSR1, handler)
        try:
            for at, where in enumerate(seen):
                cache.get("k").release()  # one hit not yet written out
                sys.setprofile(_signal_at_moment(moment, at))
                try:
                    cache.stats()
                except RuntimeError as exc:
                    assert "only close() may be called there" in str(exc), where
                    raised.append(where)
                finally:
                    sys.setprofile(None)
                assert cache.stats().hits == at + 1, where
        finally:
            signal.signal(signal.SIGUSR1, before)
        # Cut short before the write (the counts out of this process's hands, not in the
        # file: they were lost) and right after it (they must not go out again).
        assert ("call", "add") in raised and ("c_return", "pwrite") in raised, raised
    with AudioCache("kept") as again:
        assert again.stats().hits == len(seen)
        again.destroy()
