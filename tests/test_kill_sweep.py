"""SIGKILL at every system call of each producer, and what each kill leaves behind.

A zygote process imports luna_shm and numpy once (and lets the placement be chosen)
and forks one child per round (a fork costs milliseconds; a fresh interpreter with
numpy, a quarter of a second). The child does the operation's set-up (an open
AudioCache), reports "ready" and blocks on a pipe; the test attaches strace to it and
lets it go; the child runs ONE operation between two marker calls
(``access("/luna-kill-sweep-begin")`` and ``access("/luna-kill-sweep-end")``).

A dry run records every system call of the operation. strace counts ``when=N`` per
system call and per process ("the N-th openat"), not over all calls, so each later
round kills the child at one entry of that recording:
``-e inject=<name>:signal=SIGKILL:when=<k>`` for the k-th call of that name, delivered on
entry, so that call never runs: "every call before it finished, it did not run".
Every call after the begin marker up to the end marker itself (the operation complete)
gets its round, none sampled, and every round must end with the child killed by
SIGKILL: the call came again at the same place, so the rounds cover the recording.
After each kill the test checks what is visible under each name (``_check``), runs the
documented cleaner (``_clean``), and requires both private dirs to hold nothing of ours.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import LIBRARY_PATH, call_with_deadline
from luna_shm import AudioCache, AudioPool, cleanup_all_temp_audio, read_wav, write_wav

FRAMES = 3000
AUDIO = ((np.arange(FRAMES) * 37) % 20_000 - 10_000).astype(np.int16)
OLD = np.arange(100, dtype=np.int16)
ENCODED = bytes(range(256)) * 20
CHUNK_ENDS = (0, 1000, 2000, 3000)  # the writer's and the render's three chunks
CACHE = "killsweep"
KEY = "k" * 64
SPILLED_KEY = "s" * 64  # put into a cache that holds one entry: KEY goes to the disk tier
SPILL_MAX_BYTES = 8000
BEGIN, END = "/luna-kill-sweep-begin", "/luna-kill-sweep-end"

ZYGOTE = r"""
import os, sys, time
import numpy as np
from luna_shm import (AudioCache, AudioPool, WavWriter, cleanup_all_temp_audio,
                      create_wav_buffer, prefault_stats, prefault_wav_buffers, save_temp_audio,
                      temp_dir, write_wav)

# The placement is chosen once a process (its probe reads /proc/self/mountinfo, whose
# length, and so its number of reads, changes with the machine's mounts): chosen here,
# it is inherited by every child, whose calls then repeat exactly from round to round.
temp_dir()

AUDIO = ((np.arange(3000) * 37) % 20_000 - 10_000).astype(np.int16)
ENCODED = bytes(range(256)) * 20
TARGET = os.environ["KILL_SWEEP_TARGET"]


def render(writer):
    for start in (0, 1000, 2000):
        writer.write(AUDIO[start:start + 1000])


def writer_op(path):
    with WavWriter(path, 8000) as writer:
        render(writer)


def buffer_op(path):
    with create_wav_buffer(len(AUDIO), 8000, path=path) as buf:
        buf.array[:] = AUDIO


def prefault_setup():
    # The reserve's thread prepares files of a size once a buffer asked for it: wait
    # until it holds its two and sleeps, so that the buffer of the round takes one.
    prefault_wav_buffers()
    with create_wav_buffer(len(AUDIO), 8000) as first:
        pass
    os.unlink(first.path)
    deadline = time.monotonic() + 30
    while prefault_stats().files < 2 and time.monotonic() < deadline:
        time.sleep(0.01)


def spill_setup():
    cache = AudioCache("killsweep", max_bytes=8000, disk_dir=os.environ["KILL_SWEEP_DISK"])
    cache.put("k" * 64, AUDIO, 8000).release()
    return cache


def pool_op(_):
    with AudioPool(slots=2, max_bytes=8192) as pool:
        pool.write_wav(AUDIO, 8000).release()


OPS = {
    "write_wav-new": (None, lambda _: write_wav(None, AUDIO, 8000)),
    "write_wav-atomic-replace": (None, lambda _: write_wav(TARGET, AUDIO, 8000, atomic=True)),
    "write_wav-plain-replace": (None, lambda _: write_wav(TARGET, AUDIO, 8000)),
    "save_temp_audio": (None, lambda _: save_temp_audio(ENCODED)),
    # Mutable chunks are written one by one (a client may reuse its buffer).
    "save_temp_audio-stream": (None, lambda _: save_temp_audio(
        bytearray(ENCODED[start:start + 2000]) for start in (0, 2000, 4000))),
    "WavWriter": (None, writer_op),
    "WavWriter-replace": (lambda: TARGET, writer_op),
    "create_wav_buffer-replace": (lambda: TARGET, buffer_op),
    "create_wav_buffer": (None, buffer_op),
    "create_wav_buffer-prefaulted": (prefault_setup, buffer_op),
    "AudioPool": (None, pool_op),
    # An unused file of ours, moved aside to a hidden name, checked there and removed.
    "cleanup_all_temp_audio": (lambda: write_wav(None, AUDIO, 8000),
                               lambda _: cleanup_all_temp_audio()),
    "AudioCache.put": (lambda: AudioCache("killsweep", max_bytes=1 << 20),
                       lambda cache: cache.put("k" * 64, AUDIO, 8000).release()),
    "AudioCache.put-spilling": (spill_setup,
                                lambda cache: cache.put("s" * 64, AUDIO, 8000).release()),
    "AudioCache.get_or_render": (
        lambda: AudioCache("killsweep", max_bytes=1 << 20),
        lambda cache: cache.get_or_render("k" * 64, render, samplerate=8000).release()),
}

for line in sys.stdin:
    setup, run = OPS[line.strip()]
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        state = setup() if setup else None
        print("ready", os.getpid(), flush=True)
        os.read(go_read, 1)
        os.access("/luna-kill-sweep-begin", os.F_OK)
        run(state)
        os.access("/luna-kill-sweep-end", os.F_OK)
        os._exit(0)
    os.close(go_read)
    sys.stdin.readline()  # the test has attached strace
    os.write(go_write, b"g")
    os.close(go_write)
    _, status = os.waitpid(pid, 0)
    print("status", status, flush=True)
"""


@dataclass
class Zygote:
    """The forking server: one child per round, each a copy of the same imported state."""

    process: subprocess.Popen[str]

    def round(self, op: str, strace: list[str]) -> int:
        """Fork a child for op, run it under strace (these arguments, -p added), and
        return its wait status."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(op + "\n")
        self.process.stdin.flush()
        ready = self.process.stdout.readline().split()
        assert ready[:1] == ["ready"], f"the child of {op} failed its set-up: {ready}"
        tracer = subprocess.Popen([*strace, "-p", ready[1]], stderr=subprocess.PIPE,
                                  text=True)
        try:
            assert tracer.stderr is not None
            attached = tracer.stderr.readline()  # strace's interrupt is in place by then
            if "attached" not in attached:
                tracer.wait(timeout=60)
                if "Operation not permitted" in attached:  # no ptrace here (a container)
                    pytest.skip(f"strace cannot attach here: {attached.strip()!r}")
                raise AssertionError(f"strace did not attach: {attached.strip()!r}")
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
            status = self.process.stdout.readline().split()
            assert status[:1] == ["status"], f"the zygote failed: {status}"
        finally:
            try:
                tracer.wait(timeout=60)  # strace ends with its tracee
            except subprocess.TimeoutExpired:
                tracer.kill()
                tracer.wait()
            tracer.stderr.close()  # type: ignore[union-attr]
        return int(status[1])


@contextmanager
def zygote(target: Path, disk: Path) -> Iterator[Zygote]:
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH, "PYTHONDONTWRITEBYTECODE": "1",
           "OPENBLAS_NUM_THREADS": "1", "KILL_SWEEP_TARGET": str(target),
           "KILL_SWEEP_DISK": str(disk)}
    process = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield Zygote(process)
    finally:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        process.wait(timeout=60)
        process.stdout.close()


def _strace() -> str:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (it kills the child at each system call)")
    return strace


_ENTRY = re.compile(r"^(\d+) +([a-z0-9_]+)\(")  # strace pads short pids


_MARKER_CALLS = ("access", "faccessat", "faccessat2")


def kill_points(log: str) -> list[tuple[str, int]]:
    """(name, k) for each call of the operation's thread from just after the begin
    marker through the end marker: the k-th call of that name in that thread, counted
    from strace's attach, as strace counts ``when``. Another thread's calls (the prefault
    reserve's) are no points: strace counts them apart but injects by name alone, so
    they would be ambiguous. ``futex`` calls are no points either: a lock wait, which
    changes no file, and whose count depends on how the threads met."""
    counts: Counter[tuple[str, str]] = Counter()
    points: list[tuple[str, int]] = []
    main = None
    for line in log.splitlines():
        entry = _ENTRY.match(line)
        if entry is None:  # "<... resumed>", "+++ exited", "--- SIG..."
            continue
        pid, name = entry.groups()
        counts[pid, name] += 1
        if pid == main and name != "futex":
            points.append((name, counts[pid, name]))
        if main is None and name in _MARKER_CALLS and BEGIN in line:
            main = pid
        if pid == main and name in _MARKER_CALLS and END in line:
            break
    assert main is not None and points and points[-1][0] in _MARKER_CALLS, (
        "the dry run's trace holds no whole operation")
    return points


def files_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def read_both(path: Path, samplerate: int | None = 8000) -> np.ndarray:
    """The samples of path as read_wav reads them, checked against soundfile."""
    data, rate = read_wav(path, mmap=False)
    sf_data, sf_rate = sf.read(path, dtype="int16")
    assert rate == sf_rate and samplerate in (None, rate), path
    np.testing.assert_array_equal(sf_data, data)
    return data


_TEMP_WAV = re.compile(r"luna_audio_[0-9a-f]{32}\.wav")
_SLOT = re.compile(r"luna_audio_pool_[0-9a-f]{32}\.wav")
_PARTIAL = re.compile(r"\.luna_audio_\.partial_[0-9a-f]{32}")


def _check_temp_wav(ram: Path, allowed: Callable[[np.ndarray], bool]) -> None:
    """Every temp WAV name shows a whole WAV whose samples allowed() accepts (never an
    empty or headerless file: the name appears once the file is one); nothing else
    but our hidden partials."""
    for name in files_in(ram):
        if _PARTIAL.fullmatch(name):
            continue
        assert _TEMP_WAV.fullmatch(name), f"an unexpected file {name}"
        assert allowed(read_both(ram / name)), f"{name} holds audio it was never given"


def _is_prefix_of_whole_chunks(data: np.ndarray) -> bool:
    return len(data) in CHUNK_ENDS and np.array_equal(data, AUDIO[:len(data)])


def _check(op: str, ram: Path, target: Path, disk: Path | None) -> None:
    """Invariant 1 (and 3 for a replaced file): what is visible under a name after the kill."""
    if op in ("write_wav-new", "cleanup_all_temp_audio"):
        _check_temp_wav(ram, lambda data: np.array_equal(data, AUDIO))
    elif op.endswith("-replace"):
        data = read_both(target)
        if op.startswith("WavWriter"):
            assert np.array_equal(data, OLD) or _is_prefix_of_whole_chunks(data), (
                "a mix of old and new")
        elif op.startswith("create_wav_buffer"):
            assert np.array_equal(data, OLD) or (len(data) == FRAMES and (
                np.array_equal(data, AUDIO) or not data.any())), "a mix of old and new"
        else:
            assert np.array_equal(data, OLD) or np.array_equal(data, AUDIO), (
                "a mix of old and new")
        assert all(_PARTIAL.fullmatch(n) for n in files_in(ram) if n != target.name)
    elif op.startswith("save_temp_audio"):
        for name in files_in(ram):
            assert re.fullmatch(r"luna_audio_[0-9a-f]{32}\.mp3", name), name
            assert (ram / name).read_bytes() == ENCODED, f"{name} is not the whole file"
    elif op == "WavWriter":
        _check_temp_wav(ram, _is_prefix_of_whole_chunks)
    elif op.startswith("create_wav_buffer"):
        _check_temp_wav(ram, lambda data: len(data) == FRAMES and (
            np.array_equal(data, AUDIO) or not data.any()))
    elif op == "AudioPool":
        for name in files_in(ram):
            if _PARTIAL.fullmatch(name):  # a slot on its way out (see cleanup_temp_audio)
                continue
            assert _SLOT.fullmatch(name), f"an unexpected file {name}"
            data = read_both(ram / name, None)
            assert len(data) == 0 or np.array_equal(data, AUDIO), f"{name}: {len(data)} frames"
    else:
        _check_cache(ram, disk, SPILL_MAX_BYTES if disk else 1 << 20)


def _cache_dir(ram: Path) -> Path:
    return ram / f"luna_cache-{os.getuid()}-{CACHE}"


_ENTRY_NAME = re.compile(r"[a-z]{64}\.wav")


def _check_cache(ram: Path, disk: Path | None, max_bytes: int) -> None:
    """Invariant 4: every entry is whole; a new AudioCache opens without hanging, sweeps
    the in-flight files of both tiers, agrees with the files about what it holds, and
    gives each key's exact audio or a miss."""
    tiers = [_cache_dir(ram), *([_cache_dir(disk)] if disk else [])]
    entries = {tier: [n for n in files_in(tier) if _ENTRY_NAME.fullmatch(n)] for tier in tiers}
    for tier, names in entries.items():
        for name in names:
            np.testing.assert_array_equal(read_both(tier / name), AUDIO)
    cache = call_with_deadline(lambda: AudioCache(CACHE, max_bytes=max_bytes, disk_dir=disk),
                               30)
    try:
        for tier, names in entries.items():
            left = [n for n in files_in(tier) if n != "lock" and n not in names]
            assert left == [], f"the open left in-flight files in {tier}: {left}"
        sizes = [[(tier / n).stat().st_size for n in entries[tier]] for tier in tiers]
        stats = cache.stats(timeout=5)
        assert (stats.entries, stats.bytes) == (len(sizes[0]), sum(sizes[0]))
        if disk:
            assert (stats.disk_entries, stats.disk_bytes) == (len(sizes[1]), sum(sizes[1]))
        for key in (KEY, SPILLED_KEY):
            got = cache.get(key, timeout=5)  # from the disk tier: reloaded
            assert (got is None) == all(f"{key}.wav" not in names for names in entries.values())
            if got is not None:
                with got:
                    np.testing.assert_array_equal(got.array, AUDIO)
    finally:
        cache.destroy()


def _clean(op: str, ram: Path, fallback: Path, target: Path, disk: Path | None) -> None:
    """Invariant 2: the documented cleaner removes every leftover; then nothing of ours."""
    if op == "AudioPool":
        call_with_deadline(lambda: AudioPool(slots=1, max_bytes=8192).close(), 30)
        slots = [n for n in files_in(ram) if _SLOT.fullmatch(n)]
        assert slots == [], f"a new pool left a dead pool's slots: {slots}"
    cleanup_all_temp_audio()
    kept = [target.name] if target.exists() else []
    assert files_in(ram) == kept and files_in(fallback) == []
    assert disk is None or files_in(disk) == []


OPERATIONS = ["write_wav-new", "write_wav-atomic-replace",
              "write_wav-plain-replace", "save_temp_audio", "save_temp_audio-stream",
              "WavWriter", "WavWriter-replace", "create_wav_buffer", "create_wav_buffer-replace",
              "create_wav_buffer-prefaulted",
              "AudioPool", "cleanup_all_temp_audio", "AudioCache.put", "AudioCache.put-spilling",
              "AudioCache.get_or_render"]


@pytest.mark.parametrize("op", OPERATIONS)
def test_sigkill_at_every_system_call_leaves_only_whole_files_and_cleanable_leftovers(
        private_dirs, tmp_path, op) -> None:
    strace = _strace()
    ram, fallback = Path(private_dirs.ram), Path(private_dirs.fallback)
    target = ram / "given.wav"
    replaces = op.endswith("-replace")
    log = tmp_path / "dry-run.strace"
    disk_dir = tmp_path / "disk"  # the cache's disk tier, for the op that spills to it
    disk_dir.mkdir()
    disk = disk_dir if op.endswith("-spilling") else None
    with zygote(target, disk_dir) as server:
        if replaces:
            write_wav(target, OLD, 8000)
        status = server.round(op, [strace, "-f", "-o", str(log), "-e", "trace=all",
                                   "-e", "signal=none"])
        assert os.waitstatus_to_exitcode(status) == 0, "the dry run failed"
        points = kill_points(log.read_text())
        if disk is not None:  # the operation did spill: its kills fall inside a spill
            assert (_cache_dir(disk) / f"{KEY}.wav").is_file()
        _check(op, ram, target, disk)
        _clean(op, ram, fallback, target, disk)
        for name, nth in points:
            if replaces:
                write_wav(target, OLD, 8000)
            # No -f: the operation's thread alone is traced, so that no other thread's
            # call of the same name comes first.
            status = server.round(op, [strace, "-o", "/dev/null", "-e", f"trace={name}",
                                       "-e", "signal=none",
                                       "-e", f"inject={name}:signal=SIGKILL:when={nth}"])
            assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL, (
                f"call {nth} of {name} did not come again: the operation did not repeat")
            try:
                _check(op, ram, target, disk)
                _clean(op, ram, fallback, target, disk)
            except (AssertionError, OSError, ValueError) as exc:
                raise AssertionError(f"killed at call {nth} of {name} "
                                     f"({points.index((name, nth)) + 1} of {len(points)}): "
                                     f"{exc}") from None
            if replaces:
                target.unlink()
