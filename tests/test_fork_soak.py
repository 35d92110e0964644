"""A randomized soak: processes that fork while their other threads are busy in luna_shm.

Each promise about fork has its deterministic test (test_fork.py: a lock held by another
thread across the fork, a fork from a signal handler, a child leaving a render or a
temp_audio_path block); this runs them together to find what those miss: a fork at any
moment of any call of any thread. In the private dirs of the private_dirs fixture (the
workers inherit LUNA_SHM_DIR and TMPDIR), tests/fork_soak_workers.py runs as a TTS daemon
that forks workers:

- 3-5 threads loop over random public-API calls on their own objects and shared ones:
  write_wav/read_wav (views and copies), create_wav_buffer (named and anonymous), with the
  prefault reserve on in 60% of the workers, a named and an anonymous AudioPool
  (write_wav, acquire, release), WavWriter streams followed by follow_wav or
  iter_wav_stream as another thread writes them, an AudioCache shared by every worker
  (get_or_render with renders in progress, put, get), send_wav/recv_wav over
  socketpairs, get_temp_audio_path(create=True), temp_audio_path blocks and
  cleanup_all_temp_audio. Each checks that what it reads back is exact, and that
  cleanup_temp_audio removes a file nothing holds any more (retried for a few seconds only
  while a holder is a child not yet past its at-fork hooks, which close its copies).
- The main thread makes calls too, and forks at random moments (os.fork, sometimes inside
  a temp_audio_path block, or a multiprocessing worker of the fork start method), and so
  does its SIGUSR1 handler (sent by a thread of the worker and by this test). A handler
  that interrupted a fork's at-fork hooks has its child leave by os._exit: Python only
  prints an exception that leaves a hook, and the child would go on with the fork. Each
  child, under a watchdog (faulthandler: a hang writes every thread's stack and exits),
  uses what it inherited (each use must raise RuntimeError naming the parent's pid and the
  child's, but the AudioCache's: README, Limits, a forked child may use its parent's
  AudioCache), makes and uses its own objects of every kind
  above (in one or two threads, the reserve on or not), then closes or drops what it
  inherited, or not, and leaves by sys.exit, the end of the script, os._exit or an
  exception (from a signal handler, these unwind the parent's call the handler
  interrupted: a temp_audio_path block, a render, a pool call...).
- The parent checks each child's exit code, that no watchdog fired, then its own kept
  files (a named WavBuffer, a pool slot it holds, a WavWriter stream it follows, a
  pinned cache entry): each still there with its content and its flock (a cleanup from
  another process would see it in use), and each object still works with exact data.

This test SIGKILLs a worker's process group (the worker and its children) now and then and
starts another. At the end: every worker stopped with exit 0 (but the killed ones),
nothing on any process's stderr (PYTHONDEVMODE: ResourceWarnings count), no violation;
with every process gone, cleanup_all_temp_audio() and a new AudioPool's reclaim leave the
private dirs empty of our files (hidden .luna_audio_* names too; the plain files the
workers made under their own prefix, unheld, are removed by cleanup_temp_audio), and the
AudioCache the workers used agrees with its files and holds every key's exact audio.

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

import numpy as np
import pytest
from fork_soak_workers import CACHE_NAME, KEYS, PLAIN_PREFIX, key_audio

from helpers import LIBRARY_PATH, MULTITHREADED_FORK_IS_MEANT, call_with_deadline
from luna_shm import AudioCache, AudioPool, cleanup_all_temp_audio, cleanup_temp_audio

WORKERS = str(Path(__file__).resolve().parent / "fork_soak_workers.py")
WORKER_COUNT = 3
SHUTDOWN = 120.0  # seconds a worker has to finish once told to stop (a child may take 90)


@dataclass
class Soak:
    """The running workers, and what the chaos thread did to them."""

    ctl: Path
    env: dict[str, str]
    rng: random.Random
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)
    ended: list[subprocess.Popen[bytes]] = field(default_factory=list)
    signals: int = 0

    def start(self) -> None:
        seed = self.rng.getrandbits(48)
        err = open(self.ctl / "err" / f"worker-{seed}.txt", "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [sys.executable, "-W", MULTITHREADED_FORK_IS_MEANT, WORKERS, str(self.ctl),
                 str(seed)], env=self.env, stdout=err, stderr=err, start_new_session=True)
        finally:
            err.close()
        self.workers.append(proc)

    def ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """Whether the worker set up its SIGUSR1 handler (before, the signal kills it)."""
        out = self.ctl / "out" / f"{proc.pid}.jsonl"
        return out.exists() and '"event": "ready"' in out.read_text(encoding="utf-8")

    def chaos(self, done: threading.Event) -> None:
        """Now and then SIGKILL a worker and its children (its process group) and start
        another; more often send one SIGUSR1 (its handler forks)."""
        rng = self.rng
        while not done.wait(rng.uniform(0.1, 0.6)):
            index = rng.randrange(len(self.workers))
            proc = self.workers[index]
            if rng.random() < 0.08:
                self.killed.add(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                self.ended.append(self.workers.pop(index))
                self.start()
            elif self.ready(proc):
                os.kill(proc.pid, signal.SIGUSR1)
                self.signals += 1


def records(ctl: Path) -> list[dict[str, Any]]:
    found = []
    for out in sorted((ctl / "out").iterdir()):
        for line in out.read_text(encoding="utf-8").splitlines():
            found.append(json.loads(line))  # a killed worker's lines are whole: one write
    return found


def check_the_cache(seed: int) -> list[str]:
    """The cache the workers used opens, agrees with its files and gives every key's exact
    audio; then it is destroyed. Its problems, as lines."""
    problems = []
    cache = call_with_deadline(lambda: AudioCache(CACHE_NAME, max_bytes=120_000,
                                                  timeout=30), 90)
    assert isinstance(cache, AudioCache)
    try:
        directory = Path(cache.directory)
        sizes = [p.stat().st_size for p in directory.iterdir() if p.suffix == ".wav"]
        stats = cache.stats(timeout=30)
        if (stats.entries, stats.bytes) != (len(sizes), sum(sizes)) or stats.pinned:
            problems.append(f"the cache disagrees with its files: {stats}, files {sizes}")
        for index, key in enumerate(KEYS):
            entry = cache.get(key, timeout=30)
            if entry is not None:
                with entry:
                    if not np.array_equal(entry.array, key_audio(index)):
                        problems.append(f"the cache's entry of key {index} is not its audio")
    finally:
        cache.destroy()
    return problems


# Not in `make test` yet (LUNA_FORK_SOAK=1 runs it): new on 2026-12-06, when it found four
# fork bugs and, after their fixes, passed 19 of 20 runs of 20 s. The failure is open: a
# child iterating an inherited follower that another parent thread was iterating at the
# fork gets Python's "generator already executing" ValueError, not the RuntimeError.
@pytest.mark.skipif(os.environ.get("LUNA_FORK_SOAK") != "1",
                    reason="opt-in until it has a longer record: LUNA_FORK_SOAK=1")
def test_forks_at_random_moments_of_threads_busy_in_luna_shm_never_hang_or_touch_the_parent(
        private_dirs, tmp_path) -> None:
    seed = int(os.environ.get("LUNA_SOAK_SEED") or random.SystemRandom().getrandbits(32))
    seconds = float(os.environ.get("LUNA_SOAK_SECONDS") or 20)
    print(f"fork soak: seed {seed}, {seconds} s (again: LUNA_SOAK_SEED={seed})")
    ctl = tmp_path / "ctl"
    for sub in ("out", "err"):
        (ctl / sub).mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=LIBRARY_PATH)
    soak = Soak(ctl, env, random.Random(seed))
    for _ in range(WORKER_COUNT):
        soak.start()
    done = threading.Event()
    chaos = threading.Thread(target=soak.chaos, args=(done,))
    chaos.start()
    hung = []
    try:
        done.wait(seconds)
    finally:
        done.set()
        chaos.join()
        (ctl / "stop").touch()
        deadline = time.monotonic() + SHUTDOWN
        for proc in soak.workers:
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung.append(f"worker {proc.pid} did not stop within {SHUTDOWN} s (its "
                            "threads' stacks are in its err file)")
                os.kill(proc.pid, signal.SIGUSR2)  # faulthandler: every thread's stack
                time.sleep(1)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            else:
                try:  # children it left behind, if any (there should be none)
                    os.killpg(proc.pid, signal.SIGKILL)
                    hung.append(f"worker {proc.pid} left processes behind")
                except ProcessLookupError:
                    pass
    soak.ended.extend(soak.workers)

    failures = list(hung)
    for err in sorted((ctl / "err").iterdir()):
        text = err.read_text(errors="replace")
        if text:
            failures.append(f"{err.name}: {text[-4000:]}")
    for proc in soak.ended:
        if proc.pid not in soak.killed and proc.returncode != 0:
            failures.append(f"worker {proc.pid} exited with {proc.returncode}")
    found = records(ctl)
    kinds: dict[str, list[dict[str, Any]]] = {}
    for r in found:
        if "violation" in r:
            kinds.setdefault(r["violation"], []).append(r)
    failures += [f"{len(rs)} x {json.dumps(rs[0])[:4000]}" for rs in kinds.values()]

    # Every process is gone: the cache agrees with its files; one cleanup and a new pool's
    # reclaim leave nothing of ours (the plain files of killed workers: by their name).
    failures += check_the_cache(seed)
    cleanup_all_temp_audio()
    with AudioPool(slots=1, max_bytes=4096):
        pass
    plain = 0
    for directory in (private_dirs.ram, private_dirs.fallback):
        for name in os.listdir(directory):
            if name.startswith(PLAIN_PREFIX):
                plain += cleanup_temp_audio(os.path.join(directory, name))
    left = sorted(os.listdir(private_dirs.ram)) + sorted(os.listdir(private_dirs.fallback))
    if left:
        failures.append(f"files left after the final cleanup and reclaim: {left}")

    last: dict[int, dict[str, int]] = {r["pid"]: r["counts"] for r in found if "counts" in r}
    counts: dict[str, int] = {}
    for each in last.values():
        for key, n in each.items():
            counts[key] = counts.get(key, 0) + n
    children = [r for r in found if r.get("event") == "child"]
    leaves: dict[str, int] = {}
    for r in children:
        leave = f"{r['plan']['leave']}, inherited {r['plan']['inherited_then']}"
        leaves[leave] = leaves.get(leave, 0) + 1
    ends = sum(r.get("event") == "end" for r in found)
    summary = (f"seed {seed}: {len(soak.ended)} workers, {len(soak.killed)} killed, "
               f"{ends} ended normally; {soak.signals} SIGUSR1 from the test; "
               f"{len(children)} children reached their leaving; {plain} plain files of "
               "killed workers removed at the end")
    print(summary)
    for key in sorted(counts):
        print(f"  {key}: {counts[key]}")
    for key in sorted(leaves):
        print(f"  children leaving by {key}: {leaves[key]}")
    assert not failures, f"LUNA_SOAK_SEED={seed}: {summary}\n" + "\n".join(failures[:30])
    # The soak did something: children of both kinds of fork left, in every way.
    assert ends > 0 and counts.get("child exited (by a signal handler)", 0) > 0, summary
    assert counts.get("child exited (by the main thread)", 0) > 0, summary
