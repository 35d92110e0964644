"""Concurrency: many processes and threads make, write, read, pool and clean up files at once.

"In use" means locked: WavBuffer, WavWriter and pool slot files carry a shared
flock from before their name appears until they are closed, and
cleanup_all_temp_audio() never removes them. Files from get_temp_audio_path()
and write_wav(None) are never locked: any cleanup_all_temp_audio() may remove
them, so FileNotFoundError when reading one back is the documented outcome.

All files live in the private dirs of the private_dirs fixture; the child
processes inherit LUNA_SHM_DIR and TMPDIR from the environment it sets.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import (
    LIBRARY_PATH,
    call_with_deadline,
    lock_held_by_a_stopped_process,
    rest_of_output,
)
from luna_shm import (
    AudioPool,
    WavWriter,
    cleanup_all_temp_audio,
    cleanup_temp_audio,
    create_wav_buffer,
    get_temp_audio_path,
    read_wav,
    write_wav,
)

PROCESSES = 8
THREADS = 4
ROUNDS = 100
DEADLINE = 120  # seconds; a hang fails the test instead of blocking the suite


def _held_intact(path: str, data: np.ndarray, fd: int | None = None) -> str | None:
    """Why the held file at path is not what its holder wrote, or None when it is."""
    try:
        if fd is not None and not os.path.samestat(os.fstat(fd), os.stat(path)):
            return f"{path} no longer names the held file"
        back, _ = read_wav(path, mmap=False)
    except Exception as exc:
        return f"held file {path}: {exc!r}"
    if not np.array_equal(back, data):
        return f"held file {path} holds other audio"
    return None


def _worker(index: int, out_path: str, ready, passes) -> None:
    """One of the eight processes: THREADS threads doing ROUNDS rounds of every kind of file."""
    paths: list[str] = []
    slot_paths: set[str] = set()
    errors: list[str] = []
    counts = {"vanished_unlocked": 0, "orphans": 0, "held_checks": 0}
    lock = threading.Lock()
    if not ready.wait(DEADLINE):
        errors.append("the cleaner never started")
    pool = AudioPool(slots=3, max_bytes=4000, timeout=None)  # four threads, three slots

    def held(path: str, data: np.ndarray, fd: int | None = None) -> None:
        problem = _held_intact(path, data, fd)
        with lock:
            counts["held_checks"] += 1
            if problem:
                errors.append(problem)

    def unlocked_read(path: str, data: np.ndarray, mmap: bool) -> None:
        try:
            back, _ = read_wav(path, mmap=mmap)
        except FileNotFoundError:  # documented: an unlocked file is cleanup's to take
            with lock:
                counts["vanished_unlocked"] += 1
            return
        if not np.array_equal(back, data):
            with lock:
                errors.append(f"{path} holds other audio")

    def thread_main(thread: int) -> None:
        try:
            for i in range(ROUNDS):
                tag = ((index * THREADS + thread) * ROUNDS + i) % 30_000
                data = np.full(200 + i % 7, tag, np.int16)
                made: list[str] = []

                # The drop-in helper's use: a name, then another library writes the file.
                # (write_wav onto such a name can fail when cleanup removes the empty
                # file: see test_a_write_onto_a_temp_path_survives_a_concurrent_cleanup.)
                path = get_temp_audio_path()
                made.append(path)
                sf.write(path, data, 8000, subtype="PCM_16")
                unlocked_read(path, data, mmap=bool(i % 2))
                cleanup_temp_audio(path)

                path = write_wav(None, data, 8000)
                made.append(path)
                unlocked_read(path, data, mmap=not i % 2)
                if i % 5:
                    cleanup_temp_audio(path)
                else:
                    with lock:
                        counts["orphans"] += 1  # left for the cleaner process

                with create_wav_buffer(len(data), 8000, anonymous=i % 10 == 3) as buf:
                    if not buf.anonymous:
                        made.append(buf.path)
                    buf.array[:] = data
                    held(buf.path, data, buf.fileno())
                if not buf.anonymous:
                    cleanup_temp_audio(buf.path)

                with WavWriter(None, 8000) as writer:
                    made.append(writer.path)
                    writer.write(data[:100])
                    writer.write(data[100:])
                    held(writer.path, data, writer.fileno())
                cleanup_temp_audio(writer.path)

                with pool.write_wav(data, 8000) as pooled:
                    held(pooled.path, data)
                    with lock:
                        slot_paths.add(pooled.path)
                with lock:
                    paths.extend(made)
        except Exception:
            with lock:
                errors.append(traceback.format_exc())

    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
        if t.is_alive():
            errors.append("a worker thread hung")

    # Hold one file of each kind while the cleaner makes two more full passes.
    data = np.full(300, index, np.int16)
    buf = create_wav_buffer(len(data), 8000)
    buf.array[:] = data
    writer = WavWriter(None, 8000)
    writer.write(data)
    pooled = pool.write_wav(data, 8000)
    start, end = passes.value, time.monotonic() + DEADLINE
    while passes.value < start + 2 and time.monotonic() < end:
        time.sleep(0.01)
    if passes.value < start + 2:
        errors.append("the cleaner stopped making passes")
    held(buf.path, data, buf.fileno())
    held(writer.path, data, writer.fileno())
    held(pooled.path, data)
    paths += [buf.path, writer.path]
    for thing in (buf, writer, pooled):
        thing.close() if hasattr(thing, "close") else thing.release()
    cleanup_temp_audio(buf.path)
    cleanup_temp_audio(writer.path)
    pool.close()
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump({"paths": paths, "slot_paths": sorted(slot_paths), "errors": errors,
                   **counts}, out)


def _cleaner(out_path: str, ready, stop, passes) -> None:
    """The extra process: cleanup_all_temp_audio() in a loop, and now and then a new pool
    (whose start reclaims the slot files of dead pools) while the others run."""
    removed, errors, pools = 0, [], 0
    try:
        while True:
            removed += cleanup_all_temp_audio()
            if passes.value % 10 == 5:
                with AudioPool(slots=1, max_bytes=1000):
                    pools += 1
            with passes.get_lock():
                passes.value += 1
            ready.set()
            if stop.is_set():
                break
    except Exception:
        errors.append(traceback.format_exc())
        ready.set()
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump({"removed": removed, "errors": errors, "pools": pools}, out)


def test_eight_processes_and_a_cleanup_loop_never_collide_lose_a_held_file_or_leave_one(
        private_dirs, tmp_path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, stop, passes = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    cleaner_out = str(tmp_path / "cleaner.json")
    outs = [str(tmp_path / f"worker{i}.json") for i in range(PROCESSES)]
    cleaner = ctx.Process(target=_cleaner, args=(cleaner_out, ready, stop, passes))
    workers = [ctx.Process(target=_worker, args=(i, out, ready, passes))
               for i, out in enumerate(outs)]
    cleaner.start()
    for w in workers:
        w.start()
    try:
        for w in workers:
            w.join(DEADLINE)
    finally:
        stop.set()
        cleaner.join(DEADLINE)
        for p in [*workers, cleaner]:
            if p.is_alive():
                p.kill()
                p.join()
    assert [w.exitcode for w in workers] == [0] * PROCESSES
    assert cleaner.exitcode == 0
    results = [json.loads(Path(out).read_text()) for out in outs]
    cleaning = json.loads(Path(cleaner_out).read_text())

    assert cleaning["errors"] == []
    assert [r["errors"] for r in results] == [[]] * PROCESSES

    paths = [p for r in results for p in r["paths"]]
    assert len(paths) >= PROCESSES * THREADS * ROUNDS * 3
    assert len(set(paths)) == len(paths), "a name was handed out twice"
    slots = [set(r["slot_paths"]) for r in results]
    assert all(1 <= len(s) <= 3 for s in slots)  # three slots per pool, never a new one
    every_slot = set().union(*slots)
    assert len(every_slot) == sum(len(s) for s in slots) and not every_slot & set(paths)
    held_checks = sum(r["held_checks"] for r in results)
    assert held_checks == PROCESSES * (THREADS * ROUNDS * 3 + 3)

    # Every file left for the cleaner was taken while the workers ran.
    orphans = sum(r["orphans"] for r in results)
    assert orphans > 0 and cleaning["removed"] >= orphans
    assert cleaning["pools"] >= 1

    cleanup_all_temp_audio()
    assert os.listdir(private_dirs.ram) == [] and os.listdir(private_dirs.fallback) == []


# ---- the windows between a name and its lock, held open with strace ----------------------------


def _strace_prefix(syscalls: str, delay_us: int, *, when: int | None = None,
                   only_path: str | None = None, log: str = "/dev/null",
                   after: str | None = None) -> list[str]:
    """strace arguments that hold up each of these system calls (or only the when-th one,
    or only those on only_path) for delay_us microseconds; and, after them, each of the
    system calls in after for as long once it is done."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (it delays one system call to open a window)")
    inject = f"inject={syscalls}:delay_enter={delay_us}" + (f":when={when}" if when else "")
    traced = syscalls + (f",{after}" if after else "")
    delay_after = ["-e", f"inject={after}:delay_exit={delay_us}"] if after else []
    return [strace, "-f", "-qq", "-o", log, "-e", "signal=none", "-e", f"trace={traced}",
            "-e", inject, *delay_after, *(["-P", only_path] if only_path else [])]


def _run_delayed(code: str, prefix: list[str], window_open) -> dict:
    """Run code under strace; once window_open(child pid) holds, run cleanup_all_temp_audio()
    here; then let the child finish and return its JSON report (its last line).

    The child's first line is its pid (strace's own pid is not the python's).
    """
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH, "PYTHONDONTWRITEBYTECODE": "1"}
    body = "import os\nprint(os.getpid(), flush=True)\n" + textwrap.dedent(code)
    process = subprocess.Popen([*prefix, sys.executable, "-c", body], env=env,
                               stdout=subprocess.PIPE, text=True)
    try:
        pid = int(process.stdout.readline())
        end = time.monotonic() + 60
        while not window_open(pid):
            assert process.poll() is None, "the child ended before the window opened"
            assert time.monotonic() < end, "the window never opened"
            time.sleep(0.002)
        removed = cleanup_all_temp_audio()
        # Not communicate(): the report follows the strace delay, not a word from here, so
        # a loaded machine can bring it in with the pid line, into readline's buffer.
        out, _ = rest_of_output(process, timeout=120)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
        process.stdout.close()
    assert process.returncode == 0, out
    return {**json.loads(out.strip().splitlines()[-1]), "removed_meanwhile": removed}


def _appeared(directory: str, start: str):
    return lambda pid: any(n.startswith(start) for n in os.listdir(directory))


def _opened_by(path: str):
    """True once process pid has path open (it is then about to lock it)."""
    def check(pid: int) -> bool:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    return True
            except FileNotFoundError:
                pass
        return False
    return check


def test_a_pool_slot_being_made_is_never_taken_by_a_concurrent_cleanup(private_dirs) -> None:
    # Every flock of the child waits half a second: a slot file that had a name before its
    # lock would be removed by the cleanup that runs in that window. Where the slot is
    # made unnamed (O_TMPFILE) and linked once locked and marked, the window is held open
    # after the link instead: the cleanup finds the new name while the pool is still
    # making the slot.
    result = _run_delayed("""
        import json, os
        import numpy as np
        from luna_shm import AudioPool
        with AudioPool(slots=1, max_bytes=1000) as pool, \\
                pool.write_wav(np.arange(10, dtype=np.int16), 8000) as pooled:
            print(json.dumps({"exists": os.path.isfile(pooled.path)}))
    """, _strace_prefix("flock", 500_000, after="linkat"),
        _appeared(private_dirs.ram, "luna_audio_pool_"))
    assert result["removed_meanwhile"] == 0
    assert result["exists"] is True


@pytest.mark.parametrize("kind", ["create_wav_buffer", "WavWriter"])
def test_a_buffer_or_writer_opened_at_a_temp_path_is_never_removed_by_a_concurrent_cleanup(
        private_dirs, kind) -> None:
    path = get_temp_audio_path(create=True)  # empty and unlocked
    if kind == "create_wav_buffer":
        make = f"create_wav_buffer(10, 8000, path={path!r})"
    else:
        make = f"WavWriter({path!r}, 8000)"
    result = _run_delayed(f"""
        import json, os
        from luna_shm import WavWriter, create_wav_buffer
        with {make} as held:
            print(json.dumps({{"exists": os.path.exists(held.path),
                              "same": os.path.exists(held.path) and os.path.samestat(
                                  os.stat(held.path), os.fstat(held.fileno()))}}))
    """, _strace_prefix("flock", 500_000), _opened_by(path))
    assert result["exists"] is True and result["same"] is True


@pytest.mark.parametrize("kind", ["create_wav_buffer", "WavWriter"])
def test_a_buffer_or_writer_at_a_temp_path_never_waits_for_a_cleanup_stopped_holding_it(
        private_dirs, kind) -> None:
    path = get_temp_audio_path(create=True)  # empty and unlocked
    audio = np.arange(-500, 500, dtype=np.int16)

    def produce() -> tuple[bool, bool]:
        if kind == "create_wav_buffer":
            with create_wav_buffer(len(audio), 8000, path=path) as held:
                held.array[:] = audio
                named = os.path.samestat(os.stat(path), os.fstat(held.fileno()))
        else:
            with WavWriter(path, 8000) as held:
                held.write(audio)
                named = os.path.samestat(os.stat(path), os.fstat(held.fileno()))
        return named, held.path == path

    # The exclusive flock a cleanup takes to test whether the file is in use, held by a
    # process stopped there. Found in review: the producer's shared flock waited for it for
    # ever. It now writes a new file beside it and renames it over the name, which the
    # cleanup, continued, leaves alone (it takes only the file it examined).
    with lock_held_by_a_stopped_process(path):
        original = os.stat(path)
        assert call_with_deadline(produce, deadline=30) == (True, True)
        assert not os.path.samestat(os.stat(path), original)
    data, rate = read_wav(path, mmap=False)
    assert rate == 8000 and np.array_equal(data, audio)
    assert sorted(os.listdir(private_dirs.ram)) == [os.path.basename(path)]
    assert cleanup_temp_audio(path) is True


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "replacing-plain"])
def test_a_write_wav_replacing_a_file_is_never_broken_by_a_concurrent_cleanup(
        private_dirs, atomic) -> None:
    target = Path(private_dirs.ram) / "given.wav"
    write_wav(target, np.zeros(10, np.int16), 8000)
    result = _run_delayed(f"""
        import json
        import numpy as np
        from luna_shm import write_wav
        try:
            write_wav({str(target)!r}, np.ones(1000, np.int16), 8000, atomic={atomic})
            print(json.dumps({{"error": None}}))
        except OSError as exc:
            print(json.dumps({{"error": [exc.errno, exc.filename]}}))
    """, _strace_prefix("rename,renameat,renameat2", 500_000),
        _appeared(private_dirs.ram, ".luna_audio_"))
    assert result["error"] is None
    np.testing.assert_array_equal(read_wav(target)[0], np.ones(1000, np.int16))


@pytest.mark.parametrize("kind", ["write_wav", "create_wav_buffer", "WavWriter"])
def test_a_write_onto_a_temp_path_survives_a_concurrent_cleanup_removing_the_empty_file(
        private_dirs, tmp_path, kind) -> None:
    path = get_temp_audio_path(create=True)  # empty, unlocked: cleanup may remove it at any time
    make = {"write_wav": f"write_wav({path!r}, np.ones(10, np.int16), 8000)",
            "create_wav_buffer": f"create_wav_buffer(10, 8000, path={path!r}).close()",
            "WavWriter": f"WavWriter({path!r}, 8000).close()"}[kind]
    log = tmp_path / "strace.log"
    # Only the calls on this path are traced; the second open of it (the reopen after
    # EEXIST) waits half a second, and the cleanup runs as soon as the first has returned.
    prefix = _strace_prefix("openat", 500_000, when=2, only_path=path, log=str(log))
    result = _run_delayed(f"""
        import json
        import numpy as np
        from luna_shm import WavWriter, create_wav_buffer, write_wav
        try:
            {make}
            print(json.dumps({{"error": None}}))
        except OSError as exc:
            print(json.dumps({{"error": [exc.errno, exc.filename]}}))
    """, prefix, lambda pid: log.exists() and "EEXIST" in log.read_text())
    assert result["removed_meanwhile"] == 1
    assert result["error"] is None
