"""The cost of WavWriter's lock: one 20 ms chunk (24 kHz int16, 480 frames) per write.

``locked`` is ``WavWriter.write`` as shipped (the append runs under a
``threading.RLock`` so that threads may share a writer, reentrant so that a signal
handler that closes the writer mid-write does not wait for itself); ``unlocked`` is the same
write without the lock, as it was before (the same checks, the same C append);
``lock-only`` times an acquire and release of a bare lock, for scale. All three
run in one session, each on its own writer in a private directory on the RAM disk.
Run: ``.venv/bin/python -m pytest benchmarks/test_writer_lock.py``.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from luna_shm import WavWriter

FRAMES = 480
ROUNDS, ITERATIONS = 3000, 10


def write_without_lock(writer: WavWriter, chunk: np.ndarray) -> None:
    """WavWriter.write before the lock: the same checks and C append, nothing held."""
    writer._check_open()
    if (type(chunk) is np.ndarray and chunk.dtype == writer.dtype
            and chunk.flags.c_contiguous and chunk.ndim <= 2
            and (chunk.shape[1] if chunk.ndim == 2 else 1) == writer.channels):
        array = chunk
    else:
        array = writer._checked(chunk)
    stream = writer._stream
    assert stream is not None
    if stream.data_bytes + array.nbytes > 0xFFFFFFFF - writer._data_offset:
        raise ValueError("data too large for a WAV file (the limit is 4 GiB)")
    stream.append(array, writer.path)


@pytest.fixture
def writer() -> Iterator[WavWriter]:
    directory = tempfile.mkdtemp(prefix="luna_shm_bench_", dir="/dev/shm")
    try:
        with WavWriter(f"{directory}/stream.wav", 24000) as w:
            yield w
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _calls(writer: WavWriter, how: str) -> Callable[[], object]:
    chunk = np.zeros(FRAMES, np.int16)
    if how == "locked":
        return lambda: writer.write(chunk)
    if how == "unlocked":
        return lambda: write_without_lock(writer, chunk)
    lock = threading.RLock()

    def lock_only() -> None:
        with lock:
            pass

    return lock_only


@pytest.mark.parametrize("how", ["locked", "unlocked", "lock-only"])
def test_writer_lock_cost(benchmark: Any, writer: WavWriter, how: str) -> None:
    benchmark.group = "WavWriter.write, 20 ms int16 chunk, RAM disk"
    benchmark.pedantic(_calls(writer, how), rounds=ROUNDS, iterations=ITERATIONS,
                       warmup_rounds=100)
