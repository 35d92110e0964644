"""luna_wav_open_held and luna_wav_read_held, the C calls of read_wav(mmap=False): a file of
up to 4 KiB is read whole by the open (its samples come with the header), a longer one has
its samples read after; each error path on real files, FIFOs, directories and descriptors."""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from luna_shm import read_wav, write_wav
from luna_shm._native import ffi, lib

RATE = 8000
PREFIX = lib.LUNA_WAV_PREFIX_BYTES
HEADER = 44  # what write_wav writes before int16 mono samples


# As the library makes them: C makes the struct with no fd (-1: cffi must not clear it
# after, which would make it fd 0), and closes the fd it holds (if any) when it frees it.
new_wav_file = ffi.new_allocator(lib.luna_wav_file_new, lib.luna_wav_file_free,
                                 should_clear_after_alloc=False)


def open_held(path: Path) -> tuple[int, Any]:
    held = new_wav_file("struct luna_wav_file *")
    return lib.luna_wav_open_held(os.fsencode(path), held), held


def read_held(fd: int, held: Any, dest: np.ndarray) -> int:
    assert held.fd == fd  # the struct holds the fd the open returned
    with ffi.from_buffer(dest, require_writable=True) as buf:
        return int(lib.luna_wav_read_held(held, buf, len(buf)))


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


@pytest.mark.parametrize("nbytes", [0, 2, PREFIX - HEADER - 2, PREFIX - HEADER,
                                    PREFIX - HEADER + 2, 3 * PREFIX])
def test_samples_on_either_side_of_the_prefix_border_are_read_whole_and_the_fd_closed(
        ram: Path, nbytes: int) -> None:
    samples = np.arange(nbytes // 2, dtype=np.int16)
    path = Path(write_wav(str(ram / "a.wav"), samples, RATE))
    fd, held = open_held(path)
    assert fd >= 0
    assert held.held == min(path.stat().st_size, PREFIX)
    assert (held.info.data_offset, held.info.data_bytes) == (HEADER, nbytes)
    dest = np.full(nbytes // 2, -1, np.int16)
    assert read_held(fd, held, dest) == 0
    assert not fd_is_open(fd)
    np.testing.assert_array_equal(dest, samples)
    np.testing.assert_array_equal(read_wav(path, mmap=False)[0], samples)


def test_a_short_file_cut_after_the_open_still_reads_what_the_open_read(ram: Path) -> None:
    samples = np.arange(100, dtype=np.int16)
    path = Path(write_wav(str(ram / "a.wav"), samples, RATE))
    fd, held = open_held(path)
    os.truncate(path, HEADER)
    dest = np.empty(100, np.int16)
    assert read_held(fd, held, dest) == 0
    np.testing.assert_array_equal(dest, samples)


def test_a_long_file_cut_after_the_open_is_enodata_and_the_fd_closed(ram: Path) -> None:
    path = Path(write_wav(str(ram / "a.wav"), np.ones(PREFIX, np.int16), RATE))
    fd, held = open_held(path)
    os.truncate(path, HEADER)
    assert read_held(fd, held, np.empty(PREFIX, np.int16)) == -errno.ENODATA
    assert not fd_is_open(fd)


def test_a_file_shorter_than_its_header_says_is_refused_at_open(ram: Path) -> None:
    path = Path(write_wav(str(ram / "a.wav"), np.ones(100, np.int16), RATE))
    os.truncate(path, HEADER + 100)
    fd, held = open_held(path)
    assert fd == -lib.LUNA_EFORMAT
    assert "truncated" in ffi.string(held.info.error).decode()


def test_a_directory_is_eisdir(ram: Path) -> None:
    fd, _ = open_held(ram)
    assert fd == -errno.EISDIR


def test_a_fifo_is_not_a_regular_file_at_once(ram: Path) -> None:
    fifo = ram / "pipe.wav"
    os.mkfifo(fifo)
    fd, held = open_held(fifo)  # O_NONBLOCK: no writer is waited for
    assert fd == -lib.LUNA_EFORMAT
    assert ffi.string(held.info.error) == b"not a regular file"


def test_a_socket_is_not_a_regular_file_either(ram: Path) -> None:
    # open() refuses a socket with ENXIO; it is "not a regular file", as a FIFO is.
    path = ram / "socket.wav"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        fd, held = open_held(path)
    assert fd == -lib.LUNA_EFORMAT
    assert ffi.string(held.info.error) == b"not a regular file"


def test_a_missing_file_is_enoent(ram: Path) -> None:
    assert open_held(ram / "missing.wav")[0] == -errno.ENOENT


@pytest.mark.parametrize("nbytes", [32, 3 * PREFIX], ids=["in-prefix", "past-prefix"])
def test_a_closed_fd_is_ebadf(ram: Path, nbytes: int) -> None:
    path = Path(write_wav(str(ram / "a.wav"), np.ones(nbytes // 2, np.int16), RATE))
    fd, held = open_held(path)
    os.close(fd)
    assert read_held(fd, held, np.empty(nbytes // 2, np.int16)) == -errno.EBADF


def test_null_arguments_and_a_held_count_past_the_prefix_are_einval_and_the_fd_closed(
        ram: Path) -> None:
    path = Path(write_wav(str(ram / "a.wav"), np.ones(16, np.int16), RATE))
    assert lib.luna_wav_open_held(os.fsencode(path), ffi.NULL) == -errno.EINVAL
    fd, held = open_held(path)
    held.held = PREFIX + 1
    assert read_held(fd, held, np.empty(16, np.int16)) == -errno.EINVAL
    assert not fd_is_open(fd)
    assert lib.luna_wav_read_held(ffi.NULL, ffi.NULL, 0) == -errno.EINVAL
    fd, held = open_held(path)
    assert lib.luna_wav_open_held(os.fsencode(path), held) == -errno.EINVAL  # holds an fd
    assert fd_is_open(fd)
    del held  # never read: the struct closes its fd as it goes
    assert not fd_is_open(fd)


def test_threads_reading_at_once_each_get_their_own_file(ram: Path) -> None:
    # read_wav(mmap=False) reuses the struct of a finished read: threads (and a signal
    # handler that reads) must never share one. Short files (read whole by the open) and
    # long ones, in four threads at once.
    files = []
    for i, frames in enumerate([10, 300, 5000, 40000]):
        samples = (np.arange(frames) * (i + 1) % 30000).astype(np.int16)
        files.append((write_wav(str(ram / f"{i}.wav"), samples, RATE + i), samples, RATE + i))
    errors: list[str] = []

    def reader(path: str, samples: np.ndarray, rate: int) -> None:
        for _ in range(300):
            back, got_rate = read_wav(path, mmap=False)
            if got_rate != rate or not np.array_equal(back, samples):
                errors.append(f"{path}: other audio")
                return

    threads = [threading.Thread(target=reader, args=f) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
