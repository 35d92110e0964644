"""A randomized soak: live streams, followers, pools, hand-offs and cleanups all at once,
with workers killed (SIGKILL) and paused (SIGSTOP/SIGCONT) at random.

Each promise has its own tests elsewhere (test_follow.py, test_pool.py, test_handoff.py,
test_reliability_*.py); this runs them together, in separate processes, in the private
dirs of the private_dirs fixture (the workers inherit LUNA_SHM_DIR and TMPDIR):

- writers stream a seeded signal through WavWriter (path=None, or a get_temp_audio_path
  published before its file exists) in random chunks and pauses, and end each stream as
  done, aborted (abort() or an exception out of the with block) or by their own SIGKILL;
- followers follow published streams (follow_wav, afollow_wav, iter_wav_stream raw and
  wav, now and then leaving mid-stream) with a timeout far above the longest SIGSTOP: what
  they get must be an exact prefix of the stream's signal, whole frames, ending at the
  full signal, or with StreamAbandoned when the writer died or aborted (after every frame
  it wrote, when it aborted); a TimeoutError only for a file that is not there;
- pool workers write into AudioPool slots (two prefixes, sometimes anonymous), WavBuffers
  and plain write_wav files and read them back, and hand buffers over with send_wav/recv_wav;
- a cleaner runs cleanup_all_temp_audio (sometimes older_than), cleanup_temp_audio of
  published streams, dry runs and new pools' reclaims the whole time.

Writers and pool workers check that a file they hold is never removed. Every worker reports
a violation the moment it sees one (tests/stream_soak_workers.py). At the end, once every
process is gone, one cleanup_all_temp_audio() and a new pool's reclaim must leave both dirs
empty.

LUNA_SOAK_SEED=<n> runs a seed again (the same choices; the scheduling differs),
LUNA_SOAK_SECONDS=<s> soaks longer (default 25).
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

from helpers import LIBRARY_PATH
from luna_shm import AudioPool, cleanup_all_temp_audio

WORKERS = str(Path(__file__).resolve().parent / "stream_soak_workers.py")
ROLES = {"writer": 2, "follower": 3, "pool": 2, "cleaner": 1}
LONGEST_STOP = 2.0  # seconds; the followers' timeout (10 s) is far above it
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
        while not done.wait(rng.uniform(0.2, 0.8)):
            with self.lock:
                index = rng.randrange(len(self.workers))
                role, proc = self.workers[index]
                if proc.poll() is not None:  # it ended by itself (a writer's own SIGKILL)
                    self.ended.append(self.workers.pop(index))
                    self.start(role)
                    continue
                if rng.random() < 0.35:
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


def test_streams_pools_and_cleanups_soaked_with_kills_and_stops_break_no_promise(
        private_dirs, tmp_path) -> None:
    seed = int(os.environ.get("LUNA_SOAK_SEED") or random.SystemRandom().getrandbits(32))
    seconds = float(os.environ.get("LUNA_SOAK_SECONDS") or 25)
    print(f"stream soak: seed {seed}, {seconds} s (again: LUNA_SOAK_SEED={seed})")
    ctl = tmp_path / "ctl"
    for sub in ("out", "err"):
        (ctl / sub).mkdir(parents=True)
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
        # Writers first: their streams end, so the followers' follows end too.
        hung = []
        order = sorted(soak.workers, key=lambda w: w[0] != "writer")
        deadline = time.monotonic() + SHUTDOWN
        for role, proc in order:
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
        # Nothing on stderr (a warning, a traceback), killed or not; PYTHONDEVMODE from
        # the test's environment shows ResourceWarnings there.
        err = Path(proc.err_path).read_text(errors="replace")  # type: ignore[attr-defined]
        if err:
            failures.append(f"{role} {proc.pid} wrote to stderr: {err[-3000:]}")
        if proc.pid in soak.killed or proc.returncode == 0:
            continue
        if role == "writer" and proc.returncode == -signal.SIGKILL:
            continue  # a writer's own SIGKILL (the fate "die")
        failures.append(f"{role} {proc.pid} exited with {proc.returncode}")
    records = _records(ctl)
    failures += [json.dumps(r) for r in records if "violation" in r]

    # Followers' outcomes against how each stream ended (known once every worker is gone).
    ends: dict[str, dict[str, Any]] = {}
    streams = (ctl / "streams.jsonl").read_text(encoding="utf-8").splitlines()
    for line in streams:
        record = json.loads(line)
        if "end" in record:
            ends[record["path"]] = record
    outcomes = [r for r in records if "outcome" in r and "path" in r]
    for r in outcomes:
        end = ends.get(r["path"])
        if end is None:
            continue  # its writer was killed: a prefix, then StreamAbandoned (checked there)
        if r["outcome"] == "abandoned" and end["end"] == "done":
            failures.append(f"a finished stream was abandoned under its follower: {r}")
        if r["outcome"] == "complete" and end["end"] == "abort":
            failures.append(f"an aborted stream ended normally under its follower: {r}")
        if (r["outcome"] == "abandoned" and end["end"] == "abort"
                and r["frames"] != end["frames"]):
            failures.append(f"a follower of an aborted stream got {r['frames']} frames "
                            f"of the {end['frames']} written: {r}")

    # Every process is gone: one cleanup and a new pool's reclaim leave nothing of ours.
    cleanup_all_temp_audio()
    with AudioPool(slots=1, max_bytes=4096, prefix="soakpool_"):
        pass
    left = sorted(os.listdir(private_dirs.ram)) + sorted(os.listdir(private_dirs.fallback))
    if left:
        failures.append(f"files left after the final cleanup and reclaim: {left}")

    counts: dict[str, int] = {}
    for r in outcomes:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    summary = (f"seed {seed}: {len(soak.ended)} "
               f"processes, {len(soak.killed)} killed, {soak.stops} stopped; "
               f"{sum(1 for e in ends.values() if e['end'] == 'done')} streams done, "
               f"{sum(1 for e in ends.values() if e['end'] == 'abort')} aborted; "
               f"follows: {counts}")
    print(summary)
    for r in outcomes:  # shown with -s, or when the test fails
        if r["outcome"] != "complete":
            print("follow:", json.dumps(r))
    assert not failures, f"LUNA_SOAK_SEED={seed}: {summary}\n" + "\n".join(failures[:30])
    # The soak did something: at least one stream followed to its end.
    assert counts.get("complete", 0) >= 1, summary
