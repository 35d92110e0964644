"""The worker processes of tests/test_fork_soak.py (run as a script).

    python fork_soak_workers.py CTL_DIR SEED

A worker is a TTS daemon that forks: 3-5 threads loop over random public-API calls (each
checks that what it reads back is exactly what it wrote), a thread sends the process
SIGUSR1 now and then (its handler forks, as a daemon spawning a worker does), and the main
thread makes calls of its own and forks at random moments (os.fork, or a multiprocessing
worker of the fork start method). Every child, with a watchdog
(faulthandler: a hang prints every thread's stack into CTL_DIR/err/hang-PID.txt and exits),
uses what it inherited (which must refuse with RuntimeError naming the parent, but the
AudioCache, which a child may use), makes and uses its own objects of every kind, then
leaves by sys.exit, the end of the script, os._exit or an exception, after closing or
dropping what it inherited, or not. The parent checks each child's exit, then that its own
files are all there with their content and flocks, and that its objects still work.

It appends JSON lines to CTL_DIR/out/worker-PID.jsonl (soak_worker.Reporter), its children
too: {"violation": ...} at once (a worker may be killed at any moment), counts of what it
did now and then, and {"event": "end"} when it stopped. It stops (finishes its calls,
closes everything, exits 0) once CTL_DIR/stop exists.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import multiprocessing
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from soak_worker import Reporter, held_by_someone, private_dirs_only, seeded_audio

from luna_shm import (
    AudioCache,
    AudioPool,
    WavWriter,
    cache_key,
    cleanup_all_temp_audio,
    cleanup_temp_audio,
    create_wav_buffer,
    follow_wav,
    get_temp_audio_path,
    iter_wav_stream,
    prefault_wav_buffers,
    read_wav,
    recv_wav,
    send_wav,
    temp_audio_path,
    write_wav,
)

CACHE_NAME = "fork_soak"
CACHE_KEYS = 8
PLAIN_PREFIX = "forksoak_"  # plain files: out of cleanup_all_temp_audio's reach (unheld)
WATCHDOG = 30.0  # seconds a child may take: far above its calls, even on a loaded machine
CHILD_WAIT = 90.0  # seconds the parent waits for a child (past the watchdog: a hang)
TIMEOUT = 30.0  # followers, renders waited for


def audio_of(seed: int, frames: int, channels: int = 1) -> np.ndarray:
    """Seeded int16 audio, (frames,) or (frames, channels)."""
    return seeded_audio(seed, frames, channels, "int16")


def key_audio(index: int) -> np.ndarray:
    """The audio of the cache's key number index (every process renders the same)."""
    return audio_of(1000 + index, 2000 + 700 * index)


KEYS = [cache_key(f"fork soak {i}") for i in range(CACHE_KEYS)]


class LeaveByEnd(BaseException):
    """A child leaving by the end of the script: caught at the top, nothing after it."""


class ChildFails(BaseException):
    """A child leaving by an uncaught exception (a quiet excepthook: exit code 1)."""


def exactly(what: str, got: np.ndarray, want: np.ndarray) -> str | None:
    if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
        return (f"{what}: not what was written ({got.dtype}{got.shape} against "
                f"{want.dtype}{want.shape})")
    return None


def _fds_open_on(path: str) -> list[tuple[str, str]]:
    """(pid, fd) of every fd of every process that has path's file open."""
    try:
        inode = os.stat(path).st_ino
    except OSError:
        return []
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.stat(f"/proc/{pid}/fd/{fd}").st_ino == inode:
                    found.append((pid, fd))
        except OSError:
            pass
    return found


def holders(path: str) -> list[str]:
    """The processes with an fd of path open (pid, and whose child it is), to explain."""
    try:
        os.stat(path)
    except OSError as exc:
        return [f"{type(exc).__name__}: {exc}"]
    found = []
    for pid, fd in _fds_open_on(path):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                parent = stat.read().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        found.append(f"pid {pid} (child of {parent}) fd {fd}")
    return found


def holder_pids(path: str) -> set[int]:
    """The pids of the processes with an fd of path open."""
    return {int(pid) for pid, _ in _fds_open_on(path)}


def removed(path: str, started: Callable[[], set[int]]) -> bool:
    """cleanup_temp_audio(path) of a file nothing of ours holds any more: True, or False
    while a child forked in the instant has not yet closed its copies of the fds of the
    moment: its at-fork hooks do, its first steps (README, Limits: Fork), which a loaded
    machine delays. A holder that started (past its hooks: started() has its pid) holds
    it for real when it still does 0.5 s later: a child's own cleanup_all_temp_audio takes
    the file's flock for the instant of its test (and then removes it). At most a few
    seconds in all."""
    now = time.monotonic()
    deadline, started_holder_since = now + 5.0, None
    while True:
        if cleanup_temp_audio(path) is True or not os.path.exists(path):
            return True
        now = time.monotonic()
        if not holder_pids(path) & started():
            started_holder_since = None
        elif started_holder_since is None:
            started_holder_since = now
        elif now - started_holder_since > 0.5:
            return False
        if now > deadline:
            return False
        time.sleep(0.01)


def swallows_exceptions(frame: Any) -> bool:
    """Whether the code a signal handler interrupted (frame and its callers) runs where
    Python ignores (prints) an exception: a weakref callback or finalizer, a __del__."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or code.co_filename.endswith(
                ("/weakref.py", "/_weakrefset.py")):
            return True
        frame = frame.f_back
    return False


def content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Worker(Reporter):
    """The daemon: its threads' moves, its forks and their children's lives, its checks.
    Its children report into its file (out/worker-PID.jsonl), naming it as "worker"."""

    def __init__(self, ctl: str, seed: int) -> None:
        super().__init__("worker", ctl)
        self.seed = seed
        self.rng = random.Random(seed)
        # Reentrant (as Reporter's counts_lock): the SIGUSR1 handler records children,
        # and may interrupt this very thread there.
        self.children: list[tuple[int, str, str]] = []  # pid, expected exit, how forked
        self.children_lock = threading.RLock()
        self.handler_rng = random.Random(self.rng.getrandbits(64))
        self.stop_event = threading.Event()

    def stopping(self) -> bool:
        return self.stop_event.is_set() or super().stopping()

    # ---- the shared objects, and the parent's kept ones ----

    def setup(self) -> None:
        self.prefault = self.rng.random() < 0.6
        if self.prefault:
            prefault_wav_buffers(1024 * 1024)
        self.pool = AudioPool(slots=3, max_bytes=40000, when_busy="grow")
        self.anonymous_pool = AudioPool(slots=2, max_bytes=40000, anonymous=True,
                                        when_busy="grow")
        self.pools = (self.pool, self.anonymous_pool)  # what the moves use (a child: its own)
        self.cache = AudioCache(CACHE_NAME, max_bytes=120_000, timeout=TIMEOUT)
        # Kept by the main thread across every fork: their files must stay as they are.
        self.kept_audio = audio_of(self.seed, 500)
        self.kept_buffer = create_wav_buffer(500, 8000)
        self.kept_buffer.array[:] = self.kept_audio
        self.kept_pooled = self.pool.write_wav(self.kept_audio, 8000)
        self.kept_writer = WavWriter(None, 8000)
        self.kept_written = [self.kept_audio[:100]]
        self.kept_writer.write(self.kept_audio[:100])
        self.kept_follower = follow_wav(self.kept_writer.path, timeout=TIMEOUT)
        got = next(self.kept_follower)
        self.kept_followed = [got]
        # Under a key of its own: another worker's put of a shared key replaces its file.
        self.kept_key = cache_key(f"kept by {self.seed}")
        self.kept_entry = self.cache.get_or_render(
            self.kept_key, lambda writer: writer.write(self.kept_audio), samplerate=8000)
        self.snapshot()

    def kept_paths(self) -> dict[str, str]:
        return {"buffer": self.kept_buffer.path, "pooled": self.kept_pooled.path,
                "writer": self.kept_writer.path, "entry": self.kept_entry.path}

    def snapshot(self) -> None:
        self.kept_before = {p: content(p) for p in self.kept_paths().values()}

    def check_kept(self, after: str) -> None:
        """The parent's own files and objects, after a child (forked how) left."""
        for name, path in self.kept_paths().items():
            try:
                if content(path) != self.kept_before[path]:
                    self.violation(f"after {after}: the parent's {name} file changed", path=path)
                if not held_by_someone(path):
                    self.violation(f"after {after}: the parent's {name} file is not held "
                                   "any more (a cleanup would remove it)", path=path)
            except FileNotFoundError:
                self.violation(f"after {after}: the parent's {name} file is gone", path=path)
        for what, got, want in (
                ("kept buffer", self.kept_buffer.array, self.kept_audio),
                ("kept pooled", self.kept_pooled.array, self.kept_audio),
                ("kept entry", self.kept_entry.array, self.kept_audio),
                ("kept writer's file", read_wav(self.kept_writer.path, mmap=False)[0],
                 np.concatenate(self.kept_written))):
            if (problem := exactly(f"after {after}: {what}", got, want)) is not None:
                self.violation(problem)

    def write_kept_stream(self) -> None:
        """The main thread goes on with its stream and its follower of it."""
        block = audio_of(self.rng.getrandbits(32), self.rng.randrange(1, 200))
        self.kept_writer.write(block)
        self.kept_written.append(block)
        want = sum(len(b) for b in self.kept_written)
        while sum(len(b) for b in self.kept_followed) < want:
            self.kept_followed.append(next(self.kept_follower))
        if (problem := exactly("kept follower", np.concatenate(self.kept_followed),
                               np.concatenate(self.kept_written))) is not None:
            self.violation(problem)
        self.snapshot()

    # ---- the moves: each makes its own objects, checks them exactly, lets go ----

    def renderer(self, index: int, rng: random.Random | None = None) -> Callable[[Any], None]:
        audio = key_audio(index)
        pause = 0.0 if rng is None else rng.choice([0, 0.001, 0.005, 0.02])

        def render(writer: Any) -> None:
            third = len(audio) // 3
            for part in (audio[:third], audio[third:2 * third], audio[2 * third:]):
                writer.write(part)
                time.sleep(pause)  # a render in progress, which others wait for
        return render

    def move_plain(self, rng: random.Random) -> str | None:
        data = audio_of(rng.getrandbits(32), rng.randrange(1, 3000), rng.choice([1, 2]))
        atomic = rng.random() < 0.3
        # None: a new luna_audio_ file, which another thread's cleanup_all_temp_audio may
        # remove before it is read (documented: nothing holds it): read at once, checked
        # only when still there.
        given = rng.random() < 0.7
        path = write_wav(get_temp_audio_path(prefix=PLAIN_PREFIX) if given else None, data,
                         16000, atomic=atomic)
        if not given:
            try:
                got = read_wav(path, mmap=False)[0]
            except FileNotFoundError:
                return None
            if not removed(path, self.started_children):
                return (f"cleanup_temp_audio of an unheld file of ours (write_wav(None), "
                        f"atomic={atomic}): not removed: {path}; held by {holders(path)}")
            return exactly("read_wav", got, data)
        got, rate = read_wav(path, mmap=rng.random() < 0.5)
        problem = exactly("read_wav", got, data) or (None if rate == 16000 else "rate")
        del got
        if not removed(path, self.started_children):
            return (f"cleanup_temp_audio of an unheld file of ours (write_wav, atomic="
                    f"{atomic}): not removed: {path}; held by {holders(path)}")
        return problem

    def move_buffer(self, rng: random.Random) -> str | None:
        data = audio_of(rng.getrandbits(32), rng.randrange(1, 3000), rng.choice([1, 2]))
        channels = 1 if data.ndim == 1 else 2
        with create_wav_buffer(len(data), 16000, channels,
                               anonymous=rng.random() < 0.5) as buf:
            buf.array[:] = data
            got = read_wav(buf.path, mmap=rng.random() < 0.5)[0]
            problem = exactly("create_wav_buffer", got, data) or exactly(
                "WavBuffer.array", buf.array, data)
            del got
            path = buf.path
        if not buf.path.startswith("/proc/"):
            cleanup_temp_audio(path)  # False: another thread's cleanup was first, or a child
            # keeps an array of it taken before its fork (README, Limits: Fork)
        return problem

    def move_pool(self, rng: random.Random) -> str | None:
        pool = self.pools[0] if rng.random() < 0.6 else self.pools[1]
        data = audio_of(rng.getrandbits(32), rng.randrange(1, 5000))
        if rng.random() < 0.5:
            pooled = pool.write_wav(data, 8000)
        else:
            pooled = pool.acquire(len(data), 8000)
            pooled.array[:] = data
        with pooled:
            return (exactly("PooledWav.array", pooled.array, data)
                    or exactly("read_wav of a slot", read_wav(pooled.path, mmap=False)[0],
                               data))

    def move_stream(self, rng: random.Random) -> str | None:
        blocks = [audio_of(rng.getrandbits(32), rng.randrange(1, 800))
                  for _ in range(rng.randrange(1, 6))]
        chunk_frames = rng.choice([None, None, 7, 160])
        # A stream in pieces of chunk_frames may yield nothing before the writer ends:
        # a name of another prefix, which no other thread's cleanup_all_temp_audio removes
        # before the follower opened it.
        writer = WavWriter(None if chunk_frames is None else get_temp_audio_path(
            prefix=PLAIN_PREFIX), 8000)
        followed = threading.Event()
        pause = rng.choice([0, 0.001, 0.005])

        def write_the_rest() -> None:
            if chunk_frames is None:
                followed.wait(TIMEOUT)  # the follower has the file open
            for block in blocks[1:]:
                time.sleep(pause)
                writer.write(block)
            writer.close()

        path = writer.path
        writer.write(blocks[0])
        other = threading.Thread(target=write_the_rest)
        other.start()
        try:
            got = []
            if chunk_frames is None and rng.random() < 0.5:
                for block in follow_wav(path, timeout=TIMEOUT):
                    got.append(block.tobytes())
                    followed.set()
            else:
                for piece in iter_wav_stream(path, header="raw", timeout=TIMEOUT,
                                             chunk_frames=chunk_frames):
                    got.append(piece)
                    followed.set()
        finally:
            followed.set()
            other.join()
            writer.close()
            cleanup_temp_audio(path)  # unheld now (False: another thread's cleanup was first)
        if b"".join(got) != b"".join(b.tobytes() for b in blocks):
            return "a follower of a stream another thread wrote: not what was written"
        return None

    def move_cache(self, rng: random.Random, cache: AudioCache | None = None) -> str | None:
        cache = self.cache if cache is None else cache
        index = rng.randrange(CACHE_KEYS)
        key, want = KEYS[index], key_audio(index)
        how = rng.choice(["get_or_render", "get_or_render", "put", "get"])
        if how == "get_or_render":
            entry = cache.get_or_render(key, self.renderer(index, rng), samplerate=8000,
                                        timeout=TIMEOUT)
        elif how == "put":
            entry = cache.put(key, want, 8000)
        else:
            found = cache.get(key, timeout=TIMEOUT)
            if found is None:
                return None
            entry = found
        with entry:
            return exactly(f"AudioCache.{how}", entry.array, want)

    def move_handoff(self, rng: random.Random) -> str | None:
        data = audio_of(rng.getrandbits(32), rng.randrange(1, 3000))
        left, right = socket.socketpair()
        with left, right, create_wav_buffer(len(data), 8000, anonymous=True) as buf:
            buf.array[:] = data
            send_wav(left, buf)
            got, rate = recv_wav(right)
            return exactly("recv_wav", got, data) or (None if rate == 8000 else "rate")

    def move_temp(self, rng: random.Random) -> str | None:
        if rng.random() < 0.5:
            path = get_temp_audio_path(prefix=PLAIN_PREFIX, create=True)
            if os.stat(path).st_size != 0:
                return f"get_temp_audio_path(create=True): not empty: {path}"
            if not removed(path, self.started_children):
                return (f"cleanup_temp_audio of an unheld file of ours (create=True): not "
                        f"removed: {path}; held by {holders(path)}")
            return None
        data = audio_of(rng.getrandbits(32), rng.randrange(1, 2000))
        with temp_audio_path(prefix=PLAIN_PREFIX) as path:
            write_wav(path, data, 8000)
            problem = exactly("temp_audio_path", read_wav(path, mmap=False)[0], data)
        if os.path.exists(path):
            return f"temp_audio_path left its file: {path}"
        return problem

    def move_cleanup(self, rng: random.Random) -> str | None:
        cleanup_all_temp_audio()  # must never remove a file in use (others check theirs)
        return None

    MOVES = ("plain", "buffer", "pool", "stream", "cache", "handoff", "temp", "cleanup")

    def do_move(self, rng: random.Random, move: str) -> None:
        try:
            problem = getattr(self, f"move_{move}")(rng)
        except (LeaveByEnd, ChildFails, SystemExit):
            raise
        except Exception as exc:
            if os.getpid() != self.pid and self.forked_inside is not None:
                raise  # a child unwinding its parent's call: not the child's own move
            self.violation(f"{move}: unexpected {type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc())
            return
        if problem is not None:
            self.violation(f"{move}: {problem}")
        self.count(move)

    def thread_loop(self, index: int) -> None:
        rng = random.Random(self.rng.getrandbits(64) + index)
        while not self.stopping():
            self.do_move(rng, rng.choice(self.MOVES))
            if rng.random() < 0.03:
                gc.collect()

    def signal_loop(self) -> None:
        rng = random.Random(self.rng.getrandbits(64))
        while not self.stop_event.wait(rng.uniform(0.2, 1.5)):
            os.kill(self.pid, signal.SIGUSR1)

    # ---- forking ----

    forked_inside: str | None = None  # in a child: what the parent's main thread was in
    forking = 0  # os.fork calls of this thread in progress (a handler may interrupt one)

    def plan(self, rng: random.Random) -> dict[str, Any]:
        return {
            "inherited": rng.sample(INHERITED_USES, rng.randrange(0, len(INHERITED_USES) + 1)),
            "cache": rng.random() < 0.5,  # use the parent's AudioCache (documented to work)
            "own": [rng.choice(self.MOVES) for _ in range(rng.randrange(0, 6))],
            "threads": rng.random() < 0.3,
            "prefault": rng.random() < 0.2,
            "inherited_then": rng.choice(["keep", "close", "drop"]),
            "leave": rng.choice(["sys.exit", "end", "os._exit", "raise"]),
            "seed": rng.getrandbits(32),
        }

    def fork(self, plan: dict[str, Any], how: str) -> int:
        """Fork a child that runs plan; in the parent, its pid."""
        parent = os.getpid()
        self.forking += 1
        try:
            pid = os.fork()
        finally:
            self.forking -= 1
        if pid == 0:
            self.in_child(how)
            self.child(plan, parent)
            raise AssertionError("unreachable: child() always leaves")
        return pid

    def in_child(self, how: str) -> None:
        """A child's first steps: the test's own locks, its watchdog."""
        self.forked_inside = how
        # The test's own locks, which another thread of the parent may have held.
        self.counts_lock, self.children_lock = threading.RLock(), threading.RLock()
        # The parent's multiprocessing workers are not this child's to join at its exit
        # (multiprocessing empties the set in its own workers, not in an os.fork child).
        multiprocessing.process._children.clear()  # type: ignore[attr-defined]
        # A child of a handler leaves through the call its parent's main thread was in:
        # a socketpair or a file of the test made there, not yet in its with block, is
        # collected unclosed. Not luna_shm's: its objects warn "unclosed WavBuffer ...".
        warnings.filterwarnings("ignore", "unclosed <socket", ResourceWarning)
        warnings.filterwarnings("ignore", "unclosed file <_io", ResourceWarning)
        # The same inside luna_shm: a cleanup's `with os.scandir(dir_fd) as entries:` that
        # the handler interrupted between the call and the with (no Python code can close
        # that window for an exception a signal handler raises).
        warnings.filterwarnings("ignore", "unclosed scandir iterator", ResourceWarning)
        # An fd, not a file object: one the child leaves open would warn at its exit.
        hang = os.open(os.path.join(self.ctl, "err", f"hang-{os.getpid()}.txt"),
                       os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        faulthandler.dump_traceback_later(WATCHDOG, exit=True, file=hang)
        self.report(event="child started")  # past its at-fork hooks

    def started_children(self) -> set[int]:
        """The children of this worker that ran their at-fork hooks."""
        with open(self.out_path) as out:
            return {json.loads(line)["pid"] for line in out if '"child started"' in line}

    def multiprocessing_child(self, plan: dict[str, Any], parent: int) -> None:
        """The target of a multiprocessing worker (fork start method)."""
        self.in_child("by multiprocessing")
        try:
            self.child(plan, parent)
        except LeaveByEnd:
            return  # the end of its target: the worker exits 0

    def fork_multiprocessing(self, plan: dict[str, Any]) -> None:
        """Start a multiprocessing worker (fork) that runs plan; wait for it; judge."""
        if plan["leave"] == "raise":  # multiprocessing prints a target's traceback itself
            plan["leave"] = "sys.exit"
        proc = FORK.Process(target=self.multiprocessing_child, args=(plan, os.getpid()))
        self.forking += 1
        try:
            proc.start()
        finally:
            self.forking -= 1
        proc.join(CHILD_WAIT)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            self.violation(f"a multiprocessing worker hung (killed after {CHILD_WAIT} s)")
        else:
            self.judge(proc.pid, proc.exitcode, EXPECTED_EXIT[plan["leave"]],
                       "by multiprocessing")
        proc.close()

    def child(self, plan: dict[str, Any], parent: int) -> None:
        """The child's life: uses, then it leaves as planned (never returns)."""
        me = os.getpid()
        rng = random.Random(plan["seed"])
        for use in plan["inherited"]:
            try:
                INHERITED_USES_CODE[use](self)
                self.violation(f"child: {use} of the parent's object did not refuse")
            except RuntimeError as exc:
                text = str(exc)
                if f"belongs to process {parent}," not in text or f"({me})" not in text:
                    self.violation(f"child: {use}: a RuntimeError not naming the parent "
                                   f"{parent}: {text}")
            except Exception as exc:
                self.violation(f"child: {use}: {type(exc).__name__}: {exc}",
                               traceback=traceback.format_exc())
            self.count(f"child refused {use}")
        if plan["cache"]:
            self.guard_child("inherited AudioCache", lambda: self.move_cache(rng))
        own: AudioCache | None = None
        if plan["prefault"]:
            prefault_wav_buffers(512 * 1024)
        self.pools = (AudioPool(slots=2, max_bytes=40000, when_busy="grow"),
                      AudioPool(slots=1, max_bytes=40000, anonymous=True, when_busy="grow"))
        try:
            if "cache" in plan["own"]:
                own = AudioCache(CACHE_NAME, max_bytes=120_000, timeout=TIMEOUT)

            def run_own(moves: list[str], seed: int) -> None:
                moves_rng = random.Random(seed)
                for move in moves:
                    if move == "cache" and own is not None:
                        self.guard_child("own AudioCache", lambda: self.move_cache(
                            moves_rng, own))
                    else:
                        self.guard_child(f"own {move}", lambda m=move: getattr(
                            self, f"move_{m}")(moves_rng))

            if plan["threads"]:
                threads = [threading.Thread(target=run_own, args=(plan["own"], plan["seed"] + i))
                           for i in range(2)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            else:
                run_own(plan["own"], plan["seed"])
        finally:
            for pool in self.pools:
                pool.close()
            if own is not None:
                own.close()
            if plan["prefault"]:
                prefault_wav_buffers(0)
        if plan["inherited_then"] == "close":
            self.close_all(inherited=True)
        elif plan["inherited_then"] == "drop":
            for name in ("kept_buffer", "kept_pooled", "kept_writer", "kept_follower",
                         "kept_entry", "pool", "anonymous_pool", "cache"):
                delattr(self, name)
            gc.collect()
        self.report(event="child", plan=plan)  # the watchdog watches the exit too
        leave = plan["leave"]
        code = int(EXPECTED_EXIT[leave])
        default_hook = sys.unraisablehook

        def left_anyway(unraisable: Any) -> None:
            # The leave went through a place where Python only prints an exception (a
            # weakref callback such as importlib's module-lock one, a finalizer, an at-fork
            # hook, a __del__ that the handler interrupted): leave as planned from here,
            # rather than go on with the parent's code. Not luna_shm's.
            if isinstance(unraisable.exc_value, (LeaveByEnd, ChildFails, SystemExit)):
                os._exit(code)
            default_hook(unraisable)

        sys.unraisablehook = left_anyway
        if leave == "os._exit":
            os._exit(0)
        if leave == "sys.exit":
            sys.exit(0)
        if leave == "raise":
            sys.excepthook = lambda *args: None
            raise ChildFails("the child leaves by an exception")
        raise LeaveByEnd

    def guard_child(self, what: str, use: Callable[[], str | None]) -> None:
        try:
            problem = use()
        except Exception as exc:
            self.violation(f"child: {what}: {type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc())
            return
        if problem is not None:
            self.violation(f"child: {what}: {problem}")
        self.count(f"child {what}")

    def close_all(self, inherited: bool = False) -> None:
        self.kept_follower.close()  # type: ignore[attr-defined]
        self.kept_entry.release()
        self.kept_pooled.release()
        for thing in (self.kept_buffer, self.kept_writer, self.pool, self.anonymous_pool):
            thing.close()
        if inherited:
            self.cache.close()

    def wait_for(self, pid: int, expected: str, how: str) -> None:
        deadline = time.monotonic() + CHILD_WAIT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                self.violation(f"a child forked {how} hung (killed after {CHILD_WAIT} s)")
                return
            time.sleep(0.005)
        self.judge(pid, os.waitstatus_to_exitcode(status), expected, how)

    def judge(self, pid: int, code: int, expected: str, how: str) -> None:
        """A child's exit (and its watchdog's file), then the parent's own files."""
        hang = os.path.join(self.ctl, "err", f"hang-{pid}.txt")
        dumped = content(hang).decode(errors="replace") if os.path.exists(hang) else ""
        if dumped:
            self.violation(f"a child forked {how} hung: its watchdog fired", stacks=dumped)
        elif str(code) != expected:
            self.violation(f"a child forked {how} exited with {code}, not {expected}")
        if os.path.exists(hang):
            os.unlink(hang)
        self.count(f"child exited ({how})")
        self.check_kept(f"a child forked {how} left")

    def reap_handler_children(self, block: bool = False) -> None:
        with self.children_lock:
            children = self.children[:]
            del self.children[:len(children)]  # (a handler may append meanwhile)
        for pid, expected, how in children:
            self.wait_for(pid, expected, how)

    def on_sigusr1(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:
            return  # a child's copy of the handler (the signal was meant for the parent)
        plan = self.plan(self.handler_rng)
        if swallows_exceptions(frame) and plan["leave"] != "os._exit":
            # The handler interrupted a weakref callback, a finalizer or a __del__ (the
            # gc runs them in any thread): Python only prints an exception that leaves
            # one, so the child would go on with its parent's code. Not luna_shm's.
            plan["leave"] = "os._exit"
            self.count("child of a handler inside a callback: leaves by os._exit")
        if self.forking and plan["leave"] != "os._exit":
            # The handler interrupted a fork's at-fork hooks (the reserve's before-fork
            # hook waits for its locks; logging's): Python ignores (prints) an exception
            # that leaves a hook, so the child's sys.exit or exception would be lost and
            # it would go on with its parent's fork. Not luna_shm's to change.
            plan["leave"] = "os._exit"
            self.count("child of a handler inside a fork: leaves by os._exit")
        pid = self.fork(plan, "by a signal handler")
        with self.children_lock:
            self.children.append((pid, EXPECTED_EXIT[plan["leave"]], "by a signal handler"))

    def main_loop(self) -> None:
        rng = random.Random(self.rng.getrandbits(64))
        while not self.stopping():
            r = rng.random()
            if r < 0.05:
                self.fork_multiprocessing(self.plan(rng))
            elif r < 0.35:
                plan = self.plan(rng)
                if rng.random() < 0.3:  # inside a temp_audio_path block of the parent's
                    data = audio_of(rng.getrandbits(32), 300)
                    with temp_audio_path(prefix=PLAIN_PREFIX) as path:
                        write_wav(path, data, 8000)
                        pid = self.fork(plan, "in a temp_audio_path block")
                        self.wait_for(pid, EXPECTED_EXIT[plan["leave"]],
                                      "in a temp_audio_path block")
                        if (problem := exactly("the parent's temp_audio_path file after a "
                                               "child left the block",
                                               read_wav(path, mmap=False)[0], data)):
                            self.violation(problem)
                    if os.path.exists(path):
                        self.violation(f"the parent's temp_audio_path block left {path}")
                else:
                    pid = self.fork(plan, "by the main thread")
                    self.wait_for(pid, EXPECTED_EXIT[plan["leave"]], "by the main thread")
            elif r < 0.75:
                self.do_move(rng, rng.choice(self.MOVES))
            elif r < 0.85:
                self.write_kept_stream()
            else:
                time.sleep(rng.choice([0.001, 0.01, 0.05]))
            self.reap_handler_children()

    def run(self) -> None:
        self.setup()
        signal.signal(signal.SIGUSR1, self.on_sigusr1)
        self.report(event="ready")
        threads = [threading.Thread(target=self.thread_loop, args=(i,))
                   for i in range(self.rng.randrange(3, 6))]
        threads.append(threading.Thread(target=self.signal_loop))
        for t in threads:
            t.start()
        try:
            self.main_loop()
        finally:
            if os.getpid() == self.pid:
                self.stop_event.set()
                for t in threads:
                    t.join()
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.reap_handler_children()
        self.check_kept("the soak")
        self.close_all()
        self.cache.close()
        if self.prefault:
            prefault_wav_buffers(0)
        self.report_counts(event="end")


FORK = multiprocessing.get_context("fork")
EXPECTED_EXIT = {"sys.exit": "0", "end": "0", "os._exit": "0", "raise": "1"}

# What a child tries on what its parent made: each must raise RuntimeError naming the parent.
INHERITED_USES_CODE: dict[str, Callable[[Worker], object]] = {
    "pool.write_wav": lambda w: w.pool.write_wav(np.zeros(10, np.int16), 8000),
    "pool.acquire": lambda w: w.pool.acquire(10, 8000),
    "anonymous_pool.acquire": lambda w: w.anonymous_pool.acquire(10, 8000),
    "kept_pooled.array": lambda w: w.kept_pooled.array,
    "kept_buffer.array": lambda w: w.kept_buffer.array,
    "kept_buffer.truncate": lambda w: w.kept_buffer.truncate(1),
    "kept_writer.write": lambda w: w.kept_writer.write(np.zeros(10, np.int16)),
    "kept_writer.fileno": lambda w: w.kept_writer.fileno(),
    "kept_entry.array": lambda w: w.kept_entry.array,
    "kept_follower": lambda w: next(w.kept_follower),
}
INHERITED_USES = sorted(INHERITED_USES_CODE)


def main() -> None:
    ctl, seed = sys.argv[1], int(sys.argv[2])
    private_dirs_only()  # children remove and clean files
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # the test's: a worker that hangs
    try:
        Worker(ctl, seed).run()
    except LeaveByEnd:
        pass  # a child that leaves by the end of the script


if __name__ == "__main__":
    main()
