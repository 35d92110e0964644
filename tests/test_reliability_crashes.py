"""Crashes: real child processes killed with SIGKILL while they hold buffers, writers and pools.

The children see the test's private dirs (the private_dirs fixture sets
LUNA_SHM_DIR and TMPDIR in the environment they inherit). Cleanup is judged by
locks alone: a file whose shared flock died with its process is abandoned,
one whose holder lives is in use. No PIDs, no timers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import LIBRARY_PATH
from luna_shm import AudioPool, cleanup_all_temp_audio, iter_unused_temp_audio, read_wav, write_wav


@contextmanager
def child(code: str, *, prefix: list[str] | None = None) -> Iterator[tuple[subprocess.Popen, dict]]:
    """Start python code that prints one JSON line and then waits; yield (process, that JSON).

    The child is killed with SIGKILL when the block ends, if it still runs.
    """
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH, "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen([*(prefix or []), sys.executable, "-c", textwrap.dedent(code)],
                               env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, "the child died before it reported"
        yield process, json.loads(line)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def listing(private_dirs) -> list[str]:
    return sorted(os.listdir(private_dirs.ram) + os.listdir(private_dirs.fallback))


HOLDER = """
import json, sys
import numpy as np
from luna_shm import AudioPool, WavWriter, create_wav_buffer, get_temp_audio_path
buffers = [create_wav_buffer(1000, 8000) for _ in range(2)]
for buf in buffers:
    buf.array[:] = 7
writers = [WavWriter(None, 8000) for _ in range(2)]
for writer in writers:
    writer.write(np.ones(100, np.int16))
pool = AudioPool(slots=3, max_bytes=4000)
held = pool.write_wav(np.ones(100, np.int16), 8000)
loose = get_temp_audio_path(create=True)  # never locked: cleanup may take it at any time
print(json.dumps({"locked": [b.path for b in buffers] + [w.path for w in writers]
                  + sorted(s.path for s in pool._slots), "loose": loose}), flush=True)
sys.stdin.read()
"""


def test_files_of_a_live_process_are_skipped_by_cleanup_and_removed_once_it_is_killed(
        private_dirs) -> None:
    with child(HOLDER) as (process, made):
        locked = made["locked"]
        assert len(locked) == 7 and all(os.path.isfile(p) for p in locked)

        assert list(iter_unused_temp_audio()) != []  # the loose file only
        assert cleanup_all_temp_audio() == 1
        assert not os.path.lexists(made["loose"])
        assert all(os.path.isfile(p) for p in locked)
        assert cleanup_all_temp_audio() == 0

        kill(process)

        assert all(os.path.isfile(p) for p in locked)  # the crash left them behind
        assert sorted(p for p, _ in iter_unused_temp_audio()) == sorted(locked)
        assert cleanup_all_temp_audio() == 7
    assert listing(private_dirs) == []


POOL_HOLDER = """
import json, sys
import numpy as np
from luna_shm import AudioPool, create_wav_buffer
pool = AudioPool(slots=2, max_bytes=4000)
buf = create_wav_buffer(10, 8000)
print(json.dumps({"slots": sorted(s.path for s in pool._slots), "buffer": buf.path}), flush=True)
sys.stdin.read()
"""


def test_a_new_pool_reclaims_the_slot_files_of_a_killed_pool_and_leaves_a_live_pools_alone(
        private_dirs) -> None:
    with child(POOL_HOLDER) as (dead, dead_made), child(POOL_HOLDER) as (alive, alive_made):
        kill(dead)
        assert all(os.path.isfile(p) for p in dead_made["slots"] + alive_made["slots"])

        with AudioPool(slots=1, max_bytes=4000) as pool:
            new_slot = pool._slots[0].path
            assert not any(os.path.lexists(p) for p in dead_made["slots"])
            assert all(os.path.isfile(p) for p in alive_made["slots"])
            # A pool reclaims pool files only: the dead process's buffer is cleanup's job.
            assert os.path.isfile(dead_made["buffer"])
            assert os.path.isfile(alive_made["buffer"])
        assert not os.path.lexists(new_slot)

        assert cleanup_all_temp_audio() == 1  # the dead buffer; the live process keeps its own
        assert sorted(listing(private_dirs)) == sorted(
            os.path.basename(p) for p in [*alive_made["slots"], alive_made["buffer"]])
        kill(alive)
    assert cleanup_all_temp_audio() == 3
    assert listing(private_dirs) == []


ANONYMOUS_HOLDER = """
import json, sys
import numpy as np
from luna_shm import AudioPool, create_wav_buffer
buffers = [create_wav_buffer(50_000, 8000, anonymous=True) for _ in range(2)]
for i, buf in enumerate(buffers):
    buf.array[:] = i + 1
pool = AudioPool(slots=2, max_bytes=100_000, anonymous=True)
held = pool.write_wav(np.full(50_000, 3, np.int16), 8000)
print(json.dumps({"paths": [b.path for b in buffers] + [held.path]}), flush=True)
sys.stdin.read()
"""


def test_anonymous_buffers_and_pools_of_a_killed_process_leave_nothing(private_dirs) -> None:
    with child(ANONYMOUS_HOLDER) as (process, made):
        paths = made["paths"]
        assert all(p.startswith(f"/proc/{process.pid}/fd/") for p in paths)
        for value, path in enumerate(paths, start=1):
            data, _ = read_wav(path, mmap=False)  # alive: readable through /proc
            assert (data == value).all() and len(data) == 50_000
        assert listing(private_dirs) == []

        kill(process)

    assert not any(os.path.lexists(p) for p in paths)
    assert not os.path.exists(f"/proc/{process.pid}")
    assert listing(private_dirs) == []
    assert cleanup_all_temp_audio() == 0


def test_a_reader_keeps_a_killed_producers_buffer_whole_even_after_cleanup_removed_it(
        private_dirs) -> None:
    code = """
    import json, sys
    from luna_shm import create_wav_buffer
    buf = create_wav_buffer(100_000, 8000)
    buf.array[:] = (__import__("numpy").arange(100_000) % 5000)
    print(json.dumps({"path": buf.path}), flush=True)
    sys.stdin.read()
    """
    with child(code) as (process, made):
        mapped, rate = read_wav(made["path"])  # a player maps the file...
        kill(process)  # ...the producer crashes...
        assert cleanup_all_temp_audio() == 1  # ...and its file is cleaned up
        assert not os.path.lexists(made["path"])
    expected = (np.arange(100_000) % 5000).astype(np.int16)
    np.testing.assert_array_equal(mapped, expected)  # the mapping holds the pages
    assert rate == 8000


STREAMER = """
import json, sys
import numpy as np
from luna_shm import WavWriter
writer = WavWriter(None, 8000)
print(json.dumps({"path": writer.path}), flush=True)
for i in range(20_000):
    writer.write(np.full(1001, i % 30_000, np.int16))  # odd chunks: pad bytes come and go
    if i == 300:
        sys.stderr.write("streaming\\n")
        sys.stderr.flush()
sys.stdin.read()
"""


def test_a_stream_killed_while_writing_leaves_a_valid_wav_of_whole_chunks(private_dirs) -> None:
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    process = subprocess.Popen([sys.executable, "-c", STREAMER], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        path = json.loads(process.stdout.readline())["path"]
        assert process.stderr.readline() == "streaming\n"  # well into the stream
        kill(process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()

    data, rate = read_wav(path, mmap=False)
    sf_data, sf_rate = sf.read(path, dtype="int16")
    assert rate == sf_rate == 8000
    np.testing.assert_array_equal(sf_data, data)
    chunks = len(data) // 1001
    assert len(data) == chunks * 1001 and chunks > 300
    expected = np.repeat(np.arange(chunks) % 30_000, 1001).astype(np.int16)
    np.testing.assert_array_equal(data, expected)
    assert cleanup_all_temp_audio() == 1
    assert listing(private_dirs) == []


def _strace_prefix(syscalls: str, delay_us: int) -> list[str]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (it delays one system call to open a window)")
    return [strace, "-f", "-qq", "-o", "/dev/null", "-e", "signal=none", "-e",
            f"trace={syscalls}", "-e", f"inject={syscalls}:delay_enter={delay_us}"]


def _dead(pid: int) -> bool:
    """True once pid has exited (gone, or a zombie: its files are closed either way)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_for(predicate, what: str, deadline: float = 60) -> None:
    """Poll until predicate() holds; fail (never hang) after deadline seconds."""
    end = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "replacing-plain"])
def test_a_process_killed_while_replacing_a_file_leaves_it_whole_and_a_partial_cleanup_removes(
        private_dirs, atomic) -> None:
    target = Path(private_dirs.ram) / "given.wav"
    old = np.arange(100, dtype=np.int16)
    write_wav(target, old, 8000)
    before = target.read_bytes()
    # Every rename of the child is held up for a minute: it dies inside that window.
    prefix = _strace_prefix("rename,renameat,renameat2", 60_000_000)
    code = f"""
    import json, os
    import numpy as np
    from luna_shm import write_wav
    print(json.dumps({{"pid": os.getpid()}}), flush=True)
    write_wav({str(target)!r}, np.ones(50_000, np.int16), 8000, atomic={atomic})
    """
    with child(code, prefix=prefix) as (process, made):

        def partials() -> list[str]:
            return [n for n in os.listdir(private_dirs.ram) if n.startswith(".luna_audio_")]

        _wait_for(lambda: partials() != [], "the partial file of the write")
        os.kill(made["pid"], signal.SIGKILL)
        process.kill()  # strace too, rather than wait for its delay to run out
        process.wait(timeout=60)
        _wait_for(lambda: _dead(made["pid"]), "the child to die")

        assert target.read_bytes() == before  # never half-replaced
        assert len(partials()) == 1
        # The partial was locked by the writer: the kernel drops that lock as the dead
        # process's files are released, which can lag its death a little.
        removed = [0]

        def reclaimed() -> bool:
            removed[0] += cleanup_all_temp_audio()
            return removed[0] >= 1

        _wait_for(reclaimed, "the dead writer's partial file to be reclaimed")
        assert removed[0] == 1
    assert os.listdir(private_dirs.ram) == ["given.wav"]
    np.testing.assert_array_equal(read_wav(target)[0], old)


# ---- long runs leak nothing ---------------------------------------------------------------------

LONG_RUN = """
import gc, json, os, sys
import numpy as np
from luna_shm import (AudioPool, WavWriter, cleanup_all_temp_audio, cleanup_temp_audio,
                      create_wav_buffer, read_wav, write_wav)

CYCLES = int(os.environ["CYCLES"])
LEAK = os.environ.get("LEAK", "")
data = np.arange(100, dtype=np.int16)  # 100 frames: the cost is all in the bookkeeping


def measure():
    gc.collect()
    with open("/proc/self/maps", encoding="ascii") as maps:
        mappings = sum(1 for _ in maps)
    with open("/proc/self/statm", encoding="ascii") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGESIZE")
    return {"fds": len(os.listdir("/proc/self/fd")), "maps": mappings, "rss": rss}


def write_read_cleanup():
    path = write_wav(None, data, 8000)
    mapped, _ = read_wav(path)
    copied, _ = read_wav(path, mmap=False)
    assert mapped[99] == copied[99] == 99
    assert cleanup_temp_audio(path)


def buffer_cycle(i):
    with create_wav_buffer(100, 8000, anonymous=i % 2 == 1) as buf:
        buf.array[:] = data
        view = buf.array
        back, _ = read_wav(buf.path)
        assert back[99] == view[99] == 99
        if i % 3 == 0:
            buf.truncate(50)
    del view  # a live view of the mapping still holds the buffer's lock
    if not buf.anonymous:
        assert cleanup_temp_audio(buf.path)


def writer_cycle():
    with WavWriter(None, 8000) as writer:
        writer.write(data[:50])
        writer.write(data[50:])
    assert read_wav(writer.path)[0][99] == 99
    assert cleanup_temp_audio(writer.path)


def pool_cycle(i):
    with AudioPool(slots=2, max_bytes=1000, anonymous=i % 2 == 1) as pool:
        with pool.write_wav(data, 8000) as pooled:
            assert read_wav(pooled.path)[0][99] == 99
        with pool.acquire(100, 8000) as pooled:
            pooled.array[:] = data
            pooled.truncate(10)


def run(scale):
    for i in range(CYCLES * scale // 100):
        write_read_cleanup()
    for i in range(CYCLES * scale // 2000):
        buffer_cycle(i)
        writer_cycle()
    for i in range(CYCLES * scale // 10000):
        pool_cycle(i)


run(2)  # warm-up: imports, caches, allocator arenas
before = measure()
run(100)
if LEAK == "hold":
    kept = create_wav_buffer(100, 8000)  # a buffer still referenced: its fd and mapping stay
elif LEAK == "drop":
    create_wav_buffer(100, 8000)  # dropped without close: must warn
after = measure()
print(json.dumps({"before": before, "after": after,
                  "left": cleanup_all_temp_audio() if not LEAK else 0}))
"""


def _long_run(cycles: int, leak: str = "") -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH, "PYTHONDEVMODE": "1", "CYCLES": str(cycles),
           "LEAK": leak}
    done = subprocess.run([sys.executable, "-W", "error::ResourceWarning", "-c", LONG_RUN],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_a_hundred_thousand_write_read_cleanup_cycles_keep_fds_mappings_and_rss_flat(
        private_dirs) -> None:
    # 100,000 write_wav(None) + read_wav (mapped and copied) + cleanup_temp_audio cycles,
    # 5,000 buffer (named and anonymous, some truncated) and 5,000 writer cycles, 1,000
    # pools (named and anonymous): under PYTHONDEVMODE with ResourceWarning as an error.
    out, stderr = _long_run(100_000)
    before, after = out["before"], out["after"]
    assert after["fds"] == before["fds"]
    assert after["maps"] == before["maps"]
    assert after["rss"] - before["rss"] < 8 * 1024 * 1024
    assert stderr == ""  # a warning raised in a finalizer is only printed there
    assert out["left"] == 0
    assert os.listdir(private_dirs.ram) == [] and os.listdir(private_dirs.fallback) == []


@pytest.mark.parametrize("leak", ["hold", "drop"])
def test_the_long_run_check_sees_a_single_leaked_buffer(private_dirs, leak) -> None:
    # The control of the test above: one buffer too many is visible to its measures.
    out, stderr = _long_run(2_000, leak)
    if leak == "hold":
        assert out["after"]["fds"] == out["before"]["fds"] + 1
        assert out["after"]["maps"] == out["before"]["maps"] + 1
    else:
        assert "ResourceWarning: unclosed WavBuffer" in stderr
