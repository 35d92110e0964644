"""What the system-call sweeps share: a forking zygote, the dry run's recording, the checks.

The sweeps (``test_kill_sweep.py``: a SIGKILL at each system call of an operation;
``test_error_sweep.py``: a failure of each) run each operation in a child of a zygote
process that imported luna_shm and numpy once (and let the placement be chosen), one
child a round (a fork costs milliseconds; a fresh interpreter with numpy, a quarter of a
second). The child does the operation's set-up, reports "ready" and blocks on a pipe; the
test attaches strace to it and lets it go; the child runs ONE operation between two
marker calls (``access(BEGIN)`` and ``access(END)``).

A dry run records every system call of the operation (:func:`recorded_points`). strace
counts ``when=N`` per system call and per process ("the N-th openat"), not over all
calls, so each later round acts on one entry of that recording:
``-e inject=<name>:...:when=<k>`` for the k-th call of that name.

A child runs in one of two modes, the first word of the zygote's input line:

- ``kill``: the operation, then ``os._exit(0)``; the sweep kills it on the way.
- ``error``: the child lists its open fds (``/proc/self/fd``, after ``gc.collect()``)
  and copies the top level of both private dirs (into ``$SWEEP_SNAPSHOTS/before``)
  before it is let go; after the end marker it does both again (``after``), runs the
  same operation once more (``again``, with no failure injected: a failure must not
  poison the process), lists its fds a last time (``end``), and writes one line
  ``report <json>``: the outcome of each run (``ok`` and the result, or the exception's
  type names, errno, filename and text) and the fd lists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from helpers import LIBRARY_PATH, call_with_deadline
from luna_shm import AudioCache, AudioPool, cleanup_all_temp_audio, read_wav

FRAMES = 3000
AUDIO = ((np.arange(FRAMES) * 37) % 20_000 - 10_000).astype(np.int16)
OLD = np.arange(100, dtype=np.int16)
ENCODED = bytes(range(256)) * 20
CHUNK_ENDS = (0, 1000, 2000, 3000)  # the writer's and the render's three chunks
CACHE = "killsweep"
KEY = "k" * 64
SPILLED_KEY = "s" * 64  # put into a cache that holds one entry: KEY goes to the disk tier
SPILL_MAX_BYTES = 8000
BEGIN, END = "/luna-syscall-sweep-begin", "/luna-syscall-sweep-end"

ZYGOTE = r"""
import gc, json, os, shutil, signal, socket, sys, time, traceback
import numpy as np
from luna_shm import (AudioCache, AudioPool, WavWriter, cleanup_all_temp_audio,
                      cleanup_temp_audio, create_wav_buffer, follow_wav, get_temp_audio_path,
                      prefault_stats,
                      prefault_wav_buffers, read_wav, recv_wav, save_temp_audio, send_wav,
                      temp_dir, write_wav)

# The placement is chosen once a process (its probe reads /proc/self/mountinfo, whose
# length, and so its number of reads, changes with the machine's mounts): chosen here,
# it is inherited by every child, whose calls then repeat exactly from round to round.
temp_dir()
# Every child collects its garbage before it lists its fds: frozen, what the zygote
# imported is not scanned again each time (a full collection with numpy took ms).
gc.freeze()

AUDIO = ((np.arange(3000) * 37) % 20_000 - 10_000).astype(np.int16)
ENCODED = bytes(range(256)) * 20
TARGET = os.environ["SWEEP_TARGET"]
KEY, SPILLED_KEY = "k" * 64, "s" * 64


def render(writer):
    for start in (0, 1000, 2000):
        writer.write(AUDIO[start:start + 1000])


def writer_op(path):
    with WavWriter(path, 8000) as writer:
        render(writer)


def buffer_op(path):
    with create_wav_buffer(len(AUDIO), 8000, path=path) as buf:
        buf.array[:] = AUDIO


def open_fds():
    # The fd listdir itself opened is closed by the time readlink looks: skipped.
    gc.collect()
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass
    return fds


FD_BASELINE = []  # set by a set-up whose own files come and go (the prefault reserve)


def prefault_setup():
    # The reserve's thread prepares files of a size once a buffer asked for it: wait
    # until it holds its two and sleeps, so that the buffer of the round takes one.
    FD_BASELINE.append(open_fds())
    prefault_wav_buffers()
    with create_wav_buffer(len(AUDIO), 8000) as first:
        pass
    os.unlink(first.path)
    deadline = time.monotonic() + 30
    while prefault_stats().files < 2 and time.monotonic() < deadline:
        time.sleep(0.01)


def prefault_settle(_):
    prefault_wav_buffers(max_bytes=0)  # the thread stopped, every file of the reserve closed


def spill_setup():
    cache = AudioCache("killsweep", max_bytes=8000, disk_dir=os.environ["SWEEP_DISK"])
    cache.put(KEY, AUDIO, 8000).release()
    return cache


def spilled_setup():
    cache = spill_setup()
    cache.put(SPILLED_KEY, AUDIO, 8000).release()  # KEY goes to the disk tier
    return cache


def stored_setup():
    cache = AudioCache("killsweep", max_bytes=1 << 20)
    cache.put(KEY, AUDIO, 8000).release()
    return cache


def pool_op(_):
    with AudioPool(slots=2, max_bytes=8192) as pool:
        pool.write_wav(AUDIO, 8000).release()


def anonymous_op(_):
    with create_wav_buffer(len(AUDIO), 8000, anonymous=True) as buf:
        buf.array[:] = AUDIO


def anonymous_pool_op(_):
    with AudioPool(slots=2, max_bytes=8192, anonymous=True) as pool:
        pool.write_wav(AUDIO, 8000).release()


def read_float_op(path):
    data, _ = read_wav(path, dtype="float32")
    if not np.array_equal(data, AUDIO / np.float32(32768)):
        raise AssertionError("wrong audio")


def same(data):
    if not np.array_equal(data, AUDIO):
        raise AssertionError(f"wrong audio: {len(data)} frames")


def read_op(mmap):
    def run(path):
        data, _ = read_wav(path, mmap=mmap)
        same(data)
    return run


def follow_op(path):
    same(np.concatenate(list(follow_wav(path, timeout=5))))


def handoff_setup():
    buf = create_wav_buffer(len(AUDIO), 8000, anonymous=True)
    buf.array[:] = AUDIO
    return buf, *socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def handoff_op(state):
    buf, sender, receiver = state
    send_wav(sender, buf)
    data, _ = recv_wav(receiver)
    same(data)


def cache_get(cache):
    got = cache.get(KEY, timeout=5)
    if got is None:
        return "miss"
    with got:
        same(got.array)
    return "hit"


# name: (set-up, the operation, the run again or None for the operation itself,
#        a settling step before the last fd listing or None)
OPS = {
    "write_wav-new": (None, lambda _: write_wav(None, AUDIO, 8000), None, None),
    "write_wav-atomic-replace": (
        None, lambda _: write_wav(TARGET, AUDIO, 8000, atomic=True), None, None),
    "write_wav-plain-replace": (None, lambda _: write_wav(TARGET, AUDIO, 8000), None, None),
    "save_temp_audio": (None, lambda _: save_temp_audio(ENCODED), None, None),
    # Mutable chunks are written one by one (a client may reuse its buffer).
    "save_temp_audio-stream": (None, lambda _: save_temp_audio(
        bytearray(ENCODED[start:start + 2000]) for start in (0, 2000, 4000)), None, None),
    "WavWriter": (None, writer_op, None, None),
    "WavWriter-replace": (lambda: TARGET, writer_op, None, None),
    "create_wav_buffer-replace": (lambda: TARGET, buffer_op, None, None),
    "create_wav_buffer": (None, buffer_op, None, None),
    "create_wav_buffer-prefaulted": (prefault_setup, buffer_op, None, prefault_settle),
    "AudioPool": (None, pool_op, None, None),
    # An unused file of ours, moved aside to a hidden name, checked there and removed.
    "cleanup_all_temp_audio": (lambda: write_wav(None, AUDIO, 8000),
                               lambda _: cleanup_all_temp_audio(),
                               lambda _: (write_wav(None, AUDIO, 8000),
                                          cleanup_all_temp_audio())[1], None),
    "AudioCache.put": (lambda: AudioCache("killsweep", max_bytes=1 << 20),
                       lambda cache: cache.put(KEY, AUDIO, 8000).release(), None, None),
    "AudioCache.put-spilling": (spill_setup,
                                lambda cache: cache.put(SPILLED_KEY, AUDIO, 8000).release(),
                                None, None),
    "AudioCache.get_or_render": (
        lambda: AudioCache("killsweep", max_bytes=1 << 20),
        lambda cache: cache.get_or_render(KEY, render, samplerate=8000).release(), None, None),
    "read_wav": (lambda: write_wav(None, AUDIO, 8000), read_op(True), None, None),
    "read_wav-copy": (lambda: write_wav(None, AUDIO, 8000), read_op(False), None, None),
    "follow_wav": (lambda: write_wav(None, AUDIO, 8000), follow_op, None, None),
    "send_wav-recv_wav": (handoff_setup, handoff_op, None, None),
    "cleanup_temp_audio": (lambda: write_wav(None, AUDIO, 8000), cleanup_temp_audio,
                           lambda _: cleanup_temp_audio(write_wav(None, AUDIO, 8000)), None),
    "get_temp_audio_path-create": (None, lambda _: get_temp_audio_path(create=True), None, None),
    "create_wav_buffer-anonymous": (None, anonymous_op, None, None),
    "read_wav-float32": (lambda: write_wav(None, AUDIO, 8000), read_float_op, None, None),
    "AudioPool-anonymous": (None, anonymous_pool_op, None, None),
    "AudioCache.get": (stored_setup, cache_get, None, None),
    "AudioCache.get-disk": (spilled_setup, cache_get, None, None),
}


def outcome(run, state):
    try:
        result = run(state)
    except BaseException as exc:
        return {"ok": False, "types": [t.__name__ for t in type(exc).__mro__],
                "errno": getattr(exc, "errno", None),
                "filename": str(getattr(exc, "filename", None)), "text": str(exc),
                "where": [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                          for f in traceback.extract_tb(exc.__traceback__)[-4:]]}
    return {"ok": True, "result": result if isinstance(result, (bool, int, str)) else None}


def snapshot(label):
    # The top level of both private dirs as the operation left it, for the test to read.
    for side in ("ram", "fallback"):
        directory = os.environ["LUNA_SHM_DIR" if side == "ram" else "TMPDIR"]
        copy = os.path.join(os.environ["SWEEP_SNAPSHOTS"], label, side)
        os.makedirs(copy)
        for entry in os.scandir(directory):
            if entry.is_file(follow_symlinks=False):
                shutil.copyfile(entry.path, os.path.join(copy, entry.name))


def child(mode, setup, run, again, settle):
    state = setup() if setup else None
    if mode == "error":
        signal.alarm(60)  # a hang ends the child (SIGALRM), which the test reports
        before = FD_BASELINE.pop() if FD_BASELINE else open_fds()
        snapshot("before")
    print("ready", os.getpid(), flush=True)
    os.read(go_read, 1)
    os.access("/luna-syscall-sweep-begin", os.F_OK)
    if mode == "kill":
        run(state)
        os.access("/luna-syscall-sweep-end", os.F_OK)
        return
    first = outcome(run, state)
    os.access("/luna-syscall-sweep-end", os.F_OK)
    after = open_fds()
    snapshot("after")
    second = outcome(again or run, state)
    if settle:
        settle(state)
    report = {"outcome": first, "again": second, "fds_before": before, "fds_after": after,
              "fds_end": open_fds()}
    os.write(1, f"report {json.dumps(report)}\n".encode())


for line in sys.stdin:
    mode, op = line.split()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        child(mode, *OPS[op])
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

    def round(self, op: str, strace: list[str], mode: str = "kill"
              ) -> tuple[int, dict[str, Any] | None]:
        """Fork a child for op in mode ("kill" or "error"), run it under strace (these
        arguments, -p added), and return its wait status and its report (error mode)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{mode} {op}\n")
        self.process.stdin.flush()
        ready = self.process.stdout.readline().split()
        assert ready[:1] == ["ready"], f"the child of {op} failed its set-up: {ready}"
        tracer = subprocess.Popen([*strace, "-p", ready[1]], stderr=subprocess.PIPE,
                                  text=True)
        report = None
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
            status = self.process.stdout.readline().split(maxsplit=1)
            if status[:1] == ["report"]:
                report = json.loads(status[1])
                status = self.process.stdout.readline().split()
            assert status[:1] == ["status"], f"the zygote failed: {status}"
        finally:
            try:
                tracer.wait(timeout=60)  # strace ends with its tracee
            except subprocess.TimeoutExpired:
                tracer.kill()
                tracer.wait()
            tracer.stderr.close()  # type: ignore[union-attr]
        return int(status[1]), report


@contextmanager
def zygote(target: Path, disk: Path, snapshots: Path | None = None) -> Iterator[Zygote]:
    """The zygote, its children's RAM dir and fallback dir those of the test (the
    ``private_dirs`` fixture's environment); target is the given path of the replacing
    operations, disk the cache's disk tier, snapshots where error-mode children copy
    the dirs to."""
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH, "PYTHONDONTWRITEBYTECODE": "1",
           "OPENBLAS_NUM_THREADS": "1", "SWEEP_TARGET": str(target),
           "SWEEP_DISK": str(disk), "SWEEP_SNAPSHOTS": str(snapshots or "")}
    process = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield Zygote(process)
    finally:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        process.wait(timeout=60)
        process.stdout.close()


def strace_path() -> str:
    """strace, or a skip saying it is missing."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (the sweeps act at each system call with it)")
    return strace


_ENTRY = re.compile(r"^(\d+) +([a-z0-9_]+)\(")  # strace pads short pids


MARKER_CALLS = ("access", "faccessat", "faccessat2")


def recorded_points(log: str) -> list[tuple[str, int]]:
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
        if main is None and name in MARKER_CALLS and BEGIN in line:
            main = pid
        if pid == main and name in MARKER_CALLS and END in line:
            break
    assert main is not None and points and points[-1][0] in MARKER_CALLS, (
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


TEMP_WAV = re.compile(r"luna_audio_[0-9a-f]{32}\.wav")
SLOT = re.compile(r"luna_audio_pool_[0-9a-f]{32}\.wav")
PARTIAL = re.compile(r"\.luna_audio_\.partial_[0-9a-f]{32}")


def is_prefix_of_whole_chunks(data: np.ndarray) -> bool:
    return len(data) in CHUNK_ENDS and np.array_equal(data, AUDIO[:len(data)])


def cache_dir(ram: Path) -> Path:
    return ram / f"luna_cache-{os.getuid()}-{CACHE}"


_ENTRY_NAME = re.compile(r"[a-z]{64}\.wav")


def check_cache(ram: Path, disk: Path | None, max_bytes: int) -> None:
    """Invariant 4: every entry is whole; a new AudioCache opens without hanging, sweeps
    the in-flight files of both tiers, agrees with the files about what it holds, and
    gives each key's exact audio or a miss. A failed render's note for its waiters
    (``<key>.outcome``) stays until it is old (see AudioCache); ``destroy()`` removes it."""
    tiers = [cache_dir(ram), *([cache_dir(disk)] if disk else [])]
    entries = {tier: [n for n in files_in(tier) if _ENTRY_NAME.fullmatch(n)] for tier in tiers}
    for tier, names in entries.items():
        for name in names:
            np.testing.assert_array_equal(read_both(tier / name), AUDIO)
    cache = call_with_deadline(lambda: AudioCache(CACHE, max_bytes=max_bytes, disk_dir=disk),
                               30)
    try:
        for tier, names in entries.items():
            left = [n for n in files_in(tier)
                    if n != "lock" and n not in names and not n.endswith(".outcome")]
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


def clean(op: str, ram: Path, fallback: Path, target: Path, disk: Path | None) -> None:
    """Invariant 2: the documented cleaner removes every leftover; then nothing of ours."""
    if op == "AudioPool":
        call_with_deadline(lambda: AudioPool(slots=1, max_bytes=8192).close(), 30)
        slots = [n for n in files_in(ram) if SLOT.fullmatch(n)]
        assert slots == [], f"a new pool left a dead pool's slots: {slots}"
    cleanup_all_temp_audio()
    kept = [target.name] if target.exists() else []
    assert files_in(ram) == kept and files_in(fallback) == []
    assert disk is None or files_in(disk) == []
