"""follow_wav / afollow_wav / iter_wav_stream: live streams followed from other processes."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
import soundfile as sf

from helpers import (
    LIBRARY_PATH,
    as_other_user,
    call_with_deadline,
    fork_with_threads_is_meant,
    require_tool,
    rest_of_output,
    samples,
)
from luna_shm import (
    StreamAbandoned,
    WavError,
    WavWriter,
    afollow_wav,
    follow,
    follow_wav,
    iter_wav_stream,
    read_wav,
)

RATE = 24000
CHUNK = 480  # 20 ms at 24 kHz

# A follower in its own process: prints "started", follows argv[1], then prints what it got.
FOLLOWER = """
import hashlib, json, sys
from luna_shm import StreamAbandoned, follow_wav
print("started", flush=True)
digest, frames, blocks, error = hashlib.sha256(), 0, 0, None
try:
    for block in follow_wav(sys.argv[1], timeout=60):
        digest.update(block.tobytes())
        frames += len(block)
        blocks += 1
except StreamAbandoned as exc:
    error = str(exc)
print(json.dumps({"sha": digest.hexdigest(), "frames": frames, "blocks": blocks,
                  "error": error}))
"""


def start_follower(path: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", FOLLOWER, str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline() == "started\n"
    return child


def follower_report(child: subprocess.Popen[str]) -> dict[str, object]:
    # Read from the buffered file that "started" was read from: communicate() reads the
    # pipe itself and misses what that readline took in with it (a follower of a finished
    # file prints its report at once, and on a loaded machine both lines came in one read:
    # the report was lost, once in CI).
    out, err = rest_of_output(child, timeout=60)
    assert child.returncode == 0, err
    report: dict[str, object] = json.loads(out)
    return report


def stream_chunks(n: int, channels: int = 1, dtype: str = "int16") -> list[np.ndarray]:
    return [samples(dtype, CHUNK, channels, seed=i) for i in range(n)]


def digest(parts: list[np.ndarray]) -> str:
    return hashlib.sha256(np.concatenate(parts).tobytes()).hexdigest()


def collect(path: Path, timeout: float = 30) -> list[np.ndarray]:
    result = call_with_deadline(lambda: list(follow_wav(path, timeout=timeout)))
    assert isinstance(result, list)
    return result


def follower_thread(path: Path, timeout: float | None
                    ) -> tuple[threading.Thread, list[np.ndarray], list[BaseException]]:
    """A thread, not started yet, that follows path: the blocks it gets go into the first
    list, as they come, and what follow_wav raised into the second."""
    got: list[np.ndarray] = []
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            got.extend(follow_wav(path, timeout=timeout))
        except BaseException as exc:
            errors.append(exc)

    return threading.Thread(target=follow, daemon=True), got, errors


# ---- the producer's state --------------------------------------------------------


def pcm16_header(riff: int, data: int) -> bytes:
    """The 44-byte header of a mono 16-bit PCM WAV at RATE with these RIFF and data sizes
    (0xFFFFFFFF: "to the end of the file", as other programs stream)."""
    return (b"RIFF" + riff.to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
            + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
            + RATE.to_bytes(4, "little") + (2 * RATE).to_bytes(4, "little")
            + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
            + b"data" + data.to_bytes(4, "little"))


def stream_state(path: Path) -> bytes:
    raw = path.read_bytes()
    at = raw.index(b"lsst")
    return raw[at + 4:at + 8]


def test_a_writer_marks_its_stream_live_then_done_on_close(ram):
    path = ram / "s.wav"
    with WavWriter(path, RATE) as writer:
        writer.write(stream_chunks(1)[0])
        assert stream_state(path) == b"live"
    assert stream_state(path) == b"done"


def test_abort_and_an_exception_out_of_the_with_block_mark_the_stream_failed(ram):
    aborted = WavWriter(ram / "a.wav", RATE)
    aborted.write(stream_chunks(1)[0])
    aborted.abort()
    aborted.abort()  # again: nothing
    assert aborted.closed and stream_state(ram / "a.wav") == b"fail"
    with pytest.raises(KeyError), WavWriter(ram / "b.wav", RATE) as writer:
        writer.write(stream_chunks(1)[0])
        raise KeyError("renderer failed")
    assert stream_state(ram / "b.wav") == b"fail"


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_the_state_chunk_keeps_the_file_readable_by_soundfile_scipy_and_wave(ram, dtype,
                                                                             channels):
    path = ram / "s.wav"
    parts = [samples(dtype, n, channels, seed=n) for n in (7, 100, 33)]
    with WavWriter(path, RATE, channels, dtype) as writer:
        for part in parts:
            writer.write(part)
    expected = np.concatenate(parts)
    assert sf.info(str(path)).frames == len(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy warns about chunks it does not know
        rate, back = scipy.io.wavfile.read(path)
    assert rate == RATE
    np.testing.assert_array_equal(back, expected)
    assert read_wav(path)[0].shape == expected.shape
    if dtype in ("uint8", "int16", "int32") and channels <= 2:
        with wave.open(str(path), "rb") as reader:
            assert reader.getnframes() == len(expected)


def test_the_state_chunk_keeps_the_file_readable_by_sox(ram):
    sox = require_tool("sox")
    path = ram / "s.wav"
    parts = stream_chunks(3)
    with WavWriter(path, RATE) as writer:
        for part in parts:
            writer.write(part)
    done = subprocess.run([sox, "-D", str(path), "-t", "raw", "-e", "signed-integer", "-b", "16",
                           "-L", "-"], capture_output=True, check=True, timeout=60)
    assert done.stdout == np.concatenate(parts).tobytes()


# ---- followers: before, during, after ---------------------------------------------


@pytest.mark.parametrize("when", ["before-the-file", "before-the-first-chunk", "mid-stream",
                                  "after-the-end"])
def test_a_follower_in_another_process_gets_every_frame_exactly_once(ram, when):
    path = ram / "live.wav"
    parts = stream_chunks(30)
    child = start_follower(path) if when == "before-the-file" else None
    writer = WavWriter(path, RATE)
    if when == "before-the-first-chunk":
        child = start_follower(path)
    for i, part in enumerate(parts):
        if when == "mid-stream" and i == 15:
            child = start_follower(path)
        writer.write(part)
        time.sleep(0.002)
    writer.close()
    if when == "after-the-end":
        child = start_follower(path)
    assert child is not None
    report = follower_report(child)
    assert report == {"sha": digest(parts), "frames": 30 * CHUNK,
                      "blocks": report["blocks"], "error": None}


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("channels", [1, 2])
def test_followed_blocks_are_shaped_and_typed_like_read_wav(ram, dtype, channels):
    path = ram / "s.wav"
    # Odd sizes: with uint8 mono the pad byte after an odd data size is never a frame.
    parts = [samples(dtype, n, channels, seed=n) for n in (1, 7, 0, 100, 33)]
    got: list[np.ndarray] = []
    with WavWriter(path, RATE, channels, dtype) as writer:
        blocks = follow_wav(path, timeout=30)
        for part in parts:
            writer.write(part)
            if len(part):
                got.append(next(blocks))
    got.extend(call_with_deadline(lambda: list(blocks)))  # type: ignore[arg-type]
    whole, _ = read_wav(path, mmap=False)
    assert all(block.dtype == whole.dtype and block.ndim == whole.ndim for block in got)
    np.testing.assert_array_equal(np.concatenate(got), whole, strict=True)


def test_a_24_bit_stream_is_followed_as_int32_like_read_wav(ram):
    path = ram / "s24.wav"
    data = (np.arange(-50, 50, dtype=np.int32) << 8).reshape(50, 2)
    sf.write(str(path), data, RATE, subtype="PCM_24")
    blocks = collect(path)
    np.testing.assert_array_equal(np.concatenate(blocks), read_wav(path)[0])


def test_eight_followers_in_eight_processes_each_get_the_whole_stream(ram):
    path = ram / "fanout.wav"
    parts = stream_chunks(60, channels=2)
    writer = WavWriter(path, RATE, 2)
    children = [start_follower(path) for _ in range(8)]
    for part in parts:
        writer.write(part)
        time.sleep(0.001)
    writer.close()
    for child in children:
        report = follower_report(child)
        assert (report["sha"], report["frames"], report["error"]) == (digest(parts),
                                                                      60 * CHUNK, None)


def test_async_followers_share_one_thread_and_get_every_frame(ram):
    path = ram / "async.wav"
    parts = stream_chunks(20)

    async def follow_one() -> list[np.ndarray]:
        return [block async for block in afollow_wav(path, timeout=30)]

    async def main() -> tuple[list[list[np.ndarray]], int]:
        writer = WavWriter(path, RATE)
        before = threading.active_count()
        tasks = [asyncio.create_task(follow_one()) for _ in range(4)]
        await asyncio.sleep(0.01)
        threads = threading.active_count() - before
        for part in parts:
            writer.write(part)
            await asyncio.sleep(0.002)
        writer.close()
        return list(await asyncio.gather(*tasks)), threads

    results, new_threads = call_with_deadline(lambda: asyncio.run(main()))  # type: ignore[misc]
    assert new_threads == 0  # no thread per follower
    for blocks in results:
        np.testing.assert_array_equal(np.concatenate(blocks), np.concatenate(parts))


def test_an_async_follower_raises_when_the_writer_aborts(ram):
    path = ram / "a.wav"

    async def main() -> None:
        writer = WavWriter(path, RATE)
        writer.write(stream_chunks(1)[0])
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, writer.abort)
        async for _ in afollow_wav(path, timeout=30):
            pass

    with pytest.raises(StreamAbandoned, match="aborted the stream after 480 frames"):
        call_with_deadline(lambda: asyncio.run(main()))


# ---- producers that die or give up ---------------------------------------------------

PRODUCER = """
import sys, time
import numpy as np
from luna_shm import WavWriter
writer = WavWriter(sys.argv[1], 24000)
for i in range(100000):
    writer.write(np.full(480, i % 30000, np.int16))
    print(i, flush=True)
    time.sleep(0.005)
"""


def test_a_producer_killed_mid_stream_makes_every_follower_raise_promptly(ram):
    path = ram / "killed.wav"
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, str(path)],
                                stdout=subprocess.PIPE, text=True)
    assert producer.stdout is not None
    try:
        assert producer.stdout.readline() == "0\n"
        child = start_follower(path)
        errors: list[BaseException] = []
        got: list[int] = []

        def follow_here() -> None:
            try:
                for block in follow_wav(path):  # no timeout: the death alone must end it
                    got.extend(block.tolist())
            except StreamAbandoned as exc:
                errors.append(exc)

        here = threading.Thread(target=follow_here, daemon=True)
        here.start()
        for _ in range(5):
            producer.stdout.readline()
    finally:
        producer.send_signal(signal.SIGKILL)
        producer.wait(timeout=60)
        producer.stdout.close()
    here.join(60)
    assert not here.is_alive(), "the follower hung after the producer was killed"
    assert len(errors) == 1 and "the writer died" in str(errors[0])
    assert str(path) in str(errors[0])
    # Every frame the dead producer wrote, in order, each once.
    assert len(got) >= 6 * 480 and len(got) % 480 == 0
    assert got == np.repeat(np.arange(len(got) // 480), 480).tolist()
    report = follower_report(child)
    assert report["error"] is not None and "the writer died" in str(report["error"])
    assert report["frames"] >= 6 * 480


# Holds argv[1]'s flock exclusively, as a cleanup or another follower does while it tests
# the lock, until a line comes on stdin (a test of it stopped, or descheduled, that long).
EXCLUSIVE_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
sys.stdin.readline()
"""


def _asleep_in_poll(thread: threading.Thread) -> bool:
    """True once thread waits in poll() (state S; wchan names poll, or is hidden)."""
    task = Path(f"/proc/self/task/{thread.native_id}")
    for _ in range(1000):
        state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        wchan = (task / "wchan").read_text()
        if state == "S" and ("poll" in wchan or wchan in ("", "0")):
            return True
        time.sleep(0.01)
    return False


def write_then_die(path: Path) -> None:
    """A PRODUCER process that writes its first chunk to path, then is killed (SIGKILL):
    its stream stays "live" with no writer."""
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, str(path)],
                                stdout=subprocess.PIPE, text=True)
    assert producer.stdout is not None
    producer.stdout.readline()
    producer.send_signal(signal.SIGKILL)
    producer.wait(timeout=60)
    producer.stdout.close()


def test_a_dead_writers_follower_learns_it_when_another_process_lets_its_lock_go(ram):
    # Found by the stream soak's reasoning: a follower that tested the lock of a dead
    # writer's stream while another process held it exclusively (a cleanup testing it,
    # stopped or descheduled there) took it for the writer's and slept until its timeout,
    # for ever with none: letting a flock go makes no inotify event.
    path = ram / "dead.wav"
    write_then_die(path)
    holder = subprocess.Popen([sys.executable, "-c", EXCLUSIVE_HOLDER, str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    outcome: list[BaseException] = []
    got: list[np.ndarray] = []

    def follow() -> None:
        try:
            for block in follow_wav(path):  # no timeout: the death alone must end it
                got.append(block)
        except StreamAbandoned as exc:
            outcome.append(exc)

    try:
        assert holder.stdout.readline() == "locked\n"
        worker = threading.Thread(target=follow, daemon=True)
        worker.start()
        assert _asleep_in_poll(worker)  # its frames read, the lock tested: held
    finally:
        holder.communicate("\n", timeout=60)  # lets the lock go
    worker.join(60)
    assert not worker.is_alive(), "the follower hung after the lock was let go"
    assert len(outcome) == 1 and "the writer died" in str(outcome[0])
    assert sum(len(block) for block in got) == 480


def test_a_follower_started_after_the_producer_was_killed_raises_at_once(ram):
    path = ram / "dead.wav"
    write_then_die(path)
    with pytest.raises(StreamAbandoned, match="the writer died"):
        collect(path)  # no timeout needed: the verdict is in the file and the lock


def test_an_aborted_stream_yields_its_frames_then_raises(ram):
    path = ram / "a.wav"
    parts = stream_chunks(3)
    with WavWriter(path, RATE) as writer:
        for part in parts:
            writer.write(part)
        writer.abort()
    got: list[np.ndarray] = []
    with pytest.raises(StreamAbandoned, match=r"aborted the stream after 1440 frames") as caught:
        for block in follow_wav(path, timeout=30):
            got.append(block)
    assert isinstance(caught.value, WavError)
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(parts))


def test_a_stream_with_no_progress_raises_timeout_naming_the_file_and_seconds(ram):
    path = ram / "idle.wav"
    with WavWriter(path, RATE) as writer:
        writer.write(stream_chunks(1)[0])
        blocks = follow_wav(path, timeout=0.2)
        assert len(next(blocks)) == CHUNK
        with pytest.raises(TimeoutError, match=r"no new audio for 0\.2 s") as caught:
            call_with_deadline(lambda: next(blocks))
    assert caught.value.errno == errno.ETIMEDOUT and caught.value.filename == str(path)



# Another process opens the file for writing and closes it: the close event a dying writer
# makes too.
OPEN_AND_CLOSE = ["sh", "-c", ': >> "$1"', "sh"]


def test_a_close_by_another_process_never_holds_a_follower_past_its_timeout(ram, monkeypatch):
    # After a close event the follower gave the writer's lock 0.5 s to go, sleeping in a
    # loop that ignored the timeout (found in review: TimeoutError after 0.55 s with
    # timeout=0.1). A grace longer than any run shows it without timing anything.
    monkeypatch.setattr(follow, "_LOCK_RELEASE_GRACE", 3600.0)
    path = ram / "idle.wav"
    with WavWriter(path, RATE) as writer:  # alive: its lock never goes
        writer.write(stream_chunks(1)[0])
        blocks = follow_wav(path, timeout=0.5)
        next(blocks)
        subprocess.run([*OPEN_AND_CLOSE, str(path)], check=True)
        with pytest.raises(TimeoutError, match=r"no new audio for 0\.5 s"):
            call_with_deadline(lambda: next(blocks))


def test_an_async_follower_waits_out_a_close_without_stalling_the_event_loop(ram, monkeypatch):
    # The same grace ran as time.sleep() in the event loop's thread: every task of the loop
    # stood still for 0.5 s whenever another process opened and closed the file (found in
    # review). With a grace longer than any run, a stalled loop never gets to write.
    monkeypatch.setattr(follow, "_LOCK_RELEASE_GRACE", 3600.0)
    path = ram / "async.wav"
    parts = stream_chunks(2)
    writer = WavWriter(path, RATE)
    writer.write(parts[0])

    async def main() -> list[np.ndarray]:
        got: list[np.ndarray] = []
        first = asyncio.Event()

        async def consume() -> None:
            async for block in afollow_wav(path):
                got.append(block)
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        touch = await asyncio.create_subprocess_exec(*OPEN_AND_CLOSE, str(path))
        await touch.wait()
        for _ in range(10):  # the follower takes the close event meanwhile
            await asyncio.sleep(0.01)
        writer.write(parts[1])
        writer.close()
        await task
        return got

    got = call_with_deadline(lambda: asyncio.run(main()))
    assert isinstance(got, list) and digest(got) == digest(parts)


@pytest.mark.parametrize("timeout", [float("inf"), 1e300, 10**400, np.int64(60)],
                         ids=["inf", "1e300", "10**400", "np.int64"])
@pytest.mark.parametrize("form", ["follow_wav", "afollow_wav", "iter_wav_stream"])
def test_a_timeout_past_what_poll_can_wait_means_no_limit_and_numpy_numbers_are_taken(
        ram, timeout, form):
    # Found in review: follow_wav(timeout=inf) yielded its first block, then raised
    # OverflowError from the wait before the second (10**400: from its float conversion).
    path = ram / "long.wav"
    parts = stream_chunks(3)
    writer = WavWriter(path, RATE)
    writer.write(parts[0])

    def the_rest() -> None:
        time.sleep(0.2)  # the follower is waiting by then
        writer.write(parts[1])
        writer.write(parts[2])
        writer.close()

    later = threading.Thread(target=the_rest)
    later.start()
    try:
        if form == "follow_wav":
            got = np.concatenate(collect(path, timeout=timeout)).tobytes()
        elif form == "iter_wav_stream":
            got = b"".join(call_with_deadline(
                lambda: list(iter_wav_stream(path, header="raw", timeout=timeout))))
        else:
            async def follow() -> bytes:
                return b"".join([block.tobytes()
                                 async for block in afollow_wav(path, timeout=timeout)])
            got = call_with_deadline(lambda: asyncio.run(follow()))
    finally:
        later.join()
    assert got == np.concatenate(parts).tobytes()


def test_a_follower_of_a_missing_file_waits_for_it_bounded_by_the_timeout(ram):
    with pytest.raises(TimeoutError, match=r"no new audio for 0\.1 s"):
        collect(ram / "never.wav", timeout=0.1)


def test_a_follower_of_a_file_in_a_missing_directory_fails_at_once(ram):
    with pytest.raises(FileNotFoundError) as caught:
        collect(ram / "no-such-dir" / "x.wav")
    assert caught.value.errno == errno.ENOENT


def test_bytes_written_before_the_first_header_store_wait_for_it_even_a_pad_byte(ram):
    # luna_stream_append's order, the writer paused between its two steps: the samples
    # (with the pad byte an odd 8-bit data size needs) by a write, then the sizes by a
    # store into the mapped header. While the first header still said 0, the parser's
    # "to the end of the file" let the pad byte out as a sample (then a WavError, or a
    # stream shifted by one).
    import fcntl

    from luna_shm import _lowlevel, formats

    path = ram / "u8.wav"
    spec = formats.spec_for("PCM_U8", 16000, 1)
    header = _lowlevel.live_header(spec, 0)
    follower, got, errors = follower_thread(path, timeout=10)
    with open(path, "w+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # a live writer holds its lock
        f.write(header)
        f.flush()
        with mmap.mmap(f.fileno(), len(header)) as page:
            follower.start()
            written = []
            for n in (3, 4, 5):
                chunk = np.arange(len(written) + 1, len(written) + n + 1, dtype=np.uint8)
                total = len(written) + n
                os.pwrite(f.fileno(), chunk.tobytes() + b"\0" * (total & 1),
                          len(header) + len(written))
                time.sleep(0.1)  # the writer is preempted between its two steps
                page[:] = _lowlevel.live_header(spec, total)
                written.extend(chunk.tolist())
                time.sleep(0.1)
            page[:] = _lowlevel.live_header(spec, len(written), _lowlevel.STREAM_DONE)
        follower.join(30)
    assert errors == []
    assert np.concatenate(got).tolist() == written


@pytest.mark.parametrize(("damage", "match"), [
    ("cut", r"live\.wav: the stream shrank under its follower"),
    ("data size", r"live\.wav: the stream's header went back under its follower \(it counts "
                  r"0 bytes of audio, 960 were read\)"),
])
def test_a_stream_cut_or_rewritten_under_its_follower_is_a_wav_error_not_a_crash(ram, damage,
                                                                                match):
    # Another process cuts the file below what was read, or rewrites the header's data
    # size below it.
    path = ram / "live.wav"
    writer = WavWriter(path, RATE)
    writer.write(stream_chunks(1)[0])
    blocks = follow_wav(path, timeout=5)
    next(blocks)
    with open(path, "r+b") as f:
        if damage == "cut":
            f.truncate(100)
        else:
            os.pwrite(f.fileno(), (0).to_bytes(4, "little"), data_size_field(path))
    with pytest.raises(WavError, match=match):
        call_with_deadline(lambda: list(blocks))
    writer.abort()



@pytest.mark.parametrize("then", ["write", "wait"])
def test_a_live_stream_cut_above_what_its_follower_read_is_a_wav_error_never_zeros(ram, then):
    # Another process cuts the file below the audio its header counts, but above what the
    # follower has read: the writer's next append re-extended the file over a hole of
    # zeros, which the follower yielded as audio; with no append, it waited for more
    # (found in review).
    path = ram / "live.wav"
    writer = WavWriter(path, RATE)
    writer.write(np.full(CHUNK, 7, np.int16))
    blocks = follow_wav(path, timeout=10)
    got = [next(blocks)]  # caught up
    writer.write(np.full(300_000, 7, np.int16))
    data_offset = data_size_field(path) + 4
    subprocess.run(["truncate", "-s", str(data_offset + 2 * CHUNK + 100_000), str(path)],
                   check=True)
    if then == "write":
        with pytest.raises(OSError) as refused:
            writer.write(np.full(300_000, 7, np.int16))
        assert refused.value.errno == errno.ESTALE
    with pytest.raises(WavError, match=r"live\.wav: the stream was cut under its follower "
                                       r"\(its header counts 600960 bytes of audio, the "
                                       r"file holds 100960\)"):
        call_with_deadline(lambda: got.extend(blocks))
    writer.close()
    assert all((block == 7).all() for block in got)


# Another process rewrites the file in place (open "wb", then a whole new WAV).
REWRITES = {
    "float-stereo-44100": ("sf.write(sys.argv[1], np.full((48000, 2), 0.25, 'float32'), 44100,"
                           " subtype='FLOAT')",
                           r"samplerate 24000 -> 44100, channels 1 -> 2, format 1 -> 3, bits "
                           r"16 -> 32, data offset \d+ -> \d+, state chunk True -> False"),
    "same-format": ("sf.write(sys.argv[1], np.full(48000, 9, 'int16'), 24000)",
                    r"data offset \d+ -> 44, state chunk True -> False"),
}


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
def test_a_live_stream_rewritten_in_place_under_its_follower_is_a_wav_error_naming_it(
        ram, rewrite):
    # The follower waited, caught up, while soundfile.write replaced the file's content:
    # it re-parsed and went on with the new header, yielding another file's audio as
    # this stream's (found in review).
    path = ram / "live.wav"
    writer = WavWriter(path, RATE)
    writer.write(np.full(CHUNK, 7, np.int16))
    blocks = follow_wav(path, timeout=10)
    assert (next(blocks) == 7).all()
    code, changes = REWRITES[rewrite]
    subprocess.run([sys.executable, "-c", "import sys; import numpy as np; "
                    "import soundfile as sf; " + code, str(path)], check=True)
    with pytest.raises(WavError, match=r"live\.wav: the stream was rewritten under its "
                                       r"follower \(" + changes + r"\)"):
        call_with_deadline(lambda: list(blocks))
    writer.abort()


# Another process rewrites the file in place and keeps it open (no close event): a plain
# 44-byte header, then 1000s, except the two samples that lie where the live header's data
# size was (bytes 56-59), which read there as a count of 4000 bytes.
REWRITE_KEPT_OPEN = """
import sys
import numpy as np
other = np.full(48000, 1000, np.int16)
other[6:8] = (4000, 0)
header = (b"RIFF" + (36 + other.nbytes).to_bytes(4, "little") + b"WAVEfmt "
          + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
          + (24000).to_bytes(4, "little") + (48000).to_bytes(4, "little")
          + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
          + b"data" + other.nbytes.to_bytes(4, "little"))
with open(sys.argv[1], "r+b") as f:
    f.truncate(0)
    f.write(header + other.tobytes())
    f.flush()
    print("rewritten", flush=True)
    sys.stdin.read()  # the file stays open for writing until the test is done
"""


@pytest.mark.parametrize("form", ["follow_wav", "iter_wav_stream"])
def test_a_stream_rewritten_in_place_while_its_follower_waits_for_a_chunk_is_a_wav_error(
        ram, form):
    # The follower waited in its hot path (follow_wav: one C call that waits, then reads
    # what the data size field counts; iter_wav_stream: a wait, then a read of the field)
    # when another process rewrote the file and kept it open: the write events alone woke
    # it, it read the other file's bytes at the old field as a count, and yielded the
    # other file's samples as this stream's frames (found in review).
    path = ram / "live.wav"
    first, second = stream_chunks(2)
    writer = WavWriter(path, RATE)
    writer.write(first)
    blocks: Iterator[object] = (follow_wav(path, timeout=10) if form == "follow_wav"
                                else iter_wav_stream(path, header="raw", timeout=10))
    assert np.array_equal(np.frombuffer(next(blocks), np.int16), first)
    got: list[object] = []
    waiting = threading.Thread(target=lambda: got.append(next(blocks)), daemon=True)
    waiting.start()  # waits in the hot path for the next chunk
    writer.write(second)
    waiting.join(30)
    assert len(got) == 1 and np.array_equal(np.frombuffer(got[0], np.int16), second)
    with subprocess.Popen([sys.executable, "-c", REWRITE_KEPT_OPEN, str(path)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as other:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline() == "rewritten\n"
        try:
            with pytest.raises(WavError, match=r"live\.wav: the stream was rewritten under its "
                                               r"follower \(data offset \d+ -> 44, state "
                                               r"chunk True -> False\)"):
                call_with_deadline(lambda: got.extend(blocks))
        finally:
            other.stdin.close()
    assert len(got) == 1
    writer.abort()


# Another process adds bytes past a live stream's data: appends them, or extends the file.
FOREIGN_BYTES = {
    "appended": "open(sys.argv[1], 'ab').write(b'\\x7f' * 1000)",
    "extended": "import os; os.truncate(sys.argv[1], os.path.getsize(sys.argv[1]) + 1000)",
}


@pytest.mark.parametrize("how", sorted(FOREIGN_BYTES))
def test_bytes_another_process_adds_past_a_live_stream_are_never_followed_as_frames(ram, how):
    # The writer's next append writes over them; before it does, a follower that took
    # the file's size for written audio handed them out (and lost as many real frames).
    path = ram / "live.wav"
    parts = stream_chunks(10)
    child = start_follower(path)
    as_bytes: list[object] = []
    writer = WavWriter(path, RATE)
    raw = threading.Thread(target=lambda: as_bytes.append(
        b"".join(iter_wav_stream(path, header="raw", timeout=30))))
    raw.start()
    for i, part in enumerate(parts):
        writer.write(part)
        time.sleep(0.02)
        if i == 4:
            subprocess.run([sys.executable, "-c", "import sys; " + FOREIGN_BYTES[how],
                            str(path)], check=True)
            time.sleep(0.1)  # the followers see the bytes before the next append
    writer.close()
    raw.join(60)
    report = follower_report(child)
    assert report == {"sha": digest(parts), "frames": 10 * CHUNK, "blocks": report["blocks"],
                      "error": None}
    assert as_bytes == [np.concatenate(parts).tobytes()]



@pytest.mark.parametrize("end", ["close", "abort", "live"])
def test_bytes_another_process_adds_past_a_writer_that_wrote_nothing_are_never_frames(ram, end):
    # A first header's data size 0 with a RIFF that ends at the data reads "to the end of
    # the file" in other programs' streams; the follower (for a stream no longer live) and
    # read_wav took it so in a WavWriter's too, and yielded another process's bytes as
    # audio (found in review).
    path = ram / "empty.wav"
    writer = WavWriter(path, RATE)
    subprocess.run([sys.executable, "-c", "import sys; " + FOREIGN_BYTES["appended"],
                    str(path)], check=True)
    if end != "live":
        getattr(writer, end)()
        if end == "close":
            assert collect(path) == []
        else:
            with pytest.raises(StreamAbandoned, match="aborted the stream after 0 frames"):
                collect(path)
    data, rate = read_wav(path)
    assert (len(data), rate) == (0, RATE)
    writer.close()


def data_size_field(path: Path) -> int:
    """Where a WAV's data chunk size is stored: the 4 bytes before its data."""
    header = path.read_bytes()[:128]
    return header.index(b"data") + 4


def test_samples_whose_sizes_are_not_stored_yet_wait_for_the_header_that_counts_them(ram):
    # An append in two steps, as luna_stream_append does it: the samples go in with a
    # write (inotify tells the follower), the sizes follow by a store into the header
    # page (no event at all). The follower hands out the samples only once the header
    # counts them, and sees that without an event.
    path = ram / "live.wav"
    first, second = stream_chunks(2)
    writer = WavWriter(path, RATE)
    writer.write(first)
    blocks = follow_wav(path, timeout=10)
    assert np.array_equal(next(blocks), first)
    field = data_size_field(path)
    got: list[np.ndarray] = []
    waiting = threading.Thread(target=lambda: got.append(next(blocks)), daemon=True)
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), second.tobytes(), field + 4 + first.nbytes)  # the samples
        waiting.start()
        time.sleep(0.5)
        assert got == []  # written, but not counted yet: not frames
        with mmap.mmap(f.fileno(), field + 4) as page:  # the sizes, with no event
            page[field:field + 4] = (first.nbytes + second.nbytes).to_bytes(4, "little")
            page[4:8] = (int.from_bytes(page[4:8], "little") + second.nbytes).to_bytes(
                4, "little")
    waiting.join(5)
    assert len(got) == 1 and np.array_equal(got[0], second)
    blocks.close()
    writer.abort()


@pytest.mark.parametrize(("kwargs", "match", "kind"), [
    ({"timeout": -1}, "timeout must be None or >= 0 seconds, got -1", ValueError),
    ({"timeout": "1"}, "timeout must be None or a number of seconds, got '1'", TypeError),
    ({"timeout": True}, "timeout must be None or a number of seconds, got True", TypeError),
    ({"timeout": float("nan")}, "got nan", ValueError),
    ({"timeout": -10**400}, "got a negative int of 1329 bits$", ValueError),
])
def test_bad_follow_arguments_are_named(ram, kwargs, match, kind):
    with pytest.raises(kind, match=match):
        follow_wav(ram / "x.wav", **kwargs)


def test_a_non_path_is_a_type_error(ram):
    with pytest.raises(TypeError, match=r"path must be str or os\.PathLike"):
        follow_wav(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("form", [follow_wav, afollow_wav, iter_wav_stream])
def test_an_empty_path_is_a_value_error_at_the_call_not_a_wait_for_ever(ram, form):
    # ENOENT for "" read as "not created yet": the follower waited for ever (found in
    # review).
    with pytest.raises(ValueError, match=r"^path must not be empty, got ''$"):
        form("")

# A follower in its own process that prints its pid, then how many frames it followed.
FOLLOW_AND_COUNT = """
import os, sys
print(os.getpid(), flush=True)
from luna_shm import follow_wav
print(sum(len(block) for block in follow_wav(sys.argv[1], timeout=60)), flush=True)
"""


def held_in_a_call_on(pid: int, path: Path, args: dict[int, int]) -> bool:
    """True while a thread of process pid is held in a system call whose first argument is
    its fd of path and whose arguments at the positions args names (1: the one after the
    fd) are those values (/proc/<pid>/task/<tid>/syscall: the number, then the arguments
    in hex)."""
    fds = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                fds.add(hex(int(fd)))
        except FileNotFoundError:
            continue
    for task in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{task}/syscall").read_text().split()
        if (len(fields) > 1 + max(args) and fields[1] in fds
                and all(fields[1 + at] == hex(value) for at, value in args.items())):
            return True
    return False


def reading_one_byte_at_0(pid: int, path: Path) -> bool:
    """True while a thread of process pid is held in pread(its fd of path, buf, 1, 0)."""
    return held_in_a_call_on(pid, path, {2: 1, 3: 0})


def test_an_empty_file_that_a_writer_fills_meanwhile_is_followed_not_taken_for_a_proc_file(
        ram, tmp_path):
    # The follower found the file empty, then read a byte of it to tell a /proc file (size
    # 0, yet it reads) from a placeholder; a WavWriter that wrote its header in between made
    # that read succeed, and a follower started before the writer raised "not a WAV file
    # that is being written ... (a /proc or /sys file?)" (found in review: 1 follower in
    # 75 started before a writer at a new path). strace holds that read for 3 s while the
    # writer here streams and closes.
    strace = require_tool("strace")
    path = ram / "live.wav"
    path.write_bytes(b"")  # get_temp_audio_path(create=True) or a writer's first moment
    command = [strace, "-f", "-qq", "-o", str(tmp_path / "strace.log"), "-e", "signal=none",
               "-e", "trace=pread64", "-e", "inject=pread64:delay_enter=3000000:when=1",
               "-P", str(path), sys.executable, "-c", FOLLOW_AND_COUNT, str(path)]
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as child:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        end = time.monotonic() + 60
        while not reading_one_byte_at_0(pid, path):
            assert child.poll() is None and time.monotonic() < end, "it never read the file"
            time.sleep(0.002)
        parts = stream_chunks(3)
        with WavWriter(path, RATE) as writer:  # in the empty file, as the follower reads it
            for part in parts:
                writer.write(part)
        out, err = child.communicate(timeout=60)
    assert (child.returncode, out.split()) == (0, [str(3 * CHUNK)]), err


def test_a_proc_file_is_refused_at_once_not_waited_for(ram):
    # /proc files say they are empty and read all the same; no write makes them a WAV,
    # and inotify never reports them: a follower without a timeout waited forever.
    with pytest.raises(WavError, match=r"/proc/self/status: not a WAV file that is being "
                                       r"written: its size is 0 but it holds bytes"):
        call_with_deadline(lambda: list(follow_wav("/proc/self/status")), deadline=10)


def test_a_directory_is_not_followed(ram):
    with pytest.raises(OSError):
        collect(ram)


# ---- foreign writers --------------------------------------------------------------

FOREIGN = """
import os, sys, time
path, data_size = sys.argv[1], int(sys.argv[2])
riff = {0: 0, 0xFFFFFFFF: 0xFFFFFFFF, 0x7FFFFFFF: 0x7FFFFFFF}[data_size]
header = (b"RIFF" + riff.to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
          + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
          + (24000).to_bytes(4, "little") + (48000).to_bytes(4, "little")
          + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
          + b"data" + data_size.to_bytes(4, "little"))
with open(path, "wb", buffering=0) as f:
    f.write(header)
    print("header", flush=True)
    for i in range(20):
        f.write(bytes([i, 0]) * 480)
        time.sleep(0.003)
"""


@pytest.mark.parametrize("data_size", [0, 0xFFFFFFFF, 0x7FFFFFFF],
                         ids=["0", "0xFFFFFFFF", "0x7FFFFFFF"])
def test_a_foreign_streaming_writer_is_followed_until_it_closes_the_file(ram, data_size):
    path = ram / "foreign.wav"
    writer = subprocess.Popen([sys.executable, "-c", FOREIGN, str(path), str(data_size)],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    assert writer.stdout.readline() == "header\n"
    blocks = collect(path)
    writer.wait(timeout=60)
    writer.stdout.close()
    expected = np.repeat(np.arange(20, dtype=np.int16), 480)
    np.testing.assert_array_equal(np.concatenate(blocks), expected)
    # Started after the end: the header still says "unknown", nobody writes: it ends.
    np.testing.assert_array_equal(np.concatenate(collect(path)), expected)
    # read_wav reads such a header as "to the end of the file" too.
    np.testing.assert_array_equal(read_wav(path)[0], expected)


def asking_for_writers(pid: int, path: Path) -> bool:
    """True while a thread of process pid is held in fcntl(fd of path, F_SETSIG, SIGURG): the
    first call of a follower's question whether any process has the file open for writing (a
    read lease)."""
    import fcntl

    return held_in_a_call_on(pid, path, {1: fcntl.F_SETSIG, 2: signal.SIGURG})


@pytest.mark.parametrize("data_size", [8 * CHUNK * 2, 0xFFFFFFFF], ids=["final", "0xFFFFFFFF"])
def test_a_foreign_writer_that_appends_and_closes_while_the_follower_asks_is_followed_to_its_end(
        ram, tmp_path, data_size):
    # A follower that found nothing new asked the kernel whether anyone still writes the
    # file, and ended when nobody did, without looking at the file again: what the writer
    # appended between the follower's last look and its close was lost, the stream ending
    # "finished" short of it (sox writing a file that a follower had opened empty: 2704 of
    # 4000 frames, its first 8 KiB). strace holds that question for 2 s while this process,
    # the writer, appends its last part and closes.
    strace = require_tool("strace")
    path = ram / "foreign.wav"
    parts = stream_chunks(8)
    header = pcm16_header(min(36 + data_size, 0xFFFFFFFF), data_size)
    command = [strace, "-f", "-qq", "-o", str(tmp_path / "strace.log"), "-e", "signal=none",
               "-e", "trace=fcntl", "-e", "inject=fcntl:delay_enter=2000000:when=1",
               "-P", str(path), sys.executable, "-c", FOLLOW_AND_COUNT, str(path)]
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    with open(path, "wb", buffering=0) as out:
        out.write(header + np.concatenate(parts[:4]).tobytes())
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) as child:
            assert child.stdout is not None
            pid = int(child.stdout.readline())
            end = time.monotonic() + 60
            while not asking_for_writers(pid, path):
                assert child.poll() is None and time.monotonic() < end, "it never asked"
                time.sleep(0.002)
            out.write(np.concatenate(parts[4:]).tobytes())
            out.close()
            output, err = child.communicate(timeout=60)
    assert (child.returncode, output.split()) == (0, [str(8 * CHUNK)]), err


def silent_writer(path: Path) -> int:
    """A descriptor of path open for reading and writing whose close makes no inotify event:
    the one fanotify opens for its listener (the kernel marks it not to notify). It stands
    for a writer's descriptor in the moment after its close event, while the kernel still
    counts it as open for writing. Skips where fanotify is refused (no CAP_SYS_ADMIN)."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                   ctypes.c_char_p]
    fan_class_notif, fan_cloexec, fan_mark_add, fan_open, at_fdcwd = 0, 1, 1, 0x20, -100
    group = libc.fanotify_init(fan_class_notif | fan_cloexec, os.O_RDWR | os.O_CLOEXEC)
    if group < 0:
        pytest.skip(f"fanotify_init: {os.strerror(ctypes.get_errno())}")
    try:
        if libc.fanotify_mark(group, fan_mark_add, fan_open, at_fdcwd, bytes(path)) < 0:
            pytest.skip(f"fanotify_mark: {os.strerror(ctypes.get_errno())}")
        os.close(os.open(path, os.O_RDONLY))  # the open it reports, with a descriptor
        event = os.read(group, 4096)
        return struct.unpack_from("<IBBHQi", event)[5]  # struct fanotify_event_metadata.fd
    finally:
        os.close(group)


@pytest.mark.parametrize("closed", ["after the follower started", "before it started"])
def test_a_foreign_stream_ends_when_its_writer_is_counted_a_moment_after_its_close_event(
        ram, closed):
    # The kernel reports a close (IN_CLOSE_WRITE) before it stops counting the descriptor as
    # open for writing, and the file system's release runs in between (ext4 writes out a
    # rewritten file's delayed blocks there). A follower woken by the event asked for a read
    # lease in that moment, was refused, and waited for an event that never came: sox or
    # espeak-ng writing into a file it had opened empty in an ext4 /tmp (the fallback dir),
    # 6 to 11 runs in 20 after the last frame, until the timeout; for ever without one. A
    # follower started just after the close event (a player that starts on "rendered") had
    # its first question refused the same way. Here a descriptor whose close makes no event
    # is the writer still counted.
    path = ram / "foreign.wav"
    audio = np.concatenate(stream_chunks(4))
    out = open(path, "wb", buffering=0)  # noqa: SIM115 (closed mid-test, as a writer does)
    out.write(pcm16_header(0xFFFFFFFF, 0xFFFFFFFF) + audio.tobytes())
    if closed == "before it started":
        out.close()
    counted = silent_writer(path)
    thread, followed, errors = follower_thread(path, timeout=10)
    thread.start()
    try:
        end = time.monotonic() + 30
        while sum(map(len, followed)) < len(audio):
            assert thread.is_alive() and time.monotonic() < end, errors
            time.sleep(0.002)
        out.close()  # the close event (once): the follower asks; the kernel still counts one
        time.sleep(0.1)
    finally:
        out.close()
        os.close(counted)  # gone, with no event
        thread.join(timeout=30)
    assert not thread.is_alive() and errors == []
    np.testing.assert_array_equal(np.concatenate(followed), audio)


def test_a_chunk_appended_before_a_foreign_header_is_finished_is_an_error_not_a_finished_stream(
        ram):
    # libsndfile streams with sizes that say "to the end of the file" (RIFF 8, data 0) and,
    # at its close, appends a LIST chunk (a title set after the first frames) before it
    # writes the final sizes. A follower that read in between took the LIST chunk for 16
    # frames of audio, and when the sizes came that left them out, it ended the stream as
    # finished all the same (soundfile.SoundFile with strace holding its lseeks: 2016
    # frames followed, 2000 in the file). Written here in libsndfile's order, each step
    # once the follower has read what came before it.
    path = ram / "libsndfile.wav"
    audio = np.concatenate(stream_chunks(4))
    tag = b"LIST" + (24).to_bytes(4, "little") + b"INFOINAM" + (12).to_bytes(4, "little") \
        + b"late title\0\0"

    followed: list[np.ndarray] = []
    ended: list[BaseException | None] = []

    def follow() -> None:
        try:
            followed.extend(follow_wav(path, timeout=10))
            ended.append(None)
        except BaseException as exc:  # handed to the test
            ended.append(exc)

    def wait_for(frames: int) -> None:
        end = time.monotonic() + 30
        while sum(map(len, followed)) < frames:
            assert thread.is_alive() and time.monotonic() < end, (ended, frames)
            time.sleep(0.002)

    with open(path, "wb", buffering=0) as out:
        out.write(pcm16_header(8, 0) + audio.tobytes())
        thread = threading.Thread(target=follow)
        thread.start()
        try:
            wait_for(len(audio))
            out.write(tag)
            wait_for(len(audio) + len(tag) // 2)  # read as audio: the header said so
            out.seek(0)
            out.write(pcm16_header(36 + audio.nbytes + len(tag), audio.nbytes))
        finally:
            out.close()
            thread.join(timeout=30)
    assert len(ended) == 1 and isinstance(ended[0], WavError), ended
    assert re.search(r"the stream's header went back under its follower \(it counts "
                     rf"{audio.nbytes} bytes of audio, {audio.nbytes + len(tag)} were read\)",
                     str(ended[0]))
    np.testing.assert_array_equal(read_wav(path)[0], audio)


def test_espeak_writing_to_a_file_is_followed_to_its_last_sample(ram):
    espeak = require_tool("espeak-ng")
    path = ram / "espeak.wav"
    reference = subprocess.run([espeak, "--stdout", "play while it renders"],
                               capture_output=True, check=True, timeout=60).stdout
    # The shell opens the file for espeak-ng: no descriptor of it for writing ever exists in
    # this process, so none can leak into a process forked here meanwhile and keep the
    # follower waiting for a writer that is not espeak-ng. The follower waits for the name.
    speaker = subprocess.Popen(["sh", "-c", 'exec "$0" --stdout "play while it renders" > "$1"',
                                espeak, str(path)])
    try:
        blocks = collect(path)
    finally:
        speaker.wait(timeout=60)
    assert np.concatenate(blocks).tobytes() == reference[44:]


# ---- iter_wav_stream ---------------------------------------------------------------


def test_iter_wav_stream_yields_a_streamed_header_then_exactly_the_pcm(ram):
    path = ram / "s.wav"
    parts = stream_chunks(10, channels=2)
    with WavWriter(path, RATE, 2) as writer:
        pieces = iter_wav_stream(path, timeout=30)
        writer.write(parts[0])
        header = next(pieces)
        for part in parts[1:]:
            writer.write(part)
    body = b"".join(call_with_deadline(lambda: list(pieces)))  # type: ignore[arg-type]
    assert header[:4] == b"RIFF" and header[4:8] == b"\xff\xff\xff\xff"
    assert header[-8:] == b"data\xff\xff\xff\xff"
    assert body == np.concatenate(parts).tobytes()
    streamed = ram / "streamed.wav"
    streamed.write_bytes(header + body)
    back, rate = read_wav(streamed)  # 0xFFFFFFFF: to the end of the file
    assert rate == RATE
    np.testing.assert_array_equal(back, np.concatenate(parts))
    np.testing.assert_array_equal(sf.read(str(streamed), dtype="int16")[0], np.concatenate(parts))


def test_iter_wav_stream_raw_in_chunks_of_exact_frames(ram):
    path = ram / "s.wav"
    data = samples("int16", 1000, 2)
    with WavWriter(path, RATE, 2) as writer:
        writer.write(data)
    pieces = list(iter_wav_stream(path, header="raw", chunk_frames=300))
    assert [len(p) for p in pieces] == [1200, 1200, 1200, 400]
    assert b"".join(pieces) == data.tobytes()


def _pieces_before(pieces: Iterator[bytes], error: type[BaseException]) -> list[bytes]:
    """The pieces an iterator yields before it raises error (which it must)."""
    got: list[bytes] = []
    with pytest.raises(error):
        for piece in pieces:
            got.append(piece)
    return got


@pytest.mark.parametrize("header", ["raw", "wav"])
def test_iter_wav_stream_in_chunks_yields_an_aborted_streams_last_short_piece_first(
        ram, header):
    # Found by the stream soak: the frames short of a whole piece were dropped when the
    # stream was abandoned, where follow_wav yields every frame the writer wrote first.
    path = ram / "s.wav"
    data = samples("int16", 1000, 2)
    with WavWriter(path, RATE, 2) as writer:
        writer.write(data)
        writer.abort()
    got = _pieces_before(iter_wav_stream(path, header=header, chunk_frames=300, timeout=30),
                         StreamAbandoned)
    body = got[1:] if header == "wav" else got
    assert [len(p) for p in body] == [1200, 1200, 1200, 400]
    assert b"".join(body) == data.tobytes()


def test_iter_wav_stream_in_chunks_yields_the_last_short_piece_before_a_timeout(ram):
    path = ram / "s.wav"
    data = samples("int16", 70, 1)
    with WavWriter(path, RATE) as writer:
        writer.write(data)
        got = _pieces_before(iter_wav_stream(path, header="raw", chunk_frames=50, timeout=0.1),
                             TimeoutError)
    assert [len(p) for p in got] == [100, 40]
    assert b"".join(got) == data.tobytes()


def test_iter_wav_stream_of_an_empty_finished_stream_is_just_the_header(ram):
    path = ram / "empty.wav"
    WavWriter(path, RATE).close()
    pieces = list(iter_wav_stream(path))
    assert len(pieces) == 1 and pieces[0][:4] == b"RIFF"
    assert list(iter_wav_stream(path, header="raw")) == []


@pytest.mark.parametrize(("kwargs", "match", "kind"), [
    ({"header": "mp3"}, "header must be 'wav' or 'raw', got 'mp3'", ValueError),
    ({"chunk_frames": 0}, "chunk_frames must be >= 1, got 0", ValueError),
    ({"chunk_frames": 2.5}, "chunk_frames must be an int, got 2.5", TypeError),
    ({"chunk_frames": True}, "chunk_frames must be an int, got True", TypeError),
])
def test_bad_iter_wav_stream_arguments_are_named(ram, kwargs, match, kind):
    with pytest.raises(kind, match=match):
        iter_wav_stream(ram / "x.wav", **kwargs)


def test_chunk_frames_may_be_a_numpy_integer(ram):
    # Found in review: np.int64(300) was refused where every other int argument takes it.
    path = ram / "s.wav"
    with WavWriter(path, RATE) as writer:
        writer.write(samples("int16", 600, 1))
    pieces = list(iter_wav_stream(path, header="raw", chunk_frames=np.int64(300)))
    assert [len(piece) for piece in pieces] == [600, 600]  # bytes: 300 int16 frames each


def test_an_idle_follower_sleeps_in_the_kernel(ram):
    """Not a timing test: the follower's thread is blocked in poll() (state S), not spinning."""
    path = ram / "idle.wav"
    with WavWriter(path, RATE) as writer:
        writer.write(stream_chunks(1)[0])
        started = threading.Event()

        def follow() -> None:
            started.set()
            list(follow_wav(path, timeout=30))

        worker = threading.Thread(target=follow, daemon=True)
        worker.start()
        started.wait(10)
        assert worker.native_id is not None
        stat = Path(f"/proc/self/task/{worker.native_id}/stat")
        # wchan names the kernel function it sleeps in ("0" where the kernel hides it).
        wchan_file = Path(f"/proc/self/task/{worker.native_id}/wchan")
        for _ in range(200):  # until it is asleep (it reads the first chunk first)
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            wchan = wchan_file.read_text()
            asleep_in_poll = state == "S" and ("poll" in wchan or wchan in ("", "0"))
            if asleep_in_poll:
                break
            time.sleep(0.01)
        assert asleep_in_poll, (state, wchan)
    worker.join(30)
    assert not worker.is_alive()
    assert os.path.exists(path)


@pytest.mark.parametrize(("dtype", "channels"), [("float32", 3), ("float64", 1), ("int32", 2),
                                                 ("uint8", 3)])
def test_chunks_of_changing_sizes_reach_another_process_whole_in_every_layout(ram, dtype,
                                                                              channels):
    # The hot path reads what a write adds in the same call as the wake-up, into an array
    # sized like the last block: smaller, equal and larger chunks all arrive whole.
    path = ram / "layouts.wav"
    parts = [samples(dtype, n, channels, seed=i)
             for i, n in enumerate([5, 480, 480, 7, 2000, 1, 480, 33])]
    with WavWriter(path, RATE, channels, dtype) as writer:
        child = start_follower(path)
        for part in parts:
            writer.write(part)
            time.sleep(0.005)
    report = follower_report(child)
    assert (report["sha"], report["frames"], report["error"]) == (
        digest(parts), sum(len(p) for p in parts), None)


@pytest.mark.parametrize(("riff_size", "data_size", "tail", "frames"), [
    (36, 0, b"\x01\x00" * 50, 50),  # RIFF ends where the data starts: a header never fixed
    (0x7FFFFFFF, 0x7FFFFFFF, b"\x01\x00" * 50, 50),
    (0xFFFFFFFF, 0x7FFFFFFF, b"\x01\x00" * 50 + b"\x01", 50),  # a half frame is not a frame
    # Genuinely empty data followed by a LIST chunk the RIFF size covers: 0 frames.
    (36 + 8 + 4, 0, b"LIST" + (4).to_bytes(4, "little") + b"INFO", 0),
], ids=["data-0-riff-ends-at-data", "0x7FFFFFFF", "0x7FFFFFFF-odd-tail", "empty-data-then-LIST"])
def test_read_wav_reads_streamed_sizes_to_the_end_and_real_sizes_as_they_are(ram, riff_size,
                                                                              data_size, tail,
                                                                              frames):
    path = ram / "streamed.wav"
    path.write_bytes(pcm16_header(riff_size, data_size) + tail)
    data, rate = read_wav(path)
    assert rate == 24000 and len(data) == frames
    assert (data == 1).all()
    assert len(collect(path)[0] if frames else []) == frames


def test_a_forked_child_that_closes_its_copy_of_the_writer_does_not_end_the_stream(ram):
    path = ram / "forked.wav"
    with WavWriter(path, RATE) as writer:
        writer.write(stream_chunks(1)[0])
        pid = os.fork()
        if pid == 0:  # the child closes its copy and leaves without any cleanup
            try:
                writer.close()
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert stream_state(path) == b"live"
        writer.write(stream_chunks(2)[1])
    assert stream_state(path) == b"done"
    assert len(collect(path)) >= 1



def wait_until(condition: Callable[[], bool], deadline: float = 30) -> None:
    """Return once condition() is true; fail if it is still false after deadline seconds."""
    give_up = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < give_up, "waited in vain"
        time.sleep(0.005)


@pytest.mark.parametrize("end", ["close", "abort"])
def test_a_writer_whose_fd_another_process_also_holds_ends_its_waiting_followers(ram, end):
    # The state goes into the header by a store (no inotify event); the close was the
    # only event, and it is not the last close while another process holds the fd (handed
    # over, or inherited): a waiting follower waited for its timeout, or for ever (found
    # in review).
    path = ram / "shared.wav"
    writer = WavWriter(path, RATE)
    holder = subprocess.Popen(["sleep", "60"], pass_fds=[writer.fileno()])
    follower, got, errors = follower_thread(path, timeout=60)
    try:
        parts = stream_chunks(2)
        writer.write(parts[0])
        follower.start()
        wait_until(lambda: len(got) == 1)
        writer.write(parts[1])
        wait_until(lambda: len(got) == 2)  # and then it waits for more
        getattr(writer, end)()
        follower.join(30)
        assert not follower.is_alive(), "the follower did not see the end of the stream"
    finally:
        holder.kill()
        holder.wait()
    assert digest(got) == digest(parts)
    if end == "close":
        assert errors == []
    else:
        assert len(errors) == 1 and isinstance(errors[0], StreamAbandoned)


# A producer that forks a helper (a multiprocessing worker, fork start method) while its
# WavWriter is open, reports the helper's pid, writes, then closes or waits to be killed
# (each step when the test says so on its stdin).
FORKING_PRODUCER = """
import multiprocessing, sys, time
import numpy as np
from luna_shm import WavWriter
writer = WavWriter(sys.argv[1], 24000)
writer.write(np.full(480, 1, np.int16))
helper = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
helper.start()
print(helper.pid, flush=True)
sys.stdin.readline()
writer.write(np.full(480, 2, np.int16))
print("written", flush=True)
sys.stdin.readline()
if sys.argv[2] == "close":
    writer.close()
print("ended", flush=True)
time.sleep(600)
"""


def holds_file(pid: int, path: Path) -> bool:
    """Whether process pid has path open or mapped."""
    fds = Path(f"/proc/{pid}/fd")
    opened = any(os.path.realpath(fd) == str(path) for fd in fds.iterdir())
    return opened or str(path) in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("end", ["close", "SIGKILL"])
def test_a_child_forked_while_a_writer_is_open_never_keeps_its_stream_from_ending(ram, end):
    # The child kept the writer's open file (its fd, and the header page's mapping): the
    # parent's close was not the last one (no close event) and a killed parent left its
    # flock held, so the follower waited for its timeout, or for ever (found in review).
    path = ram / "forked.wav"
    producer = subprocess.Popen([sys.executable, "-c", FORKING_PRODUCER, str(path), end],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert producer.stdin is not None and producer.stdout is not None
    helper = int(producer.stdout.readline())
    try:
        wait_until(lambda: not holds_file(helper, path))  # its at-fork hook has run
        assert holds_file(producer.pid, path)
        # No timeout: the end of the stream alone must end it.
        follower, got, errors = follower_thread(path, timeout=None)
        follower.start()
        wait_until(lambda: len(got) == 1)
        producer.stdin.write("go\n")
        producer.stdin.flush()
        assert producer.stdout.readline() == "written\n"
        wait_until(lambda: len(got) == 2)  # and then it waits for more
        producer.stdin.write("end\n")
        producer.stdin.flush()
        assert producer.stdout.readline() == "ended\n"
        if end == "SIGKILL":
            producer.send_signal(signal.SIGKILL)
            producer.wait(timeout=60)
        follower.join(60)
        assert not follower.is_alive(), "the follower did not see the end of the stream"
        assert np.concatenate(got).tolist() == [1] * 480 + [2] * 480
        if end == "close":
            assert errors == []
        else:
            assert len(errors) == 1 and isinstance(errors[0], StreamAbandoned)
            assert "the writer died" in str(errors[0])
    finally:
        os.kill(helper, signal.SIGKILL)
        producer.kill()
        producer.wait(timeout=60)
        producer.stdin.close()
        producer.stdout.close()


def _follow_report(path: str) -> dict[str, object]:
    try:
        return {"frames": sum(len(b) for b in follow_wav(path, timeout=0.5))}
    except TimeoutError as exc:
        return {"timeout": str(exc)}


def follow_as_other_user(path: Path) -> dict[str, object]:
    """follow_wav(path, timeout=0.5) in a forked child that is uid 65534: what it got."""
    result = as_other_user(_follow_report, str(path))
    assert isinstance(result, dict)
    return result


@fork_with_threads_is_meant  # as_other_user forks in call_with_deadline's thread
@pytest.mark.parametrize("streamed", [False, True], ids=["final-header", "streamed-header"])
def test_a_follower_that_may_not_take_a_lease_ends_a_final_header_and_waits_on_a_streamed_one(
        ram, streamed):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a follower as uid 65534")
    path = ram / "theirs.wav"
    data = np.arange(100, dtype=np.int16)
    header = (b"RIFF" + (0xFFFFFFFF if streamed else 236).to_bytes(4, "little") + b"WAVEfmt "
              + (16).to_bytes(4, "little") + (1).to_bytes(2, "little")
              + (1).to_bytes(2, "little") + (24000).to_bytes(4, "little")
              + (48000).to_bytes(4, "little") + (2).to_bytes(2, "little")
              + (16).to_bytes(2, "little") + b"data"
              + (0xFFFFFFFF if streamed else 200).to_bytes(4, "little"))
    path.write_bytes(header + data.tobytes())
    path.chmod(0o644)
    ram.chmod(0o755)
    report = call_with_deadline(lambda: follow_as_other_user(path))
    if streamed:
        # Not its file, no CAP_LEASE: nobody can say whether a writer still has it open.
        assert report == {"timeout": f"[Errno {errno.ETIMEDOUT}] no new audio for 0.5 s: "
                                     f"'{path}'"}
    else:
        assert report == {"frames": 100}


def test_an_async_follower_cancelled_as_its_wait_ends_raises_cancelled_error(ram):
    # asyncio.wait_for (CPython 3.11) swallows a cancellation that comes in the same loop
    # turn as the wake-up (gh-86296): the cancelled consumer went on iterating. Here the
    # chunk makes the inotify fd readable and the cancel is queued before the next turn,
    # so the two land together; on the old code the task ended normally every time.
    rounds = 20

    async def one_round(path: Path) -> str:
        loop = asyncio.get_running_loop()
        parts = stream_chunks(2)
        writer = WavWriter(path, RATE)
        writer.write(parts[0])
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in afollow_wav(path, timeout=30):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()  # the consumer now waits in the follower, with a timeout
        writer.write(parts[1])
        loop.call_soon(task.cancel)
        loop.call_soon(writer.close)  # a follower that goes on ends with the stream
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        finally:
            writer.close()
        return "went on"

    async def main() -> list[str]:
        return [await one_round(ram / f"c{i}.wav") for i in range(rounds)]

    before = set(os.listdir("/proc/self/fd"))
    outcomes = call_with_deadline(lambda: asyncio.run(main()))
    assert outcomes == ["cancelled"] * rounds
    assert set(os.listdir("/proc/self/fd")) <= before  # each follower's fds closed


# ---- an async follower left before its stream ends ----------------------------------


def follower_fds() -> list[str]:
    """What this process's fds name of the kinds a follower opens: WAV files, watches."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the fd that listed them
            pass
    return sorted(name for name in names if name.endswith(".wav") or "inotify" in name)


async def leave_by_async_with(path: Path) -> list[str]:
    before = follower_fds()
    async with afollow_wav(path, timeout=30) as chunks:
        async for _ in chunks:
            break
        held = follower_fds()
    assert len(held) == len(before) + 2  # inside, it holds its two
    return follower_fds()


async def leave_by_aclosing(path: Path) -> list[str]:
    import contextlib
    async with contextlib.aclosing(afollow_wav(path, timeout=30)) as chunks:
        async for _ in chunks:
            break
    return follower_fds()


async def leave_by_aclose(path: Path) -> list[str]:
    chunks = afollow_wav(path, timeout=30)
    async for _ in chunks:
        break
    await chunks.aclose()
    await chunks.aclose()  # idempotent
    return follower_fds()


async def leave_by_break(path: Path) -> list[str]:
    # No await between the break and the look: asyncio's finalizer hook, which closed an
    # abandoned async generator, only schedules its aclose() for a later loop turn.
    async for _ in afollow_wav(path, timeout=30):
        break
    return follower_fds()


@pytest.mark.parametrize("leave", [leave_by_async_with, leave_by_aclosing, leave_by_aclose,
                                   leave_by_break])
def test_an_async_follower_left_mid_stream_closes_its_fds_at_once(ram, leave) -> None:
    # A player that stops on barge-in leaves the follower while the stream is live: the
    # follower's file and inotify fds stayed open until a later loop turn or a gc cycle.
    path = ram / "barge_in.wav"
    with WavWriter(path, RATE) as writer:
        writer.write(stream_chunks(1)[0])
        before = follower_fds()
        left = call_with_deadline(lambda: asyncio.run(leave(path)))
    assert left == before


def test_an_async_follower_another_task_waits_in_is_closed_by_cancelling_that_task(
        ram) -> None:
    # Closing the fds under a wait registered with the loop would leave the loop watching
    # a closed number (or another file opened under it): refused, naming the way out.
    path = ram / "waiting.wav"

    async def main() -> tuple[str, str, list[str]]:
        chunks = afollow_wav(path, timeout=30)
        first = asyncio.Event()

        async def play() -> None:
            async for _ in chunks:
                first.set()

        task = asyncio.create_task(play())
        await first.wait()
        await asyncio.sleep(0)  # the player is back in its wait
        with pytest.raises(RuntimeError, match="another task iterates it: cancel") as closing:
            await chunks.aclose()
        with pytest.raises(RuntimeError, match="already being iterated") as iterating:
            await chunks.__anext__()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert repr(chunks) == f"<AsyncFollower {str(path)!r} closed>"
        return str(closing.value), str(iterating.value), follower_fds()

    with WavWriter(path, RATE) as writer:
        writer.write(stream_chunks(1)[0])
        before = follower_fds()
        closing, iterating, left = call_with_deadline(lambda: asyncio.run(main()))
    assert str(path) in closing and str(path) in iterating
    assert left == before


def test_an_async_follower_whose_loop_closed_while_a_task_waited_in_it_can_be_closed(
        ram) -> None:
    # loop.close() with a task still waiting in the follower: that task can never run
    # again, nor be cancelled ("Event loop is closed"), yet close() said "cancel that
    # task" and kept the file and inotify fds until the task was collected.
    path = ram / "closed_loop.wav"
    with WavWriter(path, RATE) as writer:
        writer.write(stream_chunks(1)[0])
        before = follower_fds()
        chunks = afollow_wav(path, timeout=30)
        first = asyncio.Event()

        async def play() -> None:
            async for _ in chunks:
                first.set()

        loop = asyncio.new_event_loop()
        task = loop.create_task(play())
        loop.run_until_complete(first.wait())
        loop.run_until_complete(asyncio.sleep(0.05))  # the player is back in its wait
        loop.close()
        assert follower_fds() != before
        chunks.close()
        assert follower_fds() == before
        assert repr(chunks) == f"<AsyncFollower {str(path)!r} closed>"
        chunks.close()  # idempotent
        with pytest.raises(StopAsyncIteration):
            asyncio.run(chunks.__anext__())
        task.get_coro().close()  # what collecting the task would do, now
        assert follower_fds() == before
