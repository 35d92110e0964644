"""A randomized soak: users of mappings in threads while hostile processes cut and rewrite
their files, with workers killed (SIGKILL) and paused (SIGSTOP/SIGCONT) at random.

Each promise of the SIGBUS guard has its deterministic test (test_fault_guard.py,
test_reliability_hostile.py); this runs them together, to find the interleavings those
miss: a fault in one thread while another maps, unmaps, closes or collects a mapping.
In the private dirs of the private_dirs fixture (the workers inherit LUNA_SHM_DIR and
TMPDIR), tests/hostile_soak_workers.py runs:

- users (separate processes, 2-4 threads each, some with the prefault reserve on): read_wav
  of write_wav files (views, some read again and again for a while, some handed to
  another thread to check and drop, and copies), write_wav of such a view and
  read_wav(out=) into a named buffer (the C layer's EFAULT path), named and anonymous
  WavBuffers filled and read back (and truncated), AudioPool slots of two prefixes
  written (write_wav, or acquire and its array, then PooledWav.truncate) and read
  (PooledWav.array, read_wav of the slot), a pool shared by the threads that one of them
  closes now and then, send_wav/recv_wav inside a process and to another user's Unix
  socket, WavWriter streams read back and followed by follow_wav in another thread; about
  40% run a hostile thread too;
- a hostile process that picks files in the private dirs at random and truncates them
  (to 0, mid-header, anywhere, a page boundary), cuts and extends them back, rewrites
  them (truncate + other bytes; soundfile.write's bytes and soundfile.write itself),
  appends to them or extends them.

What is accepted (README "Errors" and "Limits", the docstrings of WavBuffer.array,
PooledWav, read_wav, WavWriter.write, follow_wav, send_wav, recv_wav):

- what a user reads back is exact (dtype, shape, samplerate, every byte) when no hostile
  touched its file (a hostile logs each file, by name and by st_dev/st_ino, before it
  touches it: a cleanup moves a file to a hidden name for an instant before the unlink,
  where a hostile may cut it) and always for anonymous buffers and slots (sealed memfds:
  they cannot be cut and are in no dir);
- a file a hostile touched may read, byte by byte, as what the user wrote, zeros (a
  mapping whose pages were cut became zero pages; a cut extended back reads zeros), or the
  hostile's bytes at that offset (a rewrite that put the bytes back before any touch is
  seen through the mapping; a read after a rewrite reads the new file), with the data
  starting where a WAV of ours or the hostile's WAV has it. Anything else is garbage.
  (A hostile's bytes are known to every process: seeded random bytes and soundfile WAVs;
  soundfile.write itself writes only the 16-bit one, since a float WAV's PEAK chunk holds
  the time it was written);
- errors: OSError(ESTALE) whose filename is the path from WavBuffer.array/.truncate,
  PooledWav.array, send_wav, WavWriter.write; WavError naming the path (a file that is
  no whole WAV any more, a follower's "shrank/cut/rewritten under its follower"); another
  OSError whose filename is the path. Any other exception, or one not naming the file,
  is a violation; so is any worker's death but by the test's SIGKILL, and anything on
  a worker's stderr (PYTHONDEVMODE: ResourceWarnings too);
- each user's fds and mappings of our files (/proc/self/fd, /proc/self/maps) are back
  to their number after a warm-up once it closed everything (+0), and its fds and
  mapping lines in all within a small slack (4 fds; 40 + 8 a thread lines: thread
  stacks and malloc arenas);
- at the end, every process gone, cleanup_all_temp_audio() and a new pool's reclaim (of
  each of the two pool prefixes) leave both private dirs empty (hidden .luna_audio_*
  names too), but for slots of dead pools of the second prefix that a hostile touched:
  a reclaim removes only files that still look made by a pool (reclaim_dead_pool_files:
  "a file that holds anything is never touched"), and cleanup_all_temp_audio only
  luna_audio_ names.

LUNA_SOAK_SEED=<n> runs a seed again (the same choices; the scheduling differs),
LUNA_SOAK_SECONDS=<s> soaks longer (default 20).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostile_soak_workers import POOL_PREFIXES

from helpers import LIBRARY_PATH
from luna_shm import AudioPool, cleanup_all_temp_audio

WORKERS = str(Path(__file__).resolve().parent / "hostile_soak_workers.py")
ROLES = {"user": 3, "hostile": 1}
LONGEST_STOP = 2.0  # seconds; the follow and hand-off timeouts (10 s) are far above it
SHUTDOWN = 90.0  # seconds a worker has to finish once told to stop: a hang, not a pace


@dataclass
class Soak:
    """The running workers, and what the chaos thread did to them."""

    ctl: Path
    env: dict[str, str]
    rng: random.Random
    workers: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)
    ended: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    stops: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, role: str) -> None:
        seed = self.rng.getrandbits(48)
        err = open(self.ctl / "err" / f"{role}-{seed}.txt", "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen([sys.executable, WORKERS, role, str(self.ctl), str(seed)],
                                    env=self.env, stdout=err, stderr=err)
        finally:
            err.close()
        proc.err_path = err.name  # type: ignore[attr-defined]
        self.workers.append((role, proc))

    def chaos(self, done: threading.Event) -> None:
        """SIGKILL a random worker (and start another in its place), or SIGSTOP one for
        0.1-2 s, again and again until done."""
        rng = self.rng
        while not done.wait(rng.uniform(0.3, 1.2)):
            with self.lock:
                index = rng.randrange(len(self.workers))
                role, proc = self.workers[index]
                if rng.random() < 0.3:
                    self.killed.add(proc.pid)
                    proc.kill()
                    proc.wait()
                    self.ended.append(self.workers.pop(index))
                    self.start(role)
                    continue
            os.kill(proc.pid, signal.SIGSTOP)
            self.stops += 1
            try:
                done.wait(rng.uniform(0.1, LONGEST_STOP))
            finally:
                os.kill(proc.pid, signal.SIGCONT)


def _records(ctl: Path) -> list[dict[str, Any]]:
    records = []
    for out in sorted((ctl / "out").iterdir()):
        for line in out.read_text(encoding="utf-8").splitlines():
            records.append(json.loads(line))  # a killed worker's lines are whole: one write
    return records


def test_mappings_used_in_threads_while_hostile_processes_cut_and_rewrite_their_files(
        private_dirs, tmp_path) -> None:
    seed = int(os.environ.get("LUNA_SOAK_SEED") or random.SystemRandom().getrandbits(32))
    seconds = float(os.environ.get("LUNA_SOAK_SECONDS") or 20)
    print(f"hostile soak: seed {seed}, {seconds} s (again: LUNA_SOAK_SEED={seed})")
    ctl = tmp_path / "ctl"
    for sub in ("out", "err", "sock"):
        (ctl / sub).mkdir(parents=True)
    (ctl / "touched").touch()
    env = dict(os.environ, PYTHONPATH=LIBRARY_PATH)
    soak = Soak(ctl, env, random.Random(seed))
    for role, count in ROLES.items():
        for _ in range(count):
            soak.start(role)
    done = threading.Event()
    chaos = threading.Thread(target=soak.chaos, args=(done,))
    chaos.start()
    try:
        done.wait(seconds)
    finally:
        done.set()
        chaos.join()
        (ctl / "stop").touch()
        stopping = time.monotonic()
        hung = []
        deadline = time.monotonic() + SHUTDOWN
        for role, proc in soak.workers:
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung.append(f"{role} {proc.pid} did not stop within {SHUTDOWN} s")
                proc.kill()
                proc.wait()
    soak.ended.extend(soak.workers)
    print(f"every worker stopped {time.monotonic() - stopping:.1f} s after being told to")

    failures = list(hung)
    for role, proc in soak.ended:
        err = Path(proc.err_path).read_text(errors="replace")  # type: ignore[attr-defined]
        if err:
            failures.append(f"{role} {proc.pid} wrote to stderr: {err[-3000:]}")
        if proc.pid in soak.killed or proc.returncode == 0:
            continue
        failures.append(f"{role} {proc.pid} exited with {proc.returncode}"
                        + (" (SIGBUS: the guard let a fault through)"
                           if proc.returncode == -signal.SIGBUS else ""))
    records = _records(ctl)
    # Each kind of violation once (its first record), with how often it was seen.
    kinds: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if "violation" in r:
            kinds.setdefault(r["violation"], []).append(r)
    failures += [f"{len(rs)} x {json.dumps(rs[0])[:3000]}" for rs in kinds.values()]

    # Every process is gone: one cleanup and a new pool's reclaim leave nothing of ours.
    cleanup_all_temp_audio()
    for prefix in POOL_PREFIXES:
        with AudioPool(slots=1, max_bytes=4096, prefix=prefix):
            pass
    touched = {json.loads(line)[0] for line in
               (ctl / "touched").read_text(encoding="utf-8").splitlines()}
    left, kept = [], []
    for directory in (private_dirs.ram, private_dirs.fallback):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            # A dead pool's slot under a prefix of its own that a hostile rewrote: a
            # reclaim removes only files that still look made by a pool (documented).
            if name.startswith(f"{POOL_PREFIXES[1]}pool_") and path in touched:
                kept.append(name)
            else:
                left.append(name)
    if left:
        failures.append(f"files left after the final cleanup and reclaim: {left}")

    # The last counts each process reported (a killed one's too).
    last: dict[int, dict[str, int]] = {r["pid"]: r["counts"] for r in records if "counts" in r}
    counts: dict[str, int] = {}
    for each in last.values():
        for key, n in each.items():
            counts[key] = counts.get(key, 0) + n
    ends = [r for r in records if r.get("event") == "end" and "before" in r]
    summary = (f"seed {seed}: {len(soak.ended)} processes, {len(soak.killed)} killed, "
               f"{soak.stops} stopped; {len(ends)} users ended normally; {len(kept)} dead "
               f"{POOL_PREFIXES[1]} slots a hostile touched left to their owner")
    print(summary)
    for key in sorted(counts):
        print(f"  {key}: {counts[key]}")
    for r in ends:
        print("  fds/maps before -> after:", r["before"], r["after"])
    assert not failures, f"LUNA_SOAK_SEED={seed}: {summary}\n" + "\n".join(failures[:30])
    # The soak did something: the hostiles touched files, and users read touched files.
    assert sum(n for k, n in counts.items() if k.startswith("hostile")) > 0, summary
    assert sum(n for k, n in counts.items() if k.endswith((" touched", "ESTALE"))) > 0, summary
