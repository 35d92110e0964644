"""AudioCache shared by real processes: single flight, the bound under load, SIGKILL, disk tier."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers import (
    FILL_FD_TABLE,
    LIBRARY_PATH,
    assert_child_ok,
    call_with_deadline,
    lock_held_by_a_stopped_process,
    require_private_mounts,
    rest_of_output,
    run_in_private_shm,
    wait_until_someone_waits_for_flock,
)
from luna_shm import AudioCache, cache_key

# Audio that any process derives from the key alone: a render, and its oracle.
AUDIO_OF_KEY = textwrap.dedent("""
    import numpy as np
    def audio_of(key, frames=2400):
        rng = np.random.default_rng(int(key[:12], 16))
        return rng.integers(-32768, 32767, size=frames, dtype=np.int16)
""")


def child_env(private_dirs) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LUNA_SHM_DISABLE"}
    env.update(LUNA_SHM_DIR=private_dirs.ram, TMPDIR=private_dirs.fallback,
               PYTHONPATH=LIBRARY_PATH)
    return env


def spawn(private_dirs, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", AUDIO_OF_KEY + textwrap.dedent(code), *args],
                            env=child_env(private_dirs), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str], timeout: float = 120) -> str:
    # Not communicate(): it misses what a test's readline() of the child's stdout took
    # into the buffer with its line (a renderer that prints "done" soon after its
    # "rendering" line, with no word from the test in between).
    try:
        out, err = rest_of_output(process, timeout)
    except subprocess.TimeoutExpired as exc:  # (killed by then)
        pytest.fail(f"child hung\n{exc.output}\n{exc.stderr}")
    assert process.returncode == 0, f"child exited {process.returncode}\n{out}\n{err}"
    return out


def audio_of(key: str, frames: int = 2400) -> np.ndarray:
    rng = np.random.default_rng(int(key[:12], 16))
    return rng.integers(-32768, 32767, size=frames, dtype=np.int16)


def put_fillers(cache: AudioCache, count: int, tag: str = "") -> None:
    """Put count other entries of 4.8 KB: through a 20 KB RAM tier, the older ones spill
    to the disk tier."""
    for i in range(count):
        other = cache_key(f"filler {tag}{i}")
        cache.put(other, audio_of(other), 24000).release()


RENDER_MANY = """
    import os, sys, threading, time
    from luna_shm import AudioCache, cache_key
    name, go, log = sys.argv[1], sys.argv[2], sys.argv[3]
    keys = [cache_key(f"sentence {i}") for i in range(20)]
    cache = AudioCache(name)
    failures = []

    def render(key):
        def into(writer):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND)
            os.write(fd, f"{key}\\n".encode())
            os.close(fd)
            audio = audio_of(key)
            for block in np.array_split(audio, 8):
                time.sleep(0.002)
                writer.write(block)
        return into

    def worker(seed):
        order = list(keys)
        np.random.default_rng(seed).shuffle(order)
        for key in order:
            with cache.get_or_render(key, render(key), samplerate=24000) as entry:
                if not np.array_equal(entry.array, audio_of(key)):
                    failures.append(key)

    while not os.path.exists(go):
        time.sleep(0.001)
    threads = [threading.Thread(target=worker, args=(os.getpid() * 10 + i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    print("failures", len(failures))
"""


def test_8_processes_x_4_threads_render_each_of_20_keys_exactly_once(private_dirs,
                                                                     tmp_path: Path) -> None:
    go, log = tmp_path / "go", tmp_path / "renders.log"
    log.touch()
    children = [spawn(private_dirs, RENDER_MANY, "shared", str(go), str(log)) for _ in range(8)]
    time.sleep(0.5)  # let them import; they all start on the go file
    go.touch()
    outputs = [finish(child) for child in children]
    assert all(out.strip() == "failures 0" for out in outputs), outputs
    rendered = log.read_text().split()
    keys = {cache_key(f"sentence {i}") for i in range(20)}
    assert sorted(rendered) == sorted(keys), "a key was rendered twice (or never)"
    with AudioCache("shared") as cache:
        stats = cache.stats()
        assert stats.renders == 20 and stats.entries == 20
        assert stats.hits + stats.misses >= 8 * 4 * 20


OBSERVER = """
    import fcntl, os, re, sys, time
    directory, stop = sys.argv[1], sys.argv[2]
    bound = int(sys.argv[3])
    entry = re.compile(r"[0-9a-f]{64}\\.wav")
    lock = os.open(f"{directory}/lock", os.O_RDWR)
    looks = worst = 0
    while not os.path.exists(stop):
        fcntl.flock(lock, fcntl.LOCK_SH)  # what a committer changes, it changes under LOCK_EX
        total = 0
        for name in os.listdir(directory):
            if entry.fullmatch(name):
                try:
                    total += os.lstat(f"{directory}/{name}").st_size
                except FileNotFoundError:
                    pass
        fcntl.flock(lock, fcntl.LOCK_UN)
        looks += 1
        worst = max(worst, total)
        if total > bound:
            print(f"over the bound: {total} > {bound}")
            sys.exit(1)
    print(looks, worst)
"""

PINNER = """
    import os, sys, time
    from luna_shm import AudioCache, cache_key
    name, stop = sys.argv[1], sys.argv[2]
    cache = AudioCache(name, max_bytes=10_000_000)
    keys = [cache_key(f"pinned {i}") for i in range(3)]
    pins = [cache.put(k, audio_of(k, 100_000), 16000) for k in keys]
    assert all(p.stored for p in pins)
    print("pinned", flush=True)
    while not os.path.exists(stop):
        time.sleep(0.01)
    for key, pin in zip(keys, pins):
        assert pin.stored and os.path.exists(pin.path), key
        assert np.array_equal(pin.array, audio_of(key, 100_000))
        pin.release()
    cache.close()
    print("intact")
"""

PUTTER = """
    import sys
    from luna_shm import AudioCache, cache_key
    name, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    cache = AudioCache(name, max_bytes=10_000_000)
    stored = 0
    for i in range(count):
        frames = int(rng.integers(1, 400_000))  # up to 800 KB
        key = cache_key(f"put {seed} {i}")
        with cache.put(key, np.full(frames, i % 30000, np.int16), 16000) as entry:
            stored += entry.stored
    cache.close()
    print(stored)
"""


def test_the_bound_holds_at_every_moment_under_random_puts_and_pins_survive(
        private_dirs, tmp_path: Path) -> None:
    bound = 10_000_000
    with AudioCache("bounded", max_bytes=bound) as cache:
        directory = cache.directory
    stop = tmp_path / "stop"
    pinner = spawn(private_dirs, PINNER, "bounded", str(stop))
    assert pinner.stdout is not None and pinner.stdout.readline().strip() == "pinned"
    observer = spawn(private_dirs, OBSERVER, directory, str(stop), str(bound))
    # 10,000 puts, random sizes up to 800 KB, from two processes at once.
    putters = [spawn(private_dirs, PUTTER, "bounded", "5000", str(seed)) for seed in (1, 2)]
    stored = [int(finish(p, timeout=300)) for p in putters]
    stop.touch()
    looks, worst = map(int, finish(observer).split())
    assert finish(pinner).strip() == "intact"
    assert looks > 100 and 0 < worst <= bound
    assert sum(stored) > 9000
    with AudioCache("bounded", max_bytes=bound) as cache:
        stats = cache.stats()
        assert stats.bytes <= bound and stats.evictions > 0


SLOW_RENDERER = """
    import os, sys, time
    from luna_shm import AudioCache, cache_key
    cache = AudioCache(sys.argv[1])
    key = cache_key("killed mid-render")
    def render(writer):
        writer.write(audio_of(key)[:800])
        print("rendering", flush=True)
        time.sleep(600)
    cache.get_or_render(key, render, samplerate=24000)
"""

WAITER = """
    import sys
    from luna_shm import AudioCache, cache_key
    cache = AudioCache(sys.argv[1])
    key = cache_key("killed mid-render")
    renders = []
    def render(writer):
        renders.append(1)
        writer.write(audio_of(key))
    with cache.get_or_render(key, render, samplerate=24000) as entry:
        assert np.array_equal(entry.array, audio_of(key))
    cache.close()
    print("rendered" if renders else "waited")
"""


@pytest.mark.parametrize("stale_note", [False, True], ids=["", "with-a-stale-note"])
def test_sigkill_of_a_renderer_mid_render_wakes_its_waiters_and_the_key_renders_again(
        private_dirs, stale_note: bool) -> None:
    renderer = spawn(private_dirs, SLOW_RENDERER, "killed")
    assert renderer.stdout is not None and renderer.stdout.readline().strip() == "rendering"
    key = cache_key("killed mid-render")
    if stale_note:
        # What a failed render leaves for its waiters when its file had the inode number
        # the killed renderer's file has now (ext4 reuses them at once), and which the
        # killed one did not live to remove: it must not be taken for the killed one's.
        with AudioCache("killed") as cache:
            live = cache.live_path(key)
            assert live is not None
            note = Path(cache.directory) / f"{key}.outcome"
            note.write_text(f"{os.stat(live).st_ino} 1 ConnectionError: an earlier render")
    waiters = [spawn(private_dirs, WAITER, "killed") for _ in range(3)]
    time.sleep(1.0)  # the waiters block on the renderer's flock by then
    renderer.send_signal(signal.SIGKILL)
    renderer.communicate(timeout=30)
    outcomes = sorted(finish(w, timeout=60).strip() for w in waiters)
    # One waiter renders the key afresh; the others wait for it and get its entry.
    assert outcomes == ["rendered", "waited", "waited"], outcomes
    with AudioCache("killed") as cache:
        assert cache.live_path(key) is None
        assert not (Path(cache.directory) / f"{key}.outcome").exists()
        with cache.get(key) as entry:
            np.testing.assert_array_equal(entry.array, audio_of(key))


class Alarm(Exception):
    pass


def test_a_signal_handler_that_raises_ends_a_wait_for_another_process_s_render(
        private_dirs) -> None:
    # As Python's own blocking calls do (PEP 475): the handler runs during the wait, and
    # its exception ends it, even with no timeout and a renderer that never finishes.
    fds = len(os.listdir("/proc/self/fd"))
    renderer = spawn(private_dirs, SLOW_RENDERER, "interrupted")
    assert renderer.stdout is not None and renderer.stdout.readline().strip() == "rendering"
    backstop = threading.Timer(30, renderer.kill)  # ends the wait if the signal cannot
    backstop.start()

    def alarm(signum, frame):
        raise Alarm("interrupted")

    previous = signal.signal(signal.SIGALRM, alarm)
    key = cache_key("killed mid-render")
    try:
        with AudioCache("interrupted") as cache:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Alarm):
                cache.get_or_render(key, lambda w: w.write(audio_of(key)), samplerate=24000)
            assert renderer.poll() is None  # the wait ended while the render went on
            backstop.cancel()
            renderer.kill()
            renderer.communicate(timeout=30)
            # Nothing held or leaked: the next caller renders the key itself.
            with cache.get_or_render(key, lambda w: w.write(audio_of(key)),
                                     samplerate=24000, timeout=30) as entry:
                np.testing.assert_array_equal(entry.array, audio_of(key))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        backstop.cancel()
        renderer.kill()
        renderer.communicate(timeout=30)
    assert len(os.listdir("/proc/self/fd")) == fds


KILLED_PUTTER = """
    import sys
    from luna_shm import AudioCache, cache_key
    cache = AudioCache(sys.argv[1], max_bytes=2_000_000)
    i = 0
    print("go", flush=True)
    while True:
        key = cache_key(f"crash {i % 50}")
        cache.put(key, audio_of(key, 10_000 + (i % 7) * 20_000), 16000).release()
        i += 1
"""


def test_kill_9_at_any_point_leaves_a_cache_that_opens_with_only_complete_entries(
        private_dirs) -> None:
    for round_ in range(10):
        putter = spawn(private_dirs, KILLED_PUTTER, "crashy")
        assert putter.stdout is not None and putter.stdout.readline().strip() == "go"
        time.sleep(0.05 + 0.03 * round_)
        putter.send_signal(signal.SIGKILL)
        putter.communicate(timeout=30)
    with AudioCache("crashy", max_bytes=2_000_000) as cache:
        assert cache.stats().bytes <= 2_000_000
        sizes = {10_000 + j * 20_000 for j in range(7)}
        for key, _path, _ in cache.entries():
            with cache.get(key) as entry:
                assert len(entry.array) in sizes  # whole, as put
                expected = audio_of(key, len(entry.array))
                np.testing.assert_array_equal(entry.array, expected)
        leftovers = [n for n in os.listdir(cache.directory)
                     if n.endswith((".part", ".live", ".unstored.wav"))]
        assert leftovers == []


SPILLER = """
    import sys
    from luna_shm import AudioCache, cache_key
    cache = AudioCache("tiered", max_bytes=100_000, disk_dir=sys.argv[1],
                       disk_max_bytes=1_000_000)
    for i in range(10):  # 10 x ~48 KB through a 100 KB RAM tier
        key = cache_key(f"tier {i}")
        cache.put(key, audio_of(key, 24_000), 24000).release()
    print(cache.stats().spills)
    cache.close()
"""

RELOADER = """
    import sys
    from luna_shm import AudioCache, cache_key
    cache = AudioCache("tiered", max_bytes=100_000, disk_dir=sys.argv[1],
                       disk_max_bytes=1_000_000)
    found = 0
    for i in range(10):
        key = cache_key(f"tier {i}")
        entry = cache.get(key)
        if entry is not None:
            with entry:
                assert np.array_equal(entry.array, audio_of(key, 24_000)), key
            found += 1
    print(found, cache.stats().reloads)
    if sys.argv[2] == "destroy":
        cache.destroy()
    else:
        cache.close()
"""


def test_evicted_entries_spill_to_disk_and_reload_after_every_process_restarted(
        private_dirs, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    spills = int(finish(spawn(private_dirs, SPILLER, str(disk))))
    assert spills == 8  # 2 entries fit in RAM; the 8 evicted went to disk
    # Every process restarted: 2 entries in RAM, 8 reloaded from disk (and, as reloads
    # push the 2 out of the 100 KB RAM tier in LRU order, those come back from disk too).
    found, reloads = map(int, finish(spawn(private_dirs, RELOADER, str(disk), "keep")).split())
    assert found == 10 and reloads >= 8
    # A reboot: the RAM disk is empty again; the disk tier still holds what was spilled.
    for name in os.listdir(private_dirs.ram):
        shutil.rmtree(f"{private_dirs.ram}/{name}")
    found, reloads = map(int, finish(spawn(private_dirs, RELOADER, str(disk),
                                           "destroy")).split())
    assert found == reloads and found >= 8
    assert os.listdir(private_dirs.ram) == []
    assert os.listdir(disk) == []


STUCK_SPILLER = """
    import os, sys, time
    from luna_shm import AudioCache, cache_key
    cache = AudioCache("stuck", max_bytes=100_000, disk_dir=sys.argv[1])

    def stuck_sendfile(*args):  # the spill's copy to disk stops here, its partial made
        print("spilling", flush=True)
        time.sleep(600)

    os.sendfile = stuck_sendfile
    for i in range(3):  # 3 x ~48 KB through a 100 KB RAM tier: the third evicts the first
        key = cache_key(f"stuck {i}")
        cache.put(key, audio_of(key, 24_000), 24000).release()
"""


def test_a_killed_spill_leaves_a_partial_on_disk_that_the_next_open_removes(
        private_dirs, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    spiller = spawn(private_dirs, STUCK_SPILLER, str(disk))
    assert spiller.stdout is not None and spiller.stdout.readline().strip() == "spilling"
    tier = disk / f"luna_cache-{os.geteuid()}-stuck"
    partials = [n for n in os.listdir(tier) if n.endswith(".part")]
    assert len(partials) == 1  # (while it lives, it holds the RAM tier's lock: no open)
    spiller.send_signal(signal.SIGKILL)
    spiller.communicate(timeout=30)
    with AudioCache("stuck", max_bytes=100_000, disk_dir=disk) as cache:
        assert sorted(os.listdir(tier)) == ["lock"]
        assert cache.stats().entries == 2  # what the killed process had stored in RAM
        cache.destroy()


def test_a_forked_child_shares_the_cache_with_its_own_lock(private_dirs) -> None:
    with AudioCache("forked", max_bytes=100_000) as cache:
        key, mine = cache_key("from the child"), cache_key("the parent's")
        cache.put(mine, audio_of(mine), 16000).release()
        for _ in range(10):  # hits this process counts, not yet written to the shared count
            cache.get(mine).release()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                cache.get(mine).release()
                cache.put(key, audio_of(key), 16000).release()
                cache.stats()  # writes the child's counts out
                code = 0
            finally:
                os._exit(code)
        _, status = call_with_deadline(lambda: os.waitpid(pid, 0))  # type: ignore[misc]
        assert os.waitstatus_to_exitcode(status) == 0
        with cache.get(key) as entry:
            np.testing.assert_array_equal(entry.array, audio_of(key))
        # The parent's 10 hits, the child's 1 and this one: the child did not write the
        # parent's pending counts out a second time.
        assert cache.stats().hits == 12



def run_in_child(work: Callable[[], int]) -> int:
    """Fork, run work in the child (its result is the child's exit code, 1 if it raised)
    and return that code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = work()
        finally:
            os._exit(code)
    _, status = call_with_deadline(lambda: os.waitpid(pid, 0))  # type: ignore[misc]
    return os.waitstatus_to_exitcode(status)


def test_a_cache_with_a_disk_tier_works_in_a_forked_child_and_in_its_child(private_dirs,
                                                                          tmp_path) -> None:
    # A forked child closes the descriptors of ours it inherited at once, but the lock files
    # of a cache's tiers, which it opens anew from (closed first, the RAM tier's reopen took
    # the lowest free number, the disk tier's own, and the disk tier found its lock file
    # "replaced"). Its child does the same with the lock files the child opened.
    with AudioCache("generations", max_bytes=100_000, disk_dir=tmp_path) as cache:
        mine = cache_key("the parent's")
        cache.put(mine, audio_of(mine), 16000).release()

        def use(name: str, then: Callable[[], int] | None = None) -> Callable[[], int]:
            def work() -> int:
                key = cache_key(name)
                cache.get(mine).release()
                cache.put(key, audio_of(key), 16000).release()
                cache.stats()  # its counts written out, under the lock
                return then() if then is not None else 0
            return work

        assert run_in_child(use("the child's", then=lambda: run_in_child(
            use("the grandchild's")))) == 0
        for name in ("the child's", "the grandchild's"):
            with cache.get(cache_key(name)) as entry:
                np.testing.assert_array_equal(entry.array, audio_of(cache_key(name)))
        assert cache.stats().hits == 4  # the parent's 2 and one from each generation


FOLLOWED_RENDERER = """
    import sys, time
    from luna_shm import AudioCache, cache_key
    cache = AudioCache(sys.argv[1])
    key = cache_key(sys.argv[2])
    audio = audio_of(key, 24_000)
    def render(writer):
        for start in range(0, len(audio), 1200):  # 20 chunks of 50 ms, one every 50 ms
            writer.write(audio[start:start + 1200])
            if start == 0:
                print("rendering", flush=True)
            if sys.argv[3] == "fail" and start == 2400:
                raise RuntimeError("the engine crashed")
            time.sleep(0.05)
    try:
        cache.get_or_render(key, render, samplerate=24000).release()
    except RuntimeError:
        pass
    print("done", flush=True)
"""


def test_a_second_caller_plays_an_entry_while_another_process_still_renders_it(
        private_dirs) -> None:
    key = cache_key("followed while it renders")
    renderer = spawn(private_dirs, FOLLOWED_RENDERER, "followed", "followed while it renders",
                     "ok")
    assert renderer.stdout is not None and renderer.stdout.readline().strip() == "rendering"
    blocks: list[np.ndarray] = []
    still_rendering_at_first_block: list[bool] = []

    def follow() -> None:
        with AudioCache("followed") as cache:
            for block in cache.follow(key, timeout=30):
                if not blocks:
                    still_rendering_at_first_block.append(renderer.poll() is None)
                blocks.append(block)

    call_with_deadline(follow, 60)
    assert finish(renderer).strip() == "done"
    assert still_rendering_at_first_block == [True]
    assert len(blocks) > 1  # it came in pieces, as it was rendered
    np.testing.assert_array_equal(np.concatenate(blocks), audio_of(key, 24_000))
    with AudioCache("followed") as cache:  # and it was stored, once
        assert cache.stats().entries == 1


def test_following_a_render_that_fails_raises_stream_abandoned_and_stores_nothing(
        private_dirs) -> None:
    from luna_shm import StreamAbandoned

    key = cache_key("a render that fails")
    renderer = spawn(private_dirs, FOLLOWED_RENDERER, "failing", "a render that fails", "fail")
    assert renderer.stdout is not None and renderer.stdout.readline().strip() == "rendering"

    def follow() -> int:
        frames = 0
        with AudioCache("failing") as cache:
            # Named by its .live file (found in review: by /proc/self/fd/<n>).
            live = f"{cache.directory}/{key}.live"
            with pytest.raises(StreamAbandoned, match=f"^{live}: the writer aborted"):
                for block in cache.follow(key, timeout=30):
                    frames += len(block)
        return frames

    frames = call_with_deadline(follow, 60)
    assert finish(renderer).strip() == "done"
    assert isinstance(frames, int) and 0 < frames < 24_000
    with AudioCache("failing") as cache:
        assert cache.get(key) is None and cache.live_path(key) is None


STOPPED_AT_ITS_LINK = """
    import os, sys
    from luna_shm import AudioCache
    key = sys.argv[1]
    print(os.getpid(), flush=True)
    with AudioCache("gave-way") as cache:
        def render(writer):
            writer.write(audio_of(key) + 1)  # never runs: another caller stored the key
        with cache.get_or_render(key, render, samplerate=24000, timeout=60) as entry:
            print("got", bool((entry.array == audio_of(key)).all()), flush=True)
"""


def test_a_follower_of_a_render_that_gives_way_to_a_stored_entry_never_sees_it_end_empty(
        private_dirs) -> None:
    """A caller that missed links its new file as key.live (the election), then finds that
    another caller stored the key meanwhile, and gives way: it removes key.live and renders
    nothing. A follower that opened key.live in that moment followed a stream that ends
    there: it must end as abandoned (StreamAbandoned), not as a finished stream of no audio
    (a player would play silence for the sentence and call it done). Found by the soak
    (tests/test_cache_soak.py, run with 8 workers, a 12 KB RAM tier and chaos every
    0.02-0.2 s). Here the caller is stopped right after its link (strace injects SIGSTOP
    at it) while this process follows its .live file and stores the key."""
    from luna_shm import StreamAbandoned
    from syscall_sweep import strace_path

    strace = strace_path()
    key = cache_key("a render that gives way")
    with AudioCache("gave-way") as cache:
        live = f"{cache.directory}/{key}.live"
        caller = subprocess.Popen(
            [strace, "-f", "-o", "/dev/null", "-e", "trace=link,linkat",
             "-e", "inject=link,linkat:signal=SIGSTOP:when=1", sys.executable, "-c",
             AUDIO_OF_KEY + textwrap.dedent(STOPPED_AT_ITS_LINK), key],
            env=child_env(private_dirs), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            assert caller.stdout is not None
            pid = int(caller.stdout.readline())
            end = time.monotonic() + 60
            while not os.path.exists(live):  # its election won; it stops at once
                assert time.monotonic() < end and caller.poll() is None, "no render began"
                time.sleep(0.001)
            with open(f"/proc/{pid}/stat") as stat:
                while stat.read().rsplit(")", 1)[1].split()[0] not in "tT":
                    assert time.monotonic() < end, "the caller did not stop after its link"
                    time.sleep(0.001)
                    stat.seek(0)
            ino = os.stat(live).st_ino
            seen: list[object] = []

            def follow() -> None:
                try:
                    seen.extend(cache.follow(key, timeout=30))
                    seen.append("finished")
                except StreamAbandoned as exc:
                    seen.append(exc)

            follower = threading.Thread(target=follow)
            follower.start()

            def following() -> bool:
                for fd in os.listdir("/proc/self/fd"):
                    with contextlib.suppress(OSError):
                        if os.stat(f"/proc/self/fd/{fd}").st_ino == ino:
                            return True
                return False

            while not following():  # the follower holds the .live file open
                assert time.monotonic() < end and follower.is_alive()
                time.sleep(0.001)
            cache.put(key, audio_of(key), 24000).release()  # another caller stores it
            os.kill(pid, signal.SIGCONT)
            follower.join(60)
            assert not follower.is_alive(), "the follower hung"
            assert finish(caller).split() == ["got", "True"]  # it gave way to the entry
            # Abandoned (the stream it followed holds nothing), or the key's audio in full.
            abandoned = len(seen) == 1 and isinstance(seen[0], StreamAbandoned)
            assert abandoned or (seen[-1:] == ["finished"] and len(seen) > 1 and np.array_equal(
                np.concatenate(seen[:-1]), audio_of(key))), f"the follower saw {seen!r}"
        finally:
            if caller.poll() is None:
                caller.kill()
                caller.wait()
        cache.clear()


DYING_RENDERER = """
    import sys, time
    from luna_shm import AudioCache
    key = sys.argv[1]
    def render(writer):
        for i in range(6000):  # 60 s: killed long before
            writer.write(audio_of(key, 240))
            if i == 0:
                print("rendering", flush=True)
            time.sleep(0.01)
    AudioCache("died-under-a-waiter").get_or_render(key, render, samplerate=24000)
"""

FOLLOWER_WITHOUT_TIMEOUT = """
    import sys
    from luna_shm import AudioCache, StreamAbandoned
    key = sys.argv[1]
    with AudioCache("died-under-a-waiter") as cache:
        try:
            for n, block in enumerate(cache.follow(key)):
                if n == 0:
                    print("following", flush=True)
        except StreamAbandoned:
            print("abandoned", flush=True)
"""


def test_a_follower_learns_that_the_render_died_while_a_waiter_held_its_file(
        private_dirs) -> None:
    """The renderer dies (SIGKILL) while a waiter of its render takes the .live file's
    shared lock, which the kernel grants at that death, and is stopped (or killed) there
    for longer than the follower's grace for the writer's lock to go. The follower must
    still learn that the render died (StreamAbandoned) once that waiter is gone, not sleep
    until its timeout (for ever with none): nothing that happens after makes an event on
    the file. The follower is stopped until the waiter holds the lock, to order the three."""
    key = cache_key("a render that died under a waiter")
    renderer = spawn(private_dirs, DYING_RENDERER, key)
    follower = None
    try:
        assert renderer.stdout is not None and renderer.stdout.readline().strip() == "rendering"
        follower = spawn(private_dirs, FOLLOWER_WITHOUT_TIMEOUT, key)
        assert follower.stdout is not None and follower.stdout.readline().strip() == "following"
        follower.send_signal(signal.SIGSTOP)
        with AudioCache("died-under-a-waiter") as cache:
            live = f"{cache.directory}/{key}.live"
        with contextlib.ExitStack() as stack:
            waiter = threading.Thread(target=lambda: stack.enter_context(
                lock_held_by_a_stopped_process(live, shared=True)))
            waiter.start()  # it waits for the renderer's lock, then stops holding it
            renderer.kill()
            renderer.communicate()
            waiter.join(60)
            assert not waiter.is_alive(), "the waiter never got the lock"
            follower.send_signal(signal.SIGCONT)
            # Past the follower's grace for the writer's lock (0.5 s): it sleeps now.
            time.sleep(2)
        # The waiter was killed: no one holds the dead render's file now. The follower
        # has no timeout: it learns, or it hangs (finish fails after 60 s then).
        assert finish(follower, 60).strip() == "abandoned"
    finally:
        for child in (renderer, follower):
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGCONT)
                child.kill()
                child.wait()


def test_follow_gives_a_stored_entry_at_once_and_refuses_an_unknown_key(private_dirs) -> None:
    key = cache_key("stored before")
    with AudioCache("stored") as cache:
        cache.put(key, audio_of(key), 24000).release()
        blocks = list(cache.follow(key))
        assert len(blocks) == 1
        np.testing.assert_array_equal(blocks[0], audio_of(key))
        with pytest.raises(KeyError, match="neither in the cache nor being rendered"):
            list(cache.follow(cache_key("never said")))


FILE_TOO_LARGE = """
    import errno, os, resource, sys
    from luna_shm import AudioCache, cache_key
    disk = sys.argv[1]
    cache = AudioCache("fsize", max_bytes=60_000, disk_dir=disk)
    spilled, pusher = cache_key("spilled"), cache_key("pusher")
    cache.put(spilled, audio_of(spilled, 20_000), 16000).release()  # 40 KB
    cache.put(pusher, audio_of(pusher, 20_000), 16000).release()  # evicts it to disk
    assert spilled not in cache and cache.stats().spills == 1
    # From here no file of this process may grow past 16 KiB (Python ignores SIGXFSZ).
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
    key = cache_key("too large")
    calls = {
        "put_bytes": lambda: cache.put_bytes(key, b"ID3" * 10_000),
        "put": lambda: cache.put(key, audio_of(key, 20_000), 16000),
        "get_or_render": lambda: cache.get_or_render(
            key, lambda w: [w.write(audio_of(key)) for _ in range(8)], samplerate=16000),
        "reload": lambda: cache.get(spilled),
    }
    for name, call in calls.items():
        try:
            call()
        except OSError as exc:
            assert exc.errno == errno.EFBIG, (name, exc)
            assert exc.filename and exc.filename.startswith(cache.directory + "/"), (name, exc)
            assert key in exc.filename or spilled in exc.filename, (name, exc)
        else:
            raise AssertionError(f"{name} stored a file larger than RLIMIT_FSIZE")
        left = sorted(n for n in os.listdir(cache.directory)
                      if n != "lock" and not n.endswith(".outcome"))
        assert left == [pusher + ".wav"], (name, left)  # nothing half written
    print("ok")
    cache.destroy()
"""


def test_a_write_refused_by_rlimit_fsize_names_its_file_and_leaves_nothing(private_dirs,
                                                                          tmp_path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    assert finish(spawn(private_dirs, FILE_TOO_LARGE, str(disk))).strip() == "ok"


ELECTION_LOSER = """
    import os, sys
    from luna_shm import AudioCache, cache_key
    stop, discard = sys.argv[1], sys.argv[2] == "discard"
    keys = [cache_key(f"raced {i}") for i in range(4)]
    cache = AudioCache("raced")
    print("go", flush=True)
    i = 0
    while not os.path.exists(stop):
        key = keys[i % 4]
        i += 1
        cache.get_or_render(key, lambda w: w.write(audio_of(key, 100)),
                            samplerate=16000).release()
        if discard:
            cache.discard(key)  # misses (and so elections) keep coming
    cache.close()
    print(i)
"""


def test_opening_and_clearing_race_with_processes_that_lose_the_render_election(
        private_dirs, tmp_path: Path) -> None:
    # A caller that loses the election removes its partial; a sweep (at open, in clear)
    # that takes the partial's lock in that moment must find it gone, not fail.
    stop = tmp_path / "stop"
    renderers = [spawn(private_dirs, ELECTION_LOSER, str(stop), mode)
                 for mode in ("discard", "keep")]
    try:
        for child in renderers:
            assert child.stdout is not None and child.stdout.readline().strip() == "go"
        for _ in range(3000):
            with AudioCache("raced") as cache:
                cache.clear()
    finally:
        stop.touch()
        outputs = [finish(child) for child in renderers]
    assert all(int(out) > 0 for out in outputs), outputs
    with AudioCache("raced") as cache:
        cache.destroy()
    assert os.listdir(private_dirs.ram) == []


READ_ONLY_CACHE = """
    import errno, json, subprocess
    from luna_shm import AudioCache, cache_key
    cache = AudioCache("ro", max_bytes=1_000_000)
    key, missing = cache_key("stored"), cache_key("missing")
    cache.put(key, audio_of(key), 16000).release()
    # Read-only under the open cache: a bind mount of the RAM dir over itself, remounted
    # read-only (a tmpfs with files open for writing cannot be remounted read-only itself).
    ram = os.environ["LUNA_SHM_DIR"]
    subprocess.run(["mount", "--bind", ram, ram], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", ram], check=True)
    out = {}
    reopened = AudioCache("ro")  # opened for looking only (its lock file read-only)
    out["reopened entries"] = reopened.stats().entries
    with cache.get(key) as hit:
        out["hit"] = bool(np.array_equal(hit.array, audio_of(key)))
    with cache.get_or_render(key, lambda w: 1 / 0, samplerate=16000) as hit:
        out["hit_or_render"] = bool(np.array_equal(hit.array, audio_of(key)))
    for name, call in [
            ("render", lambda: cache.get_or_render(missing, lambda w: w.write(audio_of(key)),
                                                   samplerate=16000)),
            ("put", lambda: cache.put(missing, audio_of(key), 16000)),
            ("discard", lambda: cache.discard(key)),
            ("reopened put", lambda: reopened.put(missing, audio_of(key), 16000))]:
        try:
            call()
            out[name] = "no error"
        except OSError as exc:
            out[name] = [exc.errno == errno.EROFS, exc.filename]
    out["listing"] = sorted(os.listdir(cache.directory))
    out["directory"] = cache.directory
    reopened.close()
    cache.close()
    print(json.dumps(out))
"""


def _child_says(private_dirs, script: str, prefix: list[str] | None = None) -> Any:
    """Run script after AUDIO_OF_KEY (and `import os`) in a child with the private dirs
    (under the command prefix, if any); what it printed, as JSON."""
    done = subprocess.run([*(prefix or []), sys.executable, "-c",
                           AUDIO_OF_KEY + "import os\n" + textwrap.dedent(script)],
                          env=child_env(private_dirs), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_cache_remounted_read_only_serves_hits_and_names_what_it_cannot_write(
        private_dirs) -> None:
    out = _child_says(private_dirs, READ_ONLY_CACHE, require_private_mounts())
    # Hits work (the LRU clock stops: it found EROFS, not the entry, refused before).
    assert out["hit"] is True and out["hit_or_render"] is True
    directory = out["directory"]
    key = cache_key("stored")
    for name in ("render", "put"):  # the partial they could not create
        assert out[name][0] is True and out[name][1].startswith(f"{directory}/."), out
    assert out["discard"] == [True, f"{directory}/{key}.wav"]
    # Opened again, it can be looked at, and says why it cannot be changed.
    assert out["reopened entries"] == 1
    assert out["reopened put"] == [True, f"{directory}/lock"]
    assert out["listing"] == sorted(["lock", f"{key}.wav"])


ONE_FREE_FD = textwrap.dedent("""
    import errno, json, resource
    from luna_shm import AudioCache, cache_key
    cache = AudioCache("fds")
    key = cache_key("one fd short")
    audio = audio_of(key)  # (numpy imports modules the first time)
""") + FILL_FD_TABLE + textwrap.dedent("""
    os.close(held.pop())  # one free: the render's file opens, its pin (a dup) does not
    try:
        cache.get_or_render(key, lambda w: w.write(audio), samplerate=16000)
        out = ["returned"]
    except OSError as exc:
        out = [exc.errno, exc.filename]
    for fd in held:
        os.close(fd)
    print(json.dumps([out, sorted(os.listdir(cache.directory)), cache.directory]))
    cache.close()
""")


def test_a_render_one_fd_short_raises_emfile_naming_its_file_and_leaves_nothing(
        private_dirs) -> None:
    (error, filename), listing, directory = _child_says(private_dirs, ONE_FREE_FD)
    assert error == errno.EMFILE
    assert filename == f"{directory}/{cache_key('one fd short')}.live"
    assert listing == ["lock"]


# A caller that found key's entry expired (or unreadable) waits on the tier lock, which the
# test holds; meanwhile a fresh entry takes the name, as another process's put would.
STALE_LOOKER = """
    import os, sys, time
    from luna_shm import AudioCache
    name, key, go, how = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    rendered = []

    def render(writer):
        rendered.append(key)
        writer.write(audio_of(key, 100))

    cache = AudioCache(name, ttl=3600)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    if how == "get":
        entry = cache.get(key)
    else:
        entry = cache.get_or_render(key, render, samplerate=16000)
    print("hit" if entry is not None else "miss", len(rendered), flush=True)
    if entry is not None:
        entry.release()
    cache.close()
"""


@pytest.mark.parametrize("how", ["get", "get_or_render"])
def test_a_look_up_that_finds_an_entry_stale_never_removes_a_fresh_one_stored_meanwhile(
        private_dirs, tmp_path: Path, how: str) -> None:
    # get() of an expired entry, and get_or_render() of an unreadable one, let go of it and
    # then remove the stale entry under the lock: only if its name still names that file.
    key, other = cache_key("stale"), cache_key("fresh")
    go = tmp_path / "go"
    with AudioCache("stale", ttl=3600) as cache:
        cache.put(key, audio_of(key), 16000).release()
        cache.put(other, audio_of(other), 16000).release()
        path = f"{cache.directory}/{key}.wav"
        if how == "get":
            os.utime(path, (time.time(), time.time() - 7200))  # stored two hours ago
        else:
            os.truncate(path, 20)  # another process cut it: not a WAV
        looker = spawn(private_dirs, STALE_LOOKER, "stale", key, str(go), how)
        assert looker.stdout is not None and looker.stdout.readline().strip() == "ready"
        lock = os.open(f"{cache.directory}/lock", os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # as a put does around its rename
            go.touch()
            lock_path = f"{cache.directory}/lock"
            assert wait_until_someone_waits_for_flock(
                lock_path, os.stat(lock_path).st_ino, lambda: looker.poll() is None), \
                finish(looker)
            os.rename(f"{cache.directory}/{other}.wav", path)  # a fresh entry for key
            fresh = os.stat(path).st_ino
        finally:
            os.close(lock)
        out = finish(looker).split()
        assert os.stat(path).st_ino == fresh, "the fresh entry was removed"
        if how == "get_or_render":
            assert out == ["hit", "0"]  # the fresh entry, not a render of its own
        with cache.get(key) as entry:
            assert np.array_equal(entry.array, audio_of(other))


DISCARD_WITH_NO_FREE_FD = textwrap.dedent("""
    import errno, json, resource
    from luna_shm import AudioCache, cache_key
    cache = AudioCache("nofd")
    key = cache_key("no fd to discard with")
    cache.put(key, audio_of(key), 16000).release()
""") + FILL_FD_TABLE + textwrap.dedent("""
    try:
        out = ["returned", cache.discard(key)]
    except OSError as exc:
        out = [exc.errno, exc.filename]
    for fd in held:
        os.close(fd)
    out.append(os.path.exists(f"{cache.directory}/{key}.wav"))
    out.append(cache.discard(key))  # with fds again: removed
    print(json.dumps([out, cache.directory]))
    cache.close()
""")


def test_discard_with_no_free_fd_raises_emfile_naming_the_entry_instead_of_saying_pinned(
        private_dirs) -> None:
    out, directory = _child_says(private_dirs, DISCARD_WITH_NO_FREE_FD)
    assert out == [errno.EMFILE, f"{directory}/{cache_key('no fd to discard with')}.wav",
                   True, True]


CACHE_ON_A_FULL_RAM_DISK = """
    import errno, json, os
    import numpy as np
    from luna_shm import AudioCache
    cache = AudioCache("full", max_bytes=100 * 1024 * 1024)
    big = np.zeros(1_000_000, dtype=np.int16)  # 2 MB on a 1 MB RAM disk

    def render(writer):
        for _ in range(20):
            writer.write(big[:50_000])

    out = {}
    for what, call in [("put", lambda: cache.put("big", big, 16000)),
                       ("put_bytes", lambda: cache.put_bytes("bytes", bytes(3_000_000))),
                       ("render", lambda: cache.get_or_render("r", render, samplerate=16000))]:
        try:
            call()
            out[what] = "no error"
        except OSError as exc:
            out[what] = [exc.errno, "the RAM disk is full" in str(exc), exc.filename]
    out["directory"] = cache.directory
    cache.close()
    print(json.dumps(out))
"""


def test_a_full_ram_disk_under_the_cache_says_so_in_its_enospc_errors() -> None:
    out = json.loads(assert_child_ok(run_in_private_shm(CACHE_ON_A_FULL_RAM_DISK,
                                                         shm_size="1m")))
    directory = out.pop("directory")
    for what, (error, hint, filename) in out.items():
        assert error == errno.ENOSPC and hint, (what, out)
        assert filename.startswith(f"{directory}/"), (what, filename)


KILLED_AT_THE_RENAME = """
    import os, signal
    from luna_shm import AudioCache, cache_key
    cache = AudioCache("undercount", max_bytes=100_000)
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):  # killed as the new entry takes the old one's name
        if dst.endswith(".wav") and ".unstored" not in dst:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst, *args, **kwargs)

    os.rename = rename
    key = cache_key("replaced")
    cache.put(key, audio_of(key, 1_000), 24000)
"""


def test_a_put_killed_before_its_rename_over_a_larger_entry_never_lets_the_bound_be_exceeded(
        private_dirs) -> None:
    with AudioCache("undercount", max_bytes=100_000) as cache:
        key = cache_key("replaced")
        cache.put(key, audio_of(key, 20_000), 24000).release()  # 40 KB
        replacer = spawn(private_dirs, KILLED_AT_THE_RENAME)
        replacer.communicate(timeout=60)
        assert replacer.returncode == -signal.SIGKILL
        # The larger entry is still there, under its name: the shared byte count must
        # still hold it (this process opened the cache before: no scan sets it right).
        for i in range(3):  # 3 x 30 KB more: the old 40 KB must make room for the third
            other = cache_key(f"after {i}")
            cache.put(other, audio_of(other, 15_000), 24000).release()
            committed = sum(st.st_size for _, _, st in cache.entries())
            assert committed <= 100_000, f"{committed} committed bytes after put {i}"
        cache.destroy()


CACHE_FILLING_ITS_RAM_DISK = """
    import json
    import numpy as np
    from luna_shm import AudioCache
    # The default bound (256 MiB) is larger than the RAM disk (1 MB), as it is larger
    # than a container's default /dev/shm (64 MB): the cache's own entries fill it.
    import os
    os.mkdir("/tmp/disk")  # the disk tier (the child's private /tmp)
    cache = AudioCache("filling", disk_dir="/tmp/disk")
    held = cache.put("held", np.full(50_000, 7, np.int16), 24000)  # 100 KB, pinned
    stored = []
    for i in range(12):  # 12 x 200 KB through a 1 MB RAM disk
        audio = np.full(100_000, i, np.int16)
        if i % 3 == 0:
            entry = cache.put_bytes(f"k{i}", audio.tobytes(), ".mp3")
        elif i % 3 == 1:
            entry = cache.put(f"k{i}", audio, 24000)
        else:  # streamed in 10 chunks: the RAM disk fills up in the middle of it
            entry = cache.get_or_render(
                f"k{i}", lambda w: [w.write(part) for part in np.split(audio, 10)],
                samplerate=24000)
        stored.append(entry.stored)
        entry.release()
    with cache.get("k11") as last:
        newest = last.array[:3].tolist()
    with cache.get("k10") as other:
        newest += other.array[-3:].tolist()
    with cache.get("k1") as first:  # evicted to the disk tier: reloaded into RAM
        reloaded = first.array[:3].tolist()
    entries = cache.stats().entries
    try:  # larger than the whole RAM disk: no entry would make room, none is evicted
        cache.put("huge", np.zeros(600_000, np.int16), 24000)
    except OSError as exc:
        huge = exc.errno
    out = {"stored": stored, "newest": newest, "held": int(held.array.sum()),
           "reloaded": reloaded, "reloads": cache.stats().reloads, "huge": huge,
           "kept": cache.stats().entries == entries,
           "entries": cache.stats().entries, "evictions": cache.stats().evictions}
    held.release()
    cache.destroy()
    print(json.dumps(out))
"""


def test_a_cache_that_fills_its_ram_disk_makes_room_from_its_own_unpinned_entries() -> None:
    out = json.loads(assert_child_ok(run_in_private_shm(CACHE_FILLING_ITS_RAM_DISK,
                                                         shm_size="1m")))
    # Puts, put_bytes and renders: never ENOSPC while its own old entries fill it.
    assert out["stored"] == [True] * 12
    assert out["newest"] == [11, 11, 11, 10, 10, 10]
    assert out["reloaded"] == [1, 1, 1] and out["reloads"] == 1  # from the disk tier
    assert out["held"] == 7 * 50_000  # the pinned entry stayed, whole
    assert out["huge"] == errno.ENOSPC and out["kept"]
    assert 2 <= out["entries"] <= 5 and out["evictions"] >= 7


READ_ONLY_DISK_TIER = """
    import json, subprocess, sys
    from luna_shm import AudioCache, cache_key
    disk = sys.argv[1]
    cache = AudioCache("rodisk", max_bytes=100_000, disk_dir=disk)
    keys = [cache_key(f"spilled {i}") for i in range(3)]
    for key in keys:  # 3 x ~48 KB through a 100 KB RAM tier: the first is spilled to disk
        cache.put(key, audio_of(key, 24_000), 24000).release()
    # The disk tier's file system turns read-only (ext4's errors=remount-ro, say).
    subprocess.run(["mount", "--bind", disk, disk], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", disk], check=True)
    out = {"spills": cache.stats().spills}
    try:
        with cache.put(keys[0], audio_of(keys[1], 2_000), 24000) as entry:
            out["put"] = entry.stored
    except OSError as exc:
        out["put"] = [exc.errno, exc.filename]
    with cache.get(keys[0]) as hit:
        out["new"] = bool(np.array_equal(hit.array, audio_of(keys[1], 2_000)))
    cache.close()
    print(json.dumps(out))
"""


def test_a_put_over_a_spilled_key_on_a_read_only_disk_tier_is_stored_and_says_so(
        private_dirs, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run([*require_private_mounts(), sys.executable, "-c",
                           AUDIO_OF_KEY + "import os\n" + textwrap.dedent(READ_ONLY_DISK_TIER),
                           str(disk)], env=child_env(private_dirs), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["spills"] >= 1
    # Stored in RAM, and returned: the stale copy on disk that it could not remove is
    # logged, not raised as if nothing had been stored.
    assert out["put"] is True and out["new"] is True
    assert "could not remove" in done.stderr and "Read-only file system" in done.stderr


CACHE_ON_A_RAM_DISK_WITH_NO_SIZE_LIMIT = """
    import json, os, subprocess, sys
    import numpy as np
    os.mkdir("/tmp/unlimited")
    subprocess.run(["mount", *sys.argv[1:], "unlimited", "/tmp/unlimited"], check=True)
    os.chmod("/tmp/unlimited", 0o700)
    os.environ["LUNA_SHM_DIR"] = "/tmp/unlimited"
    from luna_shm import AudioCache
    cache = AudioCache("unlimited", max_bytes=10_000_000)
    for i in range(3):
        cache.put(f"k{i}", np.full(10_000, i, np.int16), 24000).release()
    audio = np.arange(20_000, dtype=np.int16)
    with cache.get_or_render("rendered", lambda w: [w.write(part) for part in
                                                    np.split(audio, 10)],
                             samplerate=24000) as entry:
        whole = bool(np.array_equal(entry.array, audio))
    out = {"blocks": os.statvfs("/tmp/unlimited").f_blocks, "whole": whole,
           "kept": [f"k{i}" in cache for i in range(3)],
           "evictions": cache.stats().evictions, "entries": cache.stats().entries}
    cache.destroy()
    print(json.dumps(out))
"""


@pytest.mark.parametrize("mount_options", [["-t", "ramfs"], ["-t", "tmpfs", "-o", "size=0"]],
                         ids=["ramfs", "tmpfs-without-a-size-limit"])
def test_a_render_on_a_ram_disk_with_no_size_limit_evicts_nothing(
        mount_options: list[str]) -> None:
    # Found in review: ramfs (and a tmpfs mounted with size=0) reports 0 blocks and 0
    # free to statvfs, as nothing bounds it; a render's room check took that for a full
    # RAM disk and evicted every unpinned entry of the cache before its first chunk.
    body = ("import sys\nsys.argv[1:] = " + repr(mount_options) + "\n"
            + textwrap.dedent(CACHE_ON_A_RAM_DISK_WITH_NO_SIZE_LIMIT))
    out = json.loads(assert_child_ok(run_in_private_shm(body)))
    assert out["blocks"] == 0 and out["whole"]
    assert out["kept"] == [True, True, True]
    assert out["evictions"] == 0 and out["entries"] == 4


KILLED_AFTER_THE_RENAME_OVER_A_SPILLED_KEY = """
    import os, signal, sys
    from luna_shm import AudioCache, cache_key
    cache = AudioCache("newest", max_bytes=20_000, disk_dir=sys.argv[1])
    key = cache_key("spilled, then put again")
    final = f"{cache.directory}/{key}.wav"
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):  # killed once the new entry has its name
        real_rename(src, dst, *args, **kwargs)
        if dst == final:
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename
    cache.put(key, audio_of(key, 1_200), 24000)
"""


def test_a_put_killed_after_its_rename_never_lets_an_older_disk_copy_come_back(
        private_dirs, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    key = cache_key("spilled, then put again")
    with AudioCache("newest", max_bytes=20_000, disk_dir=disk) as cache:
        cache.put(key, audio_of(key), 24000).release()  # 4.8 KB, the older audio
        put_fillers(cache, 4)  # 4 x 4.8 KB more through a 20 KB RAM tier: the key spills
        tier = disk / f"luna_cache-{os.geteuid()}-newest"
        assert (tier / f"{key}.wav").exists()
        # Another process puts the key again and is killed right after its rename.
        replacer = spawn(private_dirs, KILLED_AFTER_THE_RENAME_OVER_A_SPILLED_KEY, str(disk))
        replacer.communicate(timeout=60)
        assert replacer.returncode == -signal.SIGKILL
        with cache.get(key) as newest:  # the new entry is in RAM
            assert np.array_equal(newest.array, audio_of(key, 1_200))
    # A reboot: the RAM tier is gone, the disk tier stays. The older audio must not
    # come back (found in review: the put dropped the disk copy after its rename).
    for name in os.listdir(private_dirs.ram):
        shutil.rmtree(f"{private_dirs.ram}/{name}")
    with AudioCache("newest", max_bytes=20_000, disk_dir=disk) as cache:
        found = cache.get(key)
        if found is not None:
            with found:
                assert np.array_equal(found.array, audio_of(key, 1_200))
        cache.destroy()


RELOADER_HELD_IN_ITS_COPY = """
    import os, sys
    from luna_shm import AudioCache, cache_key
    cache = AudioCache("typed", max_bytes=20_000, disk_dir=sys.argv[1])
    key = cache_key("a wav, then an mp3")
    real_sendfile = os.sendfile
    held = []

    def sendfile(*args):  # the reload's copy to RAM waits here, the disk copy pinned
        if not held:
            held.append(True)
            print("copying", flush=True)
            sys.stdin.readline()
        return real_sendfile(*args)

    os.sendfile = sendfile
    entry = cache.get(key)
    print("none" if entry is None else os.path.basename(entry.path), flush=True)
"""


def test_a_reload_racing_a_spill_of_another_type_never_brings_the_older_type_back(
        private_dirs, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    key = cache_key("a wav, then an mp3")
    mp3 = b"ID3\x04" + bytes(range(256)) * 8
    tier = disk / f"luna_cache-{os.geteuid()}-typed"
    with AudioCache("typed", max_bytes=20_000, disk_dir=disk) as cache:
        cache.put(key, audio_of(key), 24000).release()  # the older audio, a WAV

        def fill(round_: int) -> None:  # 5 x 4.8 KB through a 20 KB RAM tier: key spills
            put_fillers(cache, 5, f"{round_} ")

        fill(0)
        assert sorted(os.listdir(tier)).count(f"{key}.wav") == 1
        reloader = subprocess.Popen(
            [sys.executable, "-c", AUDIO_OF_KEY + textwrap.dedent(RELOADER_HELD_IN_ITS_COPY),
             str(disk)], env=child_env(private_dirs), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert reloader.stdout is not None and reloader.stdin is not None
        assert reloader.stdout.readline().strip() == "copying"
        # While the reload copies the WAV: the newer audio, an MP3, is put and spilled.
        cache.put_bytes(key, mp3, ".mp3").release()
        fill(1)
        assert f"{key}.mp3" in os.listdir(tier)
        reloader.stdin.write("go\n")
        reloader.stdin.flush()
        got = finish(reloader).strip()
        assert got in ("none", f"{key}.mp3"), got
        # Every later look-up, in RAM and after a reboot, gets the MP3 (found in review:
        # the reload stored the WAV over it, and both types stayed on disk).
        with cache.get(key) as later:
            assert later.path.endswith(".mp3") and later.read_bytes() == mp3
    for name in os.listdir(private_dirs.ram):
        shutil.rmtree(f"{private_dirs.ram}/{name}")
    with AudioCache("typed", max_bytes=20_000, disk_dir=disk) as cache:
        with cache.get(key) as after_reboot:
            assert after_reboot.path.endswith(".mp3") and after_reboot.read_bytes() == mp3
        cache.destroy()


RENDERER_STOPPED_HOLDING_ITS_ENTRY = """
    import os, signal
    from luna_shm import AudioCache, cache_key
    from luna_shm import cache as cache_module
    cache = AudioCache("stopped")
    key = cache_key("a renderer stopped")
    real_commit = cache_module.AudioCache._commit

    def commit(self, *args, **kwargs):  # stopped once the entry has its name, still locked
        entry = real_commit(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGSTOP)
        return entry

    cache_module.AudioCache._commit = commit
    cache.get_or_render(key, lambda writer: writer.write(audio_of(key)),
                        samplerate=24000).release()
    cache.close()
"""


def test_get_and_get_or_render_bound_their_wait_for_a_stopped_renderer_s_entry_by_timeout(
        private_dirs) -> None:
    key = cache_key("a renderer stopped")
    with AudioCache("stopped") as cache:
        renderer = spawn(private_dirs, RENDERER_STOPPED_HOLDING_ITS_ENTRY)
        try:
            _, status = os.waitpid(renderer.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
            entry = f"{cache.directory}/{key}.wav"
            assert os.path.exists(entry)
            # The stopped renderer holds the entry's flock exclusively: a hit would wait
            # for it for ever (found in review: get() had no timeout, and get_or_render's
            # timeout bounded only the wait for a render in flight).
            with pytest.raises(TimeoutError) as info:
                call_with_deadline(lambda: cache.get_or_render(
                    key, lambda writer: writer.write(audio_of(key)), samplerate=24000,
                    timeout=0.05), deadline=30)
            assert info.value.errno == errno.ETIMEDOUT and info.value.filename == entry
            with pytest.raises(TimeoutError, match="timed out waiting for") as info:
                call_with_deadline(lambda: cache.get(key, timeout=0.05), deadline=30)
            assert info.value.errno == errno.ETIMEDOUT and info.value.filename == entry
            with pytest.raises(TimeoutError):
                call_with_deadline(lambda: cache.get(key, timeout=0), deadline=30)
        finally:
            os.kill(renderer.pid, signal.SIGCONT)
        finish(renderer)
        with cache.get(key, timeout=5) as hit:  # the renderer went on: its entry is there
            assert np.array_equal(hit.array, audio_of(key))
        assert cache.stats().renders == 1
        cache.destroy()


RENDERER_STOPPED_MID_RENDER = """
    import os, signal
    from luna_shm import AudioCache, cache_key
    cache = AudioCache("mid-render")
    key = cache_key("a render stopped half way")
    audio = audio_of(key)

    def render(writer):
        writer.write(audio[:1200])
        os.kill(os.getpid(), signal.SIGSTOP)  # a debugger, a hung engine
        writer.write(audio[1200:])

    cache.get_or_render(key, render, samplerate=24000).release()
    cache.close()
"""


def test_waits_for_a_renderer_stopped_mid_render_are_bounded_by_timeout(private_dirs) -> None:
    key = cache_key("a render stopped half way")
    with AudioCache("mid-render") as cache:
        renderer = spawn(private_dirs, RENDERER_STOPPED_MID_RENDER)
        try:
            _, status = os.waitpid(renderer.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
            live = f"{cache.directory}/{key}.live"
            before = sorted(os.listdir(cache.directory))
            with pytest.raises(TimeoutError, match="another caller to render") as info:
                call_with_deadline(lambda: cache.get_or_render(
                    key, lambda writer: writer.write(audio_of(key)), samplerate=24000,
                    timeout=0.5), deadline=30)
            assert info.value.errno == errno.ETIMEDOUT and info.value.filename == live
            # follow() has the first half, then no new block for timeout seconds (found
            # in review: its TimeoutError named /proc/self/fd/<n>, closed by then).
            blocks: list[np.ndarray] = []

            def follow() -> None:
                for block in cache.follow(key, timeout=0.5):
                    blocks.append(block.copy())

            with pytest.raises(TimeoutError, match="no new audio") as info:
                call_with_deadline(follow, deadline=30)
            assert info.value.errno == errno.ETIMEDOUT and info.value.filename == live
            assert np.array_equal(np.concatenate(blocks), audio_of(key)[:1200])
            assert sorted(os.listdir(cache.directory)) == before  # nothing of ours left
        finally:
            os.kill(renderer.pid, signal.SIGCONT)
        finish(renderer)
        with cache.get(key, timeout=5) as hit:  # the renderer went on: its entry is there
            assert np.array_equal(hit.array, audio_of(key))
        assert cache.stats().renders == 1
        cache.destroy()


RENDERER_KILLED_MID_RENDER = """
    import os, signal
    from luna_shm import AudioCache, cache_key
    cache = AudioCache("dead-render")
    key = cache_key("a render killed half way")

    def render(writer):
        writer.write(audio_of(key)[:1200])
        os.kill(os.getpid(), signal.SIGKILL)

    cache.get_or_render(key, render, samplerate=24000)
"""


def test_a_wait_on_a_dead_render_that_a_stopped_waiter_holds_is_bounded_by_timeout(
        private_dirs) -> None:
    key = cache_key("a render killed half way")
    with AudioCache("dead-render") as cache:
        renderer = spawn(private_dirs, RENDERER_KILLED_MID_RENDER)
        renderer.communicate(timeout=60)
        assert renderer.returncode == -signal.SIGKILL
        live = f"{cache.directory}/{key}.live"
        before = sorted(os.listdir(cache.directory))
        assert f"{key}.live" in before
        # Another waiter of that render, stopped in the moment it holds its shared lock
        # of the .live file: the dead render's file can be removed only once it lets go
        # (found in review: the wait to take it exclusively had no bound, whatever the
        # timeout).
        with lock_held_by_a_stopped_process(live, shared=True):
            with pytest.raises(TimeoutError, match=key) as info:
                call_with_deadline(lambda: cache.get_or_render(
                    key, lambda writer: writer.write(audio_of(key)), samplerate=24000,
                    timeout=0.5), deadline=30)
            assert info.value.errno == errno.ETIMEDOUT and info.value.filename == live
            assert sorted(os.listdir(cache.directory)) == before
        with cache.get_or_render(key, lambda writer: writer.write(audio_of(key)),
                                 samplerate=24000, timeout=5) as entry:
            assert entry.stored and np.array_equal(entry.array, audio_of(key))
        assert sorted(os.listdir(cache.directory)) == sorted(["lock", f"{key}.wav"])
        cache.destroy()


LOOKS_AT_A_READ_ONLY_CACHE = """
    import json, os, subprocess, sys
    import numpy as np
    from luna_shm import AudioCache, cache_key
    key = cache_key("watched")
    with AudioCache("watched") as cache:
        cache.put(key, np.arange(2400, dtype=np.int16), 24000).release()
        cache.get(key).release()
        directory = cache.directory
    # A monitoring view: the cache directory bound read-only onto itself.
    subprocess.run(["mount", "--bind", directory, directory], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", directory], check=True)
    out = {}
    for action in ("stats", "ls"):
        cli = subprocess.run([sys.executable, "-m", "luna_shm", "cache", action, "--name",
                              "watched", "--json"], capture_output=True, text=True)
        out[action] = [cli.returncode, cli.stdout, cli.stderr]
    with AudioCache("watched") as cache:
        out["entries"] = [k for k, _, _ in cache.entries()]
        with cache.get(key) as hit:
            out["hit"] = hit.array[:3].tolist()
        out["hits"] = cache.stats().hits
        try:
            cache.put(cache_key("new"), np.ones(10, np.int16), 24000)
        except OSError as exc:
            out["put"] = [exc.errno, exc.filename]
        try:
            cache.clear()
        except OSError as exc:
            out["clear"] = [exc.errno, exc.filename]
    out["files"] = sorted(os.listdir(directory))
    print(json.dumps(out))
"""


def test_a_cache_on_a_read_only_mount_can_be_looked_at_by_the_cli_and_the_api() -> None:
    out = json.loads(assert_child_ok(run_in_private_shm(LOOKS_AT_A_READ_ONLY_CACHE)))
    key = cache_key("watched")
    # Found in review: EROFS naming the lock file, as the open asked for write access.
    returncode, stdout, stderr = out["stats"]
    assert returncode == 0, stderr
    stats = json.loads(stdout)
    assert stats["entries"] == 1 and stats["hits"] == 1 and stats["bytes"] > 4800
    returncode, stdout, stderr = out["ls"]
    assert returncode == 0 and stdout.startswith(key), stderr
    assert out["entries"] == [key] and out["hit"] == [0, 1, 2]
    assert out["hits"] == 2  # the shared count and this process's own, not written out
    lock = f"/dev/shm/luna_cache-{os.geteuid()}-watched/lock"
    assert out["put"][0] == errno.EROFS and out["clear"] == [errno.EROFS, lock]
    assert out["files"] == sorted([f"{key}.wav", "lock"])


def test_puts_into_a_full_cache_list_its_directory_once_per_queue_not_once_per_put(
        private_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    audio = np.arange(100, dtype=np.int16)  # 244-byte entries
    with AudioCache("full", max_bytes=244 * 300) as cache:
        for i in range(300):
            cache.put(f"fill{i}", audio, 24000).release()
        listed: list[str] = []
        real_scandir = os.scandir

        def scandir(path: Any = ".") -> Any:  # the real listing, counted
            if str(path) == cache.directory:
                listed.append(str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
        for i in range(50):  # each evicts one
            cache.put(f"new{i}", audio, 24000).release()
        monkeypatch.undo()
        # Found in review: two listings of all 300 entries per put (a sweep, then the
        # entries), so a put into a full cache of 10,000 entries took ~80 ms.
        assert len(listed) <= 2, f"{len(listed)} listings of the directory for 50 puts"
        stats = cache.stats()
        assert stats.entries == 300 and stats.evictions == 50
        assert [key for key, _, _ in cache.entries()][:3] == ["fill50", "fill51", "fill52"]
        cache.destroy()


HITS_TWO_ENTRIES = """
    from luna_shm import AudioCache
    with AudioCache("lru") as cache:
        for key in ("k1", "k2"):
            cache.get(key).release()
"""


def test_eviction_stays_least_recently_used_when_other_processes_hit_entries_meanwhile(
        private_dirs) -> None:
    audio = np.arange(100, dtype=np.int16)  # 244-byte entries, 10 fit
    with AudioCache("lru", max_bytes=2440) as cache:
        for i in range(10):
            cache.put(f"k{i}", audio, 24000).release()
        cache.put("k10", audio, 24000).release()  # full: k0 goes (a scan, this process)
        finish(spawn(private_dirs, HITS_TWO_ENTRIES))  # k1 and k2 used since that scan
        cache.put("k11", audio, 24000).release()
        cache.put("k12", audio, 24000).release()
        keys = {key for key, _, _ in cache.entries()}
        assert {"k1", "k2"} <= keys and not keys & {"k0", "k3", "k4"}, sorted(keys)
        assert [key for key, _, _ in cache.entries()][-2:] == ["k11", "k12"]
        cache.destroy()


def test_a_get_that_reloads_bounds_its_wait_for_a_stopped_holder_of_the_cache_lock(
        private_dirs, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    key = cache_key("spilled, then asked for")
    with AudioCache("held", max_bytes=20_000, disk_dir=disk) as cache:
        cache.put(key, audio_of(key), 24000).release()
        put_fillers(cache, 4)  # 4 x 4.8 KB more through a 20 KB RAM tier: the key spills
        lock = f"{cache.directory}/lock"
        with lock_held_by_a_stopped_process(lock):
            before = sorted(os.listdir(cache.directory))
            # The reload copies the disk entry, then needs the cache's lock to store it.
            with pytest.raises(TimeoutError, match="cache's lock") as info:
                call_with_deadline(lambda: cache.get(key, timeout=0.05), deadline=30)
            assert info.value.errno == errno.ETIMEDOUT and info.value.filename == lock
            assert sorted(os.listdir(cache.directory)) == before  # its copy went again
        with cache.get(key, timeout=5) as reloaded:
            assert np.array_equal(reloaded.array, audio_of(key))
        cache.destroy()


def test_a_renderer_bounds_its_commit_s_wait_for_a_stopped_holder_of_the_cache_lock(
        private_dirs) -> None:
    key, slow = cache_key("rendered, then stored"), cache_key("rendered slowly")
    with AudioCache("commit-held") as cache:
        lock = f"{cache.directory}/lock"
        holder = contextlib.ExitStack()

        def render(writer: Any) -> None:
            writer.write(audio_of(key))
            holder.enter_context(lock_held_by_a_stopped_process(lock))  # as it ends

        with holder:
            # Found in review: the renderer's commit waited for the lock with no bound,
            # whatever timeout its caller gave (its waiters were bounded, it was not).
            with pytest.raises(TimeoutError, match="cache's lock") as info:
                call_with_deadline(lambda: cache.get_or_render(
                    key, render, samplerate=24000, timeout=0.2), deadline=30)
            assert (info.value.errno, info.value.filename) == (errno.ETIMEDOUT, lock)
            # The failed render left nothing but the note its waiters read.
            assert sorted(os.listdir(cache.directory)) == sorted(["lock", key + ".outcome"])
        with cache.get_or_render(key, lambda w: w.write(audio_of(key)), samplerate=24000,
                                 timeout=5) as entry:
            assert entry.stored and np.array_equal(entry.array, audio_of(key))

        def slow_render(writer: Any) -> None:
            time.sleep(0.5)
            writer.write(audio_of(slow))

        # The render's own time is no wait: a render longer than timeout is stored.
        with cache.get_or_render(slow, slow_render, samplerate=24000, timeout=0.1) as entry:
            assert entry.stored and np.array_equal(entry.array, audio_of(slow))
        assert cache.stats().renders == 3
        cache.destroy()


def test_looking_at_a_cache_whose_lock_a_stopped_process_holds_is_bounded_by_timeout(
        private_dirs, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    key = cache_key("looked at")
    with AudioCache("watched", disk_dir=disk) as cache:
        cache.put(key, audio_of(key), 24000).release()
        cache.get(key).release()  # a hit not yet written out
        locks = {"cache": f"{cache.directory}/lock",
                 "disk cache": f"{disk}/luna_cache-{os.geteuid()}-watched/lock"}
        for what, lock in locks.items():
            with lock_held_by_a_stopped_process(lock):
                before = sorted(os.listdir(cache.directory))
                # Found in review: each of these waited for the stopped holder for ever
                # (stats, entries and clear had no timeout, nor had the open).
                calls = {"stats": lambda: cache.stats(timeout=0.05),
                         "clear": lambda: cache.clear(timeout=np.float64(0.05)),
                         "open": lambda: AudioCache("watched", disk_dir=disk, timeout=0)}
                if what == "cache":  # entries() looks at the RAM tier only
                    calls["entries"] = lambda: cache.entries(timeout=0.05)
                for name, call in calls.items():
                    with pytest.raises(TimeoutError, match=f"the {what}'s lock") as info:
                        call_with_deadline(call, deadline=30)
                    assert (info.value.errno, info.value.filename) == (errno.ETIMEDOUT,
                                                                       lock), name
                if what == "cache":
                    assert sorted(os.listdir(cache.directory)) == before
                else:  # clear() emptied the RAM tier before it waited for the disk's
                    assert os.listdir(cache.directory) == ["lock"]
        with pytest.raises(ValueError, match="timeout"):
            cache.stats(timeout=float("nan"))
        assert cache.entries(timeout=5) == [] and cache.clear(timeout=5) == 0
        assert cache.stats(timeout=5).hits == 1
        cache.destroy()


def _open_files() -> set[str]:
    """What this process's descriptors name now."""
    named = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            named.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the listing's own fd, closed by now
    return named


@pytest.mark.parametrize("how", ["close(timeout=0.05)", "the end of a with block"])
def test_a_close_with_counts_to_write_out_gives_up_on_a_stopped_lock_holder(
        private_dirs, caplog, how: str) -> None:
    key = cache_key("counted, then closed")
    with AudioCache("closing") as cache:
        cache.put(key, audio_of(key), 24000).release()
    cache = AudioCache("closing")
    lock = f"{cache.directory}/lock"

    def close() -> None:
        if how == "close(timeout=0.05)":
            cache.get(key).release()  # a hit, not yet written out: the close writes it
            cache.close(timeout=0.05)
        else:  # a daemon's `with AudioCache(...)`, whose exit can pass no timeout
            with cache:
                cache.get(key).release()

    with caplog.at_level("WARNING", logger="luna_shm"), \
            lock_held_by_a_stopped_process(lock):
        # Found in review: the close waited for the stopped holder for ever (the
        # counts are written out under the cache's lock): a daemon's shutdown hung.
        call_with_deadline(close, deadline=60)
        assert cache.closed and lock not in _open_files()
    [message] = [record.getMessage() for record in caplog.records]
    assert "without writing out" in message and "hits=1" in message and lock in message
    with AudioCache("closing") as cache:  # the hit was lost, as documented; nothing else
        assert cache.stats(timeout=5).hits == 0
        with cache.get(key) as hit:
            assert np.array_equal(hit.array, audio_of(key))
        cache.destroy()


def test_a_close_while_another_thread_waits_for_a_stopped_lock_holder_is_bounded(
        private_dirs, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    cache = AudioCache("waited-on", disk_dir=disk)
    lock = f"{cache.directory}/lock"
    looked: list[object] = []
    with lock_held_by_a_stopped_process(lock):
        # Another thread's call that waits as long as it takes, holding the cache's
        # mutex meanwhile (a TTS daemon's worker).
        worker = threading.Thread(target=lambda: looked.append(cache.entries()))
        worker.start()
        inode = os.stat(lock).st_ino
        wait_until_someone_waits_for_flock(lock, inode, worker.is_alive)
        # Found in review: close() waited for that call to end (the lock files are
        # closed under the mutex, never under a call that uses them): for ever.
        call_with_deadline(lambda: cache.close(timeout=0.05), deadline=60)
        assert not cache.closed  # the waiting call's, until it ends
        assert lock in _open_files()
    worker.join(60)
    assert not worker.is_alive() and looked == [[]]  # the call ended as it would have
    assert cache.closed and lock not in _open_files()  # and the cache closed after it
    assert not [name for name in _open_files() if "luna_cache-" in name]
    with pytest.raises(ValueError, match="closed AudioCache"):
        cache.stats()
    AudioCache("waited-on", disk_dir=disk).destroy()


@pytest.mark.parametrize("what", ["cache", "disk cache"])
def test_puts_and_removals_bound_their_wait_for_a_stopped_holder_of_a_cache_lock(
        private_dirs, tmp_path: Path, what: str) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    key = cache_key("stored, then put again while a lock is held")
    other = cache_key("another sentence")
    with AudioCache("held", disk_dir=disk) as cache:
        cache.put(key, audio_of(key), 24000).release()
        tiers = {"cache": cache.directory,
                 "disk cache": f"{disk}/luna_cache-{os.geteuid()}-held"}
        lock = f"{tiers[what]}/lock"
        # New audio for the key (a WAV; encoded bytes, which replace the WAV of another
        # type), another key's put (timeout=0: one try), a discard of the key.
        calls = {
            "put": lambda: cache.put(key, audio_of(other), 24000, timeout=0.05),
            "put_bytes": lambda: cache.put_bytes(key, b"ID3 new", timeout=np.float64(0.05)),
            "put of another key": lambda: cache.put(other, audio_of(other), 24000,
                                                    timeout=0),
            "discard": lambda: cache.discard(key, timeout=0.05),
        }
        with lock_held_by_a_stopped_process(lock):
            before = {path: sorted(os.listdir(path)) for path in tiers.values()}
            count = cache._ram.counters()[0]  # the RAM tier's shared byte count
            for name, call in calls.items():
                # Found in review: each of these waited for the stopped holder for ever.
                with pytest.raises(TimeoutError, match=f"the {what}'s lock") as info:
                    call_with_deadline(call, deadline=30)
                assert (info.value.errno, info.value.filename) == (errno.ETIMEDOUT,
                                                                   lock), name
                # No partial and no entry left in either tier, nothing removed, and the
                # bytes the put made room for out of the count again.
                assert {path: sorted(os.listdir(path)) for path in before} == before, name
                assert cache._ram.counters()[0] == count, name
            with cache.get(key, timeout=5) as kept:  # a hit takes no lock of the cache
                assert kept.is_wav and np.array_equal(kept.array, audio_of(key))
            with pytest.raises(TimeoutError, match=f"the {what}'s lock") as info:
                call_with_deadline(lambda: cache.destroy(timeout=0.05), deadline=30)
            assert (info.value.errno, info.value.filename) == (errno.ETIMEDOUT, lock)
            assert not cache.closed and os.path.isdir(cache.directory)
        with cache.put(other, audio_of(other), 24000, timeout=5) as stored:
            assert stored.stored
        cache.destroy(timeout=5)
        assert not os.path.exists(cache.directory) and cache.closed


@pytest.mark.parametrize("call", ["get", "get_or_render", "follow"])
def test_a_reload_whose_eviction_must_spill_bounds_its_wait_for_a_stopped_disk_lock_holder(
        private_dirs, tmp_path: Path, call: str) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    key = cache_key("spilled, then asked for while the disk tier is held")
    with AudioCache("held", max_bytes=20_000, disk_dir=disk) as cache:
        cache.put(key, audio_of(key), 24000).release()
        put_fillers(cache, 4)  # through a 20 KB RAM tier: the key spills, the RAM is full
        lock = f"{disk}/luna_cache-{os.geteuid()}-held/lock"
        calls = {
            "get": lambda: cache.get(key, timeout=0.05),
            "get_or_render": lambda: cache.get_or_render(
                key, lambda writer: writer.write(audio_of(key)), samplerate=24000,
                timeout=0.05),
            "follow": lambda: next(cache.follow(key, timeout=0.05)),
        }
        with lock_held_by_a_stopped_process(lock):
            before = {path: sorted(os.listdir(path))
                      for path in (cache.directory, os.path.dirname(lock))}
            # The reload's commit must evict the oldest filler, which spills to the disk
            # tier: found in review, that spill waited for the disk tier's lock for ever,
            # whatever the call's timeout.
            with pytest.raises(TimeoutError, match="disk cache's lock") as info:
                call_with_deadline(calls[call], deadline=30)
            assert (info.value.errno, info.value.filename) == (errno.ETIMEDOUT, lock)
            # Nothing changed: the filler was not evicted, no copy is left in either tier.
            assert {path: sorted(os.listdir(path)) for path in before} == before
        with cache.get(key, timeout=5) as reloaded:
            assert np.array_equal(reloaded.array, audio_of(key))
        stats = cache.stats()
        assert (stats.reloads, stats.renders, stats.spills) == (1, 0, 2)
        cache.destroy()


RELOAD_INTO_A_FULL_RAM_DISK_WHILE_HELD = """
    import json, os, subprocess, sys, threading
    import numpy as np
    from luna_shm import AudioCache
    os.mkdir("/tmp/disk")  # the disk tier (the child's private /tmp)
    # 300 KB entries through a 1 MB RAM disk (the default bound is larger): the fourth
    # put finds it full and evicts k0, which spills to the disk tier.
    cache = AudioCache("full", disk_dir="/tmp/disk")
    for i in range(4):
        cache.put(f"k{i}", np.full(150_000, i, np.int16), 24000).release()
    lock = f"{cache.directory}/lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, signal, sys\\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\\n"
        "os.kill(os.getpid(), signal.SIGSTOP)\\n"), lock])
    # A call that hangs must not leave the stopped holder behind: the test fails then.
    watchdog = threading.Timer(40, lambda: (holder.kill(), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    _, status = os.waitpid(holder.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status
    before = sorted(os.listdir(cache.directory))
    out = {"spilled": os.listdir("/tmp/disk/" + os.path.basename(cache.directory))}
    calls = {"get": lambda: cache.get("k0", timeout=0.05),
             "get_or_render": lambda: cache.get_or_render(
                 "k0", lambda writer: writer.write(np.ones(10, np.int16)),
                 samplerate=24000, timeout=0.05),
             # A put's file does not fit either: the room it makes waits the same way.
             "put": lambda: cache.put("k9", np.full(150_000, 9, np.int16), 24000,
                                      timeout=0.05),
             "put_bytes": lambda: cache.put_bytes("k9", bytes(300_000), timeout=0.05),
             # A new key's render: its 300 KB chunk does not fit either.
             "render": lambda: cache.get_or_render(
                 "k8", lambda writer: writer.write(np.full(150_000, 8, np.int16)),
                 samplerate=24000, timeout=0.05)}
    # The reload's copy finds the RAM disk full: the room it makes (evicting the cache's
    # own entries) takes the cache's lock, which the stopped process holds.
    for name, call in calls.items():
        try:
            call()
            out[name] = "returned"
        except OSError as exc:
            out[name] = [type(exc).__name__, exc.errno, exc.filename]
    # Nothing evicted; the failed render left only the note its waiters read.
    out["unchanged"] = sorted(os.listdir(cache.directory)) == sorted(before + ["k8.outcome"])
    holder.kill()
    holder.wait()
    with cache.get("k0", timeout=5) as reloaded:
        out["reloaded"] = reloaded.array.tolist() == [0] * 150_000
    with cache.get_or_render("k8", lambda writer: writer.write(np.full(150_000, 8, np.int16)),
                             samplerate=24000, timeout=5) as entry:
        out["rendered"] = entry.stored and entry.array.tolist() == [8] * 150_000
    out["lock"] = lock
    cache.destroy()
    print(json.dumps(out))
"""


def test_a_reload_into_a_full_ram_disk_bounds_its_wait_for_room_by_the_call_s_timeout(
        ) -> None:
    # Found in review: the room a reload makes on a full RAM disk waited for the cache's
    # lock for ever, whatever the call's timeout (the child's own deadline fails it); so
    # did a put's, which had no timeout, and a render's for its chunk (until b289de7).
    out = json.loads(assert_child_ok(run_in_private_shm(
        RELOAD_INTO_A_FULL_RAM_DISK_WHILE_HELD, shm_size="1m", timeout=60)))
    assert sorted(out["spilled"]) == ["k0.wav", "lock"]
    timed_out = ["TimeoutError", errno.ETIMEDOUT, out["lock"]]
    for call in ("get", "get_or_render", "put", "put_bytes", "render"):
        assert out[call] == timed_out, call
    assert out["unchanged"] and out["reloaded"] and out["rendered"]


def _holds_a_flock(inode: int, pid: int) -> bool:
    """True when /proc/locks shows process pid holding (not waiting for) a flock of the
    file with inode number inode."""
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if fields[1] == "->" or fields[1] != "FLOCK":
                continue
            if fields[4] == str(pid) and fields[5].endswith(f":{inode}"):
                return True
    return False


# For a child: the cache files (but the lock file) that it still has open.
CACHE_FILES_OPEN = """
    def cache_files_open(directory):
        named = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(directory) and not target.endswith("/lock"):
                named.append(target)
        return named
"""


WAITER_STOPPED_BEFORE_TAKING_THE_UNSTORED_AUDIO = """
    import json, os, signal
    from luna_shm import AudioCache, cache_key
    from luna_shm.cache import _audio_cache
    key = cache_key("rendered too large to store")
    real_open_regular = _audio_cache.open_regular

    def open_regular(path, cell):  # stopped once the render's unstored audio is open
        fd = real_open_regular(path, cell)
        if fd is not None and ".unstored" in path:
            os.kill(os.getpid(), signal.SIGSTOP)
        return fd

    _audio_cache.open_regular = open_regular
    cache = AudioCache("unstored", max_bytes=1000)
    try:
        with cache.get_or_render(key, lambda writer: writer.write(audio_of(key)),
                                 samplerate=24000, timeout=3) as entry:
            out = {"call": "returned", "named": os.path.exists(entry.path),
                   "audio": bool(np.array_equal(entry.array, audio_of(key)))}
    except OSError as exc:
        out = {"call": [type(exc).__name__, exc.errno, exc.filename, str(exc)]}
    out["open"] = cache_files_open(cache.directory)
    cache.close()
    print(json.dumps(out))
"""


def _fd_target(pid: int, fd: str) -> str | None:
    """What pid's fd names now, or None once it is closed."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _render_unstored_with_a_waiter(cache: AudioCache, key: str, private_dirs: Any
                                   ) -> tuple[Any, subprocess.Popen[str]]:
    """Render key (too large for cache: kept unstored) while a child process waits for the
    render and stops once it has opened the unstored audio (before it locks it); returns
    the renderer's entry and the waiter."""
    live = f"{cache.directory}/{key}.live"
    waiter: subprocess.Popen[str] | None = None

    def render(writer: Any) -> None:
        nonlocal waiter
        writer.write(audio_of(key))
        waiter = spawn(private_dirs,
                       CACHE_FILES_OPEN + WAITER_STOPPED_BEFORE_TAKING_THE_UNSTORED_AUDIO)
        end = time.monotonic() + 60  # until it waits for our render (it has its file)
        # os.readlink, not realpath: an fd the starting child closes between the listing
        # and the look is gone (realpath raised FileNotFoundError there, in CI).
        while not any(_fd_target(waiter.pid, fd) == live
                      for fd in os.listdir(f"/proc/{waiter.pid}/fd")):
            assert waiter.poll() is None and time.monotonic() < end, "no waiter came"
            time.sleep(0.005)

    entry = cache.get_or_render(key, render, samplerate=24000)
    assert waiter is not None and not entry.stored
    return entry, waiter


def test_a_waiter_bounds_its_wait_for_a_stopped_remover_of_the_render_s_unstored_audio(
        private_dirs) -> None:
    key = cache_key("rendered too large to store")
    with AudioCache("unstored", max_bytes=1000) as cache:  # the 4.8 KB render does not fit
        entry, waiter = _render_unstored_with_a_waiter(cache, key, private_dirs)
        remover = None
        try:
            # The waiter read the note that points it to the unstored audio, and opened it.
            _, status = os.waitpid(waiter.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
            unstored = entry.path
            inode = os.stat(unstored).st_ino
            # The removal of that audio once no one holds it (as a sweep, or our release,
            # makes it), stopped while it holds the file exclusively: it opened it before
            # our release, and its lock is granted as we let go.
            remover = subprocess.Popen([sys.executable, "-c", (
                "import fcntl, os, signal, sys\n"
                "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "os.kill(os.getpid(), signal.SIGSTOP)\n"), unstored])
            wait_until_someone_waits_for_flock(unstored, inode, lambda: remover.poll() is None)
            entry.release()  # our release removes the file and its note (no one holds it)
            _, status = os.waitpid(remover.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
            os.kill(waiter.pid, signal.SIGCONT)
            # Found in review: the waiter's shared lock of the unstored audio had no bound,
            # whatever the call's timeout: it waited for the stopped remover for ever.
            out = json.loads(finish(waiter, timeout=20))
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
            if remover is not None:
                remover.kill()
                remover.wait()
        name, code, filename, message = out["call"]
        assert (name, code, filename) == ("TimeoutError", errno.ETIMEDOUT, unstored)
        assert "unstored audio" in message and key in message
        assert out["open"] == []  # the waiter let go of the file it could not lock
        assert os.listdir(cache.directory) == ["lock"]
        # The cache renders the key again, for this process and others.
        with cache.get_or_render(key, lambda writer: writer.write(audio_of(key)),
                                 samplerate=24000, timeout=5) as again:
            assert not again.stored and np.array_equal(again.array, audio_of(key))
        assert os.listdir(cache.directory) == ["lock"]
        cache.destroy(timeout=5)


def test_a_waiter_never_gets_unstored_audio_whose_file_was_removed_before_it_took_it(
        private_dirs) -> None:
    key = cache_key("rendered too large to store")
    with AudioCache("unstored", max_bytes=1000) as cache:  # the 4.8 KB render does not fit
        entry, waiter = _render_unstored_with_a_waiter(cache, key, private_dirs)
        try:
            # The waiter read the note that points it to the unstored audio and opened
            # it, but holds no lock of it yet: our release removes it (no one holds it).
            _, status = os.waitpid(waiter.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
            entry.release()
            assert not os.path.exists(entry.path)
            os.kill(waiter.pid, signal.SIGCONT)
            out = json.loads(finish(waiter, timeout=20))
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
        # Found in review: the waiter took the removed file and returned it, its path
        # naming nothing (a player given it fails). It renders the key itself instead.
        assert out == {"call": "returned", "named": True, "audio": True, "open": []}, out
        assert os.listdir(cache.directory) == ["lock"]
        assert cache.stats().renders == 2
        cache.destroy(timeout=5)


RENDERER_STOPPED_BEFORE_LOCKING_ITS_NEW_FILE = """
    import json, os, signal
    from luna_shm import AudioCache, cache_key
    from luna_shm.cache import _audio_cache
    key = cache_key("a render whose new file a sweep holds")
    real_render_writer = _audio_cache.RenderWriter

    def render_writer(*args, **kwargs):  # stopped once its partial is made (locked shared)
        writer = real_render_writer(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGSTOP)
        return writer

    _audio_cache.RenderWriter = render_writer
    cache = AudioCache("swept")
    try:
        cache.get_or_render(key, lambda writer: writer.write(audio_of(key)),
                            samplerate=24000, timeout=3)
        out = {"call": "returned"}
    except OSError as exc:
        out = {"call": [type(exc).__name__, exc.errno, exc.filename, str(exc)]}
    out["open"] = cache_files_open(cache.directory)
    cache.close()
    print(json.dumps(out))
"""


def test_a_renderer_bounds_its_wait_for_a_stopped_sweep_that_holds_its_new_file(
        private_dirs) -> None:
    key = cache_key("a render whose new file a sweep holds")
    with AudioCache("swept") as cache:
        renderer = spawn(private_dirs,
                         CACHE_FILES_OPEN + RENDERER_STOPPED_BEFORE_LOCKING_ITS_NEW_FILE)
        sweeper = None
        try:
            _, status = os.waitpid(renderer.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
            [part] = [name for name in os.listdir(cache.directory) if name.endswith(".part")]
            part = f"{cache.directory}/{part}"
            inode = os.stat(part).st_ino
            # A sweep in another process that finds the renderer's new file unlocked in the
            # moment its upgrade to exclusive drops the shared lock (flock converts so),
            # and is stopped holding it exclusively, as remove_if_unpinned holds it until
            # its unlink. The kernel gives the upgrade no such moment unless a third
            # holder blocks it: the sweeper is that holder first (shared), then takes it
            # exclusively once the renderer has let go of its own lock.
            sweeper = subprocess.Popen([sys.executable, "-c", (
                "import fcntl, os, signal, sys\n"
                "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                "fcntl.flock(fd, fcntl.LOCK_SH)\n"
                "print('shared', flush=True)\n"
                "sys.stdin.readline()\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "os.kill(os.getpid(), signal.SIGSTOP)\n"), part],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert sweeper.stdout is not None and sweeper.stdin is not None
            assert sweeper.stdout.readline() == "shared\n"
            os.kill(renderer.pid, signal.SIGCONT)
            end = time.monotonic() + 60
            while _holds_a_flock(inode, renderer.pid):  # its upgrade dropped its own lock
                assert time.monotonic() < end, "the renderer kept its shared lock"
                time.sleep(0.001)
            sweeper.stdin.write("\n")
            sweeper.stdin.flush()
            _, status = os.waitpid(sweeper.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
            assert _holds_a_flock(inode, sweeper.pid)
            # Found in review: the upgrade waited for the stopped sweep for ever, whatever
            # the call's timeout.
            out = json.loads(finish(renderer, timeout=20))
        finally:
            if renderer.poll() is None:
                renderer.kill()
                renderer.wait()
            if sweeper is not None:
                sweeper.kill()
                sweeper.communicate()
        name, code, filename, message = out["call"]
        assert (name, code, filename) == ("TimeoutError", errno.ETIMEDOUT, part)
        assert "sweep" in message and key in message
        assert out["open"] == []  # the renderer closed its writer
        assert os.listdir(cache.directory) == ["lock"]  # and removed its new file
        with cache.get_or_render(key, lambda writer: writer.write(audio_of(key)),
                                 samplerate=24000, timeout=5) as entry:
            assert entry.stored and np.array_equal(entry.array, audio_of(key))
        assert sorted(os.listdir(cache.directory)) == sorted(["lock", f"{key}.wav"])
        assert cache.stats(timeout=5).renders == 1  # the timed-out one never rendered
        cache.destroy(timeout=5)


DESTROY_WHILE_ANOTHER_THREAD_WAITS_FOR_A_STOPPED_HOLDER = """
    import json, os, signal, subprocess, sys, threading, time
    from luna_shm import AudioCache
    from luna_shm.cache import _tier
    cache = AudioCache("destroyed")
    lock = f"{cache.directory}/lock"
    inode = os.stat(lock).st_ino
    # A process that has the lock file open (before destroy() removes its name), and
    # takes its lock when told to, then is stopped holding it.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, signal, sys\\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\\n"
        "print('open', flush=True)\\n"
        "sys.stdin.readline()\\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\\n"
        "os.kill(os.getpid(), signal.SIGSTOP)\\n"), lock],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "open\\n"
    looked = []

    def look():  # another thread's call that waits as long as it takes (no timeout)
        try:
            looked.append(cache.stats().entries)
        except OSError as exc:
            looked.append([type(exc).__name__, exc.errno])

    worker = threading.Thread(target=look)
    real_leftovers, real_release = _tier.Tier.leftovers, _tier.Tier.release
    calls = []
    # The first look at the leftovers finds the directory empty; the second is made as
    # destroy() removes the notes and the lock file.
    pause_after = 1 if sys.argv[1] == "found empty" else 2

    def leftovers(self):
        calls.append("leftovers")
        return real_leftovers(self)

    def release(self):
        real_release(self)
        if len(calls) == pause_after and threading.current_thread() is threading.main_thread():
            # destroy() let go of the lock: now the process takes it and is stopped
            # holding it, and the other thread's call takes the mutex and waits for it.
            calls.append("paused")
            holder.stdin.write("\\n")
            holder.stdin.flush()
            _, status = os.waitpid(holder.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
            worker.start()
            while True:
                with open("/proc/locks") as locks:
                    if any("->" in line and f":{inode} " in line for line in locks):
                        break
                time.sleep(0.001)

    _tier.Tier.leftovers, _tier.Tier.release = leftovers, release
    # A call that hangs must not leave the stopped holder behind: the test fails then.
    watchdog = threading.Timer(20, lambda: (holder.kill(), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    out = {}
    try:
        cache.destroy(timeout=0.5)
        out["destroy"] = "returned"
    except OSError as exc:
        out["destroy"] = [type(exc).__name__, exc.errno, exc.filename, str(exc)]
    out["closed at once"] = cache.closed
    holder.kill()
    holder.communicate()
    worker.join(20)
    out["worker"] = [worker.is_alive(), looked]
    out["closed"] = cache.closed  # by the worker's call, as it let go of the lock
    out["open"] = cache_files_open(cache.directory) + [
        os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(lock)]
    out["lock"] = lock
    out["left"] = sorted(os.listdir(cache.directory))
    again = AudioCache("destroyed")  # usable again: in this process and others
    again.destroy(timeout=5)
    out["after"] = [again.closed, os.path.exists(again.directory)]
    print(json.dumps(out))
"""


@pytest.mark.parametrize("when", ["found empty", "lock file removed"])
def test_destroy_bounds_its_close_while_another_thread_waits_for_a_stopped_lock_holder(
        private_dirs, when: str) -> None:
    out = json.loads(finish(spawn(
        private_dirs, CACHE_FILES_OPEN + DESTROY_WHILE_ANOTHER_THREAD_WAITS_FOR_A_STOPPED_HOLDER,
        when), timeout=60))
    # Found in review: past its timeout, destroy() closed the cache's lock file under the
    # mutex with no bound: it waited for the other thread's call, which waited for the
    # stopped process, for ever (the child's watchdog ends it then: exit status 3).
    name, code, filename, message = out["destroy"]
    assert (name, code, filename) == ("TimeoutError", errno.ETIMEDOUT, out["lock"])
    assert "another thread holds it" in message
    # The close was handed to that call, as close() hands it: the cache closed as the
    # call let go of the lock, after the stopped holder went, and the call ended as it
    # would have: it counted the entries, or found the lock file gone.
    assert out["closed at once"] is False
    looked = [0] if when == "found empty" else [["PermissionError", errno.EPERM]]
    assert out["worker"] == [False, looked] and out["closed"] is True
    assert out["open"] == []
    # The directory stays, with its lock file when destroy() had not removed it yet.
    assert out["left"] == (["lock"] if when == "found empty" else [])
    assert out["after"] == [True, False]


# A process that opens the cache "shared" (its RAM tier), seen at one moment of the open:
# argv[1] says which, "the directory" (its mkdir found it there, or made it: now it opens
# it), "the lock file" (the directory is open: now it opens, or makes, the lock file in
# it) or "its first lock" (the lock file is open: now it takes its flock, to sweep).
# argv[2] says what happens there: "paused" the first time (until a line on stdin:
# another process removes the empty directory meanwhile), or "removed" by a process it
# runs (rm -r: the directory, and the lock file in it if any), each time.
OPENER_AT_A_MOMENT = """
    import json, os, subprocess, sys
    from luna_shm import AudioCache, _lowlevel, cache_key
    from luna_shm.cache import _tier
    moment, what = sys.argv[1], sys.argv[2]
    directory = f"{os.environ['LUNA_SHM_DIR']}/luna_cache-{os.geteuid()}-shared"
    seen = []

    def at_the_moment(frame, event, arg):
        if event != "call":
            return
        if frame.f_code is _lowlevel.open_at.__code__:
            path, dir_fd = frame.f_locals["path"], frame.f_locals["dir_fd"]
            at = ("the lock file" if path == "lock" and dir_fd is not None else
                  "the directory" if path == directory else None)
        else:
            at = "its first lock" if frame.f_code is _tier.lock_by.__code__ else None
        if at != moment:
            return
        seen.append(at)
        if what == "removed":
            subprocess.run(["rm", "-r", directory], check=True)
        elif len(seen) == 1:
            print("paused", flush=True)
            sys.stdin.readline()

    sys.setprofile(at_the_moment)
    try:
        cache = AudioCache("shared")
    except OSError as exc:
        sys.setprofile(None)
        print(json.dumps({"error": [type(exc).__name__, exc.errno, exc.filename, str(exc)],
                          "seen": len(seen), "left": os.path.exists(directory)}))
        sys.exit(0)
    sys.setprofile(None)
    key = cache_key("opened as its directory went")
    cache.put(key, audio_of(key), 24000).release()
    with cache.get(key) as entry:
        same = bool(np.array_equal(entry.array, audio_of(key)))
    out = {"seen": len(seen), "directory": cache.directory == directory, "same": same,
           "files": sorted(os.listdir(directory))}
    cache.destroy(timeout=5)
    print(json.dumps(out))
"""

# A process whose open of the cache "shared" makes its directory, then fails to make the
# lock file in it (EMFILE: its fd table is full by then, as a full RAM disk's ENOSPC
# would), and so removes the empty directory again. It waits for a line on stdin first,
# at the lock file's open.
FAILS_TO_MAKE_THE_LOCK_FILE = """
    import errno, json, os, resource, sys
    from luna_shm import AudioCache, _lowlevel
    paused = []

    def at_the_lock_file(frame, event, arg):
        if (event == "call" and frame.f_code is _lowlevel.open_at.__code__ and not paused
                and frame.f_locals["path"] == "lock"):
            paused.append(True)
            print("paused", flush=True)
            sys.stdin.readline()
""" + textwrap.indent(FILL_FD_TABLE, "    " * 3) + """
    sys.setprofile(at_the_lock_file)
    try:
        AudioCache("shared").close()
        print(json.dumps({"error": None}))
    except OSError as exc:
        sys.setprofile(None)
        print(json.dumps({"error": [type(exc).__name__, exc.errno, exc.filename]}))
"""


def _spawn_told(private_dirs, code: str, *args: str) -> subprocess.Popen[str]:
    """spawn, with a pipe to the child's stdin; returns once it printed "paused"."""
    child = subprocess.Popen([sys.executable, "-c", AUDIO_OF_KEY + textwrap.dedent(code),
                              *args], env=child_env(private_dirs), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    if line != "paused\n":
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"the child did not pause: {line!r}\n{err}")
    return child


def _go_on(child: subprocess.Popen[str]) -> Any:
    assert child.stdin is not None
    child.stdin.write("\n")
    child.stdin.flush()
    return json.loads(finish(child))


@pytest.mark.parametrize(("remover", "moment"), [
    ("destroy()", "the directory"), ("destroy()", "the lock file"),
    ("destroy()", "its first lock"),
    # A lock file once made is never removed by a failed open: it can remove the
    # directory only before the opener made one in it.
    ("a failed open", "the directory"), ("a failed open", "the lock file")])
def test_a_cache_opened_as_another_process_removes_its_empty_directory_opens_it_anew(
        private_dirs, remover: str, moment: str) -> None:
    directory = f"{private_dirs.ram}/luna_cache-{os.geteuid()}-shared"
    children: list[subprocess.Popen[str]] = []
    cache = None
    try:
        if remover == "destroy()":
            # The cache is there, empty; the opener finds its directory (mkdir: EEXIST)
            # and is paused in its open; then another process destroys the cache.
            cache = AudioCache("shared")
            children.append(_spawn_told(private_dirs, OPENER_AT_A_MOMENT, moment, "paused"))
            if os.path.exists(directory):
                cache.destroy(timeout=5)
            else:  # removed under it (the bug): only close it
                cache.close()
        else:
            # Another process made the directory and is paused before it makes the lock
            # file; the opener finds the directory and is paused in its open; then the
            # other process fails to make the lock file, and removes its empty directory.
            children.append(_spawn_told(private_dirs, FAILS_TO_MAKE_THE_LOCK_FILE))
            children.append(_spawn_told(private_dirs, OPENER_AT_A_MOMENT, moment, "paused"))
            failed = _go_on(children[0])
            assert failed["error"] == ["OSError", errno.EMFILE, f"{directory}/lock"]
        assert not os.path.exists(directory)
        out = _go_on(children[-1])
    finally:
        if cache is not None:
            cache.close()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    # Before the fix, the opener's AudioCache("shared") raised FileNotFoundError, for the
    # directory (removed between its mkdir and its open, or, its lock file open, before
    # its lock: "removed after the cache opened", though it never opened) or for the lock
    # file (the directory removed between its open and the lock file's), though nothing
    # was wrong on its side. It starts its open again: it makes the directory anew and
    # uses it.
    assert "error" not in out, out
    assert out == {"seen": 2, "directory": True, "same": True,
                   "files": sorted(["lock", f"{cache_key('opened as its directory went')}.wav"])}


@pytest.mark.parametrize("moment", ["the lock file", "its first lock"])
def test_an_open_whose_directory_another_process_removes_each_time_gives_up_naming_it(
        private_dirs, moment: str) -> None:
    from luna_shm.cache._tier import OPEN_ATTEMPTS

    directory = f"{private_dirs.ram}/luna_cache-{os.geteuid()}-shared"
    out = json.loads(finish(spawn(private_dirs, OPENER_AT_A_MOMENT, moment, "removed")))
    # Each open of the lock file, or each first lock, finds the directory just removed:
    # the open starts again a bounded number of times, then raises, naming the
    # directory, and leaves nothing.
    name, code, filename, message = out["error"]
    assert (name, code, filename) == ("FileNotFoundError", errno.ENOENT, directory)
    assert f"removed by another process each of the {OPEN_ATTEMPTS} times" in message
    assert out["seen"] == OPEN_ATTEMPTS and out["left"] is False


# A process whose AudioCache("shared", disk_dir=argv[1]) makes the RAM tier's directory,
# then waits for a line on stdin before it opens the disk tier, which fails (argv[1] is a
# file, not a directory).
FAILS_AT_ITS_DISK_TIER = """
    import json, sys
    from luna_shm import AudioCache
    from luna_shm.cache import _tier
    paused = []

    def before_the_disk_tier(frame, event, arg):
        if (event == "call" and frame.f_code is _tier.open_tier.__code__ and not paused
                and frame.f_locals["what"] == "disk cache"):
            paused.append(True)
            print("paused", flush=True)
            sys.stdin.readline()

    sys.setprofile(before_the_disk_tier)
    try:
        AudioCache("shared", disk_dir=sys.argv[1]).close()
        print(json.dumps({"error": None}))
    except OSError as exc:
        sys.setprofile(None)
        print(json.dumps({"error": [type(exc).__name__, exc.errno]}))
"""


def test_a_failed_open_never_removes_the_directory_another_process_made_anew_meanwhile(
        private_dirs, tmp_path) -> None:
    # A constructor that fails undoes the RAM tier it made: it removed the directory at the
    # tier's path when only a lock file was in it, without asking whether that was still
    # its own. Another process had destroyed the empty cache meanwhile, and a third made
    # the directory anew and opened the cache in it: the failed open removed that one's
    # lock file and directory, and the open cache found its directory gone at its next
    # call (found reading the open's retry; the lock file of a live cache is never ours).
    directory = f"{private_dirs.ram}/luna_cache-{os.geteuid()}-shared"
    not_a_dir = tmp_path / "a file"
    not_a_dir.write_bytes(b"")
    failing = _spawn_told(private_dirs, FAILS_AT_ITS_DISK_TIER, str(not_a_dir))
    cache = None
    try:
        assert os.listdir(directory) == ["lock"]  # the failing open made it
        AudioCache("shared").destroy(timeout=5)  # another process's: the cache was empty
        assert not os.path.exists(directory)
        cache = AudioCache("shared")  # a third process's, in a new directory
        out = _go_on(failing)
        assert out["error"] == ["NotADirectoryError", errno.ENOTDIR]
        assert os.listdir(directory) == ["lock"], "the failed open removed it"
        key = cache_key("in the directory made anew")
        cache.put(key, np.full(100, 3, np.int16), 8000).release()
        entry = cache.get(key)
        assert entry is not None
        with entry:
            assert np.array_equal(entry.array, np.full(100, 3, np.int16))
    finally:
        if failing.poll() is None:
            failing.kill()
            failing.communicate()
        if cache is not None:
            if os.path.exists(directory):
                cache.destroy(timeout=5)
            else:  # removed under it (the bug): only close it
                cache.close()
