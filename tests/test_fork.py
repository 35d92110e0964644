"""Fork: objects belong to the process that made them; a forked child never changes them.

Each test runs a real script in a child process (its files in the private dirs of the
private_dirs fixture), which forks for real: the grandchild leaves by ``sys.exit``, by
the end of the script, by ``os._exit``, after closing or dropping what it inherited, or
tries to use it. The first child then checks its own files and objects.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from helpers import (
    LIBRARY_PATH,
    MULTITHREADED_FORK_IS_MEANT,
    call_with_deadline,
    fork_with_threads_is_meant,
    wait_until_someone_waits_for_flock,
)
from luna_shm import (
    AudioCache,
    AudioPool,
    WavBuffer,
    WavWriter,
    _lowlevel,
    afollow_wav,
    cache_key,
    cleanup_all_temp_audio,
    cleanup_temp_audio,
    create_wav_buffer,
    follow_wav,
    get_temp_audio_path,
    iter_unused_temp_audio,
    iter_wav_stream,
    read_wav,
    recv_wav,
    send_wav,
    write_wav,
)
from luna_shm.cache import RenderError
from luna_shm.cache._tier import LOCK_NAME as CACHE_LOCK_NAME
from luna_shm.pool import reclaim_dead_pool_files

PRELUDE = """
import gc, json, os, sys, threading, time
import numpy as np
from luna_shm import AudioPool, WavWriter, cleanup_all_temp_audio, create_wav_buffer, read_wav

pool = AudioPool(slots=2, max_bytes=4000)
anonymous_pool = AudioPool(slots=1, max_bytes=4000, anonymous=True)
held = pool.write_wav(np.full(100, 1, np.int16), 8000)
acquired = anonymous_pool.acquire(100, 8000)
acquired.array[:] = 4
buf = create_wav_buffer(100, 8000)
buf.array[:] = 2
writer = WavWriter(None, 8000)
writer.write(np.full(100, 3, np.int16))
files = sorted(s.path for s in pool._slots) + [buf.path, writer.path]


def content(path):
    with open(path, "rb") as f:
        return f.read()


before = {p: content(p) for p in files}


def wait_for(pid):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "hung"


def parent_report(code, **extra):
    report = {"child_exit": code, **extra}
    report["files_kept"] = {p: os.path.isfile(p) and content(p) == before[p]
                            for p in files}
    report["in_use"] = cleanup_all_temp_audio()  # 0: every lock is still held
    report["held"] = held.array.tolist() == [1] * 100
    report["acquired"] = read_wav(acquired.path, mmap=False)[0].tolist() == [4] * 100
    held.release()
    acquired.release()
    with pool.write_wav(np.full(50, 5, np.int16), 8000) as a, pool.acquire(50, 8000) as b:
        report["two_slots"] = a.path != b.path and sorted([a.path, b.path]) == files[:2]
    writer.write(np.full(10, 3, np.int16))
    report["writer_frames"] = read_wav(writer.path, mmap=False)[0].tolist() == [3] * 110
    buf.array[:] = 6
    report["buffer"] = read_wav(buf.path, mmap=False)[0].tolist() == [6] * 100
    for thing in (pool, anonymous_pool, buf, writer):
        thing.close()
    report["removed"] = [p for p in files[:2] if os.path.exists(p)] == []
    print(json.dumps(report))
"""

LEAVE = PRELUDE + """
how = sys.argv[1]
pid = os.fork()
if pid == 0:
    if how == "close":
        held.release()
        acquired.release()
        for thing in (pool, anonymous_pool, buf, writer):
            thing.close()
    elif how == "drop":
        del held, acquired, pool, anonymous_pool, buf, writer
        gc.collect()
    if how == "os._exit":
        os._exit(0)
    if how == "sys.exit":
        sys.exit(0)
    # "end", "close", "drop": the child runs off the end of the script
else:
    parent_report(wait_for(pid))
"""


def run(script: str, *args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-X", "dev", "-W", MULTITHREADED_FORK_IS_MEANT,
                           "-c", script, *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": LIBRARY_PATH})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no warning, no traceback, from either process
    report: dict[str, object] = json.loads(done.stdout)
    return report


ALL_KEPT = {"child_exit": 0, "in_use": 0, "held": True, "acquired": True, "two_slots": True,
            "writer_frames": True, "buffer": True, "removed": True}


@pytest.mark.parametrize("how", ["sys.exit", "end", "os._exit", "close", "drop"])
def test_a_forked_child_leaving_in_any_way_never_removes_or_changes_its_parents_files(
        private_dirs, how) -> None:
    report = run(LEAVE, how)
    kept = report.pop("files_kept")
    assert isinstance(kept, dict) and len(kept) == 4 and all(kept.values()), kept
    assert report == ALL_KEPT


USE = PRELUDE + """
parent = os.getpid()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read)
    uses = {
        "pool.write_wav": lambda: pool.write_wav(np.zeros(10, np.int16), 8000),
        "pool.acquire": lambda: pool.acquire(10, 8000),
        "pool.__enter__": lambda: pool.__enter__(),
        "anonymous_pool.acquire": lambda: anonymous_pool.acquire(10, 8000),
        "held.array": lambda: held.array,
        "held.truncate": lambda: held.truncate(1),
        "acquired.array": lambda: acquired.array,
        "buf.array": lambda: buf.array,
        "buf.truncate": lambda: buf.truncate(1),
        "buf.fileno": lambda: buf.fileno(),
        "writer.write": lambda: writer.write(np.zeros(10, np.int16)),
        "writer.fileno": lambda: writer.fileno(),
    }
    errors = {}
    for name, use in uses.items():
        try:
            use()
            errors[name] = "no error"
        except BaseException as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    with os.fdopen(write, "w") as out:
        json.dump({"errors": errors, "child": os.getpid()}, out)
    os._exit(0)
os.close(write)
with os.fdopen(read) as got:
    child = json.load(got)
parent_report(wait_for(pid), parent=parent, **child)
"""


def test_a_forked_child_gets_a_runtime_error_naming_the_owner_for_every_inherited_object(
        private_dirs) -> None:
    report = run(USE)
    parent, child, errors = report.pop("parent"), report.pop("child"), report.pop("errors")
    kept = report.pop("files_kept")
    assert isinstance(kept, dict) and all(kept.values()), kept
    assert report == ALL_KEPT
    assert isinstance(errors, dict)
    tail = (f"belongs to process {parent}, which made it; this process ({child}) is a forked "
            "child and cannot use it: make a new one here")
    for name, error in errors.items():
        assert error.startswith("RuntimeError: ") and error.endswith(tail), (name, error)
    assert errors["pool.write_wav"] == f"RuntimeError: AudioPool {tail}"
    assert errors["pool.__enter__"] == f"RuntimeError: AudioPool {tail}"
    assert errors["held.array"].startswith("RuntimeError: PooledWav '")
    assert errors["buf.array"].startswith("RuntimeError: WavBuffer '")
    assert errors["writer.write"].startswith("RuntimeError: WavWriter '")


LOCKED = PRELUDE + """
# Another thread holds the pool's and the writer's locks while the main thread forks.
holding, done = threading.Event(), threading.Event()

def hold():
    with pool._cond, writer._lock:
        holding.set()
        done.wait()

holder = threading.Thread(target=hold)
holder.start()
holding.wait()
pid = os.fork()
if pid == 0:
    outcome = []
    for use in (lambda: pool.write_wav(np.zeros(10, np.int16), 8000),
                lambda: writer.write(np.zeros(10, np.int16))):
        try:
            use()
        except RuntimeError:
            outcome.append("refused")
    pool.close()
    writer.close()
    held.release()
    os._exit(0 if outcome == ["refused", "refused"] else 1)
done.set()
holder.join()
parent_report(wait_for(pid))
"""


def test_a_child_forked_while_another_thread_holds_the_locks_neither_hangs_nor_touches_them(
        private_dirs) -> None:
    report = run(LOCKED)
    kept = report.pop("files_kept")
    assert isinstance(kept, dict) and all(kept.values()), kept
    assert report == ALL_KEPT


FORK_FROM_A_SIGNAL_HANDLER = """
import faulthandler, json, os, signal, sys, threading
faulthandler.dump_traceback_later(60, exit=True)
from luna_shm import _prefault, create_wav_buffer, prefault_stats, prefault_wav_buffers

prefault_wav_buffers(per_size=1)
workers = []


def spawn_worker(signum, frame):  # a daemon's handler that forks a worker
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    workers.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))


signal.signal(signal.SIGUSR1, spawn_worker)
sent = []


def signal_inside_the_reserves_lock(frame, event, arg):
    if (event == "c_call" and frame.f_code.co_name == "take" and not sent
            and _prefault._reserve.lock.locked()):
        sent.append(True)
        os.kill(os.getpid(), signal.SIGUSR1)


sys.setprofile(signal_inside_the_reserves_lock)
buf = create_wav_buffer(1000, 16000, anonymous=True)
sys.setprofile(None)
buf.close()
prefault_wav_buffers(0)
print(json.dumps({"sent": sent, "workers": workers, "thread": any(
    t.name == "luna_shm-prefault" for t in threading.enumerate())}))
"""


def test_a_fork_from_a_signal_handler_that_interrupted_the_reserve_never_hangs(
        private_dirs) -> None:
    # The reserve's before-fork hook takes its locks; a signal handler that forks (a
    # daemon spawning a worker) and runs while this very thread holds one of them
    # (inside create_wav_buffer's take) waited for itself forever.
    assert run(FORK_FROM_A_SIGNAL_HANDLER) == {"sent": [True], "workers": [0],
                                               "thread": False}


# Signals that come faster than the reserve's before-fork hook waits for a lock (a daemon
# whose handler forks a worker for each SIGUSR1 or SIGCHLD): the first arrives while the
# main thread's own fork is inside that hook, holding the reserve's locks; each handler's
# fork runs the hook again, nested, in the same thread.
FORKS_FROM_SIGNALS_INSIDE_THE_FORK_HOOK = """
import faulthandler, json, os, signal, sys, threading, time
faulthandler.dump_traceback_later(20, exit=True)
from luna_shm import _prefault, prefault_wav_buffers

prefault_wav_buffers(per_size=1)
workers, done = [], threading.Event()


def spawn_worker(signum, frame):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    workers.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))


signal.signal(signal.SIGUSR1, spawn_worker)


def inside_the_hook(frame, event, arg):
    if (event == "c_call" and frame.f_code.co_name == "_before_fork" and not sent
            and _prefault._reserve.making.locked()):
        sent.append(True)
        os.kill(os.getpid(), signal.SIGUSR1)


def more_signals():  # a signal every 0.2 s, while the main thread's fork is not done
    while not done.wait(0.2):
        os.kill(os.getpid(), signal.SIGUSR1)


sent = []
threading.Thread(target=more_signals, daemon=True).start()
sys.setprofile(inside_the_hook)
pid = os.fork()
if pid == 0:
    os._exit(0)
sys.setprofile(None)
done.set()
main = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
prefault_wav_buffers(0)
print(json.dumps({"sent": sent, "main": main, "workers": set(workers) == {0}}))
"""


def test_forks_from_signal_handlers_nested_inside_the_reserves_fork_hook_never_stall(
        private_dirs) -> None:
    # Each nested hook waited (1 s) for the reserve's locks the hook it interrupted held,
    # in the same thread: signals that came faster nested the hooks deeper for ever, while
    # every thread that took a file from the reserve waited for its lock (the fork soak,
    # seed 215687993935107's worker). A nested hook also let go of the locks the one it
    # interrupted had taken.
    assert run(FORKS_FROM_SIGNALS_INSIDE_THE_FORK_HOOK) == {"sent": [True], "main": 0,
                                                            "workers": True}


TEMP_PATH_BLOCK = """
import json, os, sys
from luna_shm import temp_audio_path, write_wav
import numpy as np

how = sys.argv[1]
report = {}
try:
    with temp_audio_path() as path:
        write_wav(path, np.zeros(100, np.int16), 8000)
        pid = os.fork()
        if pid == 0:  # the child leaves the block its parent is still in
            if how == "sys.exit":
                sys.exit(0)
            if how == "raise":
                raise RuntimeError("the child failed")
        else:  # ("end": the child runs to the end of the block)
            _, status = os.waitpid(pid, 0)
            report["child_exit"] = os.waitstatus_to_exitcode(status)
            report["kept"] = os.path.isfile(path)
except RuntimeError:
    pass
if pid == 0:
    os._exit(0)
report["removed"] = not os.path.exists(path)
print(json.dumps(report))
"""


def test_a_forked_child_closes_the_fd_of_every_cell_but_those_kept(tmp_path) -> None:
    # The contract of the C layer's fd cells at a fork: each fd a C call stored into a cell
    # (an open, a dup, a received fd) and not yet released is closed in a child, and its
    # cell emptied; a cell kept (keep_in_child) is left as it is; an fd number released
    # and then reused by a plain os.open is not ours any more, and stays.
    path = str(tmp_path / "file")
    opened, duplicated, received, kept, released = (_lowlevel.fd_cell() for _ in range(5))
    fd_opened = _lowlevel.open_at(path, os.O_RDWR | os.O_CREAT, cell=opened)
    fd_duplicated = _lowlevel.dup(fd_opened, cell=duplicated)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        socket.send_fds(left, [b"x"], [fd_opened])
        _lowlevel.recv_fd(right.fileno(), bytearray(1), received)
    fd_received = received[0]
    fd_kept = _lowlevel.open_at(path, os.O_RDONLY, cell=kept)
    _lowlevel.keep_in_child(kept)
    _lowlevel.open_at(path, os.O_RDONLY, cell=released)
    _lowlevel.release(released)
    plain = os.open(path, os.O_RDONLY)  # the lowest free number: the one just released
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            closed = []
            for fd in (fd_opened, fd_duplicated, fd_received):
                try:
                    os.fstat(fd)
                except OSError as exc:
                    closed.append(exc.errno == errno.EBADF)
            emptied = [cell[0] for cell in (opened, duplicated, received)] == [-1] * 3
            os.fstat(fd_kept)
            os.fstat(plain)
            code = 0 if closed == [True] * 3 and emptied and kept[0] == fd_kept else 3
        finally:
            os._exit(code)
    try:
        assert exit_code_within(pid, 30) == 0
        for cell in (opened, duplicated, received, kept):  # the parent's are as they were
            os.fstat(cell[0])
    finally:
        os.close(plain)
        for cell in (opened, duplicated, received, kept):
            _lowlevel.release(cell)


FORK_DURING_A_SLOW_READ = """
import json, os, sys, threading, warnings
import numpy as np
from luna_shm import read_wav
warnings.simplefilter("ignore", DeprecationWarning)  # a fork beside a thread: meant
path, mmap, pread64 = sys.argv[1], sys.argv[2] == "mmap", sys.argv[3]
got = []
def in_pread(thread):
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            return f.read().split()[0] == pread64
    except OSError:
        return False
reader = threading.Thread(target=lambda: got.append(read_wav(path, mmap=mmap)))
reader.start()
while not in_pread(reader):  # strace holds this pread up for 2 s
    pass
pid = os.fork()
if pid == 0:
    os._exit(0)
still_reading = in_pread(reader)  # fork returned while the read still waits
os.waitpid(pid, 0)
reader.join()
data, samplerate = got[0]
print(json.dumps({"still_reading": still_reading, "read": [int(data.sum()), samplerate]}))
"""

# pread64's number, as /proc/<pid>/task/<tid>/syscall shows it.
_PREAD64 = {"x86_64": 17, "aarch64": 67}


@pytest.mark.parametrize("mmap", ["mmap", "copy"])
def test_a_fork_never_waits_for_a_slow_read_of_a_wav_header_in_another_thread(
        tmp_path, mmap: str) -> None:
    # read_wav on a slow file (a FUSE or NFS mount reading over the network, a stalled
    # disk): its header's pread ran while forks waited (the fork lock of fd cells), so an
    # os.fork in another thread waited for it, holding the GIL: every thread stood still.
    # Only the open and the store of its fd into a cell need the lock. Here strace holds
    # the pread up for 2 s, and the fork must return while it still waits.
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (it holds up a read to open the window)")
    number = _PREAD64.get(os.uname().machine)
    if number is None:
        pytest.skip(f"pread64's system call number on {os.uname().machine} is not listed")
    path = str(tmp_path / "slow.wav")
    write_wav(path, np.full(100, 3, dtype=np.int16), 8000)
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [strace, "-f", "-qq", "-o", str(tmp_path / "strace.log"), "-e", "signal=none",
         "-e", "trace=pread64", "-e", "inject=pread64:delay_enter=2000000", "-P", path,
         sys.executable, "-c", FORK_DURING_A_SLOW_READ, path, mmap, str(number)],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"still_reading": True, "read": [300, 8000]}


def test_a_child_forked_during_a_scan_of_unused_files_goes_on_with_it(private_dirs,
                                                                     tmp_path) -> None:
    # The directory a scan walks is open in a cell, and a forked child closes the fds of
    # cells at once (every file of ours it would otherwise keep): but a child may go on
    # with an iter_unused_temp_audio() its parent started, which would then look through
    # a closed fd number, or through the one the child opened next, another directory.
    # That cell is kept in a child.
    for n in range(3):
        write_wav(None, np.full(10, n, np.int16), 8000)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    scan = iter_unused_temp_audio()
    first, _ = next(scan)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.open(elsewhere, os.O_RDONLY | os.O_DIRECTORY)  # takes a free fd number
            rest = [path for path, _ in scan]
            code = 0 if len(rest) == 2 and first not in rest else 3
        finally:
            os._exit(code)
    assert exit_code_within(pid, 30) == 0
    assert len([path for path, _ in scan]) == 2  # the parent's scan goes on too


@pytest.mark.parametrize("how", ["sys.exit", "raise", "end"])
def test_a_child_forked_inside_a_temp_audio_path_block_never_removes_the_parents_file(
        private_dirs, how) -> None:
    # The child unwinds its copy of the parent's stack: the block's cleanup ran there and
    # removed the file the parent was still using (found in review).
    assert run(TEMP_PATH_BLOCK, how) == {"child_exit": 0, "kept": True, "removed": True}


FORK_INSIDE_A_RENDER = """
import json, os, sys
import numpy as np
from luna_shm import AudioCache, cache_key

how = sys.argv[1]
parent = os.getpid()
cache = AudioCache("forked_render", max_bytes=1_000_000)
key = cache_key("forked inside a render")
report = {}


def render(writer):
    writer.write(np.full(100, 1, np.int16))
    pid = os.fork()
    if pid == 0:  # a helper that leaves the render its parent goes on with
        if how == "sys.exit":
            sys.exit(0)
        if how == "raise":
            raise ValueError("the helper failed")
        return  # "return": back into get_or_render
    _, status = os.waitpid(pid, 0)
    report["child_exit"] = os.waitstatus_to_exitcode(status)
    writer.write(np.full(100, 2, np.int16))


try:
    entry = cache.get_or_render(key, render, samplerate=8000)
except Exception as exc:
    if os.getpid() == parent:
        raise
    expected = ("the helper failed" if how == "raise" else
                f"a child forked inside the render of {key!r} returned from it: the render "
                f"belongs to process {parent}; end the child with os._exit()")
    os._exit(0 if str(exc) == expected else 3)
report["audio"] = entry.array.tolist() == [1] * 100 + [2] * 100
report["stored"] = entry.stored
entry.release()
report["files"] = sorted(os.listdir(cache.directory))
cache.destroy()
report["files"] = [name.replace(key, "<key>") for name in report["files"]]
print(json.dumps(report))
"""


@pytest.mark.parametrize("how", ["sys.exit", "raise", "return"])
def test_a_child_forked_inside_a_render_never_ends_or_removes_the_parents_render(
        private_dirs, how) -> None:
    # The child's copy of get_or_render ran the failure path: it wrote a failure note and
    # removed the parent's .live file, whose commit then failed (found in review); a child
    # that returned from the render went on to commit it.
    assert run(FORK_INSIDE_A_RENDER, how) == {
        "child_exit": 0, "audio": True, "stored": True, "files": ["<key>.wav", "lock"]}


# A renderer whose render forks a helper (a multiprocessing worker of its engine, fork
# start method) that lives on, then fails or is killed, as the test says on its stdin.
RENDER_WITH_A_HELPER = """
import multiprocessing, sys, time
import numpy as np
from luna_shm import AudioCache, cache_key

cache = AudioCache("helped")


def render(writer):
    writer.write(np.full(100, 1, np.int16))
    helper = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
    helper.start()
    print(helper.pid, flush=True)
    sys.stdin.readline()
    raise RuntimeError("the engine failed")


try:
    cache.get_or_render(cache_key("helped"), render, samplerate=8000)
except RuntimeError:
    pass
print("failed", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("end", ["fail", "SIGKILL"])
def test_a_helper_forked_by_a_render_never_keeps_its_waiters_waiting(private_dirs, end):
    # The render's second descriptor of its file (the pin that holds the exclusive flock
    # the waiters sleep on) stayed open in the helper: after the renderer failed or was
    # killed, the waiters slept for as long as the helper lived (found in review).
    key = cache_key("helped")
    renderer = subprocess.Popen([sys.executable, "-c", RENDER_WITH_A_HELPER],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": LIBRARY_PATH})
    assert renderer.stdin is not None and renderer.stdout is not None
    helper = int(renderer.stdout.readline())
    outcome: list[object] = []
    cache = AudioCache("helped")
    try:
        live = cache.live_path(key)
        assert live is not None
        inode = os.stat(live).st_ino

        def wait_for_the_render() -> None:
            try:
                with cache.get_or_render(key, lambda w: w.write(np.full(10, 2, np.int16)),
                                         samplerate=8000) as entry:
                    outcome.append(entry.array.tolist())
            except RenderError as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait_for_the_render, daemon=True)
        waiter.start()
        wait_until_someone_waits_for_flock(live, inode, waiter.is_alive)
        if end == "fail":
            renderer.stdin.write("go\n")
            renderer.stdin.flush()
            assert renderer.stdout.readline() == "failed\n"
        else:
            renderer.send_signal(signal.SIGKILL)
            renderer.wait(timeout=60)
        waiter.join(60)
        assert not waiter.is_alive(), "the waiter slept on while the helper lived"
        if end == "fail":  # told at once that the render failed
            assert len(outcome) == 1 and isinstance(outcome[0], RenderError), outcome
            assert "the engine failed" in str(outcome[0])
        else:  # elected to render in the dead renderer's place
            assert outcome == [[2] * 10]
    finally:
        os.kill(helper, signal.SIGKILL)
        renderer.kill()
        renderer.wait(timeout=60)
        renderer.stdin.close()
        renderer.stdout.close()
        cache.destroy()


def fork_a_helper_that_lives_on(stay_read: int, stay_write: int,
                                then: Callable[[], object] | None = None,
                                report: int = -1) -> int:
    """Fork a child that lives until stay_write is closed, and return its pid once it has
    run its at-fork hooks: it closes the copies luna_shm lets go of when it first runs,
    which a busy machine may delay past the parent's next steps. Given then, the child
    calls it as stay_write closes, and writes what it raised (or "no error") to report."""
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: a helper that lives on
        os.close(ready_read)
        os.close(stay_write)
        os.close(ready_write)  # its at-fork hooks have run
        os.read(stay_read, 1)
        if then is not None:
            try:
                then()
                outcome = "no error"
            except BaseException as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            os.write(report, outcome.encode())
        os._exit(0)
    os.close(ready_write)
    try:
        assert os.read(ready_read, 1) == b""
    finally:
        os.close(ready_read)
    return pid


def test_a_buffer_and_a_cache_entry_closed_after_a_fork_are_free_while_the_child_lives(
        private_dirs) -> None:
    # The child kept its copies of the buffer's and the entry's open files, and with them
    # their flocks: after the parent closed them, cleanup_temp_audio said "held by a live
    # process" and discard "pinned" for as long as the child lived (found in review).
    cache = AudioCache("forked_pins", max_bytes=1_000_000)
    key = cache_key("pinned at the fork")
    cache.put(key, np.full(100, 1, np.int16), 8000).release()
    buf = create_wav_buffer(100, 8000)
    entry = cache.get(key)
    assert entry is not None
    stay_read, stay_write = os.pipe()
    pid = fork_a_helper_that_lives_on(stay_read, stay_write)
    os.close(stay_read)
    try:
        # By inode: a file made with O_TMPFILE keeps its "#<inode> (deleted)" name there.
        held = {os.stat(f"/proc/{pid}/fd/{fd}").st_ino for fd in os.listdir(f"/proc/{pid}/fd")}
        with open(f"/proc/{pid}/maps") as maps:
            held |= {int(line.split()[4]) for line in maps}
        for path in (buf.path, entry.path):
            assert os.stat(path).st_ino not in held, path
        buf.close()
        entry.release()
        assert cleanup_temp_audio(buf.path) is True
        assert cache.discard(key) is True
    finally:
        os.close(stay_write)
        os.waitpid(pid, 0)
        cache.destroy()


RENDER_WHEN_TOLD = """
import sys
import numpy as np
from luna_shm import AudioCache, cache_key

cache = AudioCache("waited")


def render(writer):
    writer.write(np.full(100, 1, np.int16))
    print("rendering", flush=True)
    sys.stdin.readline()
    writer.write(np.full(100, 2, np.int16))


cache.get_or_render(cache_key("waited"), render, samplerate=8000).release()
print("stored", flush=True)
"""


@fork_with_threads_is_meant  # the waiting thread is there on purpose
def test_a_child_forked_while_a_thread_waits_for_a_render_never_pins_the_entry(
        private_dirs) -> None:
    # The child kept the waiter's descriptor of the render's file, on which the kernel
    # then granted the waiter its shared flock: the entry the file became stayed pinned
    # (discard, clear and eviction refused it) for as long as the child lived (found in
    # review).
    key = cache_key("waited")
    renderer = subprocess.Popen([sys.executable, "-c", RENDER_WHEN_TOLD],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": LIBRARY_PATH})
    assert renderer.stdin is not None and renderer.stdout is not None
    assert renderer.stdout.readline() == "rendering\n"
    cache = AudioCache("waited")
    got: list[object] = []
    stay_read, stay_write = os.pipe()
    pid = -1
    try:
        live = cache.live_path(key)
        assert live is not None
        inode = os.stat(live).st_ino

        def wait_for_the_render() -> None:
            with cache.get_or_render(key, lambda w: None, samplerate=8000) as entry:
                got.append(entry.array.tolist())

        waiter = threading.Thread(target=wait_for_the_render, daemon=True)
        waiter.start()
        wait_until_someone_waits_for_flock(live, inode, waiter.is_alive)
        pid = fork_a_helper_that_lives_on(stay_read, stay_write)
        renderer.stdin.write("go\n")
        renderer.stdin.flush()
        assert renderer.stdout.readline() == "stored\n"
        waiter.join(60)
        assert not waiter.is_alive()
        assert got == [[1] * 100 + [2] * 100]
        assert cache.discard(key) is True  # while the child lives
    finally:
        os.close(stay_write)
        os.close(stay_read)
        if pid > 0:
            os.waitpid(pid, 0)
        renderer.kill()
        renderer.wait(timeout=60)
        renderer.stdin.close()
        renderer.stdout.close()
        cache.destroy()


# Another thread holds a module-level lock of luna_shm while the main thread forks; the
# child's first call that takes that lock must not wait for a thread it does not have.
HELD_MODULE_LOCK = """
import json, os, socket, sys, threading, time
import numpy as np
from luna_shm import create_wav_buffer, get_temp_audio_path, handoff, placement, recv_wav, send_wav

which = sys.argv[1]
# placement's: a thread busy in placement (log_once, refresh, a new choice); handoff's: a
# thread's recv_wav looking up what an earlier receive on its socket left part-read.
lock = {"placement": placement._lock, "handoff": handoff._partial_lock}[which]
holding, done = threading.Event(), threading.Event()

def hold():
    with lock:
        holding.set()
        done.wait()

holder = threading.Thread(target=hold)
holder.start()
holding.wait()
pid = os.fork()
if pid == 0:
    if which == "placement":
        os.environ["LUNA_SHM_DIR"] = sys.argv[2]  # a new choice: current() takes the lock
        get_temp_audio_path()
    else:  # a hand-off of the child's own: every recv_wav takes the lock
        left, right = socket.socketpair()
        buf = create_wav_buffer(10, 8000, anonymous=True)
        buf.array[:] = 7
        send_wav(left, buf)
        buf.close()
        data, _ = recv_wav(right)
        assert (data == 7).all()
    os._exit(0)
done.set()
holder.join()
deadline = time.monotonic() + 20
while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
if waited[0] == 0:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(json.dumps({"child_exit": os.waitstatus_to_exitcode(waited[1]) if waited[0] else "hung"}))
"""


@pytest.mark.parametrize("which", ["placement", "handoff"])
def test_a_child_forked_while_another_thread_holds_a_module_lock_goes_on_with_its_calls(
        private_dirs, which) -> None:
    other = os.path.join(private_dirs.ram, "child_ram")
    os.mkdir(other, 0o700)
    assert run(HELD_MODULE_LOCK, which, str(other)) == {"child_exit": 0}


# A pool's process forks a helper that never uses the pool, then is SIGKILLed. The helper
# reports once its at-fork hooks have run, then lives until its stdin closes.
POOL_OWNER_KILLED = """
import json, os, sys
import numpy as np
from luna_shm import AudioPool

pool = AudioPool(slots=3, max_bytes=4000, anonymous=sys.argv[1] == "anonymous")
held = pool.write_wav(np.full(100, 1, np.int16), 8000)
held.array  # a handle whose array was asked for before the fork
acquired = pool.acquire(100, 8000)
acquired.array[:] = 2
pid = os.fork()
if pid == 0:
    print(json.dumps({"child": os.getpid(), "slots": sorted(s.path for s in pool._slots)}),
          flush=True)
    sys.stdin.read()  # until the test lets go
    os._exit(0)
sys.stdin.read()
"""


@pytest.mark.parametrize("kind", ["named", "anonymous"])
def test_a_pools_slots_are_reclaimable_after_its_process_is_killed_while_an_idle_child_lives(
        private_dirs, kind) -> None:
    # Named slots: their files stayed flock-held, out of every reclaim, while the child
    # lived. Anonymous (memfd) slots: their RAM stayed.
    owner = subprocess.Popen([sys.executable, "-X", "dev", "-c", POOL_OWNER_KILLED, kind],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": LIBRARY_PATH})
    assert owner.stdin is not None and owner.stdout is not None
    try:
        child = json.loads(owner.stdout.readline())
        slots = child["slots"]
        assert len(slots) == 3
        inodes = {os.stat(p).st_ino for p in slots}
        owner.kill()
        owner.wait(timeout=60)
        # The helper closed its copies of the slot files, their mappings and the pool's
        # inotify fd at the fork: nothing of the dead pool is held while it lives.
        proc = f"/proc/{child['child']}"
        fds = {fd: os.readlink(f"{proc}/fd/{fd}") for fd in os.listdir(f"{proc}/fd")}
        open_inodes = {os.stat(f"{proc}/fd/{fd}").st_ino for fd in fds}
        with open(f"{proc}/maps") as maps:
            mapped_inodes = {int(line.split()[4]) for line in maps}
        assert inodes & open_inodes == set()
        assert inodes & mapped_inodes == set()
        assert [link for link in fds.values() if "inotify" in link] == []
        if kind == "named":
            assert reclaim_dead_pool_files() == 3
            assert [p for p in slots if os.path.exists(p)] == []
        os.kill(child["child"], 0)  # the helper still lives
    finally:
        owner.kill()
        owner.wait(timeout=60)
        owner.stdin.close()  # the helper's stdin too: it leaves
        owner.stdout.close()


# Threads released together make the first locked cache call of a forked child: each may
# find the tier still the parent's and reopen its lock file. Each child then counts its
# descriptors of the lock file (its own one only) and the errors its threads met.
FIRST_CACHE_CALL_IN_THREADS = """
import json, os, sys, threading, time
from luna_shm import AudioCache

cache = AudioCache("first_call_in_threads", max_bytes=1_000_000)
lock_inode = os.stat(os.path.join(cache.directory, "lock")).st_ino


def lock_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.stat(f"/proc/self/fd/{fd}").st_ino == lock_inode
        except OSError:  # the listing's own fd, closed by now
            pass
    return count


def child() -> None:
    sys.setswitchinterval(1e-6)
    barrier = threading.Barrier(8)
    errors = []

    def first_call() -> None:
        barrier.wait()
        try:
            cache.stats()
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=first_call, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    for thread in threads:
        thread.join(max(0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        os.write(1, b'"hung"\\n')
    else:
        os.write(1, (json.dumps([lock_fds(), errors]) + "\\n").encode())


for _ in range(int(sys.argv[1])):  # up to the first child that goes wrong
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(write_end, 1)
            child()
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as report:
        line = report.read()
    os.waitpid(pid, 0)
    print(line, end="", flush=True)
    if line != "[1, []]\\n":
        break
cache.close()
"""


def test_threads_making_the_first_cache_call_of_a_forked_child_open_one_lock_fd(
        private_dirs) -> None:
    done = subprocess.run([sys.executable, "-X", "dev", "-W", MULTITHREADED_FORK_IS_MEANT,
                           "-c", FIRST_CACHE_CALL_IN_THREADS, "40"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": LIBRARY_PATH})
    assert (done.returncode, done.stderr) == (0, "")
    children = [json.loads(line) for line in done.stdout.splitlines()]
    assert children == [[1, []]] * 40


# A thread of the cache's process is inside a locked cache call (a put, a sweep, a spill)
# while the main thread forks a helper that never uses the cache; then the process is
# SIGKILLed. The helper reports once its at-fork hooks ran, then lives until stdin closes.
CACHE_LOCK_HOLDER_KILLED = """
import json, os, sys, threading
from luna_shm import AudioCache

cache = AudioCache("forked_lock_holder", max_bytes=1_000_000)
holding = threading.Event()

def hold():
    with cache._ram.locked():
        holding.set()
        threading.Event().wait()

threading.Thread(target=hold, daemon=True).start()
holding.wait()
pid = os.fork()
if pid == 0:
    print(json.dumps(os.getpid()), flush=True)
    sys.stdin.read()  # until the test lets go
    os._exit(0)
sys.stdin.read()
"""


def test_a_cache_process_killed_holding_its_lock_leaves_it_free_while_an_idle_child_lives(
        private_dirs) -> None:
    owner = subprocess.Popen([sys.executable, "-X", "dev", "-W", MULTITHREADED_FORK_IS_MEANT,
                              "-c", CACHE_LOCK_HOLDER_KILLED],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": LIBRARY_PATH})
    assert owner.stdin is not None and owner.stdout is not None
    opened: list[AudioCache] = []
    try:
        child = json.loads(owner.stdout.readline())
        owner.kill()
        owner.wait(timeout=60)
        # The helper's copy of the lock fd (the killed owner's open file description,
        # flock and all) was closed at the fork: the lock died with the owner.
        call_with_deadline(lambda: opened.append(
            AudioCache("forked_lock_holder", max_bytes=1_000_000)), 20)
        os.kill(child, 0)  # the helper still lives
    finally:
        owner.kill()
        owner.wait(timeout=60)
        owner.stdin.close()  # the helper's stdin too: it leaves, and its flock with it
        owner.stdout.close()
        for cache in opened:
            cache.destroy()


class Follower:
    """A follower of path, driven one block at a time as its kind does: first() and
    more() in this process, in_child() in a forked child; close() when done."""

    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop() if kind == "afollow_wav" else None
        if kind == "follow_wav":
            self.it = follow_wav(path, timeout=10)
        elif kind == "iter_wav_stream":
            self.it = iter_wav_stream(path, header="raw", timeout=10)
        else:
            self.agen = afollow_wav(path, timeout=10)

    def more(self) -> bytes:
        """The next block's bytes (b"" at the end)."""
        try:
            if self.loop is None:
                block = next(self.it)
            else:
                block = self.loop.run_until_complete(self.agen.__anext__())
        except (StopIteration, StopAsyncIteration):
            return b""
        return block if isinstance(block, bytes) else block.tobytes()

    def in_child(self) -> None:
        """Ask for the next block without an event loop (the loop is the parent's)."""
        if self.loop is None:
            next(self.it)
        else:
            self.agen.__anext__().send(None)

    def close_in_child(self) -> None:
        """Close it without an event loop (the loop is the parent's)."""
        if self.loop is None:
            self.it.close()  # type: ignore[attr-defined]
        else:
            self.agen.close()

    def close(self) -> None:
        if self.loop is None:
            self.it.close()  # type: ignore[attr-defined]
        else:
            self.loop.run_until_complete(self.agen.aclose())
            self.loop.close()


def open_fds() -> set[int]:
    """This process's open fds (not the one that lists them, closed by then)."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")
            if os.path.lexists(f"/proc/self/fd/{fd}")}


@pytest.mark.parametrize("kind", ["follow_wav", "afollow_wav", "iter_wav_stream"])
def test_a_forked_child_drops_a_followers_fds_and_refuses_to_iterate_it(
        private_dirs, kind) -> None:
    # A child forked by a follower's process (a TTS daemon forking a worker) kept the
    # follower's descriptor of the file and its inotify fd: a removed file's RAM stayed
    # taken while the child lived. The child now closes both at the fork, and iterating
    # the parent's follower there raises RuntimeError naming the parent.
    writer = WavWriter(None, 8000)
    writer.write(np.full(100, 1, np.int16))
    before = open_fds()
    follower = Follower(kind, writer.path)
    loop_fds = open_fds() - before  # an event loop's own
    assert follower.more() == np.full(100, 1, np.int16).tobytes()
    ours = open_fds() - before - loop_fds
    kinds = sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in ours)
    assert kinds == sorted(["anon_inode:inotify", writer.path]), kinds
    inode = os.stat(writer.path).st_ino
    stay_read, stay_write = os.pipe()
    result_read, result_write = os.pipe()
    pid = fork_a_helper_that_lives_on(stay_read, stay_write, then=follower.in_child,
                                      report=result_write)
    os.close(stay_read)
    os.close(result_write)
    reported = b""
    try:
        child_fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in ours & child_fds}
        assert "anon_inode:inotify" not in held
        assert inode not in {os.stat(f"/proc/{pid}/fd/{fd}").st_ino for fd in child_fds}
        os.close(stay_write)
        stay_write = -1
        with os.fdopen(result_read, "rb") as result:
            reported = result.read()
    finally:
        if stay_write >= 0:
            os.close(stay_write)
        if not reported:
            os.kill(pid, signal.SIGKILL)  # it waits on a follower it shares with us
        os.waitpid(pid, 0)
    assert reported.decode() == (
        f"RuntimeError: {kind} {writer.path!r} belongs to process {os.getpid()}, which "
        f"made it; this process ({pid}) is a forked child and cannot use it: make a new "
        "one here")
    writer.write(np.full(50, 2, np.int16))  # the parent follows on
    writer.close()
    rest = b""
    while block := follower.more():
        rest += block
    assert rest == np.full(50, 2, np.int16).tobytes()
    follower.close()
    os.unlink(writer.path)


def wait_until_polling(thread: threading.Thread) -> None:
    """Return once thread sleeps in the kernel's poll (a follower's wait, or an event
    loop's epoll_wait), at most 30 s from now."""
    deadline = time.monotonic() + 30
    wchan = pathlib.Path(f"/proc/self/task/{thread.native_id}/wchan")
    while "poll" not in wchan.read_text():
        assert time.monotonic() < deadline, "the thread never waited in poll"
        time.sleep(0.001)


# It forks beside a waiting thread on purpose: CPython 3.12+ warns at such a fork.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("then", ["next", "close"])
@pytest.mark.parametrize("kind", ["follow_wav", "afollow_wav", "iter_wav_stream"])
def test_a_child_forked_while_another_thread_waits_in_a_follower_refuses_it_naming_the_parent(
        private_dirs, kind, then) -> None:
    # Found by the fork soak: a child forked while another thread of its parent waited
    # inside a follow_wav or iter_wav_stream generator inherited the generator marked
    # "running", and Python refused it with "generator already executing" (ValueError)
    # before our owner check could run; an afollow_wav that a task awaited said "already
    # being iterated (by another task)". Each now raises the RuntimeError naming the parent.
    # Closing it there lets go of the child's copy (its fds were closed at the fork): an
    # afollow_wav raised "cannot be closed while another task iterates it" (the parent's
    # task, which is not in the child).
    writer = WavWriter(None, 8000)
    writer.write(np.full(100, 1, np.int16))
    follower = Follower(kind, writer.path)
    assert follower.more() == np.full(100, 1, np.int16).tobytes()
    blocks: list[bytes] = []
    waiting = threading.Thread(target=lambda: blocks.append(follower.more()))
    waiting.start()
    reported = b""
    try:
        wait_until_polling(waiting)
        stay_read, stay_write = os.pipe()
        result_read, result_write = os.pipe()
        in_child = follower.in_child if then == "next" else follower.close_in_child
        pid = fork_a_helper_that_lives_on(stay_read, stay_write, then=in_child,
                                          report=result_write)
        os.close(stay_read)
        os.close(result_write)
        os.close(stay_write)
        with os.fdopen(result_read, "rb") as result:
            reported = result.read()
        if not reported:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    finally:
        writer.write(np.full(50, 2, np.int16))  # the parent's waiting thread follows on
        writer.close()
        waiting.join(timeout=30)
    assert reported.decode() == ("no error" if then == "close" else (
        f"RuntimeError: {kind} {writer.path!r} belongs to process {os.getpid()}, which "
        f"made it; this process ({pid}) is a forked child and cannot use it: make a new "
        "one here"))
    assert blocks == [np.full(50, 2, np.int16).tobytes()]
    assert follower.more() == b""
    follower.close()
    os.unlink(writer.path)



def forking_at_a_moments_lock(caller: str, children: list[int], stay_read: int,
                              stay_write: int):  # type: ignore[no-untyped-def]
    """A profile hook that forks a child that lives on (once) as the function called caller
    has just taken an exclusive flock through _lowlevel.lock."""
    def hook(frame, event, arg):  # type: ignore[no-untyped-def]
        if (event == "return" and frame.f_code.co_name == "lock" and arg is True
                and frame.f_code.co_filename.endswith("_lowlevel.py")
                and frame.f_locals["exclusive"] and frame.f_back.f_code.co_name == caller
                and not children):
            children.append(fork_a_helper_that_lives_on(stay_read, stay_write))
    return hook


# Each a moment-long exclusive flock on a file taken to test that no live process holds it
# (then remove it, or count it as pinned): the function that takes it, and what runs it.
MOMENTS = {
    "a cleanup's test": ("_examine", lambda cache, key: cleanup_all_temp_audio()),
    "an eviction's": ("_evict", lambda cache, key: cache.put(
        cache_key("pushes the first out"), np.full(3000, 2, np.int16), 8000).release()),
    "a discard's": ("remove_if_unpinned", lambda cache, key: cache.discard(key)),
    "a pin count's": ("<lambda>", lambda cache, key: cache.stats()),
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_child_forked_during_a_moments_flock_on_a_file_holds_neither_the_file_nor_its_lock(
        private_dirs, moment) -> None:
    # The moment-long exclusive flock a cleanup, an eviction, a discard or a pin count takes
    # on a file was an fd a fork in that moment copied: the child kept the lock (the entry
    # then missed in every get, which could not pin it) and a removed file's RAM for as long
    # as it lived (found in review).
    caller, action = MOMENTS[moment]
    cache = AudioCache("moments", max_bytes=8000)
    key = cache_key("first")
    cache.put(key, np.full(3000, 1, np.int16), 8000).release()
    path = get_temp_audio_path()
    with open(path, "wb") as f:
        f.write(b"RIFF" + bytes(100))
    target = path if moment == "a cleanup's test" else cache.entries()[0][1]
    inode = os.stat(target).st_ino
    stay_read, stay_write = os.pipe()
    children: list[int] = []
    sys.setprofile(forking_at_a_moments_lock(caller, children, stay_read, stay_write))
    try:
        action(cache, key)
    finally:
        sys.setprofile(None)
    os.close(stay_read)
    try:
        assert children, f"{caller} never took a file's lock"
        pid = children[0]
        held = {os.stat(f"/proc/{pid}/fd/{fd}").st_ino for fd in os.listdir(f"/proc/{pid}/fd")}
        assert inode not in held
        if moment == "a pin count's":
            entry = cache.get(key)  # a hit: the child holds no lock that stops its pin
            assert entry is not None
            entry.release()
        else:
            assert not os.path.exists(target)
    finally:
        os.close(stay_write)
        for pid in children:
            os.waitpid(pid, 0)
        cache.destroy()


@fork_with_threads_is_meant  # the writing thread is there on purpose
def test_a_child_forked_while_another_thread_writes_a_file_atomically_never_holds_it(
        private_dirs) -> None:
    # write_wav(atomic=True) makes, flocks, fills and names the new file inside one C call:
    # a fork from another thread meanwhile copied that descriptor, and the child kept the
    # file's lock (and, once it was removed, its RAM) for as long as it lived:
    # cleanup_temp_audio said "held by a live process" (found by the fork soak). Each try
    # forks a few ms into a 32 MB write, which takes longer than that.
    data = np.zeros(16_000_000, np.int16)
    for _ in range(3):
        path = get_temp_audio_path(prefix="atomic_")
        writing = threading.Event()

        def write(path: str = path, writing: threading.Event = writing) -> None:
            writing.set()
            write_wav(path, data, 8000, atomic=True)

        writer = threading.Thread(target=write)
        writer.start()
        writing.wait()
        time.sleep(0.003)
        stay_read, stay_write = os.pipe()
        pid = fork_a_helper_that_lives_on(stay_read, stay_write)
        os.close(stay_read)
        try:
            writer.join()
            inode = os.stat(path).st_ino
            held = {os.stat(f"/proc/{pid}/fd/{fd}").st_ino
                    for fd in os.listdir(f"/proc/{pid}/fd")}
            assert inode not in held
            assert cleanup_temp_audio(path) is True  # while the child lives
        finally:
            os.close(stay_write)
            os.waitpid(pid, 0)


def forking_as_returns(function: str, children: list[int], stay_read: int,
                       stay_write: int):  # type: ignore[no-untyped-def]
    """A profile hook that forks a child that lives on (once) as the function called
    function returns."""
    def hook(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "return" and frame.f_code.co_name == function and not children:
            children.append(fork_a_helper_that_lives_on(stay_read, stay_write))
    return hook


# Each a new file that a call makes, flocked, before the object that will own it exists
# (or, for write_wav(None), for the whole write): the call, and the function that returns
# the file's descriptor to it.
MADE_FILES: dict[str, tuple[str, Callable[[], str]]] = {
    "write_wav(None)": ("create_unnamed_temp_file",
                        lambda: write_wav(None, np.zeros(100, np.int16), 8000)),
    "create_wav_buffer": ("create_unnamed_temp_file",
                          lambda: closed_path(create_wav_buffer(100, 8000))),
    "WavWriter(None)": ("create_unnamed_temp_file", lambda: closed_path(WavWriter(None, 8000))),
    "WavWriter(path)": ("open_destination", lambda: closed_path(
        WavWriter(get_temp_audio_path(prefix="given_"), 8000))),
}


def closed_path(thing: WavWriter | WavBuffer) -> str:
    thing.close()
    return thing.path


@pytest.mark.parametrize("call", MADE_FILES)
def test_a_child_forked_while_a_call_makes_a_file_never_holds_it(private_dirs, call) -> None:
    # The descriptor of a new file, flocked from its creation, was copied by a fork before
    # the object that owns it (which closes a child's copies at the fork) existed, or
    # during the whole of a write_wav(None): the child kept the file's lock for as long as
    # it lived, and cleanup_temp_audio said "held by a live process" after the parent
    # closed it (found while checking the fork soak's finding in write_wav(atomic=True)).
    function, make = MADE_FILES[call]
    stay_read, stay_write = os.pipe()
    children: list[int] = []
    sys.setprofile(forking_as_returns(function, children, stay_read, stay_write))
    try:
        path = make()
    finally:
        sys.setprofile(None)
    os.close(stay_read)
    try:
        assert children, f"{function} never returned"
        pid = children[0]
        held = {os.stat(f"/proc/{pid}/fd/{fd}").st_ino for fd in os.listdir(f"/proc/{pid}/fd")}
        assert os.stat(path).st_ino not in held
        assert cleanup_temp_audio(path) is True  # while the child lives
    finally:
        os.close(stay_write)
        for pid in children:
            os.waitpid(pid, 0)


def exit_code_within(pid: int, seconds: float) -> int | None:
    """pid's exit code, or None (and the child killed) when it has not exited in time: a
    child that hangs after its fork (a lock the fork left taken) fails the test."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def churn_writers(stop: threading.Event) -> None:
    while not stop.is_set():
        writer = WavWriter(get_temp_audio_path(prefix="churn_"), 8000)
        writer.close()
        cleanup_temp_audio(writer.path)


def churn_buffers(stop: threading.Event) -> None:
    while not stop.is_set():
        buffer = create_wav_buffer(100, 8000)
        buffer.close()
        cleanup_temp_audio(buffer.path)


def churn_atomic_writes(stop: threading.Event) -> None:
    path = get_temp_audio_path(prefix="churn_")
    while not stop.is_set():
        write_wav(path, np.zeros(100, np.int16), 8000, atomic=True)
    cleanup_temp_audio(path)


def churn_new_files(stop: threading.Event) -> None:
    while not stop.is_set():
        cleanup_temp_audio(write_wav(None, np.zeros(100, np.int16), 8000))


def churn_cache_hits(stop: threading.Event) -> None:
    with AudioCache("churn") as cache:
        key = cache_key("churn")
        cache.put(key, np.zeros(100, np.int16), 8000).release()
        while not stop.is_set():
            entry = cache.get(key)
            assert entry is not None
            entry.release()


def churn_cache_renders(stop: threading.Event) -> None:
    with AudioCache("churn") as cache:
        rounds = 0
        while not stop.is_set():
            key = cache_key("render", round=rounds)
            cache.get_or_render(key, lambda writer: writer.write(np.zeros(100, np.int16)),
                                samplerate=8000).release()
            cache.discard(key)
            rounds += 1


def churn_pools(stop: threading.Event) -> None:
    while not stop.is_set():
        with AudioPool(slots=2, max_bytes=4000) as pool:
            pool.write_wav(np.zeros(100, np.int16), 8000).release()


def churn_plain_writes(stop: threading.Event) -> None:
    while not stop.is_set():
        path = get_temp_audio_path(prefix="churn_", create=False)
        write_wav(path, np.zeros(100, np.int16), 8000)
        cleanup_temp_audio(path)


def reading(**options: Any) -> Callable[[threading.Event], None]:
    """A loop of read_wav(path, **options) of one file (its fd not flocked: a child that
    kept it would keep a removed file's RAM)."""
    def churn(stop: threading.Event) -> None:
        path = write_wav(None, np.zeros(100, np.int16), 8000)
        while not stop.is_set():
            read_wav(path, **options)
        cleanup_temp_audio(path)
    return churn


def churn_handoffs(stop: threading.Event) -> None:
    buffer = create_wav_buffer(100, 8000)
    left, right = socket.socketpair()
    with buffer, left, right:
        while not stop.is_set():
            send_wav(left, buffer)
            recv_wav(right)
    cleanup_temp_audio(buffer.path)


# Each a loop that opens and closes files of ours through fd cells (flocked, but for
# the reads).
CHURNS: dict[str, Callable[[threading.Event], None]] = {
    "write_wav(path)": churn_plain_writes,
    "read_wav(mmap=False)": reading(mmap=False),
    "read_wav(dtype=float32)": reading(mmap=False, dtype="float32"),
    "read_wav (view)": reading(),
    "recv_wav": churn_handoffs,
    "WavWriter(path)": churn_writers,
    "create_wav_buffer": churn_buffers,
    "write_wav(path, atomic=True)": churn_atomic_writes,
    "write_wav(None)": churn_new_files,
    "AudioCache.get": churn_cache_hits,
    "AudioCache.get_or_render": churn_cache_renders,
    "AudioPool": churn_pools,
}


@fork_with_threads_is_meant  # the churning thread is there on purpose
@pytest.mark.parametrize("churn", CHURNS)
def test_children_forked_while_another_thread_opens_and_closes_files_hold_none_of_them(
        private_dirs, churn, monkeypatch) -> None:
    # A fork copies the fd table before the memory, and the parent's other threads run on
    # meanwhile: a child forked between a file's open and the store of its fd into its
    # cell, or between a cell's clearing and its fd's close, had the file in its fd table
    # while its copy of the cell said "no fd", so nothing closed that copy, and the child
    # kept the file's flock (a reader took the writer for alive; a cleanup said "held by a
    # live process") and a removed file's RAM for as long as it lived: 6-18% of 2,000
    # children of a thread making and closing WavWriters held one. The C layer now fills
    # and empties cells under a lock that fork takes (pthread_atfork).
    ours = (private_dirs.ram, private_dirs.fallback)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            CHURNS[churn](stop)
        except BaseException as exc:  # reported below, in the test
            errors.append(exc)

    report_read, report_write = os.pipe()
    parent = os.getpid()

    def unraisable(info) -> None:  # type: ignore[no-untyped-def]
        if os.getpid() != parent:  # what a child's fork handlers raised
            os.write(report_write, f"{info.exc_type.__name__}: {info.exc_value}\n".encode())

    monkeypatch.setattr(sys, "unraisablehook", unraisable)
    thread = threading.Thread(target=run)
    thread.start()
    holders = []
    try:
        for _ in range(400):
            pid = os.fork()
            if pid == 0:  # the child: does it hold a file of ours after its fork handlers?
                held = 0
                for fd in os.listdir("/proc/self/fd"):
                    try:
                        target = os.readlink(f"/proc/self/fd/{fd}")
                        regular = stat.S_ISREG(os.stat(f"/proc/self/fd/{fd}").st_mode)
                    except OSError:
                        continue
                    # Files only (a directory's fd holds no lock and no RAM), but the
                    # cache's lock file, which a child opens anew at once, by design.
                    held += (regular and target.startswith(ours)
                             and not target.endswith(f"/{CACHE_LOCK_NAME}"))
                with open("/proc/self/maps") as maps:  # a mapping holds its open file too
                    mapped = sum(1 for line in maps if any(d in line for d in ours))
                if churn in ("read_wav (view)", "recv_wav"):  # the caller's array: kept
                    mapped = 0
                os._exit(1 if held else 2 if mapped else 0)
            code = exit_code_within(pid, 30)
            assert code in (0, 1, 2), f"child exited with {code}"
            if code:
                holders.append("fd" if code == 1 else "mapping")
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    os.close(report_write)
    with os.fdopen(report_read, "rb") as report:
        assert report.read() == b""
    assert not holders, (f"{len(holders)} of 400 children held a file of ours: "
                         f"{holders.count('fd')} by a descriptor, "
                         f"{holders.count('mapping')} by a mapping only")


def test_a_pool_forked_before_its_watch_exists_lets_go_in_the_child(private_dirs,
                                                                     monkeypatch) -> None:
    # A pool forked between the moment it asked to be let go at a fork and the making of its
    # inotify watch: the child's fork handler raised TypeError (no watch cell yet), printed
    # "Exception ignored in: <function _after_fork_in_child ...>" on the child's stderr, and
    # left every object after it in the handler's list unreleased (found by the fork-churn
    # test). The handler now also lets go of the others when one raises.
    stay_read, stay_write = os.pipe()
    report_read, report_write = os.pipe()
    children: list[int] = []
    parent = os.getpid()

    def unraisable(info) -> None:  # type: ignore[no-untyped-def]
        if os.getpid() != parent:  # what the child's fork handlers raised
            os.write(report_write, f"{info.exc_type.__name__}: {info.exc_value}; ".encode())

    def hook(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "return" and frame.f_code.co_name == "_let_go_at_fork" and not children:
            children.append(fork_a_helper_that_lives_on(stay_read, stay_write,
                                                        then=lambda: None,
                                                        report=report_write))

    monkeypatch.setattr(sys, "unraisablehook", unraisable)
    sys.setprofile(hook)
    try:
        pool = AudioPool(slots=1, max_bytes=4000)
    finally:
        sys.setprofile(None)
    os.close(stay_read)
    os.close(report_write)
    try:
        assert children, "AudioPool never asked to be let go at a fork"
        with pool.write_wav(np.full(100, 7, np.int16), 8000) as held:
            assert np.array_equal(held.array, np.full(100, 7, np.int16))
        pool.close()
    finally:
        os.close(stay_write)
        for pid in children:
            os.waitpid(pid, 0)
    with os.fdopen(report_read, "rb") as report:
        assert report.read() == b"no error"
