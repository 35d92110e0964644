"""The processes of tests/test_full_disk_soak.py (run as a script, one role a process).

    python full_disk_soak_workers.py run SEED SECONDS         (the soak, in its namespace)
    python full_disk_soak_workers.py ROLE CTL_DIR SEED        (worker, filler or watcher)

``run`` is started by the test inside a private mount namespace (helpers.run_in_private_shm).
It mounts two small private tmpfs, the RAM dir and the fallback dir (LUNA_SHM_DIR and TMPDIR
of every process it starts), and a control dir; starts the workers, a filler and a watcher;
SIGKILLs (and replaces) workers at random; tells everyone to stop; then checks the end state.
Its last line on stdout is a JSON summary: {"seed", "failures", "counts", ...}.

- A worker (one or two threads) loops over random public-API producers of files: each call
  either succeeds, and what it made reads back exactly (read_wav, and python-soundfile or the
  stdlib wave module) from one of the two dirs, or raises a documented error (Worker.failed):
  OSError ENOSPC/EDQUOT naming a path in one of our dirs (a file the fallback dir refused
  when the producer falls back; the given path when it was given; a RAM-dir file's message
  with the --shm-size hint), a cache's RenderError naming a full disk. Anything else is a
  violation, a TimeoutError too: pools and the cache wait 10 s at most, and no process
  here is ever stopped, so only a hang runs that out.
- The filler makes and removes balloon files (``balloon_*``) of random sizes in both dirs,
  so that ENOSPC comes and goes at any step.
- The watcher scans both dirs at random moments: a WAV under one of our final names that
  no process holds (every luna_shm object holds its file with a shared flock: none in
  /proc/locks, and the watcher gets its exclusive lock without waiting, as a cleanup
  does, and holds it while it reads) must be empty (a name reserved by
  get_temp_audio_path(create=True)) or a complete WAV, unchanged while read, whose RIFF
  size covers exactly the file; only a WavWriter's stream whose state still says "live"
  (its writer died: a SIGKILL between its samples and its header store) may have bytes
  past the RIFF end, and a write_wav(path, atomic=False) in place is not checked (a new
  file at a given path is written where it is, unlocked, documented; the worker lists
  those paths first).

Every role reports through soak_worker.Reporter, in JSON lines in CTL/out/<role>-<pid>.jsonl:
{"violation": ...} the moment it sees one, {"counts": ...} its tallies so far, now and then
and when it stops. The driving (start, kill, stop, judge) is tests/soak.py's.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import io
import json
import logging
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time
import traceback
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from soak import Soak, script_command, sweep, total_counts
from soak_worker import DTYPES, Reporter, held_by_someone, seeded_audio

import luna_shm
from luna_shm import (
    AudioCache,
    AudioPool,
    WavWriter,
    cache_key,
    cleanup_all_temp_audio,
    cleanup_temp_audio,
    create_wav_buffer,
    get_temp_audio_path,
    read_wav,
    save_temp_audio,
    write_wav,
)
from luna_shm.cache import RenderError

ROOT = "/tmp/fullsoak"  # inside the test's private /tmp (a private tmpfs)
RAM, FALLBACK, CTL = f"{ROOT}/ram", f"{ROOT}/fallback", f"{ROOT}/ctl"
RAM_SIZE, FALLBACK_SIZE = 3 * 1024 * 1024, 3 * 1024 * 1024
CACHE_NAME = "fullsoak"
CACHE_DISK = f"{FALLBACK}/fullsoak_cache"  # the cache's disk tier (not a name of ours)
CACHE_MAX, CACHE_DISK_MAX = 200_000, 300_000
WORKERS = 3
POOL_PREFIXES = ("luna_audio_", "fsoak_")
OWN_PREFIX = "fsown"  # + <pid>t<n>_: one worker thread's own pool prefix
FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
SHUTDOWN = 60.0  # seconds a worker has to finish once told to stop: a hang, not a pace
CALL_TIMEOUT = 10.0  # the pools' and cache's timeouts: no process here is ever stopped
KEYS = [cache_key(f"full disk soak {i}") for i in range(8)]
ENCODED_KEYS = [cache_key(f"full disk soak mp3 {i}") for i in range(3)]  # put_bytes only
# A worker's steps and their weights (Worker.do_<step>).
OPS = {"write_new": 14, "write_given": 10, "buffer": 10, "writer_new": 10, "writer_given": 6,
       "pool": 10, "save_bytes": 6, "save_stream": 5, "create_path": 5, "cache": 12,
       "cleanup_all": 4}


def audio_of(key: str) -> np.ndarray:
    """A cache key's audio: only ever this, whoever renders or puts it."""
    rng = np.random.default_rng(int(key[:12], 16))
    frames = 400 + int(key[12:16], 16) % 12_000
    return rng.integers(-32768, 32767, size=frames, dtype=np.int16)


def encoded_of(key: str) -> bytes:
    """An encoded key's bytes (put_bytes as .mp3): only ever these."""
    return b"ID3 not really an mp3 " + key.encode() * (50 + int(key[:4], 16) % 2000)


def signal_of(rng: random.Random, max_bytes: int) -> np.ndarray:
    """Random audio of a random type and channel count, at most max_bytes of samples."""
    dtype = rng.choice(DTYPES)
    channels = rng.choice([1, 1, 2])
    frames = rng.randrange(1, max(2, max_bytes // (channels * np.dtype(dtype).itemsize)))
    return seeded_audio(rng.getrandbits(48), frames, channels, dtype)


def some_size(rng: random.Random) -> int:
    """Bytes of audio for one producer: mostly small, now and then most of a dir."""
    return rng.choice([rng.randrange(100, 20_000), rng.randrange(20_000, 300_000),
                       rng.randrange(300_000, 1_500_000)])


def in_dir(path: str, directory: str) -> bool:
    return path.startswith(directory + "/")


# ---- the workers ---------------------------------------------------------------------------


class Worker(Reporter):
    """One or two threads, each looping over random producers until told to stop."""

    def __init__(self, ctl: str, seed: int) -> None:
        super().__init__("worker", ctl)
        self.seed = seed

    def run(self) -> None:
        rng = random.Random(self.seed)
        if rng.random() < 0.5:
            # The reserve of pre-faulted unnamed RAM files: a create that lacks space
            # gets it back first (every producer), so it meets every full disk too.
            luna_shm.prefault_wav_buffers(rng.choice([256 * 1024, 1024 * 1024]),
                                          per_size=rng.choice([1, 2]))
            self.count("prefault reserve on")
        threads = [threading.Thread(target=self.loop, args=(rng.getrandbits(48),))
                   for _ in range(rng.choice([1, 2]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = luna_shm.prefault_stats()
        if stats.hits or stats.misses or stats.failures:
            self.count(f"prefault hits {stats.hits}, misses {stats.misses}, "
                       f"failures {stats.failures}")
        luna_shm.prefault_wav_buffers(0)
        self.report_counts()

    def loop(self, seed: int) -> None:
        state = ThreadState(random.Random(seed), f"{OWN_PREFIX}{os.getpid()}t{seed % 1000}_")
        try:
            while not self.stopping():
                op = state.rng.choices(list(OPS), list(OPS.values()))[0]
                self.call(op, lambda op=op: getattr(self, f"do_{op}")(state))
        finally:
            self.call("shutdown", state.close)

    def call(self, op: str, action: Callable[[], object]) -> None:
        try:
            action()
            self.count(f"{op}: ok")
        except Exception as exc:  # each documented failure is accepted in failed()
            self.failed(op, exc)

    # -- what a failure may be --

    def failed(self, op: str, exc: BaseException, *, given: str | None = None) -> None:
        """Count exc when the README documents it for op, else report a violation.

        An OSError of a full disk names a path in one of our dirs (a cache's file one
        level deeper; a pool's room check names the RAM dir itself); a producer that
        falls back names the fallback dir's file; one given a path names that path; a
        RAM-dir file's ENOSPC carries the --shm-size hint.
        """
        where = getattr(exc, "luna_where", None)
        given = getattr(exc, "luna_given", given)
        if isinstance(exc, TimeoutError):
            # Pools and the cache take a timeout, but no process here is ever stopped:
            # only a hang (or a machine loaded for CALL_TIMEOUT seconds) runs it out.
            self.violation(f"a call timed out after {CALL_TIMEOUT} s: {exc}", op=op,
                           traceback="".join(traceback.format_exception(exc)))
            return
        if isinstance(exc, RenderError) and op == "cache":
            text = str(exc)
            if "No space left on device" in text:
                self.count(f"{op}: RenderError")
            else:
                self.violation("a RenderError that names no documented cause", op=op,
                               error=text)
            return
        if isinstance(exc, _Violation):
            self.violation(str(exc), op=op, **exc.details)
            return
        if not isinstance(exc, OSError) or exc.errno not in FULL:
            self.violation(f"undocumented {type(exc).__name__}: {exc}", op=op,
                           traceback=traceback.format_exc())
            return
        name = exc.filename
        problems = []
        if not isinstance(name, str) or not (
                name in (RAM, FALLBACK) or in_dir(name, RAM) or in_dir(name, FALLBACK)):
            problems.append("its filename is not in our dirs")
        elif name in (RAM, FALLBACK) and op != "pool":
            problems.append("its filename is a dir, not the file")
        elif given is not None and name != given:
            problems.append(f"its filename is not the given path {given}")
        elif where == "fallback" and not (in_dir(name, FALLBACK) or name == RAM):
            problems.append("a producer that falls back names no fallback file")
        # A pool refused up front says why in numbers (test_reliability_full_disk.py).
        room = op == "pool" and name == RAM and " cannot fit: " in (exc.strerror or "")
        if not room and os.strerror(exc.errno) not in (exc.strerror or ""):
            problems.append("its message does not say what failed")
        if (isinstance(name, str) and in_dir(name, RAM) and exc.errno == errno.ENOSPC
                and "--shm-size" not in (exc.strerror or "")):
            problems.append("a full RAM disk's error has no --shm-size hint")
        if problems:
            self.violation("; ".join(problems), op=op, errno=exc.errno,
                           error=str(exc), filename=name, given=given, where=where,
                           traceback="".join(traceback.format_exception(exc)))
            return
        self.count(f"{op}: {errno.errorcode[exc.errno]}"
                   f" {'ram' if isinstance(name, str) and name.startswith(RAM) else 'fallback'}")

    # -- checks of what succeeded --

    def check_audio(self, path: str, data: np.ndarray, what: str, *,
                    may_vanish: bool) -> None:
        """path holds exactly data, by read_wav and python-soundfile (or wave); a file
        nobody holds may be removed by any cleanup meanwhile (may_vanish)."""
        if os.path.dirname(path) not in (RAM, FALLBACK):
            raise _Violation(f"{what} is outside our dirs", path=path)
        try:
            with open(path, "rb") as f:
                whole = f.read()
            got, _ = read_wav(path, mmap=False)
        except FileNotFoundError:
            if not may_vanish:
                raise _Violation(f"a held {what} was removed", path=path) from None
            self.count(f"{what}: removed before read back")
            return
        if got.shape != data.shape or got.dtype != data.dtype or got.tobytes() != data.tobytes():
            raise _Violation(f"{what} does not read back (read_wav)", path=path)
        oracle = oracle_samples(whole, data)
        if oracle is not None and not np.array_equal(oracle, expected_by_oracle(data)):
            raise _Violation(f"{what} does not read back (soundfile/wave)", path=path)

    # -- the producers --

    def do_write_new(self, s: ThreadState) -> None:
        data = signal_of(s.rng, some_size(s.rng))
        with where("fallback"):
            path = write_wav(None, data, 16000, atomic=s.rng.random() < 0.3)
        self.check_audio(path, data, "write_wav(None) file", may_vanish=True)
        s.mine.append(path)

    def do_write_given(self, s: ThreadState) -> None:
        data = signal_of(s.rng, some_size(s.rng))
        hint = data.nbytes + 128 if s.rng.random() < 0.5 else None
        # Its name reserved by an empty file now and then.
        reserved = s.rng.random() < 0.3
        path = get_temp_audio_path(size_hint=hint, create=reserved)
        atomic = s.rng.random() < 0.5
        if not atomic:  # written in place (documented): the watcher does not check it
            self.publish_in_place(path)
        try:
            with where("given", path):
                write_wav(path, data, 16000, atomic=atomic)
        except OSError:
            # "A file the call created is removed, a file with content is left as it
            # was": a name reserved before the call may stay as it was, empty (atomic=True
            # leaves it; atomic=False removes an empty temp file of ours too).
            try:
                size: int | None = os.lstat(path).st_size
            except FileNotFoundError:
                size = None
            if size is not None and (size or not reserved):
                self.violation("a failed write_wav left a file", path=path, size=size,
                               atomic=atomic, reserved=reserved)
            raise
        self.check_audio(path, data, "write_wav(path) file", may_vanish=True)
        s.mine.append(path)

    def publish_in_place(self, path: str) -> None:
        fd = os.open(os.path.join(self.ctl, "in_place"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, (path + "\n").encode())
        finally:
            os.close(fd)

    def do_buffer(self, s: ThreadState) -> None:
        data = signal_of(s.rng, some_size(s.rng))
        channels = 1 if data.ndim == 1 else data.shape[1]
        with where("fallback"):
            buf = create_wav_buffer(data.shape[0], 16000, channels, data.dtype)
        buf.array[...] = data
        self.check_audio(buf.path, data, "WavBuffer", may_vanish=False)
        if s.rng.random() < 0.5:
            s.buffers.append((buf, data))  # kept a while: space taken, the file held
        else:
            buf.close()
            self.check_audio(buf.path, data, "closed WavBuffer", may_vanish=True)
        while len(s.buffers) > 2 or (s.buffers and s.rng.random() < 0.3):
            kept, kept_data = s.buffers.pop(0)
            self.check_audio(kept.path, kept_data, "kept WavBuffer", may_vanish=False)
            # Its pages written again, on a disk the filler may have filled meanwhile:
            # reserved at its creation, they never fault (SIGBUS).
            again = kept_data[::-1].copy()
            kept.array[...] = again
            self.check_audio(kept.path, again, "kept WavBuffer", may_vanish=False)
            kept.close()

    def do_writer_new(self, s: ThreadState) -> None:
        self.stream(s, None)

    def do_writer_given(self, s: ThreadState) -> None:
        self.stream(s, get_temp_audio_path(create=s.rng.random() < 0.3))

    def stream(self, s: ThreadState, given: str | None) -> None:
        """A WavWriter streams random chunks; a full disk at its creation falls back
        (path None) or raises naming the path; mid-stream it raises naming the file,
        which keeps exactly the chunks before; then close() or abort()."""
        rng = s.rng
        data = signal_of(rng, some_size(rng))
        channels = 1 if data.ndim == 1 else data.shape[1]
        op = "writer_new" if given is None else "writer_given"
        try:
            with where("fallback" if given is None else "given", given):
                writer = WavWriter(given, 16000, channels, data.dtype)
        except OSError:
            # The file it made is removed, and so is an empty temp file of ours that
            # reserved the name (see _newfile.discard).
            if given is not None and os.path.lexists(given):
                self.violation("a WavWriter that failed at its creation left its file",
                               path=given)
            raise
        done, full = 0, None
        try:
            while done < data.shape[0]:
                size = min(data.shape[0] - done, rng.choice([1, rng.randrange(1, 4000),
                                                             rng.randrange(1, 40_000)]))
                try:
                    writer.write(data[done:done + size])
                except OSError as exc:
                    full = exc
                    self.failed(op + " mid-stream", exc, given=writer.path)
                    break
                done += size
                if rng.random() < 0.2:
                    self.check_named(writer)
                    time.sleep(rng.uniform(0, 0.02))
            self.check_named(writer)
            if writer.frames != done:
                self.violation("writer.frames is not what was written", path=writer.path,
                               frames=writer.frames, written=done)
        finally:
            if (full is not None and rng.random() < 0.5) or rng.random() < 0.1:
                writer.abort()
            else:
                writer.close()
        self.check_audio(writer.path, data[:done], "finished WavWriter file", may_vanish=True)
        s.mine.append(writer.path)

    def check_no_slots(self, s: ThreadState, what: str) -> None:
        """No file of the thread's own pool prefix is left (it has no pool now)."""
        left = [f"{d}/{n}" for d in (RAM, FALLBACK) for n in os.listdir(d)
                if n.startswith(s.prefix)]
        if left:
            raise _Violation(what, files=left)

    def check_named(self, writer: WavWriter) -> None:
        """A live WavWriter's file is never removed or replaced (its path names it)."""
        try:
            named = os.stat(writer.path).st_ino
        except FileNotFoundError:
            named = None
        if named != os.fstat(writer.fileno()).st_ino:
            raise _Violation("a live WavWriter's file was removed or replaced",
                             path=writer.path)
        # In use: held with a shared flock (a cleanup's exclusive test fails), on the
        # open file of the writer itself.
        if not held_by_someone(writer.path):
            raise _Violation("a live WavWriter's file is not locked", path=writer.path,
                             frames=writer.frames)

    def do_pool(self, s: ThreadState) -> None:
        rng = s.rng
        if s.pool is None or rng.random() < 0.1:
            if s.pool is not None:
                s.pool.close()
                s.pool = None
                self.check_no_slots(s, "a closed pool left slot files")
            # The thread's own prefix, now and then: no other pool reclaims its files, so
            # a pool that failed (or closed) must have removed every one it made.
            prefix = rng.choice([*POOL_PREFIXES, s.prefix])
            try:
                with where("fallback"):
                    s.pool = AudioPool(slots=rng.randrange(1, 4),
                                       max_bytes=rng.choice([8192, 60_000, 250_000]),
                                       prefix=prefix, timeout=CALL_TIMEOUT,
                                       when_busy=rng.choice(["wait", "grow"]))
            except OSError:
                self.check_no_slots(s, "a pool that failed to be made left slot files")
                raise
        pool = s.pool
        held = []
        try:
            for _ in range(rng.randrange(1, pool.slots + 1)):
                data = signal_of(rng, pool.max_bytes)
                with where("fallback"):
                    if rng.random() < 0.7:
                        pooled = pool.write_wav(data, 16000)
                    else:  # its pages written through the mapping: reserved, no SIGBUS
                        channels = 1 if data.ndim == 1 else data.shape[1]
                        pooled = pool.acquire(data.shape[0], 16000, channels, data.dtype)
                        pooled.array[...] = data
                held.append((pooled, data))
                self.check_audio(pooled.path, data, "pool slot", may_vanish=False)
            for pooled, data in held:
                self.check_audio(pooled.path, data, "pool slot", may_vanish=False)
        finally:
            for pooled, _ in held:
                pooled.release()

    def do_save_bytes(self, s: ThreadState) -> None:
        payload = s.rng.randbytes(some_size(s.rng))
        with where("fallback"):
            path = save_temp_audio(payload if s.rng.random() < 0.6 else
                                   [payload[:1000], payload[1000:]], ".mp3")
        self.check_bytes(path, payload)
        s.mine.append(path)

    def do_save_stream(self, s: ThreadState) -> None:
        payload = s.rng.randbytes(some_size(s.rng))
        pieces = [payload[i:i + 30_000] for i in range(0, len(payload), 30_000)]

        def chunks() -> Iterator[bytes]:
            for piece in pieces:
                if s.rng.random() < 0.2:
                    time.sleep(s.rng.uniform(0, 0.01))
                yield piece

        # A stream falls back only at its creation: mid-stream, the RAM file is named.
        path = save_temp_audio(chunks(), ".mp3")
        self.check_bytes(path, payload)
        s.mine.append(path)

    def check_bytes(self, path: str, payload: bytes) -> None:
        if os.path.dirname(path) not in (RAM, FALLBACK):
            raise _Violation("a saved file is outside our dirs", path=path)
        try:
            with open(path, "rb") as f:
                got = f.read()
        except FileNotFoundError:
            self.count("saved file: removed before read back")
            return
        if got != payload:
            raise _Violation("a saved file does not hold what was saved", path=path,
                             size=len(got), of=len(payload))

    def do_create_path(self, s: ThreadState) -> None:
        with where("fallback"):
            path = get_temp_audio_path(create=True, size_hint=s.rng.choice([None, 1000]))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.count("created path: removed before looked at")
            return
        if st.st_size != 0 or os.path.dirname(path) not in (RAM, FALLBACK):
            raise _Violation("get_temp_audio_path(create=True) made no empty file in our dirs",
                             path=path, size=st.st_size)
        s.mine.append(path)

    def do_cleanup_all(self, s: ThreadState) -> None:
        if s.rng.random() < 0.5:
            cleanup_all_temp_audio(older_than=s.rng.choice([0, 0.5]))
        else:
            cleanup_all_temp_audio()
        while len(s.mine) > 4 or (s.mine and s.rng.random() < 0.5):
            result = cleanup_temp_audio(s.mine.pop(s.rng.randrange(len(s.mine))))
            if not isinstance(result, bool):
                raise _Violation("cleanup_temp_audio returned no bool", result=repr(result))

    def do_cache(self, s: ThreadState) -> None:
        rng = s.rng
        if s.cache is None:
            s.cache = AudioCache(CACHE_NAME, max_bytes=CACHE_MAX, disk_dir=CACHE_DISK,
                                 disk_max_bytes=CACHE_DISK_MAX, timeout=CALL_TIMEOUT)
        cache = s.cache
        what = rng.choice(["get", "put", "render", "render", "bytes", "reopen"])
        if what == "reopen":
            cache.close()
            s.cache = None
            return
        if what == "bytes":
            key = rng.choice(ENCODED_KEYS)
            if rng.random() < 0.5:
                entry = cache.put_bytes(key, encoded_of(key), ".mp3", timeout=CALL_TIMEOUT)
            else:
                entry = cache.get(key, timeout=CALL_TIMEOUT)
                if entry is None:
                    self.count("cache get: miss")
                    return
            with entry:
                if entry.read_bytes() != encoded_of(key):
                    raise _Violation("the cache gave other bytes of an encoded key",
                                     key=key, path=entry.path)
            return
        key = rng.choice(KEYS)
        want = audio_of(key)
        if what == "get":
            entry = cache.get(key, timeout=CALL_TIMEOUT)
            if entry is None:
                self.count("cache get: miss")
                return
        elif what == "put":
            entry = cache.put(key, want, 16000, timeout=CALL_TIMEOUT)
        else:
            slow = rng.random() < 0.3  # a render others wait for

            def render(writer: WavWriter) -> None:
                for i in range(0, len(want), 1000):
                    writer.write(want[i:i + 1000])
                    if slow:
                        time.sleep(0.005)

            entry = cache.get_or_render(key, render, samplerate=16000, timeout=CALL_TIMEOUT)
        with entry:
            if entry.array.tobytes() != want.tobytes() or entry.samplerate != 16000:
                raise _Violation(f"the cache's {what} of a key gave other audio", key=key,
                                 path=entry.path)


class ThreadState:
    """What one worker thread holds between steps."""

    def __init__(self, rng: random.Random, prefix: str) -> None:
        self.rng = rng
        self.prefix = prefix  # the thread's own pool prefix
        self.mine: list[str] = []  # files it made and may clean up itself
        self.buffers: list[tuple[luna_shm.WavBuffer, np.ndarray]] = []
        self.pool: AudioPool | None = None
        self.cache: AudioCache | None = None

    def close(self) -> None:
        for buf, _ in self.buffers:
            buf.close()
        if self.pool is not None:
            self.pool.close()
        if self.cache is not None:
            self.cache.close()


class _Violation(Exception):
    """A check of a worker failed (reported with its details)."""

    def __init__(self, what: str, **details: Any) -> None:
        super().__init__(what)
        self.details = details


@contextmanager
def where(place: str, given: str | None = None) -> Iterator[None]:
    """Mark an OSError raised in the block with where its file should be: the fallback
    dir ("fallback": a producer that falls back), or the given path ("given")."""
    try:
        yield
    except OSError as exc:
        exc.luna_where = place  # type: ignore[attr-defined]
        exc.luna_given = given  # type: ignore[attr-defined]
        raise


def expected_by_oracle(data: np.ndarray) -> np.ndarray:
    """data as python-soundfile returns it (8-bit as int16: (x - 128) << 8)."""
    if data.dtype == np.uint8:
        return ((data.astype(np.int16) - 128) << 8).astype(np.int16)
    return data


def oracle_samples(whole: bytes, data: np.ndarray) -> np.ndarray | None:
    """The samples python-soundfile reads from the file's bytes (the stdlib wave module
    for the 8-bit and 16-bit ones, every other time), in data's shape."""
    if data.dtype in (np.uint8, np.int16) and len(whole) % 2:
        return None
    if data.dtype in (np.uint8, np.int16) and hash(whole[-64:]) % 2:
        with wave.open(io.BytesIO(whole)) as w:
            raw = w.readframes(w.getnframes())
        got = np.frombuffer(raw, data.dtype)
        return expected_by_oracle(got.reshape(data.shape))
    dtype = "int16" if data.dtype == np.uint8 else data.dtype.name
    got, _ = sf.read(io.BytesIO(whole), dtype=dtype, always_2d=data.ndim == 2)
    return got.reshape(data.shape)


# ---- the filler ----------------------------------------------------------------------------


class Filler(Reporter):
    """Balloon files (balloon_*, not a name of ours) made and removed at random in both
    dirs: a dir filled to the last page, part-filled, or freed again."""

    def __init__(self, ctl: str, seed: int) -> None:
        super().__init__("filler", ctl)
        self.rng = random.Random(seed)
        self.balloons: list[str] = []

    def run(self) -> None:
        rng = self.rng
        serial = 0
        while not self.stopping():
            what = rng.choices(["blow", "fill", "pop", "pop_all"], [40, 15, 35, 10])[0]
            if what in ("blow", "fill") and len(self.balloons) < 6:
                serial += 1
                directory = rng.choice([RAM, FALLBACK])
                path = f"{directory}/balloon_{os.getpid()}_{serial}"
                size = (1 << 40) if what == "fill" else rng.randrange(4096, RAM_SIZE)
                self.blow(path, size)
                self.count(what)
            elif what == "pop" and self.balloons:
                os.unlink(self.balloons.pop(rng.randrange(len(self.balloons))))
                self.count(what)
            elif what == "pop_all":
                while self.balloons:
                    os.unlink(self.balloons.pop())
                self.count(what)
            time.sleep(rng.choice([0, rng.uniform(0, 0.05), rng.uniform(0, 0.4)]))
        while self.balloons:
            os.unlink(self.balloons.pop())
        self.report_counts()

    def blow(self, path: str, size: int) -> None:
        """Write up to size bytes into a new balloon at path (less when the dir fills)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.balloons.append(path)
        block = b"\xa5" * 65536
        try:
            done = 0
            while done < size:
                try:
                    done += os.write(fd, block[:min(len(block), size - done)])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    self.count("a dir filled up")
                    break
        finally:
            os.close(fd)


# ---- the watcher ---------------------------------------------------------------------------


def held_inodes() -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file that some process holds a lock on (/proc/locks:
    the luna_shm objects that own a file hold a shared flock on it)."""
    held = set()
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if "->" in fields:  # a waiter: it holds nothing yet
                continue
            major, minor, inode = fields[5].split(":")
            held.add((int(major, 16), int(minor, 16), int(inode)))
    return held


def identity(st: os.stat_result) -> tuple[int, int, int]:
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)


class Watcher(Reporter):
    """Scans both dirs at random moments for visible half-made files of ours."""

    def __init__(self, ctl: str, seed: int) -> None:
        super().__init__("watcher", ctl)
        self.rng = random.Random(seed)

    def run(self) -> None:
        while not self.stopping():
            for directory in (RAM, FALLBACK):
                for name in os.listdir(directory):
                    # Our WAVs (save_temp_audio's .mp3 files are checked by their makers).
                    if name.startswith(luna_shm.AUDIO_PREFIX) and name.endswith(".wav"):
                        self.check(f"{directory}/{name}")
            time.sleep(self.rng.uniform(0, 0.05))
        self.report_counts()

    def in_place(self) -> set[str]:
        try:
            with open(os.path.join(self.ctl, "in_place")) as f:
                return set(f.read().split())
        except FileNotFoundError:
            return set()

    def check(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone, or a symlink (none of ours)
            return
        try:
            if os.fstat(fd).st_size == 0:
                self.count("empty (a reserved name)")
                return
            # /proc/locks first (it disturbs no one), but it is read a page at a time and
            # skips locks taken or let go of between the pages: a free file is then made
            # sure of as a cleanup does, by taking its lock exclusively without waiting
            # (every luna_shm holder holds it shared from before the file has a name).
            # Held by us while it is read, the file cannot get a luna_shm holder, so
            # nothing but a write_wav(path) in place (unlocked, documented) may change it.
            if identity(os.fstat(fd)) in held_inodes():
                self.count("held")
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.count("held (seen by the lock test)")
                return
            before = os.fstat(fd)
            whole = b""
            while chunk := os.pread(fd, 1 << 20, len(whole)):
                whole += chunk
            after = os.fstat(fd)
            changed = (after.st_size != before.st_size or len(whole) != after.st_size
                       or after.st_mtime_ns != before.st_mtime_ns)
            problem = "it changed while it was read" if changed else wav_problem(whole)
            if problem is None:
                self.count("complete")
                try:
                    read_wav(path, mmap=False)
                except FileNotFoundError:
                    pass
                except luna_shm.WavError as exc:
                    if os.path.exists(path) and os.lstat(path).st_ino == after.st_ino:
                        self.violation("read_wav refuses a complete file", path=path,
                                       error=str(exc))
                return
            if path in self.in_place():
                self.count("in-place write_wav(path) not checked")
                return
            self.violation("a visible file of ours, held by no one, is not a complete WAV",
                           path=path, problem=problem, size=len(whole),
                           head=whole[:96].hex())
        finally:
            os.close(fd)


def wav_problem(whole: bytes) -> str | None:
    """None when whole is a complete WAV (its RIFF size covering exactly the bytes; a
    WavWriter's stream still "live", whose writer died, may have bytes past it) that
    python-soundfile reads, else what is wrong."""
    if len(whole) < 12 or whole[:4] != b"RIFF" or whole[8:12] != b"WAVE":
        return "no RIFF/WAVE header"
    riff_end = struct.unpack_from("<I", whole, 4)[0] + 8
    live = b"lsstlive" in whole[:128]
    if riff_end != len(whole) and not (live and riff_end < len(whole)):
        return f"its RIFF size says {riff_end} bytes, the file has {len(whole)}"
    try:
        sf.info(io.BytesIO(whole[:riff_end]))
    except Exception as exc:  # soundfile's LibsndfileError and friends
        return f"python-soundfile cannot read it: {exc}"
    return None


# ---- the soak itself (in the private mount namespace) -------------------------------------


def mount_dirs() -> None:
    for directory, size in ((RAM, RAM_SIZE), (FALLBACK, FALLBACK_SIZE)):
        os.makedirs(directory)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        directory], check=True)
    os.mkdir(CACHE_DISK, 0o700)  # the disk tier's parent (its cache dir is made in it)


def chaos(run: Soak, done: threading.Event) -> None:
    """SIGKILL a random worker now and then, and start another in its place."""
    while not done.wait(run.rng.uniform(0.5, 3.0)):
        with run.lock:
            workers = [w for w in run.workers if w.role == "worker" and w.proc.poll() is None]
            if workers:
                run.kill(run.rng.choice(workers))


def listing() -> list[str]:
    return [f"{d}/{n}" for d in (RAM, FALLBACK) for n in sorted(os.listdir(d))]


def soak(seed: int, seconds: float) -> dict[str, Any]:
    mount_dirs()
    os.environ.update(LUNA_SHM_DIR=RAM, TMPDIR=FALLBACK)
    assert luna_shm.refresh_temp_dir() == RAM, luna_shm.temp_dir()
    env = dict(os.environ)
    env.pop("LUNA_SHM_DISABLE", None)
    run = Soak(Path(CTL), env, random.Random(seed), script_command(__file__, CTL))
    run.start_all({"worker": WORKERS, "filler": 1, "watcher": 1})
    # The soak's time starts once every process has imported what it needs (each makes
    # its report file then): on a loaded machine that alone can take seconds.
    ready = time.monotonic() + SHUTDOWN
    while len(os.listdir(f"{CTL}/out")) < WORKERS + 2 and time.monotonic() < ready:
        time.sleep(0.05)
    failures, records = run.run(seconds, lambda done: chaos(run, done), shutdown=SHUTDOWN)
    counts = collections.Counter(total_counts(records, by_role=True))
    # Every process is gone (the filler removed its balloons): one cleanup and new pools'
    # reclaims leave nothing of ours but the cache's directories.
    balloons = [p for p in listing() if os.path.basename(p).startswith("balloon_")]
    if balloons:
        failures.append(f"the filler left balloons: {balloons}")
        for path in balloons:
            os.unlink(path)
    # A worker thread's own pool prefix: a worker that was not killed closed its pools,
    # removing their files; a killed one's are reclaimed below.
    own = {n.split("_pool_")[0] + "_" for n in
           (os.path.basename(p) for p in listing()) if n.startswith(OWN_PREFIX)}
    for prefix in sorted(own):
        pid = int(prefix[len(OWN_PREFIX):].split("t")[0])
        if pid not in run.killed:
            failures.append(f"worker {pid}, which was not killed, left files of its own "
                            f"pool prefix {prefix}: "
                            f"{[p for p in listing() if os.path.basename(p).startswith(prefix)]}")
    sweep([*POOL_PREFIXES, *sorted(own)])
    cache_dir = f"{RAM}/luna_cache-{os.geteuid()}-{CACHE_NAME}"
    left = [p for p in listing() if p not in (cache_dir, CACHE_DISK)]
    if left:
        failures.append(f"files left after the final cleanup and reclaims: {left}")
    failures += check_cache(counts)
    left = listing()
    if left:
        failures.append(f"files left after the cache was destroyed: {left}")
    return {"seed": seed, "failures": failures, "counts": dict(sorted(counts.items())),
            "processes": len(run.ended), "killed": len(run.killed)}


def check_cache(counts: collections.Counter[str]) -> list[str]:
    """A fresh cache on the same dirs agrees with its files: every key it has gives
    exactly that key's audio (from RAM, or reloaded from the disk tier); then it is
    destroyed, leaving nothing."""
    failures = []
    cache = AudioCache(CACHE_NAME, max_bytes=CACHE_MAX, disk_dir=CACHE_DISK,
                       disk_max_bytes=CACHE_DISK_MAX, timeout=CALL_TIMEOUT)
    try:
        for key, path, _ in cache.entries():
            if key not in KEYS and key not in ENCODED_KEYS:
                failures.append(f"the cache has an entry of no key of ours: {path}")
        for key in [*KEYS, *ENCODED_KEYS]:
            entry = cache.get(key, timeout=CALL_TIMEOUT)
            if entry is None:
                continue
            with entry:
                counts["end: cache entries"] += 1
                if key in KEYS and entry.array.tobytes() != audio_of(key).tobytes():
                    failures.append(f"the cache's entry of {key} holds other audio")
                elif key in ENCODED_KEYS and entry.read_bytes() != encoded_of(key):
                    failures.append(f"the cache's entry of {key} holds other bytes")
    finally:
        cache.destroy(timeout=CALL_TIMEOUT)
    os.rmdir(CACHE_DISK)
    return failures


# The lines luna_shm logs once a process (placement.log_once); others are one an event
# (an entry the cache could not spill is lost: each says which).
ONCE = ("refused a new file", "does not fit in", "cannot be examined", "prefault reserve")


class LoggedOnce(logging.Handler):
    """A violation when the luna_shm logger says one of its once-only lines twice (but
    for its numbers and names) in one process."""

    def __init__(self, reporter: Reporter) -> None:
        super().__init__(logging.DEBUG)
        self.reporter = reporter
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.INFO:  # DEBUG lines: one a call, by design
            return
        message = record.getMessage()
        kind = re.sub(r"[0-9a-f]*[0-9][0-9a-f]*", "N", message)  # numbers, hex names
        if kind in self.seen and any(once in message for once in ONCE):
            self.reporter.violation("the luna_shm logger said it again", message=message)
        self.seen.add(kind)
        self.reporter.count(f"logged: {kind}")


def main() -> None:
    if sys.argv[1] == "run":
        result = soak(int(sys.argv[2]), float(sys.argv[3]))
        print(json.dumps(result))
        return
    role, ctl, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    assert luna_shm.temp_dir() == RAM, luna_shm.temp_dir()
    process = {"worker": Worker, "filler": Filler, "watcher": Watcher}[role](ctl, seed)
    # The fallback's log lines (warnings: with no handler, Python's last resort prints
    # them on stderr, which the soak fails on) are checked here instead: each is logged
    # once a process, whatever its numbers.
    logging.getLogger("luna_shm").addHandler(LoggedOnce(process))
    logging.getLogger("luna_shm").propagate = False
    process.run()


if __name__ == "__main__":
    main()
