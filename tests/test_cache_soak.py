"""A randomized soak of AudioCache: every scenario at once, under kills, stops and a hostile.

Five worker processes share one cache (a small RAM tier that evicts and spills to a disk tier
all the time, a ttl'd second view of it) and loop over random operations on twelve keys:
renders (in chunks, slow or fast, failing on purpose, empty, too large to store), gets, puts
(WAV and encoded), follows of renders in flight, discards, stats, clears, reopens; they hold
some entries for a while. Every audio any of them gets is checked against the one audio its
key can have. Meanwhile a chaos thread here kills workers (SIGKILL, and starts a new one),
stops them (SIGSTOP for 0.1-3 s), and corrupts entry files no one holds (truncated, or their
header overwritten), as a hostile program would. At the end a fresh cache of that name must
open, agree with its files, give every key's exact audio, clean to nothing and be destroyed.

What a worker may see (the documented outcomes) is recorded as events, anything else as a
violation: TimeoutError of a call with the long (10 s) timeout only while some process was
stopped (checked here against the stop windows, on the shared CLOCK_MONOTONIC; a quarter of
the calls wait 2 s at most, to make stops time them out), WavError only once an entry was
corrupted,
RenderError only for a failure on purpose (or a renderer's own timeout), StreamAbandoned and
KeyError for follows. The luna_shm logger's lines are a worker's own to check (they never
reach its stderr): its one expected line, the removal of an unreadable entry to render it
again, is an event, and the entry must be one the chaos corrupted; any other line is a
violation. As in the other soaks, anything a worker writes to its stdout or stderr (a
traceback, a warning: the soaks run under PYTHONDEVMODE, so ResourceWarnings too) fails the
soak, and so does an exit but 0 of a worker the chaos did not kill.

The seed is printed; ``LUNA_SOAK_SEED=<seed>`` runs that seed again (the same random choices,
not the same interleaving: that depends on the scheduler). ``LUNA_SOAK_SECONDS`` makes the
soak longer than its default 25 s for manual runs (both read by soak.soak_settings, as every
soak reads them). Its driving is its own, unlike the other soaks' (tests/soak.py): one worker
script with one event log, and chaos that also corrupts entries and records each stop's
window; its judging of the workers' stderr is theirs (soak.written_to_stderr,
soak.assert_soak_passed).
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from soak import assert_soak_passed, soak_settings, written_to_stderr

from helpers import LIBRARY_PATH, call_with_deadline
from luna_shm import AudioCache, WavError, WavWriter, read_wav

DEFAULT_SECONDS = 25.0
WORKERS = 5
NAME = "soak"
MAX_BYTES = 32_000  # about 8 of the small keys: eviction and spills all the time
DISK_MAX_BYTES = 48_000
TTL = 0.5  # the ttl'd view a worker uses for a quarter of its calls
CALL_TIMEOUT = 10.0  # most calls of a worker; a stop lasts 3 s at most
# A quarter of them: a long stop makes them time out. Not much shorter: a call that times
# out while no process was stopped is a violation, and a loaded machine is slow.
SHORT_TIMEOUT = 2.0

# Shared by the workers and this test: the keys and the one audio each can have.
COMMON = r'''
import numpy as np
from luna_shm import cache_key

SAMPLERATE = 16000
KEYS = [cache_key(f"soak sentence {i}") for i in range(12)]
LARGE = set(KEYS[:2])  # 60 KB each: more than the RAM tier's bound, rendered but not stored


def audio_of(key):
    """The key's audio: only ever this, whoever renders or puts it."""
    frames = 30_000 if key in LARGE else 400 + int(key[12:16], 16) % 2600
    rng = np.random.default_rng(int(key[:12], 16))
    return rng.integers(-32768, 32767, size=frames, dtype=np.int16)


def encoded_of(key):
    """The key's encoded audio (put_bytes as .mp3): its bytes only ever these."""
    return b"ID3 not really an mp3 " + key.encode() * 7
'''

_COMMON: dict[str, Any] = {}
exec(COMMON, _COMMON)
KEYS: list[str] = _COMMON["KEYS"]
SAMPLERATE: int = _COMMON["SAMPLERATE"]
audio_of: Callable[[str], np.ndarray] = _COMMON["audio_of"]
encoded_of: Callable[[str], bytes] = _COMMON["encoded_of"]

WORKER = COMMON + r'''
import collections, json, logging, os, random, sys, threading, time, traceback
import soundfile
from luna_shm import AudioCache, StreamAbandoned, WavError
from luna_shm.cache import RenderError

cfg = json.loads(sys.argv[1])
TIMEOUT = cfg["timeout"]
log_fd = os.open(cfg["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
# Each thread's own: its random choices, the call it is in, the entries it holds.
me = threading.local()
tally = collections.Counter()  # what this worker met, reported as it stops (coverage)
tally_lock = threading.Lock()


def count(what):
    with tally_lock:
        tally[what] += 1


def limit():
    """The timeout of this thread's call now."""
    return me.state["timeout"]


def report(kind, **fields):
    """One JSON line (one O_APPEND write: whole even if we are killed right after)."""
    state = getattr(me, "state", {"op": None, "key": None, "start": 0.0})
    fields.update(kind=kind, worker=cfg["worker"], pid=os.getpid(), op=state["op"],
                  key=state["key"], start=state["start"], end=time.monotonic())
    os.write(log_fd, (json.dumps(fields) + "\n").encode())


def violation(what, **fields):
    report("violation", what=what, **fields)


class OnPurpose(Exception):
    pass


# The one line the luna_shm logger may say here (its format, as AudioCache._usable logs it):
# a look-up removed a RAM entry it could not read (the chaos corrupted it, here or in the
# disk tier it came back from), to render it again.
REMOVED = "luna_shm: removed the unreadable cache entry %s (%s); rendering it again"
# A close whose wait for the lock (to write this process's counts out) timed out: a
# timeout of the long limit, explained only by a stop, as a call's is.
CLOSED_UNCOUNTED = "luna_shm: AudioCache %r closed without writing out this process's counts"


class LogChecked(logging.Handler):
    """The luna_shm logger's lines, checked here instead of reaching stderr (with no
    handler, Python's last resort prints a warning there, and any stderr fails the soak):
    the removal of an entry of the RAM tier for its WavError is an event (the test checks
    that the chaos corrupted an entry of that name), a close that timed out waiting for
    the lock a timeout (the test checks that a process was stopped meanwhile), any other
    line a violation."""

    def emit(self, record):
        args = record.args if isinstance(record.args, tuple) else ()
        if (record.msg == REMOVED and record.levelno == logging.WARNING and len(args) == 2
                and os.path.dirname(args[0]) == cfg["ram_dir"]
                and isinstance(args[1], WavError)):
            count("removed an unreadable entry")
            report("removed_unreadable", path=args[0], what=str(args[1]))
        elif (isinstance(record.msg, str) and record.msg.startswith(CLOSED_UNCOUNTED)
              and record.levelno == logging.WARNING):
            count("timeout")
            report("timeout", what=record.getMessage(), limit=TIMEOUT)
        else:
            violation(f"the luna_shm logger said: {record.getMessage()}",
                      level=record.levelname)


logging.getLogger("luna_shm").addHandler(LogChecked())
logging.getLogger("luna_shm").propagate = False


def open_caches():
    plain = AudioCache(cfg["name"], max_bytes=cfg["max_bytes"], disk_dir=cfg["disk"],
                       disk_max_bytes=cfg["disk_max_bytes"], timeout=TIMEOUT)
    try:
        ttl = AudioCache(cfg["name"], max_bytes=cfg["max_bytes"], ttl=cfg["ttl"],
                         disk_dir=cfg["disk"], disk_max_bytes=cfg["disk_max_bytes"],
                         timeout=TIMEOUT)
    except BaseException:
        plain.close(timeout=TIMEOUT)
        raise
    return plain, ttl


def check_entry(entry, key, where):
    """Its audio is the key's, through the mapping and (while its path names the pinned
    file) through the path with soundfile; an encoded entry holds the key's bytes."""
    if entry.key != key:
        violation(f"{where}: an entry of key {entry.key} for {key}")
    if not entry.is_wav:
        if not entry.path.endswith(".mp3") or entry.read_bytes() != encoded_of(key):
            violation(f"{where}: wrong encoded audio", path=entry.path)
        return
    try:
        array = entry.array
    except WavError as exc:
        report("wav_error", what=f"{where}: {exc}")
        return
    if entry.samplerate != SAMPLERATE or not np.array_equal(array, audio_of(key)):
        violation(f"{where}: wrong audio", path=entry.path, stored=entry.stored,
                  frames=len(array), want=len(audio_of(key)))
        return
    try:
        with open(entry.path, "rb") as file:
            if os.fstat(file.fileno()).st_ino != os.fstat(entry.fileno()).st_ino:
                return  # replaced by a newer entry (a put, another render) meanwhile
            data, rate = soundfile.read(file, dtype="int16")
    except FileNotFoundError:
        return
    if rate != SAMPLERATE or not np.array_equal(data, audio_of(key)):
        violation(f"{where}: its path reads other audio", path=entry.path)


def keep_or_release(entry, key, where):
    if entry is None:
        return
    check_entry(entry, key, where)
    if len(me.held) < 3 and me.rng.random() < 0.25:
        me.held.append((entry, key, where))
    else:
        entry.release()


def release_some():
    while me.held and (len(me.held) >= 3 or me.rng.random() < 0.3):
        entry, key, where = me.held.pop(me.rng.randrange(len(me.held)))
        check_entry(entry, key, where + " (at its release)")
        entry.release()


def make_render(key):
    audio = audio_of(key)
    chunks = me.rng.randint(1, 5)
    pause = me.rng.choice([0, 0, 0.002, 0.01, 0.03])
    plan = me.rng.choices(["ok", "fail", "empty"], weights=[85, 12, 3])[0]
    use_with = me.rng.random() < 0.3

    def body(writer):
        if plan == "empty":
            return
        for i, block in enumerate(np.array_split(audio, chunks)):
            if plan == "fail" and i == chunks // 2:
                raise OnPurpose(f"on purpose {key[:8]}")
            writer.write(block)
            if pause:
                time.sleep(pause)

    def render(writer):
        if use_with:
            with writer:
                body(writer)
        else:
            body(writer)

    return render, plan


def do_get_or_render(cache, key):
    render, plan = make_render(key)
    me.state["op"] = f"get_or_render/{plan}"
    try:
        entry = cache.get_or_render(key, render, samplerate=SAMPLERATE, timeout=limit())
    except OnPurpose:
        count("render failed on purpose")
        if plan != "fail":
            violation("OnPurpose raised by a render that was not to fail")
        return
    except ValueError as exc:
        if plan != "empty" or "wrote no frames" not in str(exc):
            raise
        count("render empty")
        return
    if key in LARGE and entry.is_wav and entry.stored:
        violation("audio larger than max_bytes was stored", path=entry.path)
    count("get_or_render " + ("stored" if entry.stored else "unstored"))
    keep_or_release(entry, key, "get_or_render")


def do_get(cache, key):
    entry = cache.get(key, timeout=limit())
    count("get hit" if entry is not None else "get miss")
    keep_or_release(entry, key, "get")


def do_put(cache, key):
    entry = cache.put(key, audio_of(key), SAMPLERATE, timeout=limit())
    if key in LARGE and entry.stored:
        violation("audio larger than max_bytes was stored by put", path=entry.path)
    keep_or_release(entry, key, "put")


def do_put_bytes(cache, key):
    entry = cache.put_bytes(key, encoded_of(key), ".mp3", timeout=limit())
    keep_or_release(entry, key, "put_bytes")


def do_follow(cache, key):
    audio = audio_of(key)
    got = 0
    stream = cache.follow(key, timeout=limit())
    blocks = 0
    try:
        for block in stream:
            blocks += 1
            block = np.asarray(block)
            if block.ndim != 1 or not np.array_equal(block, audio[got:got + len(block)]):
                violation("follow: a block that is not the next part of the audio",
                          at=got, frames=len(block))
                return
            got += len(block)
    except StreamAbandoned:
        count("follow abandoned")
        return
    except KeyError:
        count("follow of nothing")
        return
    except ValueError as exc:
        if "encoded audio" not in str(exc):
            raise
        count("follow of encoded")
        return
    finally:
        stream.close()
    count("follow in blocks" if blocks > 1 else "follow whole")
    if got != len(audio):
        violation("follow: the stream ended early without StreamAbandoned", got=got,
                  want=len(audio))


def do_discard(cache, key):
    cache.discard(key, timeout=limit())


def do_contains(cache, key):
    key in cache


def do_stats(cache, key):
    stats = cache.stats(timeout=limit())
    if stats.bytes > cfg["max_bytes"] or stats.disk_bytes > cfg["disk_max_bytes"]:
        violation("stats: over the bound", bytes=stats.bytes, disk_bytes=stats.disk_bytes)


def do_clear(cache, key):
    cache.clear(timeout=limit())


OPS = {do_get_or_render: 35, do_get: 20, do_put: 8, do_put_bytes: 2, do_follow: 12,
       do_discard: 5, do_contains: 2, do_stats: 5, do_clear: 1}
NAMES = list(OPS)
WEIGHTS = list(OPS.values())


def run(caches, seed, threads):
    me.rng = random.Random(seed)
    me.state = {"op": None, "key": None, "start": 0.0, "timeout": TIMEOUT}
    me.held = []
    while not os.path.exists(cfg["stop"]):
        op = me.rng.choices(NAMES, weights=WEIGHTS)[0]
        key = me.rng.choice(KEYS)
        cache = caches[1] if me.rng.random() < 0.25 else caches[0]
        # A quarter of the calls wait less than the longest stop: their timeouts (and the
        # state a call that timed out leaves) come up too, while a process is stopped.
        timeout = cfg["short_timeout"] if me.rng.random() < 0.25 else TIMEOUT
        me.state.update(op=op.__name__[3:], key=key, start=time.monotonic(), timeout=timeout)
        try:
            if threads == 1 and me.rng.random() < 0.005:  # (closed under another thread: no)
                me.state["op"] = "reopen"
                for entry, _, _ in me.held:
                    entry.release()
                me.held.clear()
                for old in caches:
                    old.close(timeout=TIMEOUT)
                caches[:] = open_caches()
                continue
            op(cache, key)
            release_some()
        except TimeoutError as exc:
            count("timeout")
            report("timeout", what=str(exc), limit=limit())
        except RenderError as exc:
            count("RenderError")
            text = str(exc)
            if "TimeoutError" in text:
                # The renderer's own wait timed out: its call reports it, with its limit.
                report("renderer_timeout", what=text)
            elif "on purpose" not in text and "wrote no frames" not in text:
                violation(f"RenderError: {text}")
        except StreamAbandoned as exc:
            violation(f"StreamAbandoned outside a follow: {exc}")
        except WavError as exc:
            count("WavError")
            report("wav_error", what=str(exc))
        except Exception as exc:
            violation(f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    for entry, _, _ in me.held:
        entry.release()


def main():
    """cfg["threads"] threads (one or two) share this process's caches, as a server's do."""
    caches = list(open_caches())
    threads = [threading.Thread(target=run, args=(caches, cfg["seed"] + i, cfg["threads"]))
               for i in range(cfg["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for cache in caches:
        cache.close(timeout=TIMEOUT)
    report("summary", tally=dict(tally))


main()
'''


def child_env(ram: str, fallback: str) -> dict[str, str]:
    """The environment of a worker: the test's private dirs, this checkout's luna_shm."""
    env = {k: v for k, v in os.environ.items() if k != "LUNA_SHM_DISABLE"}
    env.update(LUNA_SHM_DIR=ram, TMPDIR=fallback, PYTHONPATH=LIBRARY_PATH)
    return env


@dataclass
class Soak:
    """The workers and what the chaos thread did to them (times: time.monotonic())."""

    tmp: Path
    env: dict[str, str]
    rng: random.Random
    script: Path
    disk: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)
    stops: list[tuple[float, float]] = field(default_factory=list)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    spawned: int = 0
    corrupted: set[str] = field(default_factory=set)  # the names of the entries it corrupted

    def spawn(self) -> subprocess.Popen[bytes]:
        self.spawned += 1
        cfg = {"name": NAME, "disk": str(self.disk), "seed": self.rng.getrandbits(64),
               "worker": self.spawned, "timeout": CALL_TIMEOUT,
               "short_timeout": SHORT_TIMEOUT, "log": str(self.log),
               "stop": str(self.stop_file), "max_bytes": MAX_BYTES,
               "disk_max_bytes": DISK_MAX_BYTES, "ttl": TTL,
               "threads": self.rng.choice([1, 2]),
               "ram_dir": str(cache_dir(Path(self.env["LUNA_SHM_DIR"])))}
        self.err_dir.mkdir(exist_ok=True)
        with open(self.err_dir / self.err_name(self.spawned), "wb") as out:
            worker = subprocess.Popen([sys.executable, str(self.script), json.dumps(cfg)],
                                      env=self.env, stdout=out, stderr=out, cwd=self.tmp)
        self.workers.append(worker)
        return worker

    @property
    def err_dir(self) -> Path:
        """The workers' stdout and stderr, a file each (see err_name): all empty, or the
        soak fails."""
        return self.tmp / "err"

    @staticmethod
    def err_name(number: int) -> str:
        return f"worker{number}.txt"

    @property
    def log(self) -> Path:
        return self.tmp / "events.jsonl"

    @property
    def stop_file(self) -> Path:
        return self.tmp / "stop"

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]


def entry_files(directory: Path) -> list[Path]:
    """The committed entries among directory's files (<64 hex>.wav or .mp3)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if len(p.stem) == 64 and p.suffix in (".wav", ".mp3"))


def corrupt_one(soak: Soak, tiers: list[Path]) -> None:
    """As a hostile program: truncate a WAV entry, or overwrite its header, while no one
    holds it (its exclusive flock, taken without waiting, as an eviction takes it: a
    holder's mapping is never changed under it, which no cache could defend)."""
    candidates = [p for tier in tiers for p in entry_files(tier) if p.suffix == ".wav"]
    if not candidates:
        return
    path = soak.rng.choice(candidates)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # gone meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # pinned
        try:
            if os.lstat(path).st_ino != os.fstat(fd).st_ino:
                return  # replaced meanwhile
        except FileNotFoundError:
            return
        size = os.fstat(fd).st_size
        if soak.rng.random() < 0.5:
            os.ftruncate(fd, soak.rng.randrange(size))
        else:
            os.pwrite(fd, bytes(soak.rng.getrandbits(8) | 1 for _ in range(12)), 0)
        soak.counts["corruptions"] += 1
        soak.corrupted.add(path.name)
    finally:
        os.close(fd)


def chaos(soak: Soak, tiers: list[Path], end: float, errors: list[BaseException]) -> None:
    """Until end: kill a worker (and start another), stop one for a while, corrupt an entry."""
    try:
        while time.monotonic() < end:
            time.sleep(soak.rng.uniform(0.05, 0.6))
            action = soak.rng.choices(["kill", "stop", "stop+kill", "corrupt"],
                                      weights=[3, 3, 1, 4])[0]
            alive = soak.alive()
            if action == "corrupt" or not alive:
                corrupt_one(soak, tiers)
                continue
            worker = soak.rng.choice(alive)
            if action.startswith("stop"):
                began = time.monotonic()
                worker.send_signal(signal.SIGSTOP)
                time.sleep(soak.rng.uniform(0.1, 3.0))
                if action == "stop":
                    worker.send_signal(signal.SIGCONT)
                soak.stops.append((began, time.monotonic()))
                soak.counts["stops"] += 1
            if action.endswith("kill"):  # stopped or not: whatever it held, it holds no more
                worker.send_signal(signal.SIGKILL)
                worker.wait(timeout=60)
                soak.killed.add(worker.pid)
                soak.counts["kills"] += 1
                soak.spawn()
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


def read_events(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line]


def processes_running(marker: str) -> list[int]:
    """Pids of live processes whose command line holds marker (a worker script path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if marker.encode() in cmdline.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def cache_dir(parent: Path) -> Path:
    return parent / f"luna_cache-{os.getuid()}-{NAME}"


def names_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def check_what_the_workers_saw(soak: Soak, events: list[dict[str, Any]],
                               seed: int) -> None:
    """No violation; every timeout while some process was stopped; WavError only after
    a corruption."""
    violations = [e for e in events if e["kind"] == "violation"]
    kinds = collections.Counter(str(e["what"])[:60] for e in violations)
    assert violations == [], (f"seed {seed}: {len(violations)} violations {dict(kinds)}: "
                              f"{violations[:5]}")
    # A call with the long timeout times out only while some process is stopped. One with
    # the short one may also on a loaded machine, by the contract: its timeout bounds the
    # whole call (a renderer's store gets what its wait for an earlier render left), and
    # no call promises a lock within 2 s; its hangs would show as a worker that does not stop.
    unexplained = [e for e in events if e["kind"] == "timeout" and e["limit"] == CALL_TIMEOUT
                   and not any(began <= e["end"] + 0.001 and ended >= e["start"] - 0.001
                               for began, ended in soak.stops)]
    assert unexplained == [], (f"seed {seed}: timeouts while no process was stopped: "
                               f"{unexplained[:5]} (stops {soak.stops})")
    if not soak.counts["corruptions"]:
        wav_errors = [e for e in events if e["kind"] == "wav_error"]
        assert wav_errors == [], f"seed {seed}: WavError with no entry corrupted: {wav_errors}"
    # The luna_shm logger's one expected line: the removal of an entry the chaos corrupted.
    removed = [e for e in events if e["kind"] == "removed_unreadable"
               and os.path.basename(e["path"]) not in soak.corrupted]
    assert removed == [], (f"seed {seed}: removed as unreadable, never corrupted: "
                           f"{removed[:5]} (corrupted {sorted(soak.corrupted)})")


def check_the_cache_after(soak: Soak, ram: Path, disk: Path, seed: int) -> None:
    """A fresh cache opens, agrees with its files, gives every key's exact audio (or,
    for an entry the hostile corrupted, WavError then a render), cleans to nothing."""
    ram_dir, disk_dir = cache_dir(ram), cache_dir(disk)
    cache = call_with_deadline(lambda: AudioCache(
        NAME, max_bytes=MAX_BYTES, disk_dir=disk, disk_max_bytes=DISK_MAX_BYTES,
        timeout=30), 90)
    assert isinstance(cache, AudioCache)
    try:
        # The open swept both tiers: entries, the lock and failed renders' notes remain.
        for tier in (ram_dir, disk_dir):
            entries = {p.name for p in entry_files(tier)}
            left = [n for n in names_in(tier) if n != "lock" and n not in entries
                    and not (tier == ram_dir and n.endswith(".outcome"))]
            assert left == [], f"seed {seed}: the open left in-flight files in {tier}: {left}"
        stats = cache.stats(timeout=30)
        ram_sizes = [p.stat().st_size for p in entry_files(ram_dir)]
        disk_sizes = [p.stat().st_size for p in entry_files(disk_dir)]
        assert (stats.entries, stats.bytes) == (len(ram_sizes), sum(ram_sizes)), seed
        assert (stats.disk_entries, stats.disk_bytes) == (len(disk_sizes), sum(disk_sizes))
        assert stats.bytes <= MAX_BYTES and stats.disk_bytes <= DISK_MAX_BYTES, (seed, stats)
        assert stats.pinned == 0, (seed, stats)
        for key in KEYS:
            entry = cache.get(key, timeout=30)
            if entry is not None:
                with entry:
                    if not entry.is_wav:
                        assert entry.read_bytes() == encoded_of(key), (seed, entry.path)
                    else:
                        try:
                            np.testing.assert_array_equal(entry.array, audio_of(key))
                        except WavError:
                            assert soak.counts["corruptions"], (seed, entry.path)

            def render(writer: WavWriter, key: str = key) -> None:
                writer.write(audio_of(key))

            with cache.get_or_render(key, render, samplerate=SAMPLERATE, timeout=30) as entry:
                if entry.is_wav:
                    np.testing.assert_array_equal(entry.array, audio_of(key))
                    np.testing.assert_array_equal(read_wav(entry.path, mmap=False)[0],
                                                  audio_of(key))
                else:
                    assert entry.read_bytes() == encoded_of(key), (seed, entry.path)
        cache.clear(timeout=30)
        left_ram = [n for n in names_in(ram_dir) if n != "lock" and not n.endswith(".outcome")]
        left_disk = [n for n in names_in(disk_dir) if n != "lock"]
        assert (left_ram, left_disk) == ([], []), f"seed {seed}: after clear()"
        call_with_deadline(lambda: cache.destroy(timeout=30), 90)
    finally:
        if not cache.closed:
            cache.close(timeout=30)
    assert names_in(ram) == [] and names_in(disk) == [], (seed, names_in(ram), names_in(disk))


def test_a_randomized_soak_of_processes_killed_stopped_and_a_hostile_keeps_every_promise(
        private_dirs, tmp_path) -> None:
    seed, seconds = soak_settings("cache", DEFAULT_SECONDS)
    ram, fallback = Path(private_dirs.ram), Path(private_dirs.fallback)
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "soak_worker.py"
    script.write_text(WORKER)
    soak = Soak(tmp_path, child_env(private_dirs.ram, private_dirs.fallback),
                random.Random(seed), script, disk)
    errors: list[BaseException] = []
    try:
        for _ in range(WORKERS):
            soak.spawn()
        end = time.monotonic() + seconds
        thread = threading.Thread(target=chaos, args=(soak, [cache_dir(ram), cache_dir(disk)],
                                                      end, errors), daemon=True)
        thread.start()
        thread.join(seconds + 120)
        assert not thread.is_alive(), f"seed {seed}: the chaos thread hung"
        assert errors == [], f"seed {seed}: the chaos thread failed: {errors}"
        soak.stop_file.touch()
        hung = []
        for worker in soak.workers:
            try:
                worker.wait(timeout=120)
            except subprocess.TimeoutExpired:
                hung.append(worker.pid)
                worker.kill()
                worker.wait()
        assert hung == [], f"seed {seed}: workers did not stop: {hung}"
    finally:
        for worker in soak.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGCONT)
                worker.kill()
                worker.wait()
    # Whatever a worker wrote (a traceback, a warning: PYTHONDEVMODE's ResourceWarnings
    # too; its luna_shm log lines are its own to check, see LogChecked), and a worker's
    # exit but 0 when the chaos did not kill it.
    failures = written_to_stderr(soak.err_dir, {
        Soak.err_name(i + 1): f"worker {i + 1} ({w.pid})" for i, w in enumerate(soak.workers)})
    failures += [f"worker {i + 1} ({w.pid}) exited with {w.returncode}"
                 for i, w in enumerate(soak.workers)
                 if w.pid not in soak.killed and w.returncode != 0]
    events = read_events(soak.log)
    kinds = collections.Counter(str(e["kind"]) for e in events)
    met: collections.Counter[str] = collections.Counter()
    for event in events:
        if event["kind"] == "summary":
            met.update(event["tally"])
    summary = (f"{soak.spawned} workers, chaos {dict(soak.counts)}, events {dict(kinds)}, "
               f"the workers that stopped met {dict(sorted(met.items()))}")
    print(f"soak seed {seed}: {summary}")
    assert_soak_passed(seed, summary, failures)
    check_what_the_workers_saw(soak, events, seed)
    assert processes_running(str(script)) == [], f"seed {seed}: workers left running"
    check_the_cache_after(soak, ram, disk, seed)
    assert names_in(fallback) == [], (seed, names_in(fallback))
