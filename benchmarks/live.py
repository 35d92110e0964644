"""Live streams across processes, side by side with a pipe, in one run (issue 11, section 5).

``python benchmarks/live.py [--quick]`` prints the table; ``benchmarks/test_live.py``
runs the same measurements under pytest (``make bench``) and checks the targets.

- Hand-off latency: from ``writer.write(chunk)`` returning to a follower in another
  process holding that chunk's array, 20 ms chunks of 24 kHz int16, 1 and 8
  followers; beside it the same chunks through a pipe (one per reader).
- First audio of a 3 s utterance rendered in 20 ms chunks at real time: live follow
  against write-then-read of the whole file.
- CPU time of an idle follower over 10 s of no progress.
- Throughput: a writer as fast as it can, a follower in another process; against
  the same bytes through a pipe.

Times are CLOCK_MONOTONIC, one clock for every process of the machine. Numbers from
one run on one (shared) machine are only that.
"""

from __future__ import annotations

import json as _json
import os as _os
import subprocess as _subprocess
import sys as _sys
import time as _time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import cases as bench
from luna_shm import WavWriter, read_wav, write_wav

RATE = 24000
CHUNK = 480  # 20 ms of 24 kHz
CHUNK_BYTES = CHUNK * 2
REAL_TIME = 0.020  # a renderer at real time hands over a 20 ms chunk every 20 ms

# A follower process: "ready", then (frames so far, time held) for every block.
_FOLLOWER = """
import json, sys, time
from luna_shm import follow_wav
print("ready", flush=True)
marks, frames = [], 0
for block in follow_wav(sys.argv[1], timeout=60):
    now = time.monotonic()
    frames += len(block)
    marks.append((frames, now))
print(json.dumps(marks))
"""

# A pipe reader: "ready", then reads whole chunks of CHUNK_BYTES into new arrays.
_PIPE_READER = """
import json, sys, time
import numpy as np
chunk = int(sys.argv[1])
stdin = sys.stdin.buffer
print("ready", flush=True)
marks, frames = [], 0
while True:
    block = np.empty(chunk // 2, np.int16)
    n = stdin.readinto(memoryview(block).cast("B"))
    if not n:
        break
    assert n == chunk, n
    now = time.monotonic()
    frames += len(block)
    marks.append((frames, now))
print(json.dumps(marks))
"""

# A pipe reader that only counts (throughput).
_PIPE_COUNTER = """
import json, sys, time
stdin = sys.stdin.buffer
print("ready", flush=True)
total = 0
buf = bytearray(1 << 16)
while n := stdin.readinto(buf):
    total += n
print(json.dumps([total // 2, time.monotonic()]))
"""

_COUNTER = """
import json, sys, time
from luna_shm import follow_wav
print("ready", flush=True)
frames = blocks = 0
for block in follow_wav(sys.argv[1], timeout=60):
    frames += len(block)
    blocks += 1
print(json.dumps([frames, time.monotonic(), blocks]))
"""


def _spawn(code: str, *args: str, stdin: bool = False) -> _subprocess.Popen[str]:
    child = _subprocess.Popen([_sys.executable, "-c", code, *args], text=True,
                              stdout=_subprocess.PIPE,
                              stdin=_subprocess.PIPE if stdin else None)
    assert child.stdout is not None
    if child.stdout.readline() != "ready\n":
        raise RuntimeError("a benchmark child did not start")
    return child


def _report(child: _subprocess.Popen[str]) -> object:
    assert child.stdout is not None
    if child.stdin is not None and not child.stdin.closed:
        child.stdin.close()
    out = child.stdout.read()
    child.stdout.close()
    child.wait(timeout=120)
    if child.returncode != 0:
        raise RuntimeError(f"a benchmark child failed ({child.returncode})")
    return _json.loads(out)


def _chunk(i: int) -> np.ndarray:
    return np.full(CHUNK, i % 32000, np.int16)


def _latencies(returned: Sequence[float], marks: list[list[float]]) -> list[float]:
    """Per chunk: when a follower held its last frame minus when write() returned."""
    out = []
    j = 0
    for i, t_write in enumerate(returned):
        need = (i + 1) * CHUNK
        while marks[j][0] < need:
            j += 1
        out.append(marks[j][1] - t_write)
    return out


@dataclass(frozen=True)
class Latency:
    """Hand-off latencies (seconds) of one method with some followers."""

    method: str
    followers: int
    values: list[float]

    @property
    def p50(self) -> float:
        return bench.percentile(self.values, 50)

    @property
    def p99(self) -> float:
        return bench.percentile(self.values, 99)


def handoff_latency(directory: str, followers: int, chunks: int = 300,
                    gap: float = 0.005) -> Latency:
    """Chunks written every gap seconds; latency to each of followers processes."""
    path = _os.path.join(directory, f"handoff-{followers}.wav")
    returned: list[float] = []
    with WavWriter(path, RATE) as writer:
        children = [_spawn(_FOLLOWER, path) for _ in range(followers)]
        _time.sleep(0.3)  # every follower has read the header and sleeps in poll()
        for i in range(chunks):
            writer.write(_chunk(i))
            returned.append(_time.monotonic())
            _time.sleep(gap)
    values: list[float] = []
    for child in children:
        marks = _report(child)
        assert isinstance(marks, list) and marks[-1][0] == chunks * CHUNK, "frames lost"
        values += _latencies(returned, marks)
    _os.unlink(path)
    return Latency("follow_wav", followers, values)


def pipe_latency(followers: int, chunks: int = 300, gap: float = 0.005) -> Latency:
    """The same chunks written to one pipe per reader process."""
    children = [_spawn(_PIPE_READER, str(CHUNK_BYTES), stdin=True) for _ in range(followers)]
    _time.sleep(0.3)
    returned: list[float] = []
    pipes = [child.stdin.fileno() for child in children if child.stdin is not None]
    for i in range(chunks):
        data = _chunk(i)
        for fd in pipes:
            _os.write(fd, data)  # type: ignore[arg-type]
        returned.append(_time.monotonic())
        _time.sleep(gap)
    values: list[float] = []
    for child in children:
        marks = _report(child)
        assert isinstance(marks, list) and marks[-1][0] == chunks * CHUNK, "frames lost"
        values += _latencies(returned, marks)
    return Latency("pipe", followers, values)


@dataclass(frozen=True)
class FirstAudio:
    """First-audio times (seconds after the first chunk was ready), per run."""

    live: list[float]
    whole_file: list[float]


_WHOLE_READER = """
import json, sys, time
from luna_shm import read_wav
print("ready", flush=True)
path = sys.stdin.readline().strip()
data, rate = read_wav(path)
print(json.dumps([len(data), time.monotonic()]))
"""


def first_audio(directory: str, runs: int = 3, seconds: float = 3.0) -> FirstAudio:
    """A 3 s utterance rendered in 20 ms chunks at real time, followed live and handed off
    whole (write_wav after the last chunk, read_wav in a waiting process)."""
    live: list[float] = []
    whole: list[float] = []
    n = int(seconds * 50)
    for run in range(runs):
        path = _os.path.join(directory, f"first-{run}.wav")
        whole_path = _os.path.join(directory, f"whole-{run}.wav")
        reader = _spawn(_WHOLE_READER, stdin=True)
        parts: list[np.ndarray] = []
        with WavWriter(path, RATE) as writer:
            follower = _spawn(_FOLLOWER, path)
            _time.sleep(0.2)
            start = _time.monotonic()
            first_ready = 0.0
            for i in range(n):
                _time.sleep(max(0.0, start + (i + 1) * 0.020 - _time.monotonic()))
                chunk = _chunk(i)
                if i == 0:
                    first_ready = _time.monotonic()
                writer.write(chunk)
                parts.append(chunk)
        marks = _report(follower)
        assert isinstance(marks, list) and marks[-1][0] == n * CHUNK
        live.append(marks[0][1] - first_ready)
        write_wav(whole_path, np.concatenate(parts), RATE)
        assert reader.stdin is not None
        reader.stdin.write(whole_path + "\n")
        reader.stdin.flush()
        got = _report(reader)
        assert isinstance(got, list) and got[0] == n * CHUNK
        whole.append(got[1] - first_ready)
        _os.unlink(path)
        _os.unlink(whole_path)
    return FirstAudio(live, whole)


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process: from schedstat (nanoseconds) where the kernel has it, else
    from stat (clock ticks, 10 ms)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _os.sysconf("SC_CLK_TCK")


def idle_cpu(directory: str, seconds: float = 10.0) -> float:
    """CPU seconds an idle follower process uses over seconds of a live, silent stream."""
    path = _os.path.join(directory, "idle.wav")
    with WavWriter(path, RATE) as writer:
        writer.write(_chunk(0))
        child = _spawn(_FOLLOWER, path)
        _time.sleep(0.5)  # it has read the first chunk and sleeps
        before = _cpu_seconds(child.pid)
        _time.sleep(seconds)
        used = _cpu_seconds(child.pid) - before
    _report(child)
    _os.unlink(path)
    return used


@dataclass(frozen=True)
class Throughput:
    """Frames moved as fast as the writer can, and when the reader held the last one."""

    method: str
    mbytes: float
    writer_seconds: float
    reader_seconds: float  # from the first write to the reader holding the last frame
    lag_seconds: float  # from the last write returning to the reader holding it
    blocks: int

    @property
    def mb_per_s(self) -> float:
        return self.mbytes / self.reader_seconds


def throughput(directory: str, chunks: int = 20000) -> list[Throughput]:
    """follow_wav against a pipe: chunks of 20 ms written back to back."""
    data = [_chunk(i) for i in range(chunks)]
    mbytes = chunks * CHUNK_BYTES / 1e6
    path = _os.path.join(directory, "throughput.wav")
    with WavWriter(path, RATE) as writer:
        child = _spawn(_COUNTER, path)
        _time.sleep(0.3)
        start = _time.monotonic()
        for chunk in data:
            writer.write(chunk)
        end = _time.monotonic()
    frames, held, blocks = _report(child)  # type: ignore[misc]
    assert frames == chunks * CHUNK, "the follower lost frames"
    assert np.array_equal(read_wav(path)[0][::CHUNK], [c[0] for c in data])
    _os.unlink(path)
    live = Throughput("follow_wav", mbytes, end - start, held - start, held - end, blocks)

    reader = _spawn(_PIPE_COUNTER, stdin=True)
    assert reader.stdin is not None
    fd = reader.stdin.fileno()
    _time.sleep(0.3)
    start = _time.monotonic()
    for chunk in data:
        _os.write(fd, chunk)  # type: ignore[arg-type]
    end = _time.monotonic()
    frames, held = _report(reader)  # type: ignore[misc]
    assert frames == chunks * CHUNK
    pipe = Throughput("pipe", mbytes, end - start, held - start, held - end, chunks)
    return [live, pipe]


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f} µs"


def main(argv: Sequence[str]) -> int:
    quick = "--quick" in argv
    with bench.Workspace() as ws:
        directory = ws.ram
        machine = bench.describe_machine(ws)
        print("machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()))
        print(f"load average at start: {bench.loadavg()}")
        print("\nhand-off latency, write() returning -> follower holding the array "
              "(20 ms chunks, 24 kHz int16)")
        n = 100 if quick else 300
        for gap in (REAL_TIME, 0.001):
            print(f"  chunks written {gap * 1e3:g} ms apart:")
            for followers in (1, 8):
                for result in (handoff_latency(directory, followers, n, gap),
                               pipe_latency(followers, n, gap)):
                    print(f"    {result.method:10} {followers} follower(s): p50 "
                          f"{_us(result.p50)}   p99 {_us(result.p99)}   "
                          f"(n={len(result.values)})")
        fa = first_audio(directory, 1 if quick else 3)
        live, whole = sorted(fa.live)[len(fa.live) // 2], sorted(fa.whole_file)[len(fa.live) // 2]
        print(f"\nfirst audio of a 3 s utterance (median of {len(fa.live)}): live "
              f"{live * 1e3:.2f} ms, whole file {whole * 1e3:.1f} ms: {whole / live:.0f}x sooner")
        cpu = idle_cpu(directory, 2.0 if quick else 10.0)
        seconds = 2.0 if quick else 10.0
        print(f"\nidle follower: {cpu * 1e6:.0f} µs of CPU over {seconds:g} s "
              f"({cpu / seconds * 100:.4f}% of one core)")
        print("\nthroughput (writer as fast as it can):")
        for t in throughput(directory, 2000 if quick else 20000):
            print(f"  {t.method:10} {t.mbytes:.1f} MB: writer {t.writer_seconds * 1e3:.1f} ms, "
                  f"reader done {t.reader_seconds * 1e3:.1f} ms ({t.mb_per_s:.0f} MB/s), "
                  f"lag at the end {t.lag_seconds * 1e3:.2f} ms, {t.blocks} blocks")
        print(f"\nload average at end: {bench.loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(_sys.argv[1:]))
