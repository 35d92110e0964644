"""What the soaks' worker processes share: their report file, the test's stop flag, seeded
audio, the flock test of a cleanup, and the guard that keeps a destructive worker in the
test's private dirs.

The workers (stream_soak_workers.py, hostile_soak_workers.py, full_disk_soak_workers.py,
fork_soak_workers.py) run as scripts from tests/, so this module is found next to them
(sys.path[0]) from any checkout. The driving side is tests/soak.py: it reads what a
Reporter writes (soak.read_records, soak.violations, soak.total_counts).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np

import luna_shm

# The sample types of luna_shm's WAVs, which the soaks' signals take at random.
DTYPES = ("uint8", "int16", "int32", "float32", "float64")


def seeded_audio(seed: int, frames: int, channels: int, dtype: str) -> np.ndarray:
    """Audio that is a function of its seed (another process knows every sample):
    (frames,) for mono, else (frames, channels), of dtype; floats in [-1, 1) with 24
    bits, integers over their whole range."""
    rng = np.random.default_rng(seed)
    shape = (frames, channels)
    if dtype.startswith("float"):
        data = (rng.integers(-(2**23), 2**23, shape) / 2**23).astype(dtype)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return data[:, 0].copy() if channels == 1 else data


def private_dirs_only() -> tuple[str, str]:
    """The test's private dirs (LUNA_SHM_DIR, TMPDIR), where luna_shm puts its files.
    Exits the process unless they are the private_dirs fixture's: a worker that cuts or
    removes files must never run in shared ones."""
    ram, fallback = os.environ["LUNA_SHM_DIR"], os.environ["TMPDIR"]
    if not (os.path.basename(ram).startswith("luna_shm_test_")
            and os.path.basename(fallback) == "fallback"):
        sys.exit(f"refusing to run outside the test's private dirs: {ram}, {fallback}")
    assert luna_shm.temp_dir().startswith(ram)
    return ram, fallback


def held_by_someone(path: str) -> bool:
    """Whether some process holds path's flock (every luna_shm object holds its file's,
    shared), tested as a cleanup from another process tests it: its exclusive lock,
    taken without waiting, fails."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class Reporter:
    """A worker's JSON lines in CTL/out/<role>-<pid>.jsonl, each written with one write to
    a file opened O_APPEND: a worker may be killed at any moment, and its lines are whole.

    Every record names the role and the pid of the process that wrote it (and, from a
    child forked by the worker, the worker's pid as "worker"). A violation is reported the
    moment it is seen, so that a worker killed later still reports it. Counts are
    reported whole now and then (event "counts"), so that a killed worker's count until
    then is known too: the last record with counts of each process is its total.
    """

    def __init__(self, role: str, ctl: str) -> None:
        self.role = role
        self.ctl = ctl
        self.pid = os.getpid()
        self.out_path = os.path.join(ctl, "out", f"{role}-{self.pid}.jsonl")
        self._out = os.open(self.out_path,
                            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.counts: dict[str, int] = {}
        # Reentrant: a signal handler may count while it interrupted a count of its thread.
        self.counts_lock = threading.RLock()
        self._counted = time.monotonic()

    def report(self, **record: Any) -> None:
        """Write record as one JSON line (values JSON does not know as their str)."""
        record.update(role=self.role, pid=os.getpid())
        if record["pid"] != self.pid:
            record["worker"] = self.pid
        os.write(self._out, (json.dumps(record, default=str) + "\n").encode())

    def violation(self, what: str, **details: Any) -> None:
        """Report a broken promise: what, and details to look into it."""
        self.report(violation=what, **details)

    def count(self, what: str) -> None:
        """Count what; the counts go out at most every second (a forked child's counts
        are not its worker's: they never go out)."""
        with self.counts_lock:
            self.counts[what] = self.counts.get(what, 0) + 1
            now = time.monotonic()
            if now - self._counted < 1.0 or os.getpid() != self.pid:
                return
            self._counted = now
            # Under the lock: two threads' counts never go out newest first.
            self.report(event="counts", counts=dict(self.counts))

    def report_counts(self, **record: Any) -> None:
        """Report the counts now, with record (a worker's end)."""
        with self.counts_lock:
            self.report(counts=dict(self.counts), **record)

    def stopping(self) -> bool:
        """Whether the test told the workers to stop (CTL/stop exists)."""
        return os.path.exists(os.path.join(self.ctl, "stop"))
