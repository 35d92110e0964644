"""One process, many threads: the public objects shared by the threads of a TTS server
(synthesis workers, a player, an HTTP server's workers), used and closed at once.

Each test lines its threads up with a barrier, repeats the race many times, and runs under
``call_with_deadline``, so that a deadlock fails the test instead of hanging the suite. The
interpreter's thread switch interval is cut to 10 us meanwhile: a switch between any two
bytecodes, which the default 5 ms makes rare, happens in most rounds.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from helpers import call_with_deadline
from luna_shm import create_wav_buffer, read_wav

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

            def fill() -> None:
                for i in range(40):
                    buf.array[i] = i

            def shorten() -> None:
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
