"""What the randomized soaks share on the driving side: their settings, their worker
processes and the chaos done to them, how they are stopped, and how their end is judged.

Each soak (test_stream_soak.py, test_hostile_soak.py, test_fork_soak.py, and the full-disk
soak's driver, full_disk_soak_workers.py run, in its private mount namespace) starts worker
processes from its *_soak_workers.py script, which report through tests/soak_worker.py;
hurts them in its own way while they run (SIGKILL, SIGSTOP/SIGCONT, SIGUSR1), then stops
them and judges what they did. What is the same in each lives here:

- LUNA_SOAK_SEED=<n> runs a seed again (the same choices; the scheduling differs),
  LUNA_SOAK_SECONDS=<s> soaks for another time than the soak's default (soak_settings;
  test_cache_soak.py reads them here too);
- a worker is started with a seed drawn from the soak's rng, its stdout and stderr into
  CTL/err/<role>-<seed>.txt (Soak.start); a worker the chaos kills is replaced by a new one
  of its role (Soak.kill), a stopped one is continued (Soak.pause);
- the end: CTL/stop tells every worker to stop, all of them within one deadline, and a hung
  one is killed and reported (Soak.stop); then anything in CTL/err (a warning, a traceback:
  the soaks run under PYTHONDEVMODE, so ResourceWarnings too: written_to_stderr, which
  test_cache_soak.py's own driving uses as well), any exit but 0 of a worker the soak did
  not kill (Soak.failures), and every violation a worker reported (violations) fail the
  soak (Soak.run returns them all), with its seed (assert_soak_passed);
- with every process gone, a cleanup and new pools' reclaims (sweep) must leave nothing of
  the soak's in its dirs but what the soak says may stay.

It imports no test helper, so no pytest: the full-disk soak's driver runs it outside pytest.
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from luna_shm import AudioPool, cleanup_all_temp_audio

# How much of a process's stderr, or of a violation's record, a failure line shows.
SHOWN = 4000


def soak_settings(name: str, default_seconds: float) -> tuple[int, float]:
    """The soak's seed (LUNA_SOAK_SEED, else a random one) and its length in seconds
    (LUNA_SOAK_SECONDS, else default_seconds), printed so that a failed run can be run
    again with the same choices."""
    seed = int(os.environ.get("LUNA_SOAK_SEED") or random.SystemRandom().getrandbits(32))
    seconds = float(os.environ.get("LUNA_SOAK_SECONDS") or default_seconds)
    print(f"{name} soak: seed {seed}, {seconds} s (again: LUNA_SOAK_SEED={seed})")
    return seed, seconds


def script_command(script: str, ctl: Path | str) -> Callable[[str, int], list[str]]:
    """The command line of a worker run as `python SCRIPT ROLE CTL SEED` (the stream,
    hostile and full-disk soaks' workers), for Soak's command."""
    return lambda role, seed: [sys.executable, script, role, str(ctl), str(seed)]


@dataclass
class Worker:
    """A worker process of a soak: its role, its process, the file of its stdout/stderr."""

    role: str
    proc: subprocess.Popen[bytes]
    err: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __str__(self) -> str:
        return f"{self.role} {self.proc.pid}"


@dataclass
class Soak:
    """The running workers of a soak, and what its chaos did to them.

    ctl is the soak's control dir, made with out/ (the workers' reports) and err/ (their
    stdout and stderr); command(role, seed) is the command line of a worker. With
    new_session, each worker leads a process group of its own, which a kill kills whole
    (its children too), and which must be empty once the worker exited. stacks_signal is
    the signal that makes a worker write every thread's stack to its stderr
    (faulthandler.register), sent to a worker that does not stop in time.
    """

    ctl: Path
    env: dict[str, str]
    rng: random.Random
    command: Callable[[str, int], list[str]]
    new_session: bool = False
    stacks_signal: int | None = None
    workers: list[Worker] = field(default_factory=list)
    ended: list[Worker] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)
    stops: int = 0
    # Reentrant: the chaos kills under it, and a kill starts a new worker.
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        for sub in ("out", "err"):
            (self.ctl / sub).mkdir(parents=True)

    def start(self, role: str) -> Worker:
        """Start a worker of role, its seed drawn from the soak's rng."""
        seed = self.rng.getrandbits(48)
        err = self.ctl / "err" / f"{role}-{seed}.txt"
        with open(err, "wb") as out:
            proc = subprocess.Popen(self.command(role, seed), env=self.env, stdout=out,
                                    stderr=out, start_new_session=self.new_session)
        worker = Worker(role, proc, err)
        self.workers.append(worker)
        return worker

    def start_all(self, roles: dict[str, int]) -> None:
        """Start roles[role] workers of each role, in the dict's order."""
        for role, count in roles.items():
            for _ in range(count):
                self.start(role)

    def retire(self, worker: Worker) -> None:
        """Move worker, which ended, from the running workers to the ended ones."""
        with self.lock:
            self.workers.remove(worker)
            self.ended.append(worker)

    def kill(self, worker: Worker) -> None:
        """SIGKILL worker (its process group with new_session), then start another of its
        role in its place."""
        with self.lock:
            self.killed.add(worker.pid)
            self._kill_now(worker)
            self.retire(worker)
            self.start(worker.role)

    def _kill_now(self, worker: Worker) -> None:
        if self.new_session:
            os.killpg(worker.pid, signal.SIGKILL)
        else:
            worker.proc.kill()
        worker.proc.wait()

    def pause(self, worker: Worker, done: threading.Event, longest: float) -> None:
        """SIGSTOP worker for 0.1 to longest seconds (less once done is set), then
        SIGCONT it."""
        os.kill(worker.pid, signal.SIGSTOP)
        self.stops += 1
        try:
            done.wait(self.rng.uniform(0.1, longest))
        finally:
            os.kill(worker.pid, signal.SIGCONT)

    def kill_or_stop(self, done: threading.Event, *, every: tuple[float, float],
                     kill_chance: float, longest_stop: float,
                     replace_ended: bool = False) -> None:
        """The chaos of the stream and hostile soaks: every every[0]-every[1] s until done,
        SIGKILL a random worker (and start another in its place) with kill_chance, else
        SIGSTOP it for 0.1-longest_stop s. With replace_ended, a picked worker that ended by
        itself is replaced instead (a stream writer's own SIGKILL)."""
        rng = self.rng
        while not done.wait(rng.uniform(*every)):
            with self.lock:
                worker = self.workers[rng.randrange(len(self.workers))]
                if replace_ended and worker.proc.poll() is not None:
                    self.retire(worker)
                    self.start(worker.role)
                    continue
                if rng.random() < kill_chance:
                    self.kill(worker)
                    continue
            self.pause(worker, done, longest_stop)

    def run(self, seconds: float, chaos: Callable[[threading.Event], None], *,
            shutdown: float, first: str | None = None,
            may_end: Callable[[Worker], bool] = lambda worker: False,
            ) -> tuple[list[str], list[dict[str, Any]]]:
        """Run chaos (a loop until its event is set) in a thread for seconds, then stop
        every worker (see stop) and judge them (see failures). Returns the failures found
        (hung workers, stderr, exits, each kind of violation), and every record the
        workers reported."""
        done = threading.Event()
        thread = threading.Thread(target=chaos, args=(done,))
        thread.start()
        try:
            done.wait(seconds)
        finally:
            done.set()
            thread.join()
            failures = self.stop(shutdown, first=first)
        failures += self.failures(may_end=may_end)
        records = read_records(self.ctl)
        return failures + violations(records), records

    def stop(self, shutdown: float, *, first: str | None = None) -> list[str]:
        """Tell every worker to stop (CTL/stop) and wait for them, the workers of role
        first first (a stream's writers: their followers end with their streams), all
        within shutdown seconds: a hang, not a pace. A worker still running then is
        killed (its stacks asked for first, with stacks_signal). Returns the failures:
        each hung worker, and (with new_session) each worker that left processes behind."""
        (self.ctl / "stop").touch()
        stopping = time.monotonic()
        hung = []
        deadline = stopping + shutdown
        for worker in sorted(self.workers, key=lambda w: w.role != first):
            try:
                worker.proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if self.stacks_signal is None:
                    hung.append(f"{worker} did not stop within {shutdown} s")
                else:
                    hung.append(f"{worker} did not stop within {shutdown} s (its threads' "
                                "stacks are in its err file)")
                    os.kill(worker.pid, self.stacks_signal)
                    time.sleep(1)
                self._kill_now(worker)
                continue
            if self.new_session:
                try:  # children it left behind, if any (there should be none)
                    os.killpg(worker.pid, signal.SIGKILL)
                    hung.append(f"{worker} left processes behind")
                except ProcessLookupError:
                    pass
        self.ended.extend(self.workers)
        self.workers.clear()
        print(f"every worker stopped {time.monotonic() - stopping:.1f} s after being told to")
        return hung

    def failures(self, *, may_end: Callable[[Worker], bool] = lambda worker: False,
                 ) -> list[str]:
        """Once every worker ended: whatever any process wrote into CTL/err (a worker's
        stderr, a file its children wrote there), and the exit of each worker that was not
        killed by the soak and neither exited 0 nor may_end (a death it chose)."""
        found = written_to_stderr(self.ctl / "err",
                                  {worker.err.name: worker for worker in self.ended})
        for worker in self.ended:
            code = worker.proc.returncode
            if worker.pid in self.killed or code == 0 or may_end(worker):
                continue
            found.append(f"{worker} exited with {code}"
                         + (" (SIGBUS: the guard let a fault through)"
                            if code == -signal.SIGBUS else ""))
        return found


def written_to_stderr(err_dir: Path, who: Mapping[str, object]) -> list[str]:
    """A failure line for each file in err_dir that is not empty (a worker's stdout and
    stderr, a file its children wrote there): who wrote it (who[its name], else its name)
    and the last SHOWN characters of it. A soak's workers write nothing there: a
    traceback, a warning (a ResourceWarning under PYTHONDEVMODE, a luna_shm log line no
    handler of the worker took) is a failure even when the worker exits 0."""
    found = []
    for err in sorted(err_dir.iterdir()):
        text = err.read_text(errors="replace")
        if text:
            found.append(f"{who.get(err.name, err.name)} wrote to stderr: {text[-SHOWN:]}")
    return found


def read_records(ctl: Path) -> list[dict[str, Any]]:
    """Every record the workers wrote into CTL/out/*.jsonl, file by file (a killed
    worker's lines are whole: each is one write)."""
    records = []
    for out in sorted((ctl / "out").iterdir()):
        for line in out.read_text(encoding="utf-8").splitlines():
            records.append(json.loads(line))
    return records


def violations(records: Iterable[dict[str, Any]]) -> list[str]:
    """A failure line for each kind of violation the records hold: how often it was seen,
    and its first record."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if "violation" in record:
            kinds.setdefault(record["violation"], []).append(record)
    return [f"{len(rs)} x {json.dumps(rs[0])[:SHOWN]}" for rs in kinds.values()]


def total_counts(records: Iterable[dict[str, Any]], *,
                 by_role: bool = False) -> dict[str, int]:
    """The sums of the last counts each process reported (a killed one's too: a worker
    reports its counts now and then, soak_worker.Reporter.count), by what was counted
    ("<role>: <what>" with by_role)."""
    last: dict[int, tuple[str, dict[str, int]]] = {
        r["pid"]: (r.get("role", ""), r["counts"]) for r in records if "counts" in r}
    counts: dict[str, int] = {}
    for role, each in last.values():
        for what, n in each.items():
            key = f"{role}: {what}" if by_role else what
            counts[key] = counts.get(key, 0) + n
    return counts


def sweep(prefixes: Iterable[str], *directories: str) -> list[str]:
    """With every process gone: one cleanup_all_temp_audio(), then a new pool of each of
    prefixes, whose opening reclaims the slot files of dead pools of that prefix. Returns
    the names left in directories (each dir's sorted, one dir after the other)."""
    cleanup_all_temp_audio()
    for prefix in prefixes:
        with AudioPool(slots=1, max_bytes=4096, prefix=prefix):
            pass
    return [name for directory in directories for name in sorted(os.listdir(directory))]


def assert_soak_passed(seed: int, summary: str, failures: list[str]) -> None:
    """Fail with the seed, the summary and the first 30 failures, if there are any."""
    if failures:
        raise AssertionError(f"LUNA_SOAK_SEED={seed}: {summary}\n" + "\n".join(failures[:30]))
