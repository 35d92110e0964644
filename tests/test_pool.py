"""AudioPool: pre-faulted WAV slots, handed out one holder at a time, each a valid WAV file.

Every slot file lives in the private dirs (the private_dirs fixture). The
readers that judge the files are independent of luna_shm: python-soundfile,
scipy, sox (another process) and the stdlib ``wave`` module.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
import wave
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
import soundfile as sf

from helpers import (
    FILL_FD_TABLE,
    LIBRARY_PATH,
    SOUNDFILE_DTYPE,
    SOX_ENCODING,
    as_other_user,
    assert_child_ok,
    call_with_deadline,
    closed_and_readable_dirs,
    require_tool,
    run_in_private_shm,
    samples,
)
from luna_shm import AudioPool, PooledWav, placement, read_wav, write_wav

RATE = 16000
POOL_PREFIX = "luna_audio_pool_"


def slot_files(directory: Path | str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(POOL_PREFIX))


def soundfile_view(data: np.ndarray) -> np.ndarray:
    """What python-soundfile returns for our samples (it reads 8-bit as 16-bit)."""
    if data.dtype == np.uint8:
        return ((data.astype(np.int16) - 128) << 8).astype(np.int16)
    return data


def assert_every_reader_sees(path: str, data: np.ndarray, rate: int = RATE) -> None:
    """soundfile, scipy, sox and (plain PCM) wave read exactly data at rate from path."""
    dtype = data.dtype.name
    frames = data.shape[0]
    channels = 1 if data.ndim == 1 else data.shape[1]

    back, sf_rate = sf.read(path, dtype=SOUNDFILE_DTYPE[dtype])
    assert sf_rate == rate
    np.testing.assert_array_equal(back.reshape(data.shape), soundfile_view(data), strict=True)

    sc_rate, sc_back = scipy.io.wavfile.read(path)
    assert sc_rate == rate
    np.testing.assert_array_equal(np.array(sc_back).reshape(data.shape), data, strict=True)

    sox = require_tool("sox")
    done = subprocess.run(
        [sox, "-D", "-t", "wav", path, "-t", "raw", "-e", SOX_ENCODING[dtype],
         "-b", str(data.dtype.itemsize * 8), "-L", "-"],
        capture_output=True, check=True, timeout=60)
    assert done.stdout == data.astype(data.dtype.newbyteorder("<")).tobytes()

    if channels <= 2 and data.dtype.kind in "iu":  # wave knows plain PCM only
        with wave.open(path) as w:
            assert (w.getnframes(), w.getnchannels(), w.getframerate()) == (frames, channels,
                                                                             rate)
            assert w.readframes(frames) == data.tobytes()


# ---- the slots --------------------------------------------------------------------------------


def test_a_pool_makes_its_slots_up_front_as_locked_empty_wavs_in_the_ram_dir(ram) -> None:
    with AudioPool(slots=3, max_bytes=10_000) as pool:
        names = slot_files(ram)
        assert pool.slots == 3 and len(names) == 3
        for name in names:
            assert sf.info(str(ram / name)).frames == 0  # a valid, empty WAV already
            fd = os.open(ram / name, os.O_RDONLY)
            try:  # the pool's shared lock keeps an exclusive one (cleanup's) out
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
    assert slot_files(ram) == []


MATRIX = [pytest.param(dtype, channels, id=f"{dtype}-{channels}ch")
          for dtype in ("uint8", "int16", "int32", "float32", "float64") for channels in (1, 2, 3)]


@pytest.mark.parametrize(("dtype", "channels"), MATRIX)
def test_write_wav_returns_a_pooled_wav_whose_path_every_reader_reads_sample_exact(
        ram, dtype, channels) -> None:
    data = samples(dtype, 777, channels)
    with AudioPool(slots=1, max_bytes=100_000) as pool, pool.write_wav(data, RATE) as pooled:
        assert isinstance(pooled, PooledWav)
        assert (pooled.frames, pooled.channels, pooled.samplerate) == (777, channels, RATE)
        assert_every_reader_sees(pooled.path, data)
        for mmap in (True, False):
            back, rate = read_wav(pooled.path, mmap=mmap)
            assert rate == RATE
            np.testing.assert_array_equal(back, data, strict=True)


def test_a_reused_slot_is_a_valid_wav_of_the_latest_audio_after_each_write_and_release(
        ram) -> None:
    # Longer, shorter, empty, other types and channel counts: the leftovers of the
    # previous audio must never show through the next WAV.
    sequence = [("int16", 5000, 1), ("int16", 10, 1), ("float32", 3000, 2), ("uint8", 333, 1),
                ("int16", 0, 1), ("int32", 1500, 3), ("float64", 1, 1), ("int16", 4999, 2)]
    with AudioPool(slots=1, max_bytes=40_000) as pool:
        paths = set()
        for seed, (dtype, frames, channels) in enumerate(sequence):
            data = samples(dtype, frames, channels, seed)
            pooled = pool.write_wav(data, RATE + seed)
            paths.add(pooled.path)
            assert_every_reader_sees(pooled.path, data, RATE + seed)
            pooled.release()
            # Released and not yet reused: still the same complete WAV.
            assert_every_reader_sees(pooled.path, data, RATE + seed)
        assert len(paths) == 1


def test_acquire_gives_a_valid_wav_at_once_and_the_rendered_array_is_the_file(ram) -> None:
    data = samples("float32", 2000, 2, seed=3)
    with AudioPool(slots=1, max_bytes=100_000) as pool:
        pool.write_wav(samples("int16", 9000, 1), RATE).release()  # leftovers in the slot
        with pool.acquire(2000, RATE, 2, "float32") as pooled:
            info = sf.info(pooled.path)
            assert (info.frames, info.channels, info.samplerate) == (2000, 2, RATE)
            array = pooled.array
            assert array.shape == (2000, 2) and array.dtype == np.float32
            assert array.flags.writeable
            array[...] = data  # render straight into the file
            assert_every_reader_sees(pooled.path, data)


def test_the_array_of_a_written_slot_is_read_only_and_refused_after_release(ram) -> None:
    with AudioPool(slots=1, max_bytes=1000) as pool:
        pooled = pool.write_wav(np.arange(10, dtype=np.int16), RATE)
        with pytest.raises(ValueError, match="read-only"):
            pooled.array[0] = 1
        pooled.release()
        assert pooled.released
        with pytest.raises(ValueError, match="PooledWav was released"):
            _ = pooled.array
        with pytest.raises(ValueError, match="PooledWav was released"):
            pooled.truncate(1)
        pooled.release()  # again: nothing happens
        with pytest.raises(ValueError, match="PooledWav was released"), pooled:
            pass
        with pool.write_wav(np.zeros(3, np.int16), RATE) as again:
            assert again.frames == 3


@pytest.mark.parametrize(("dtype", "channels"), [("int16", 1), ("uint8", 1), ("float64", 3)])
def test_truncate_shortens_the_wav_every_reader_sees(ram, dtype, channels) -> None:
    data = samples(dtype, 1001, channels, seed=5)
    with AudioPool(slots=1, max_bytes=100_000) as pool, \
            pool.acquire(1001, RATE, channels, dtype) as pooled:
        pooled.array[...] = data
        pooled.truncate(401)
        assert pooled.frames == 401 and pooled.array.shape[0] == 401
        assert_every_reader_sees(pooled.path, data[:401])
        pooled.truncate(0)
        assert sf.info(pooled.path).frames == 0


def test_truncate_refuses_to_grow_or_go_negative_and_keeps_the_wav(ram) -> None:
    data = np.arange(100, dtype=np.int16)
    with AudioPool(slots=1, max_bytes=1000) as pool, pool.write_wav(data, RATE) as pooled:
        with pytest.raises(ValueError, match="cannot grow a pooled WAV: frames=101 > 100"):
            pooled.truncate(101)
        with pytest.raises(ValueError, match="frames must be >= 0, got -1"):
            pooled.truncate(-1)
        assert_every_reader_sees(pooled.path, data)


# ---- convert on write -------------------------------------------------------------------------


def reference_pcm(data: np.ndarray, bits: int) -> np.ndarray:
    """The documented conversion: scale by the largest positive value, clip, round half to even.

    float32 input to 16 bits is computed in float32 (as the C does); the wider
    targets in float64. 24-bit samples come back in the top 24 bits of an int32.
    """
    if bits == 16:
        scaled = data.astype(np.float32) * np.float32(32767)
        return np.rint(np.clip(scaled, -32768, 32767)).astype(np.int16)
    top = 2.0 ** (bits - 1)
    values = np.rint(np.clip(data.astype(np.float64) * (top - 1), -top, top - 1))
    if bits == 24:
        return values.astype(np.int32) << 8
    return values.astype(np.int32)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32"])
@pytest.mark.parametrize("channels", [1, 2])
def test_float32_written_into_a_slot_as_pcm_is_converted_like_write_wav_does(
        ram, subtype, channels) -> None:
    rng = np.random.default_rng(7)
    data = rng.uniform(-1.2, 1.2, (3001, channels)).astype(np.float32)  # clips at both ends
    data[:4, 0] = [1.0, -1.0, 0.5 / 32767, np.nan]  # full scale, a tie, NaN -> 0
    if channels == 1:
        data = data[:, 0].copy()
    bits = int(subtype[4:])
    expected = reference_pcm(np.nan_to_num(data, nan=0.0), bits)
    with AudioPool(slots=1, max_bytes=3001 * channels * 4) as pool, \
            pool.write_wav(data, RATE, subtype=subtype) as pooled:
        back, rate = read_wav(pooled.path, mmap=False)
        sf_back, _ = sf.read(pooled.path, dtype="int32" if bits > 16 else "int16")
        plain = write_wav(None, data, RATE, subtype=subtype)
        try:
            assert Path(plain).read_bytes()[8:36] == Path(pooled.path).read_bytes()[8:36]  # fmt
            plain_back, _ = read_wav(plain, mmap=False)
        finally:
            os.unlink(plain)
    assert rate == RATE
    np.testing.assert_array_equal(back, expected, strict=True)
    np.testing.assert_array_equal(sf_back.reshape(expected.shape), expected, strict=True)
    np.testing.assert_array_equal(plain_back, expected, strict=True)


# ---- who gets a slot --------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["write_wav", "acquire"])
def test_a_request_larger_than_a_slot_raises_value_error_and_takes_no_slot(ram, call) -> None:
    with AudioPool(slots=2, max_bytes=1000, timeout=0) as pool:
        with pytest.raises(ValueError, match="1002 bytes of audio do not fit a slot of this pool "
                                             r"\(max_bytes=1000\)"):
            if call == "write_wav":
                pool.write_wav(np.zeros(501, np.int16), RATE)
            else:
                pool.acquire(501, RATE)
        # Both slots are still free: two holders at once, without waiting.
        first, second = pool.acquire(500, RATE), pool.acquire(500, RATE)
        assert first.path != second.path
        first.release()
        second.release()


def test_wait_mode_raises_timeout_error_when_every_slot_stays_busy(ram) -> None:
    with AudioPool(slots=2, max_bytes=100, timeout=0.05) as pool:
        held = [pool.acquire(10, RATE), pool.acquire(10, RATE)]
        with pytest.raises(TimeoutError, match=r"all 2 slots stayed busy for 0\.05 s"):
            pool.write_wav(np.zeros(10, np.int16), RATE)
        assert pool.slots == 2
        for pooled in held:
            pooled.release()
        pool.write_wav(np.zeros(10, np.int16), RATE).release()


def test_wait_mode_hands_a_released_slot_to_a_thread_waiting_without_timeout(ram) -> None:
    got: list[str] = []
    with AudioPool(slots=1, max_bytes=100) as pool:
        held = pool.acquire(10, RATE)

        def wait_for_a_slot() -> None:
            with pool.write_wav(np.ones(10, np.int16), RATE) as pooled:
                got.append(pooled.path)

        waiter = threading.Thread(target=wait_for_a_slot, daemon=True)
        waiter.start()
        held.release()
        waiter.join(60)
        assert not waiter.is_alive(), "the waiting thread never got the released slot"
    assert got == [held.path]


def test_a_thread_waiting_for_a_slot_is_woken_by_close_with_value_error(ram) -> None:
    errors: list[BaseException] = []
    pool = AudioPool(slots=1, max_bytes=100)
    held = pool.acquire(10, RATE)
    started = threading.Event()

    def wait_for_a_slot() -> None:
        started.set()
        try:
            pool.acquire(10, RATE)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_a_slot, daemon=True)
    waiter.start()
    started.wait(60)
    pool.close()
    waiter.join(60)
    assert not waiter.is_alive(), "close left a thread waiting forever"
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert str(errors[0]) == "AudioPool is closed"
    held.release()


def test_grow_mode_adds_a_slot_for_each_holder_beyond_the_pool_size(ram) -> None:
    with AudioPool(slots=1, max_bytes=1000, when_busy="grow") as pool:
        data = [samples("int16", 100, 1, seed) for seed in range(4)]
        held = [pool.write_wav(d, RATE) for d in data]
        assert pool.slots == 4
        assert len({p.path for p in held}) == 4 and len(slot_files(ram)) == 4
        for pooled, d in zip(held, data, strict=True):
            assert_every_reader_sees(pooled.path, d)
            pooled.release()
        # Released slots are reused before any new one is made.
        again = [pool.acquire(10, RATE) for _ in range(4)]
        assert pool.slots == 4
        for pooled in again:
            pooled.release()
    assert slot_files(ram) == []


def test_many_threads_never_share_a_slot_and_always_read_back_their_own_audio(ram) -> None:
    threads_count, rounds = 12, 150
    held: set[str] = set()
    held_lock = threading.Lock()
    errors: list[str] = []
    start = threading.Barrier(threads_count)
    paths_seen: set[str] = set()

    with AudioPool(slots=3, max_bytes=2000, timeout=None) as pool:

        def work(index: int) -> None:
            try:
                start.wait()
                for i in range(rounds):
                    data = np.full(200 + index, index * 1000 + i, np.int16)
                    if i % 2:
                        pooled = pool.write_wav(data, RATE)
                    else:
                        pooled = pool.acquire(len(data), RATE)
                        pooled.array[...] = data
                    with held_lock:
                        if pooled.path in held:
                            errors.append(f"slot {pooled.path} handed out twice")
                        held.add(pooled.path)
                        paths_seen.add(pooled.path)
                    back, _ = read_wav(pooled.path, mmap=False)
                    if not np.array_equal(back, data):
                        errors.append(f"thread {index} round {i} read other audio")
                    with held_lock:
                        held.discard(pooled.path)
                    pooled.release()
            except BaseException as exc:  # reported below
                errors.append(f"thread {index}: {exc!r}")

        threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert pool.slots == 3
    assert errors == []
    assert len(paths_seen) == 3


# ---- anonymous slots, close and leaks ---------------------------------------------------------


def test_anonymous_slots_have_proc_paths_no_name_in_any_directory_and_other_processes_read_them(
        private_dirs) -> None:
    data = samples("int16", 999, 2, seed=9)
    with AudioPool(slots=2, max_bytes=10_000, anonymous=True) as pool, \
            pool.write_wav(data, RATE) as pooled:
        assert pooled.path.startswith(f"/proc/{os.getpid()}/fd/")
        assert os.readlink(pooled.path).startswith("/memfd:luna_audio_pool_")
        assert os.listdir(private_dirs.ram) == [] and os.listdir(private_dirs.fallback) == []
        done = subprocess.run(
            [sys.executable, "-c", "import sys, soundfile as sf; "
             "print(sf.read(sys.argv[1], dtype='int16')[0].tobytes().hex())", pooled.path],
            env={**os.environ, "PYTHONPATH": LIBRARY_PATH}, capture_output=True, text=True,
            timeout=60, check=True)
        assert bytes.fromhex(done.stdout.strip()) == data.tobytes()
        assert_every_reader_sees(pooled.path, data)


@pytest.mark.parametrize("anonymous", [False, True], ids=["named", "anonymous"])
def test_close_while_pooled_wavs_are_held_keeps_their_arrays_valid_and_frees_the_slots(
        private_dirs, anonymous) -> None:
    pool = AudioPool(slots=2, max_bytes=10_000, anonymous=anonymous)
    data = samples("int16", 1000, 1, seed=11)
    written = pool.write_wav(data, RATE)
    acquired = pool.acquire(1000, RATE)
    acquired.array[...] = data[::-1]
    views = [written.array, acquired.array]
    paths = [written.path, acquired.path]

    pool.close()

    assert pool.closed
    assert not any(os.path.exists(p) for p in paths)
    assert os.listdir(private_dirs.ram) == []
    np.testing.assert_array_equal(views[0], data)  # the mappings live on with the arrays
    np.testing.assert_array_equal(views[1], data[::-1])
    np.testing.assert_array_equal(written.array, data)
    written.release()
    acquired.release()
    pool.close()  # again: nothing happens
    with pytest.raises(ValueError, match="AudioPool is closed"):
        pool.write_wav(data, RATE)
    with pytest.raises(ValueError, match="AudioPool is closed"):
        pool.acquire(10, RATE)


def test_released_pooled_wavs_kept_after_close_hold_no_slot_memory(ram) -> None:
    # A released PooledWav kept its slot, so after close() the slot's mapping (RAM of an
    # unlinked file: a whole slot) lived as long as the handle did, in a list of recent
    # utterances, say. Only arrays taken from a slot keep it (close()'s promise).
    pool = AudioPool(slots=2, max_bytes=100_000)
    kept = [pool.write_wav(samples("int16", 100, 1), RATE), pool.acquire(100, RATE)]
    files = {(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", str(st.st_ino))
             for st in (os.stat(pooled.path) for pooled in kept)}
    for pooled in kept:
        pooled.release()
    pool.close()
    with open("/proc/self/maps") as maps:  # address, perms, offset, dev, inode, path
        mapped = {tuple(line.split()[3:5]) for line in maps}
    assert files & mapped == set()
    assert [pooled.released for pooled in kept] == [True, True]


def test_a_pooled_wav_released_twice_at_once_gives_its_slot_back_once_and_never_raises(
        ram) -> None:
    # Two threads may release one PooledWav (a player done with it, a watchdog cancelling
    # it): the second call, at whatever bytecode of the first it starts, does nothing.
    # The trace function makes that second call at each opcode of the first in turn.
    # CPython 3.12 sends opcode events only if some frame had f_trace_opcodes set before
    # sys.settrace (python/cpython#114480; 3.11 and 3.13 honour it when set in the "call"
    # event): this frame's is set first, so that every version cuts at every opcode.
    this_frame = sys._getframe()
    with AudioPool(slots=2, max_bytes=1000, timeout=0) as pool:
        opcode = 0
        while True:
            pooled = pool.write_wav(samples("int16", 10, 1), RATE)
            seen = {"count": 0, "done": False}

            def second_release_at_one_opcode(frame, event, arg, target=opcode, seen=seen,
                                             pooled=pooled):
                if frame.f_code.co_name != "release" or seen["done"]:
                    return None
                frame.f_trace_opcodes = True
                if event == "opcode":
                    if seen["count"] == target:
                        seen["done"] = True
                        pooled.release()
                    seen["count"] += 1
                return second_release_at_one_opcode

            this_frame.f_trace_opcodes = True
            sys.settrace(second_release_at_one_opcode)
            try:
                pooled.release()
            finally:
                sys.settrace(None)
                this_frame.f_trace_opcodes = False
            assert pooled.released
            both = [pool.acquire(1, RATE), pool.acquire(1, RATE)]  # timeout=0: both free
            assert both[0].path != both[1].path
            for each in both:
                each.release()
            if not seen["done"]:
                break  # past the first release's last opcode
            opcode += 1
        assert opcode > 10


@pytest.mark.parametrize("anonymous", [False, True], ids=["named", "anonymous"])
def test_a_closed_pool_refuses_a_with_block_like_a_closed_buffer_or_writer(
        private_dirs, anonymous) -> None:
    pool = AudioPool(slots=1, max_bytes=100, anonymous=anonymous)
    with pool as entered:
        assert entered is pool
    assert pool.closed
    entered_again = False
    with pytest.raises(ValueError, match=r"^I/O operation on closed AudioPool$"), pool:
        entered_again = True
    assert not entered_again and pool.closed
    assert os.listdir(private_dirs.ram) == []


@pytest.mark.parametrize("anonymous", [False, True], ids=["named", "anonymous"])
def test_a_leaked_pool_warns_resource_warning_and_removes_its_slot_files(
        private_dirs, anonymous) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.warns(ResourceWarning, match="unclosed AudioPool"):
        pool = AudioPool(slots=3, max_bytes=1000, anonymous=anonymous)
        pool.write_wav(np.zeros(10, np.int16), RATE).release()
        # a descriptor per slot, and a named pool's inotify watch of its slot files
        assert len(os.listdir("/proc/self/fd")) == fds_before + 3 + (not anonymous)
        del pool
        gc.collect()
    assert os.listdir(private_dirs.ram) == []
    assert len(os.listdir("/proc/self/fd")) == fds_before


LEAKED_WITH_WARNINGS_AS_ERRORS = """
import gc, json, os
from luna_shm import AudioPool
fds = len(os.listdir("/proc/self/fd"))
pool = AudioPool(slots=2, max_bytes=1000)
del pool
gc.collect()  # the finalizer's ResourceWarning is an error: printed, then ignored
print(json.dumps({"left": os.listdir(os.environ["LUNA_SHM_DIR"]),
                  "fds": len(os.listdir("/proc/self/fd")) - fds}))
"""


def test_a_leaked_pool_removes_its_slot_files_even_when_warnings_are_errors(ram) -> None:
    # Under -W error (as in this suite's own config) the finalizer's "unclosed AudioPool"
    # was raised before the cleanup: the slot files and descriptors stayed.
    done = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", "-c", LEAKED_WITH_WARNINGS_AS_ERRORS],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": LIBRARY_PATH, "LUNA_SHM_DIR": str(ram)})
    assert json.loads(assert_child_ok(done)) == {"left": [], "fds": 0}
    assert "ResourceWarning: unclosed AudioPool" in done.stderr


def test_a_pool_fails_to_start_without_leaving_a_slot_file_or_descriptor(private_dirs,
                                                                         monkeypatch) -> None:
    # The third slot cannot be made (its name is taken by a directory, every try):
    # the two made before are removed again, and their descriptors closed.
    from luna_shm import _newfile

    count = {"n": 0}
    real = _newfile._new_token

    def token() -> str:
        count["n"] += 1
        return "d" * 32 if count["n"] >= 3 else real()

    os.mkdir(f"{private_dirs.ram}/{POOL_PREFIX}{'d' * 32}.wav")
    monkeypatch.setattr(_newfile, "_new_token", token)
    monkeypatch.setattr(_newfile, "_MAX_TRIES", 3)
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileExistsError, match="no free temp file name") as info:
        AudioPool(slots=4, max_bytes=1000)
    assert info.value.errno == errno.EEXIST
    assert os.listdir(private_dirs.ram) == [f"{POOL_PREFIX}{'d' * 32}.wav"]
    assert len(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slots": 0}, "slots must be >= 1, got 0"),
        ({"max_bytes": 0}, "max_bytes must be >= 1, got 0"),
        ({"max_bytes": 2**32}, "max_bytes must fit a WAV file"),
        ({"when_busy": "drop"}, "when_busy must be 'wait' or 'grow', got 'drop'"),
        ({"timeout": -1}, "timeout must be None or >= 0 seconds, got -1"),
        ({"timeout": float("nan")}, "timeout must be None or >= 0 seconds, got nan"),
        ({"prefix": "../escape_"}, "prefix must not contain '/'"),
    ],
    ids=["no-slots", "no-bytes", "over-4-GiB", "bad-when-busy", "negative-timeout",
         "nan-timeout", "traversal-prefix"],
)
def test_bad_pool_arguments_are_refused_with_value_error_and_create_nothing(
        private_dirs, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AudioPool(**{"slots": 1, "max_bytes": 100, **kwargs})
    assert os.listdir(private_dirs.ram) == [] and os.listdir(private_dirs.fallback) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"slots": True}, "slots must be an int, got True"),
    ({"slots": 2.0}, "slots must be an int, got 2.0"),
    ({"max_bytes": "100"}, "max_bytes must be an int, got '100'"),
])
def test_a_slot_count_or_size_that_is_not_an_int_is_a_type_error_naming_it(
        private_dirs, kwargs, message) -> None:
    with pytest.raises(TypeError, match=message):
        AudioPool(**{"slots": 1, "max_bytes": 100, **kwargs})
    assert os.listdir(private_dirs.ram) == []


def test_numpy_integers_are_good_slot_counts_and_sizes(private_dirs) -> None:
    with AudioPool(slots=np.int64(2), max_bytes=np.uint32(1000)) as pool:
        assert pool.slots == 2 and pool.max_bytes == 1000
        assert type(pool.max_bytes) is int


@pytest.mark.parametrize(("timeout", "message"), [
    (True, "timeout must be None or a number of seconds, got True"),
    ("1", "timeout must be None or a number of seconds, got '1'"),
    ([1], r"timeout must be None or a number of seconds, got \[1\]"),
])
def test_a_timeout_that_is_not_a_number_is_a_type_error_naming_it(private_dirs, timeout,
                                                                   message) -> None:
    with pytest.raises(TypeError, match=message):
        AudioPool(slots=1, max_bytes=100, timeout=timeout)
    assert os.listdir(private_dirs.ram) == []


def test_the_largest_timeout_threading_accepts_still_works(ram) -> None:
    with AudioPool(slots=1, max_bytes=100, timeout=threading.TIMEOUT_MAX) as pool, \
            pool.write_wav(np.ones(3, np.int16), RATE) as pooled:
        assert pooled.frames == 3 and pool.timeout == threading.TIMEOUT_MAX


@pytest.mark.parametrize("timeout", [float("inf"), 1e10, 10**100],
                         ids=["inf", "past-TIMEOUT_MAX", "past-a-float"])
def test_a_timeout_no_wait_can_take_means_no_limit_as_for_followers_and_the_cache(
        ram, timeout) -> None:
    # formats.check_timeout, the package's one timeout check: None, infinity and anything
    # past threading.TIMEOUT_MAX are no limit (Condition.wait refuses such numbers).
    with AudioPool(slots=1, max_bytes=100, timeout=timeout) as pool:
        assert pool.timeout is None
        with pool.write_wav(np.ones(3, np.int16), RATE) as pooled:
            assert pooled.frames == 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"timeout": -10**100},
     "^timeout must be None or >= 0 seconds, got a negative int of 333 bits$"),
    ({"max_bytes": 10**100},
     r"^max_bytes must fit a WAV file \(< 4 GiB\), got an int of 333 bits$"),
    ({"when_busy": "w" * 5000}, "^when_busy must be 'wait' or 'grow', got str of length 5000$"),
], ids=["huge-negative-timeout", "huge-max-bytes", "long-when-busy"])
def test_a_huge_pool_argument_is_named_by_its_size_not_its_whole_value(
        private_dirs, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AudioPool(**{"slots": 1, "max_bytes": 100, **kwargs})
    assert os.listdir(private_dirs.ram) == []


@pytest.mark.parametrize(("when_busy", "shown"), [
    (None, "None"),
    (["wait"], r"\['wait'\]"),
    (np.array(["wait", "grow"]), "a numpy array of shape \\(2,\\) and dtype <U4"),
], ids=["none", "list", "numpy-array"])
def test_a_when_busy_that_is_not_a_str_is_a_type_error_naming_it(private_dirs, when_busy,
                                                                   shown) -> None:
    # A numpy array raised numpy's "truth value of an array is ambiguous", naming nothing.
    with pytest.raises(TypeError, match=f"^when_busy must be 'wait' or 'grow', got {shown}$"):
        AudioPool(slots=1, max_bytes=100, when_busy=when_busy)
    assert os.listdir(private_dirs.ram) == []


def test_a_huge_frame_count_for_acquire_or_truncate_is_named_by_its_size(ram) -> None:
    with AudioPool(slots=1, max_bytes=100) as pool:
        with pytest.raises(ValueError, match=r"^frames=an int of 333 bits is too long for a WAV"):
            pool.acquire(10**100, RATE)
        with pool.acquire(10, RATE) as pooled, pytest.raises(
                ValueError, match=r"^cannot grow a pooled WAV: frames=an int of 333 bits > 10$"):
            pooled.truncate(10**100)


@pytest.mark.parametrize("timeout", [np.int64(0), np.uint8(0), np.float32(0.05)],
                         ids=["int64", "uint8", "float32"])
def test_a_numpy_timeout_is_taken_like_a_python_number(ram, timeout) -> None:
    with AudioPool(slots=1, max_bytes=100, timeout=timeout) as pool:
        assert pool.timeout == float(timeout) and type(pool.timeout) is float
        with pool.acquire(10, RATE), pytest.raises(TimeoutError, match="all 1 slots stayed busy"):
            pool.acquire(10, RATE)


@pytest.mark.parametrize("prefix", ["", ".luna_audio_", "tts pool_", "tts*_", "tts:", "é_"])
def test_an_empty_or_unsafe_pool_prefix_is_refused_with_value_error_naming_it(
        private_dirs, prefix) -> None:
    planted = Path(private_dirs.ram) / "pool_results.sqlite"
    planted.write_bytes(b"user data")
    with pytest.raises(ValueError, match="prefix must be one or more letters, digits, '_' or "
                                         rf"'-' .*got {re.escape(repr(prefix))}"):
        AudioPool(slots=1, max_bytes=100, prefix=prefix)
    assert os.listdir(private_dirs.ram) == ["pool_results.sqlite"]
    assert planted.read_bytes() == b"user data"


def test_a_pool_prefix_that_is_not_a_str_is_a_type_error(private_dirs) -> None:
    with pytest.raises(TypeError, match="prefix must be a str, got b'tts_'"):
        AudioPool(slots=1, max_bytes=100, prefix=b"tts_")  # type: ignore[arg-type]


# ---- reclaiming dead pools' slots: only files a pool provably made ----------------------------

DEAD_POOL = """
import json, os
from luna_shm import AudioPool
pool = AudioPool(slots=2, max_bytes=3000, prefix="tts_")
print(json.dumps([s.path for s in pool._slots]), flush=True)
os._exit(0)  # dies without closing: its slot files stay, unlocked
"""


def make_dead_pool_slots(env: dict[str, str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", DEAD_POOL], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": LIBRARY_PATH, **env}, timeout=60)
    assert done.returncode == 0, done.stderr
    paths: list[str] = __import__("json").loads(done.stdout)
    assert all(os.path.isfile(p) for p in paths)
    return paths


def test_a_new_pool_reclaims_only_marked_slot_files_and_never_user_files_with_its_prefix(
        private_dirs) -> None:
    dead = make_dead_pool_slots({}) + make_dead_pool_slots({"LUNA_SHM_DISABLE": "1"})
    assert {os.path.dirname(p) for p in dead} == {private_dirs.ram, private_dirs.fallback}
    user_files: dict[str, bytes] = {}
    for directory in (private_dirs.ram, private_dirs.fallback):
        for name, content in [
            ("tts_pool_config.json", b'{"voice": "luna"}'),
            ("tts_pool_results.sqlite", b"SQLite format 3\0" + bytes(4080)),
            ("pool_results.sqlite", b"SQLite format 3\0"),
            # Named exactly like a slot, page-sized, a valid WAV, but no marker.
            (f"tts_pool_{'ab' * 16}.wav", b""),
        ]:
            path = f"{directory}/{name}"
            if name.endswith(".wav"):
                write_wav(path, np.zeros((4096 - 44) // 2, np.int16), RATE)
                content = Path(path).read_bytes()
                assert len(content) == 4096
            else:
                Path(path).write_bytes(content)
            user_files[path] = content

    with AudioPool(slots=1, max_bytes=3000, prefix="tts_") as pool:
        new_slot = pool._slots[0].path
        assert not any(os.path.lexists(p) for p in dead)  # the dead pool's slots: reclaimed
        for path, content in user_files.items():  # everything else: untouched
            assert Path(path).read_bytes() == content
    assert not os.path.lexists(new_slot)
    assert {p for d in (private_dirs.ram, private_dirs.fallback) for p in
            (f"{d}/{n}" for n in os.listdir(d))} == set(user_files)


def test_a_slot_file_whose_marker_was_overwritten_is_not_reclaimed(private_dirs) -> None:
    [first, second] = make_dead_pool_slots({})
    with open(first, "r+b") as f:  # somebody else's program wrote over the tail
        f.seek(-4, os.SEEK_END)
        f.write(b"user")
    with AudioPool(slots=1, max_bytes=3000, prefix="tts_"):
        assert os.path.isfile(first) and not os.path.lexists(second)


KILLED_WHILE_MAKING_A_SLOT = """
import os, signal
from luna_shm import AudioPool
from luna_shm.pool import _slot_files

made = _slot_files.Slot.__init__

def killed_after_mapping(self, *args):  # the slot's file is reserved and mapped, not marked
    made(self, *args)
    os.kill(os.getpid(), signal.SIGKILL)

_slot_files.Slot.__init__ = killed_after_mapping
AudioPool(slots=1, max_bytes=3000, prefix="tts_")
"""


@pytest.mark.parametrize("where", ["ram", "fallback"])
def test_a_pool_killed_while_making_a_slot_leaves_no_file_that_no_pool_reclaims(
        private_dirs, where: str) -> None:
    env = {"LUNA_SHM_DISABLE": "1"} if where == "fallback" else {}
    done = subprocess.run([sys.executable, "-c", KILLED_WHILE_MAKING_A_SLOT],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": LIBRARY_PATH, **env})
    assert done.returncode == -signal.SIGKILL, done.stderr
    with AudioPool(slots=1, max_bytes=3000, prefix="tts_"):
        pass
    assert os.listdir(private_dirs.ram) == os.listdir(private_dirs.fallback) == []


def test_a_new_pool_reclaims_unmarked_slot_files_only_while_they_hold_nothing(
        private_dirs) -> None:
    # What a pool killed before its marker left where O_TMPFILE is missing (or an older
    # luna_shm left): a slot-named file, empty or page-sized zeros.
    unmarked = [b"", bytes(8192)]
    kept = [bytes(8191) + b"\1", bytes(4096 + 1), b"\1"]  # content, or no slot's size
    names = {f"tts_pool_{os.urandom(16).hex()}.wav": content for content in unmarked + kept}
    for directory in (private_dirs.ram, private_dirs.fallback):
        for name, content in names.items():
            Path(directory, name).write_bytes(content)
    with AudioPool(slots=1, max_bytes=3000, prefix="tts_") as pool:
        mine = os.path.basename(pool._slots[0].path)
        for directory in (private_dirs.ram, private_dirs.fallback):
            left = {n: Path(directory, n).read_bytes() for n in os.listdir(directory)}
            left.pop(mine, None)
            assert sorted(left.values()) == sorted(kept)


REWRITTEN_THEN_KILLED = """
import os, subprocess
import numpy as np
from luna_shm import AudioPool

pool = AudioPool(slots=1, max_bytes=3000, prefix="tts_")
pool.write_wav(np.ones(100, np.int16), 16000).release()
path = pool._slots[0].path
size = os.path.getsize(path)
# Another program rewrites the free slot in place, at its full length, marker and all.
subprocess.run(["dd", "if=/dev/urandom", f"of={path}", f"bs={size}", "count=1",
                "conv=notrunc"], check=True, capture_output=True)
with pool.write_wav(np.full(100, 3, np.int16), 16000) as again:  # still its slot
    assert again.path == path
os._exit(0)  # dies without closing: its slot file stays, unlocked
"""


def test_a_slot_rewritten_in_place_and_used_again_is_reclaimed_after_its_pool_dies(
        private_dirs) -> None:
    done = subprocess.run([sys.executable, "-c", REWRITTEN_THEN_KILLED], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": LIBRARY_PATH})
    assert done.returncode == 0, done.stderr
    [left] = os.listdir(private_dirs.ram)
    with AudioPool(slots=1, max_bytes=3000, prefix="tts_") as pool:
        assert not os.path.lexists(f"{private_dirs.ram}/{left}")
        assert os.listdir(private_dirs.ram) == [os.path.basename(pool._slots[0].path)]


def test_pool_writes_of_the_largest_audio_never_reach_the_slot_marker(ram) -> None:
    from luna_shm.pool._slot_files import SLOT_MARKER as _SLOT_MARKER

    for max_bytes in (1, 2, 3999, 4096 - 128 - 9 - 16, 4096 - 128 - 9 - 15, 4096, 10_001):
        with AudioPool(slots=1, max_bytes=max_bytes) as pool:
            path = pool._slots[0].path
            frames = max_bytes // 8
            with pool.write_wav(np.full(max_bytes, 255, np.uint8), RATE):
                assert Path(path).read_bytes().endswith(_SLOT_MARKER)
            with pool.write_wav(np.full(frames, -1.0), RATE, subtype="PCM_32"):
                assert Path(path).read_bytes().endswith(_SLOT_MARKER)
            with pool.acquire(max_bytes, RATE, 1, "uint8") as pooled:
                pooled.array[...] = 255
                pooled.truncate(max_bytes // 2)
                assert Path(path).read_bytes().endswith(_SLOT_MARKER)
                assert sf.info(path).frames == max_bytes // 2


# ---- a slot whose path was taken over ---------------------------------------------------------


def test_a_slot_whose_path_was_rewritten_while_held_is_replaced_by_a_fresh_slot(ram) -> None:
    first, second = samples("int16", 300, 1, seed=1), samples("int16", 200, 1, seed=2)
    other = samples("float32", 100, 2, seed=3)
    with AudioPool(slots=1, max_bytes=1000) as pool:
        pooled = pool.write_wav(first, RATE)
        old_path = pooled.path
        write_wav(pooled.path, other, RATE)  # the user writes their own file at that path
        pooled.release()
        with pool.write_wav(second, RATE) as again:
            assert again.path != old_path
            assert_every_reader_sees(again.path, second)
        assert pool.slots == 1
        with pool.write_wav(first, RATE) as third:  # the fresh slot is reused from now on
            assert third.path == again.path
            assert_every_reader_sees(third.path, first)
    # The user's file is not ours: closing the pool leaves it as written.
    np.testing.assert_array_equal(read_wav(old_path, mmap=False)[0], other)
    assert slot_files(ram) == [os.path.basename(old_path)]


def test_a_slot_whose_file_was_removed_while_free_is_replaced_by_a_fresh_slot(ram) -> None:
    data = samples("int16", 100, 1)
    with AudioPool(slots=1, max_bytes=1000) as pool:
        path = pool._slots[0].path
        os.unlink(path)  # another program removed it
        with pool.write_wav(data, RATE) as pooled:
            assert pooled.path != path
            assert_every_reader_sees(pooled.path, data)
    assert slot_files(ram) == []


def test_a_slot_that_could_not_be_replaced_is_made_again_by_the_next_call_never_awaited(
        ) -> None:
    # Another program removes the only slot's file while the RAM disk (and the fallback
    # dir on it) is full: the next write drops the slot and cannot make a fresh one
    # (ENOSPC, as it should). Once there is room again, a call must make the slot it
    # lacks; it waited instead for a release that could never come ("all 0 slots stayed
    # busy"), forever without a timeout.
    done = run_in_private_shm("""
        import errno, json, os
        import numpy as np
        os.mkdir("/dev/shm/fallback")  # TMPDIR: the fallback dir is full too
        from luna_shm import AudioPool, read_wav
        data = np.arange(100, dtype=np.int16)
        pool = AudioPool(slots=1, max_bytes=100_000, timeout=10)
        with pool.write_wav(data, 16000) as pooled:
            path = pooled.path
        os.unlink(path)  # another program removes the free slot's file
        fill = os.open("/dev/shm/fill", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fill, bytes(65536))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        try:
            pool.write_wav(data, 16000)
            first = "written"
        except OSError as exc:
            first = errno.errorcode[exc.errno]
        os.close(fill)
        os.unlink("/dev/shm/fill")
        try:
            with pool.write_wav(data, 16000) as pooled:
                second = read_wav(pooled.path, mmap=False)[0].tolist() == data.tolist()
        except TimeoutError as exc:
            second = str(exc)
        slots = pool.slots
        pool.close()
        print(json.dumps({"first": first, "second": second, "slots": slots,
                          "left": sorted(os.listdir("/dev/shm"))}))
    """, shm_size="1m", env={"TMPDIR": "/dev/shm/fallback"})
    assert json.loads(assert_child_ok(done)) == {
        "first": "ENOSPC", "second": True, "slots": 1, "left": ["fallback"]}


def test_a_caller_waits_for_a_busy_slot_while_a_lost_one_cannot_be_made_again() -> None:
    # Two slots: one held, the other's file removed by another program while the RAM
    # disk (and the fallback dir on it) is full, so it cannot be made again. A call in
    # "wait" mode must wait for the held slot, as it would have with both slots busy,
    # rather than fail on the slot it cannot make.
    done = run_in_private_shm("""
        import errno, json, os, threading, time
        import numpy as np
        os.mkdir("/dev/shm/fallback")
        from luna_shm import AudioPool
        pool = AudioPool(slots=2, max_bytes=100_000, timeout=60)
        held = pool.acquire(10, 16000)
        free = [slot.path for slot in pool._slots if slot.path != held.path]
        os.unlink(free[0])  # another program removes the free slot's file
        fill = os.open("/dev/shm/fill", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fill, bytes(65536))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        got = []

        def write():
            try:
                with pool.write_wav(np.ones(10, np.int16), 16000) as pooled:
                    got.append(pooled.path)
            except Exception as exc:
                got.append(f"{type(exc).__name__}: {exc}")

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 60
        while not pool._waiting and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        waited = bool(pool._waiting)
        held.release()
        writer.join(60)
        os.close(fill)
        os.unlink("/dev/shm/fill")
        pool.close()
        print(json.dumps({"waited": waited, "got": got == [held.path]}))
    """, shm_size="1m", env={"TMPDIR": "/dev/shm/fallback"})
    assert json.loads(assert_child_ok(done)) == {"waited": True, "got": True}


def test_a_file_renamed_over_a_slot_path_as_the_pool_closes_is_never_removed(ram) -> None:
    # close() asked whether the slot's path still named its file, then unlinked the
    # path: a file another program (or write_wav(pooled.path, ...)) renamed over it in
    # between was removed. The profile hook renames it over at that very instant.
    theirs = samples("int16", 50, 1, seed=4)
    pool = AudioPool(slots=1, max_bytes=1000)
    pooled = pool.write_wav(samples("int16", 10, 1), RATE)
    path = pooled.path
    renamed: list[str] = []

    def rename_theirs_over_it_right_after_the_pools_stat(frame, event, arg) -> None:
        if event == "c_return" and arg is os.stat and not renamed:
            renamed.append(frame.f_code.co_name)
            write_wav(f"{path}.theirs", theirs, RATE)
            os.rename(f"{path}.theirs", path)

    sys.setprofile(rename_theirs_over_it_right_after_the_pools_stat)
    try:
        pool.close()
    finally:
        sys.setprofile(None)
    assert renamed
    np.testing.assert_array_equal(read_wav(path, mmap=False)[0], theirs)
    assert os.listdir(ram) == [os.path.basename(path)]
    pooled.release()


CLOSE_WITH_A_FULL_FD_TABLE = """
import errno, json, os, resource
import numpy as np
from luna_shm import AudioPool
pool = AudioPool(slots=2, max_bytes=1000)
pool.write_wav(np.ones(10, np.int16), 16000).release()
paths = [slot.path for slot in pool._slots]
""" + FILL_FD_TABLE + """
try:
    pool.close()
    closed = "closed"
except OSError as exc:
    closed = errno.errorcode[exc.errno]
for fd in held:
    os.close(fd)
print(json.dumps({"closed": closed, "left": [p for p in paths if os.path.exists(p)]}))
"""


def test_a_pool_closes_and_removes_its_slot_files_even_with_a_full_fd_table(ram) -> None:
    # A daemon that ran out of fds still closes its pool: the slot files go, no EMFILE.
    done = subprocess.run([sys.executable, "-c", CLOSE_WITH_A_FULL_FD_TABLE],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": LIBRARY_PATH,
                               "LUNA_SHM_DIR": str(ram)})
    assert json.loads(assert_child_ok(done)) == {"closed": "closed", "left": []}
    assert os.listdir(ram) == []


USED_BY_A_DAEMON_THREAD_AT_EXIT = """
import atexit, json, os, threading, weakref
# Registered before any weakref.finalize exists, this runs after their exit hook, which
# finalizes the pool that was never closed, while the daemon thread still uses it.
assert not weakref.finalize._registered_with_atexit
results = []
go = threading.Event()


def after_the_pools_finalizer():
    go.set()
    worker.join(30)
    print(json.dumps({"results": results, "left": os.listdir(os.environ["LUNA_SHM_DIR"])}))


atexit.register(after_the_pools_finalizer)
import numpy as np
from luna_shm import AudioPool
pool = AudioPool(slots=1, max_bytes=1000)
pool.write_wav(np.ones(10, np.int16), 16000).release()


def use_the_pool_at_exit():
    go.wait(30)
    for call in (lambda: pool.write_wav(np.ones(10, np.int16), 16000),
                 lambda: pool.acquire(10, 16000)):
        try:
            results.append(["made", os.path.exists(call().path)])
        except Exception as exc:
            results.append([type(exc).__name__, str(exc)])


worker = threading.Thread(target=use_the_pool_at_exit, daemon=True)
worker.start()
"""


def test_a_pool_never_closed_is_closed_at_exit_for_the_daemon_threads_still_using_it(
        ram) -> None:
    # At interpreter exit the finalizer of a pool never closed removed its slot files
    # while the pool lived on for the daemon threads still using it: one got "list.remove
    # (x): x not in list", the next made a new slot file that outlived the process.
    done = subprocess.run([sys.executable, "-c", USED_BY_A_DAEMON_THREAD_AT_EXIT],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": LIBRARY_PATH,
                               "LUNA_SHM_DIR": str(ram)})
    closed = ["ValueError", "AudioPool is closed"]
    assert json.loads(assert_child_ok(done)) == {"results": [closed, closed], "left": []}
    assert os.listdir(ram) == []


# What another program does to a slot file while the slot is free, after the pool
# has checked it once (so only the pool's inotify watch can tell).
TAMPERING = {
    "removed": "rm -f -- \"$1\"",
    "renamed over": "printf 'not ours' > \"$1.new\" && mv -f -- \"$1.new\" \"$1\"",
    "renamed away": "mv -- \"$1\" \"$1.moved\"",
    "cut": "truncate -s 44 -- \"$1\"",
    "hard linked elsewhere, then removed": "ln -- \"$1\" \"$1.link\" && rm -- \"$1\"",
}


# 300 frames take the small write's path (its checks and copy in one C call under the
# pool's lock); 12,000 frames (24 KB) the general one.
@pytest.mark.parametrize("frames", [300, 12_000])
@pytest.mark.parametrize("tamper", list(TAMPERING))
def test_a_checked_slot_that_another_program_changes_while_free_is_never_handed_out(
        ram, tamper, frames) -> None:
    data = samples("int16", frames, 1, seed=4)
    with AudioPool(slots=1, max_bytes=30_000) as pool:
        with pool.write_wav(data, RATE) as pooled:  # the slot is checked and watched now
            path = pooled.path
        subprocess.run(["sh", "-c", TAMPERING[tamper], "sh", path], check=True, timeout=30)
        other = data[::-1].copy()  # contiguous, like data: the same write path
        with pool.write_wav(other, RATE) as again:
            assert again.path != path
            assert_every_reader_sees(again.path, other)
        with pool.write_wav(data, RATE) as third:  # the fresh slot is trusted from now on
            assert third.path == again.path
    # Whatever the other program left is its own: never removed by the pool.
    left = sorted(set(os.listdir(ram)) - {os.path.basename(again.path)})
    if tamper == "renamed over":
        assert left == [os.path.basename(path)]
        assert Path(path).read_bytes() == b"not ours"
    elif tamper == "renamed away":
        assert left == [os.path.basename(path) + ".moved"]
    elif tamper == "hard linked elsewhere, then removed":
        assert left == [os.path.basename(path) + ".link"]


@pytest.mark.parametrize("frames", [300, 12_000])
def test_an_event_about_one_slot_drained_by_a_write_into_another_still_catches_the_first(
        ram, frames) -> None:
    # The watch has one queue for every slot: the write that drains an event about slot B
    # may take slot A. B must still be checked by name before it is handed out.
    data = samples("int16", frames, 1, seed=6)
    other = data[::-1].copy()  # contiguous, like data: the same write path
    with AudioPool(slots=2, max_bytes=30_000) as pool:
        with pool.write_wav(data, RATE) as first, pool.write_wav(data, RATE) as second:
            kept, lost = first.path, second.path  # both checked and watched now
        os.unlink(lost)  # another program removes B while both slots are free
        with pool.write_wav(other, RATE) as a:  # takes A, draining the event
            assert a.path == kept
            with pool.write_wav(data, RATE) as b:  # B is checked by name: gone
                assert b.path not in (kept, lost)
                assert_every_reader_sees(b.path, data)
            assert_every_reader_sees(a.path, other)
        assert pool.slots == 2


def test_a_slot_used_many_times_by_readers_and_the_pool_keeps_its_path(ram) -> None:
    # Reads, other processes' reads and the pool's own writes through the mapping are no
    # reason to replace a slot: the watch stays quiet and the path stays the same.
    data = samples("int16", 300, 1, seed=5)
    with AudioPool(slots=1, max_bytes=1000) as pool:
        paths = set()
        for _ in range(20):
            with pool.write_wav(data, RATE) as pooled:
                paths.add(pooled.path)
                assert_every_reader_sees(pooled.path, data)  # soundfile, scipy, wave, sox
        assert len(paths) == 1 and pool.slots == 1


NO_INOTIFY = """
import os
import numpy as np
from luna_shm import AudioPool, read_wav
# No inotify instance to be had: the pool checks each slot's name with a stat on every
# take, and still never hands out one whose path another program took over.
with AudioPool(slots=1, max_bytes=1000) as pool:
    with pool.write_wav(np.ones(100, np.int16), 8000) as pooled:
        path = pooled.path
    with pool.write_wav(np.ones(100, np.int16), 8000) as pooled:
        assert pooled.path == path
    with open(path + ".new", "wb") as f:
        f.write(b"not ours")
    os.rename(path + ".new", path)
    with pool.write_wav(np.full(100, 7, np.int16), 8000) as again:
        assert again.path != path
        assert (read_wav(again.path, mmap=False)[0] == 7).all()
    assert open(path, "rb").read() == b"not ours"
print("ok")
"""


def test_a_pool_without_an_inotify_instance_checks_its_slots_by_name_on_every_take(
        ram) -> None:
    # A user namespace whose limit of inotify instances is 0: inotify_init1 fails there
    # with EMFILE, as it does for a user who has used up max_user_instances.
    unshare = require_tool("unshare")
    script = ('echo 0 > /proc/sys/user/max_inotify_instances || exit 77\n'
              'exec "$0" -c "$1"\n')
    done = subprocess.run(
        [unshare, "-U", "-r", "sh", "-c", script, sys.executable, NO_INOTIFY],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": LIBRARY_PATH, "LUNA_SHM_DIR": str(ram)})
    if done.returncode == 77 or "unshare failed" in done.stderr:
        pytest.skip(f"no user namespace with its own inotify limit here: {done.stderr}")
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
    assert "no inotify instance for an AudioPool (Too many open files)" in done.stderr


SHRUNK_SLOT = """
import os
import sys
import numpy as np
from luna_shm import AudioPool, read_wav
frames, cut_to = int(sys.argv[1]), int(sys.argv[2])
with AudioPool(slots=1, max_bytes=100_000) as pool:
    pool.write_wav(np.ones(frames, np.int16), 8000).release()  # its name checked once
    pooled = pool.write_wav(np.ones(frames, np.int16), 8000)
    os.truncate(pooled.path, cut_to)  # another program cuts the slot file while it is held
    if cut_to == 0:
        # A read of the cut page: the SIGBUS guard gives the mapping zeros and marks it
        # broken, which the next write finds before it asks the watch.
        assert pooled.array[0] == 0
    pooled.release()
    with pool.write_wav(np.full(frames, 7, np.int16), 8000) as again:
        assert again.path != pooled.path
        assert (read_wav(again.path, mmap=False)[0] == 7).all()
print("ok")
"""


# 40,000 frames take the general path; 100 frames the small write's, whose copy never
# reaches past the cut in the first page unless the mapping broke there.
@pytest.mark.parametrize(("frames", "cut_to"), [(40_000, 44), (100, 44), (100, 0)])
def test_a_slot_file_cut_by_another_program_is_replaced_before_it_is_handed_out(
        private_dirs, frames, cut_to) -> None:
    # In a child: before the check, the next write into the cut file was a SIGBUS.
    done = subprocess.run([sys.executable, "-c", SHRUNK_SLOT, str(frames), str(cut_to)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": LIBRARY_PATH}, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


# ---- a PooledWav dropped without release ------------------------------------------------------


COLLECTED_INSIDE_THE_LOCK = """
import gc
import sys
import warnings
import numpy as np
from luna_shm import AudioPool
warnings.simplefilter("ignore", ResourceWarning)
data = np.arange(int(sys.argv[2]), dtype=np.int16)
with AudioPool(slots=2, max_bytes=30_000) as pool:
    a, b = pool.write_wav(data, 8000), pool.write_wav(data, 8000)
    a.release()  # both slots' names checked: a small write takes the small path
    b.release()
    gc.disable()
    leaked = pool.write_wav(data, 8000)
    cycle = [leaked]
    cycle.append(cycle)
    del leaked, cycle  # garbage that only a collection frees, running its __del__
    def collect_inside(frame, event, arg):
        # A profiler's hook runs code anywhere, also where the pool holds its lock; so
        # does a garbage collection triggered by any allocation there.
        if event == "call" and frame.f_code.co_name == sys.argv[1]:
            sys.setprofile(None)
            assert gc.collect() > 0
            print("collected in", sys.argv[1])
    sys.setprofile(collect_inside)
    first = pool.write_wav(data, 8000)
    sys.setprofile(None)
    second = pool.write_wav(data, 8000)
    assert first.path != second.path, "a slot handed out twice"
    assert (pool.slots, first.array.tolist()) == (2, data.tolist())
print("ok")
"""


# pool_fill runs under the lock on the small-write path, _intact on the general one (a
# write of more than 16 KiB).
@pytest.mark.parametrize(("where", "frames"), [("pool_fill", 16), ("_intact", 9000)])
def test_a_dropped_pooled_wav_collected_while_its_pool_holds_the_lock_gives_its_slot_back(
        ram, where, frames) -> None:
    # Its __del__ gives the slot back from the thread that holds the pool's lock: a lock
    # that is not reentrant hangs there, and a slot given back during the C call must not
    # be confused with the one being filled.
    done = subprocess.run(
        [sys.executable, "-c", COLLECTED_INSIDE_THE_LOCK, where, str(frames)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": LIBRARY_PATH, "LUNA_SHM_DIR": str(ram)})
    assert (done.returncode, done.stdout, done.stderr) == (
        0, f"collected in {where}\nok\n", "")


def test_a_dropped_pooled_wav_warns_and_its_slot_goes_back_so_the_next_caller_never_hangs(
        ram) -> None:
    with AudioPool(slots=1, max_bytes=1000, timeout=None) as pool:
        pooled = pool.acquire(10, RATE)
        path = pooled.path
        with pytest.warns(ResourceWarning, match=f"unreleased PooledWav '{path}'"):
            del pooled
            gc.collect()
        again = call_with_deadline(lambda: pool.acquire(10, RATE))
        assert isinstance(again, PooledWav) and again.path == path
        again.release()
        # A released one is not given back a second time when it is collected.
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            del again
            gc.collect()
        pool.timeout = 0
        with pool.acquire(1, RATE), pytest.raises(TimeoutError):  # one slot, not two
            pool.acquire(1, RATE)


def _pool_as_other_user(readable: str, closed: str) -> str:
    os.environ.update(LUNA_SHM_DIR=readable, TMPDIR=closed)
    placement.refresh()
    with AudioPool(slots=1, max_bytes=1000) as pool, \
            pool.write_wav(np.zeros(10, np.int16), 16000) as wav:
        return os.path.dirname(wav.path)


def test_a_pool_is_made_even_when_one_of_our_dirs_cannot_be_read_for_its_reclaim(
    private_dirs,
) -> None:
    # Reclaiming dead slots is housekeeping: an unreadable fallback dir (EACCES for a
    # real second user) is logged and skipped, and the pool is made in the RAM dir.
    closed, readable = closed_and_readable_dirs(private_dirs.ram)
    assert as_other_user(_pool_as_other_user, readable, closed) == readable


class Interrupted(Exception):
    """What a signal handler raised."""


def all_slots_come_back(pool: AudioPool) -> None:
    """Every slot of the pool can be held at once, each its own file (none lost, none
    handed out twice)."""
    held = [pool.acquire(10, RATE) for _ in range(pool.slots)]
    try:
        assert len({pooled.path for pooled in held}) == pool.slots
    finally:
        for pooled in held:
            pooled.release()


@pytest.mark.parametrize("anonymous", [False, True], ids=["named", "memfd"])
@pytest.mark.parametrize(("operation", "cut_at"), [
    ("write", "_intact"),  # the slot taken, not yet checked
    ("write", "__init__"),  # written, its PooledWav not yet made
    ("acquire", "format_slot"),
    ("release", "_give_back"),  # the PooledWav released, its slot not yet back
])
def test_a_call_cut_short_between_its_steps_loses_no_slot(ram, anonymous, operation,
                                                          cut_at) -> None:
    # Python can raise at any call (a signal handler that raises, KeyboardInterrupt):
    # here the first call of cut_at raises, as a handler run just then would.
    with warnings.catch_warnings(), \
            AudioPool(slots=2, max_bytes=100_000, anonymous=anonymous, timeout=5) as pool:
        big = np.zeros(30_000, np.int16)  # past the small-write path: _take and _intact

        def cut(frame, event, arg):
            if event == "call" and frame.f_code.co_name == cut_at:
                sys.setprofile(None)
                raise Interrupted(cut_at)

        warnings.simplefilter("ignore", ResourceWarning)  # the PooledWav a cut release left
        for _ in range(pool.slots + 1):  # more cut calls than slots: a lost one shows
            pooled = pool.acquire(10, RATE) if operation == "release" else None
            try:
                with pytest.raises(Interrupted):
                    sys.setprofile(cut)
                    if operation == "write":
                        pool.write_wav(big, RATE)
                    elif operation == "acquire":
                        pool.acquire(10, RATE)
                    else:
                        assert pooled is not None
                        pooled.release()
            finally:
                sys.setprofile(None)
            del pooled
            gc.collect()
        all_slots_come_back(pool)
        assert pool.slots == 2  # found again, not replaced


@pytest.mark.parametrize("anonymous", [False, True], ids=["named", "memfd"])
def test_a_slot_lost_by_a_cut_release_wakes_a_thread_already_waiting_without_timeout(
        ram, anonymous) -> None:
    # The pool found a slot whose lease died only when a call ran dry: a thread that was
    # already waiting (timeout=None) when the release was cut short slept on for ever,
    # though the slot was free, and so did whoever joined it (a daemon's shutdown).
    got: list[object] = []
    with warnings.catch_warnings(), \
            AudioPool(slots=1, max_bytes=100, anonymous=anonymous) as pool:
        warnings.simplefilter("ignore", ResourceWarning)  # the PooledWav the cut release left
        held = pool.acquire(10, RATE)

        def wait_for_a_slot() -> None:
            try:
                with pool.acquire(10, RATE) as pooled:
                    got.append(pooled.path)
            except BaseException as exc:  # the pool's close below ends a hung wait
                got.append(exc)

        waiter = threading.Thread(target=wait_for_a_slot, daemon=True)
        waiter.start()
        deadline = time.monotonic() + 60
        while not pool._waiting and waiter.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert pool._waiting == 1, "the thread never waited for the held slot"

        def cut(frame, event, arg):
            if event == "call" and frame.f_code.co_name == "_give_back":
                sys.setprofile(None)
                raise Interrupted("_give_back")

        try:
            with pytest.raises(Interrupted):
                sys.setprofile(cut)
                held.release()
        finally:
            sys.setprofile(None)
        del held
        gc.collect()  # the cut release's frame, and with it its lease, are gone now
        waiter.join(10)
        hung = waiter.is_alive()
    waiter.join(60)  # the close woke a hung waiter (ValueError): it ends either way
    assert not hung, "the waiting thread slept on while the lost slot was free"
    assert len(got) == 1 and isinstance(got[0], str)


def test_raising_signal_handlers_at_random_moments_lose_no_slot(ram) -> None:
    armed = [False]

    def handler(signum, frame):
        # Not inside a __del__ or the pool's callback of a dead lease (a collection may
        # run one at any moment): Python only prints what a finalizer raises, and a slot
        # given back there needs no test.
        while frame is not None and frame.f_code.co_name not in ("__del__", "lease_died"):
            frame = frame.f_back
        if armed[0] and frame is None:
            armed[0] = False
            raise Interrupted("SIGALRM")

    previous = signal.signal(signal.SIGALRM, handler)
    rng = random.Random(7)
    small, big = np.arange(1000, dtype=np.int16), np.zeros(60_000, np.int16)
    interrupted = 0
    try:
        with warnings.catch_warnings(), \
                AudioPool(slots=3, max_bytes=200_000, timeout=5) as pool:
            # A call cut between its write and its release leaves a PooledWav unreleased.
            warnings.simplefilter("ignore", ResourceWarning)
            for _ in range(3000):
                delay, choice = rng.uniform(1e-6, 100e-6), rng.randrange(3)
                pooled = None  # (one that a cut call left unreleased goes now, unarmed)
                armed[0] = True
                try:
                    signal.setitimer(signal.ITIMER_REAL, delay)
                    if choice == 0:
                        pooled = pool.write_wav(small, RATE)
                    elif choice == 1:
                        pooled = pool.write_wav(big, RATE)
                    else:
                        pooled = pool.acquire(5000, RATE)
                    pooled.release()
                except Interrupted:
                    interrupted += 1
                finally:
                    armed[0] = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
            gc.collect()
            all_slots_come_back(pool)
            assert pool.slots == 3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted > 0  # the handler did cut calls short
