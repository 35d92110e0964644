"""AudioCache in one process (threads, forks aside): keys, hits, bounds, TTL, pins, errors."""

from __future__ import annotations

import contextlib
import errno
import gc
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import luna_shm
from helpers import (
    LIBRARY_PATH,
    REPO,
    as_other_user,
    call_with_deadline,
    closed_and_readable_dirs,
    wait_until_someone_waits_for_flock,
)
from luna_shm import AudioCache, CachedAudio, cache_key
from luna_shm.cache import RenderError


def tone(key: str, frames: int = 4000, channels: int = 1) -> np.ndarray:
    """Audio that depends on the key, so that a wrong entry shows."""
    rng = np.random.default_rng(int(key[:8], 16) if all(c in "0123456789abcdef" for c in key[:8])
                                else len(key))
    shape = (frames,) if channels == 1 else (frames, channels)
    return rng.integers(-32768, 32767, size=shape, dtype=np.int16)


@pytest.fixture
def cache(private_dirs):
    opened = AudioCache(f"t{uuid.uuid4().hex[:8]}", max_bytes=100_000)
    yield opened
    opened.close()


def test_cache_key_is_a_stable_digest_of_a_canonical_form() -> None:
    key = cache_key("Timer set", voice="en-us", engine="espeak-ng", speed=1.25, pitch=50)
    # Known answer: the same in every process and Python version.
    assert key == cache_key("Timer set", engine="espeak-ng", pitch=50, speed=1.25, voice="en-us")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key != cache_key("Timer set", voice="en-us", engine="espeak-ng", speed=1.25)
    assert key != cache_key("Timer set.", voice="en-us", engine="espeak-ng", speed=1.25, pitch=50)
    code = ("from luna_shm import cache_key; print(cache_key('Timer set', voice='en-us', "
            "engine='espeak-ng', speed=1.25, pitch=50))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert done.stdout.strip() == key


def test_cache_key_refuses_values_that_have_no_canonical_form() -> None:
    with pytest.raises(TypeError, match="text must be a str, got b'hi'"):
        cache_key(b"hi")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must be JSON values.*set"):
        cache_key("hi", voices={"a"})
    with pytest.raises(ValueError, match="finite"):
        cache_key("hi", speed=float("nan"))


@pytest.mark.parametrize("bad_key", [1, None, 1.5, True, ("a",)])
@pytest.mark.parametrize("nest", [lambda d: d, lambda d: [0, {"inner": d}]],
                         ids=["flat", "nested"])
def test_cache_key_refuses_dicts_with_keys_that_are_not_str(bad_key, nest) -> None:
    # JSON would write 1 as "1" and None as "null": two different dicts, one key.
    with pytest.raises(TypeError, match=rf"speed.* dict key that is not a str: "
                                        rf"{re.escape(repr(bad_key))}"):
        cache_key("hi", speed=nest({bad_key: "a"}))
    with pytest.raises(TypeError, match=r"voice.* dict key that is not a str"):
        cache_key("hi", voice=nest({"ok": 1, bad_key: "a"}))


def test_cache_key_names_a_lone_surrogate_and_a_huge_int() -> None:
    with pytest.raises(ValueError, match=r"text holds a lone surrogate '\\udcff' at index 0"):
        cache_key("\udcff")
    with pytest.raises(ValueError, match=r"speed\['x'\] holds a lone surrogate"):
        cache_key("hi", speed={"x": "ok\ud800"})
    with pytest.raises(ValueError, match=r"speed \(a dict key\) holds a lone surrogate"):
        cache_key("hi", speed={"\ud800": 1})
    with pytest.raises(ValueError, match=r"x is too large an int for a key .*"
                                         r"got an int of 16610 bits"):
        cache_key("hi", x=10**5000)
    with pytest.raises(ValueError, match=r"x\[1\] is too large an int"):
        cache_key("hi", x=[1, -(10**4300)])
    assert cache_key("hi", x=10**4300 - 1) != cache_key("hi", x=10**4299)


def test_cache_key_takes_numpy_scalars_as_the_python_numbers_of_their_value() -> None:
    assert cache_key("hi", speed=np.int64(2), pitch=np.float32(0.5), loud=np.bool_(True)) == \
        cache_key("hi", speed=2, pitch=0.5, loud=True)
    with pytest.raises(ValueError, match="finite numbers: speed is nan"):
        cache_key("hi", speed=np.float32("nan"))


def test_cache_key_refuses_a_list_that_contains_itself() -> None:
    looped: list[object] = [1]
    looped.append(looped)
    with pytest.raises(ValueError, match=r"options\[1\] contains itself"):
        cache_key("hi", options=looped)


def test_cache_key_refuses_lists_and_dicts_nested_too_deep_naming_the_argument() -> None:
    deep: object = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="cache_key argument speed is nested more than "
                                         "100 lists or dicts deep"):
        cache_key("hi", speed=deep)
    wide: object = {"a": 1}
    for _ in range(150):
        wide = {"a": wide}
    with pytest.raises(ValueError, match="cache_key argument voice is nested more than"):
        cache_key("hi", voice=wide)
    fine: object = 1
    for _ in range(99):
        fine = [fine]
    assert len(cache_key("hi", speed=fine)) == 64


def test_bad_names_keys_and_sizes_raise_naming_what_was_passed(private_dirs) -> None:
    with pytest.raises(ValueError, match=r"name must be .*got '\.\./x'"):
        AudioCache("../x")
    with pytest.raises(TypeError, match="name must be a str, got 3"):
        AudioCache(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_bytes"):
        AudioCache("x", max_bytes=0)
    with pytest.raises(ValueError, match="ttl must be None or > 0 seconds, got -1"):
        AudioCache("x", ttl=-1)
    with AudioCache("x") as cache:
        with pytest.raises(ValueError, match=r"key must be .*got 'a/b'"):
            cache.get("a/b")
        with pytest.raises(TypeError, match="key must be a str"):
            cache.get(None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"suffix must be one of .*got '\.exe'"):
            cache.put_bytes(cache_key("x"), b"abc", suffix=".exe")
        with pytest.raises(ValueError, match="empty"):
            cache.put_bytes(cache_key("x"), b"")
        cache.destroy()


def test_a_miss_then_a_put_then_a_hit_that_is_sample_exact_and_zero_copy(cache) -> None:
    key = cache_key("hello")
    assert cache.get(key) is None
    audio = tone(key, channels=2)
    with cache.put(key, audio, 22050) as stored:
        assert stored.stored
    with cache.get(key) as hit:
        assert isinstance(hit, CachedAudio)
        assert hit.samplerate == 22050
        np.testing.assert_array_equal(hit.array, audio)
        assert not hit.array.flags.writeable and not hit.array.flags.owndata
        assert luna_shm.read_wav(hit.path)[0].tolist() == audio.tolist()
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses) == (1, 1, 1)


def test_entries_are_0600_files_in_a_0700_directory_per_name_and_user(cache, private_dirs) -> None:
    key = cache_key("private")
    with cache.put(key, tone(key), 16000) as entry:
        directory = os.path.dirname(entry.path)
        assert os.path.dirname(directory) == private_dirs.ram
        assert os.path.basename(directory) == f"luna_cache-{os.geteuid()}-{cache.name}"
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(entry.path).st_mode) == 0o600


def test_a_symlinked_foreign_or_open_cache_directory_is_refused(private_dirs, tmp_path) -> None:
    uid = os.geteuid()
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, f"{private_dirs.ram}/luna_cache-{uid}-linked")
    with pytest.raises(PermissionError, match="symbolic link") as caught:
        AudioCache("linked")
    assert caught.value.errno == errno.EPERM
    os.mkdir(f"{private_dirs.ram}/luna_cache-{uid}-open", 0o700)
    os.chmod(f"{private_dirs.ram}/luna_cache-{uid}-open", 0o770)
    with pytest.raises(PermissionError, match="mode 770 lets others in"):
        AudioCache("open")
    if uid == 0:  # root can give a directory to another user, as an attacker would own it
        os.mkdir(f"{private_dirs.ram}/luna_cache-0-foreign", 0o700)
        os.chown(f"{private_dirs.ram}/luna_cache-0-foreign", 12345, 12345)
        with pytest.raises(PermissionError, match="belongs to uid 12345"):
            AudioCache("foreign")


def test_a_cache_directory_swapped_for_a_symlink_after_the_open_is_refused_untouched(
        cache, private_dirs) -> None:
    key = cache_key("swapped")
    cache.put(key, tone(key), 16000).release()
    user = f"{private_dirs.ram}/user_music"  # someone's own files, named like the cache's
    os.mkdir(user)
    for name in (f"{key}.wav", "lock"):
        with open(f"{user}/{name}", "w") as f:
            f.write("mine")
    os.rename(cache.directory, cache.directory + ".old")
    os.symlink(user, cache.directory)
    for call in (cache.clear, lambda: cache.put(key, tone(key), 16000), cache.stats,
                 lambda: cache.discard(key), cache.destroy):
        with pytest.raises(PermissionError, match="replaced after the cache opened "
                                                  r"\(it is now a symbolic link\)") as caught:
            call()
        assert caught.value.errno == errno.EPERM and caught.value.filename == cache.directory
    assert sorted(os.listdir(user)) == [f"{key}.wav", "lock"]
    for name in os.listdir(user):
        with open(f"{user}/{name}") as f:
            assert f.read() == "mine"
    cache.close()  # closes without touching it either
    assert sorted(os.listdir(user)) == [f"{key}.wav", "lock"]


def test_least_recently_used_entries_go_first_and_the_bound_holds(cache) -> None:
    keys = [cache_key(f"lru {i}") for i in range(4)]
    for key in keys:  # 4 x ~24 KB in a 100 KB cache
        cache.put(key, tone(key, 12000), 16000).release()
    cache.get(keys[0]).release()  # now the most recently used
    newcomer = cache_key("lru new")
    cache.put(newcomer, tone(newcomer, 12000), 16000).release()
    assert keys[1] not in cache  # the least recently used one left
    assert keys[0] in cache and keys[2] in cache and keys[3] in cache and newcomer in cache
    stats = cache.stats()
    assert stats.bytes <= cache.max_bytes and stats.evictions == 1


def test_a_rendered_entry_counts_as_used_when_it_is_stored_not_when_its_render_began(
        cache) -> None:
    # 4 x ~24 KB in a 100 KB cache; the oldest is used while the newest renders.
    keys = [cache_key(f"lru render {i}") for i in range(4)]
    for key in keys[:3]:
        cache.put(key, tone(key, 12000), 16000).release()

    def render(writer) -> None:
        for key in keys[:3]:
            cache.get(key).release()  # all three used after the render began
        writer.write(tone(keys[3], 12000))

    cache.get_or_render(keys[3], render, samplerate=16000).release()
    assert [key for key, _, _ in cache.entries()][-1] == keys[3]  # the most recently used
    newcomer = cache_key("lru render new")
    cache.put(newcomer, tone(newcomer, 12000), 16000).release()
    assert keys[0] not in cache  # the least recently used one left, not the new render
    assert keys[3] in cache and newcomer in cache


def test_an_entry_larger_than_the_bound_is_returned_but_never_stored(cache) -> None:
    key = cache_key("very long")
    audio = tone(key, 60000)  # 120 KB > 100 KB
    with cache.put(key, audio, 16000) as entry:
        assert not entry.stored
        np.testing.assert_array_equal(entry.array, audio)
        assert key not in cache
    rendered = cache.get_or_render(key, lambda w: w.write(audio), samplerate=16000)
    with rendered:
        assert not rendered.stored
        np.testing.assert_array_equal(rendered.array, audio)
    assert cache.stats().entries == 0
    cache.clear()
    assert [n for n in os.listdir(cache.directory) if n.endswith(".wav")] == []


def _files_of(directory: str) -> dict[str, int]:
    """The entries in a tier's directory: {file name: size}."""
    names = [n for n in os.listdir(directory) if n != "lock" and not n.startswith(".")]
    return {n: os.lstat(f"{directory}/{n}").st_size for n in names}


def _store(cache: AudioCache, how: str, key: str, frames: int, **kwargs: Any) -> CachedAudio:
    """key's audio of that many frames, stored by put (a WAV) or put_bytes (an MP3's
    bytes of the same size)."""
    audio = tone(key, frames)
    if how == "put":
        return cache.put(key, audio, 16000, **kwargs)
    return cache.put_bytes(key, audio.tobytes(), ".mp3", **kwargs)


@pytest.mark.parametrize("how", ["put", "put_bytes"])
@pytest.mark.parametrize("older", ["in RAM", "on the disk tier", "evicted by the put",
                                   "held"])
def test_a_put_too_large_to_store_leaves_the_key_a_miss_in_both_tiers(
        private_dirs, tmp_path, how: str, older: str) -> None:
    # Found in review: the put returned stored=False and left the key's older entry,
    # which every later get returned (reloaded from the disk tier too), though a put
    # stores its data "replacing any".
    disk = tmp_path
    key = cache_key("said again, at length")
    with AudioCache("unstored", max_bytes=20_000, disk_dir=disk) as cache:
        disk_tier = f"{disk}/luna_cache-{os.geteuid()}-unstored"
        held = _store(cache, how, key, 2400)
        if older != "held":
            held.release()
        pins: list[CachedAudio] = []
        if older == "on the disk tier":  # 4 more entries of 4.8 KB: the oldest spills
            for i in range(4):
                other = cache_key(f"filler {i}")
                cache.put(other, tone(other, 2400), 16000).release()
            assert key not in cache and any(n.startswith(key) for n in _files_of(disk_tier))
        if older == "evicted by the put":  # the put's room is made by spilling it
            for i in range(2):
                other = cache_key(f"pinned {i}")
                pins.append(cache.put(other, tone(other, 3600), 16000))
        size = 30_000 if older != "evicted by the put" else 4500  # > max_bytes, or no room
        with _store(cache, how, key, size) as big:
            assert not big.stored
        assert key not in cache
        assert cache.get(key) is None  # no older audio in RAM, none reloaded from disk
        if older == "held":  # its holder keeps reading it; it is never looked up again
            expected = tone(key, 2400)
            got = held.array if how == "put" else np.frombuffer(held.read_bytes(), np.int16)
            np.testing.assert_array_equal(got, expected)
            del got  # its mapping pins the entry too
            held.release()
            assert cache.get(key) is None  # and this look-up removes it, unheld now
        for pin in pins:
            pin.release()
        # The counts agree with the files of both tiers.
        stats = cache.stats()
        ram_files, disk_files = _files_of(cache.directory), _files_of(disk_tier)
        assert not [n for n in [*ram_files, *disk_files] if n.startswith(key)]
        assert (stats.entries, stats.bytes) == (len(ram_files), sum(ram_files.values()))
        assert cache._ram.counters()[0] == stats.bytes  # the RAM tier's shared byte count
        assert (stats.disk_entries, stats.disk_bytes) == (len(disk_files),
                                                          sum(disk_files.values()))
        cache.destroy()


def test_unstored_audio_and_its_note_are_removed_once_no_one_holds_it(cache) -> None:
    for i in range(5):
        key = cache_key(f"too large {i}")
        with cache.put(key, tone(key, 60_000), 16000) as entry:
            assert not entry.stored and os.path.exists(entry.path)
        assert sorted(os.listdir(cache.directory)) == ["lock"]
    for i in range(3):
        key = cache_key(f"too large render {i}")
        entry = cache.get_or_render(key, lambda w, key=key: w.write(tone(key, 60_000)),
                                    samplerate=16000)
        assert not entry.stored and f"{key}.outcome" in os.listdir(cache.directory)
        array = entry.array
        entry.release()
        assert sorted(os.listdir(cache.directory)) == ["lock"]
        np.testing.assert_array_equal(array, tone(key, 60_000))  # its mapping keeps it


def test_unstored_audio_stays_while_another_process_holds_it(cache) -> None:
    key = cache_key("too large, held twice")
    entry = cache.put(key, tone(key, 60_000), 16000)
    # Another holder, as a waiter of its render holds it: a shared flock on the file.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'rb'); "
         "fcntl.flock(f, fcntl.LOCK_SH); print('held', flush=True); sys.stdin.readline()",
         entry.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        entry.release()
        assert os.path.exists(entry.path)  # the other holder's flock keeps it
    finally:
        holder.communicate("\n", timeout=60)
    # Its last holder gone without releasing it through the cache: the next look for
    # room removes it.
    for text in ("fits", "fits too, once the first goes"):
        key = cache_key(text)
        cache.put(key, tone(key, 30_000), 16000).release()
    assert sorted(os.listdir(cache.directory)) == [f"{key}.wav", "lock"]


def test_pinned_entries_survive_eviction_pressure_and_discard_and_clear(cache) -> None:
    pinned_key = cache_key("pinned")
    pinned_audio = tone(pinned_key, 20000)
    pin = cache.put(pinned_key, pinned_audio, 16000)
    for i in range(30):
        key = cache_key(f"pressure {i}")
        cache.put(key, tone(key, 10000), 16000).release()
        assert cache.stats().bytes <= cache.max_bytes
    assert not cache.discard(pinned_key)
    cache.clear()
    assert pinned_key in cache
    np.testing.assert_array_equal(pin.array, pinned_audio)
    pin.release()
    assert cache.discard(pinned_key) and pinned_key not in cache


def test_when_every_entry_is_pinned_a_new_one_is_not_stored(cache) -> None:
    pins = []
    for i in range(4):
        key = cache_key(f"full {i}")
        pins.append(cache.put(key, tone(key, 12000), 16000))
    key = cache_key("no room")
    with cache.put(key, tone(key, 12000), 16000) as entry:
        assert not entry.stored
    assert cache.stats().bytes <= cache.max_bytes
    for pin in pins:
        pin.release()


def test_expired_entries_are_misses_and_get_rendered_again(private_dirs) -> None:
    with AudioCache("ttl", ttl=60) as cache:
        key = cache_key("weather intro")
        cache.put(key, tone(key), 16000).release()
        with cache.get(key) as hit:
            past = os.stat(hit.path).st_mtime - 61  # stored 61 s ago, without sleeping
            os.utime(hit.path, (past, past))
        assert cache.get(key) is None
        assert key not in cache
        renders = []
        with cache.get_or_render(key, lambda w: (renders.append(1), w.write(tone(key))),
                                 samplerate=16000) as fresh:
            np.testing.assert_array_equal(fresh.array, tone(key))
        assert renders == [1]
        cache.destroy()


def test_an_expired_entry_a_caller_still_holds_is_rendered_again_and_replaced(
        private_dirs) -> None:
    with AudioCache("ttl", ttl=60) as cache:
        key = cache_key("held past its time")
        held = cache.put(key, tone(key), 16000)  # a player still holds it
        past = os.stat(held.path).st_mtime - 61  # stored 61 s ago, without sleeping
        os.utime(held.path, (past, past))
        fresh = tone(key)[::-1].copy()
        renders: list[int] = []

        def render(writer) -> None:
            renders.append(1)
            writer.write(fresh)

        with held, call_with_deadline(lambda: cache.get_or_render(
                key, render, samplerate=16000, timeout=5), deadline=30) as entry:
            assert renders == [1] and entry.stored
            np.testing.assert_array_equal(entry.array, fresh)
            np.testing.assert_array_equal(held.array, tone(key))  # the holder's, intact
        with cache.get(key) as hit:
            np.testing.assert_array_equal(hit.array, fresh)
        assert cache.stats().bytes == os.path.getsize(hit.path)


def test_a_render_that_raises_or_writes_nothing_is_not_stored_and_the_next_caller_renders(
        cache) -> None:
    key = cache_key("flaky")

    def broken(writer) -> None:
        writer.write(tone(key)[:100])
        raise ConnectionError("TTS server went away")

    with pytest.raises(ConnectionError, match="went away"):
        cache.get_or_render(key, broken, samplerate=16000)
    assert cache.get(key) is None
    with pytest.raises(ValueError, match="wrote no frames: not cached"):
        cache.get_or_render(key, lambda writer: None, samplerate=16000)
    assert cache.get(key) is None
    with cache.get_or_render(key, lambda w: w.write(tone(key)), samplerate=16000) as good:
        np.testing.assert_array_equal(good.array, tone(key))
    assert [n for n in os.listdir(cache.directory) if n.endswith((".live", ".part"))] == []


@pytest.mark.parametrize("then_raise", [False, True], ids=["closes", "closes-then-raises"])
def test_a_render_that_closes_its_writer_keeps_its_audio_and_its_waiters(cache,
                                                                          then_raise) -> None:
    # Render functions commonly write inside `with writer:`. The cache keeps its own
    # descriptor of the file (and so the render's flock): a waiter sleeps on until the
    # render is stored or failed, and then gets what any waiter gets.
    key = cache_key("closes its writer")
    closed, go_on = threading.Event(), threading.Event()
    waiter_rendered: list[str] = []

    def render(writer) -> None:
        with writer:
            writer.write(tone(key))
        closed.set()
        go_on.wait(30)
        if then_raise:
            raise ConnectionError("TTS server went away after the last chunk")

    def waiter_render(writer) -> None:
        waiter_rendered.append(key)
        writer.write(tone(key, 10))

    outcomes: dict[str, object] = {}

    def call(who: str, into) -> None:
        try:
            with cache.get_or_render(key, into, samplerate=16000) as entry:
                outcomes[who] = entry.array.copy()
        except BaseException as exc:
            outcomes[who] = exc

    renderer = threading.Thread(target=call, args=("renderer", render))
    renderer.start()
    assert closed.wait(30)
    live = cache.live_path(key)
    assert live is not None
    inode = os.stat(live).st_ino
    waiter = threading.Thread(target=call, args=("waiter", waiter_render))
    waiter.start()
    waited = wait_until_someone_waits_for_flock(live, inode, waiter.is_alive)
    go_on.set()
    renderer.join(30)
    waiter.join(30)
    assert waited, outcomes  # the close did not let the waiter go (nor elect it)
    assert waiter_rendered == []
    if then_raise:
        assert isinstance(outcomes["renderer"], ConnectionError), outcomes
        assert isinstance(outcomes["waiter"], RenderError), outcomes
        assert "went away after the last chunk" in str(outcomes["waiter"])
        assert cache.get(key) is None
    else:
        np.testing.assert_array_equal(outcomes["renderer"], tone(key))
        np.testing.assert_array_equal(outcomes["waiter"], tone(key))
        with cache.get(key) as entry:
            np.testing.assert_array_equal(entry.array, tone(key))
    assert cache.stats().renders == 1
    assert [n for n in os.listdir(cache.directory) if n.endswith((".live", ".part"))] == []


@pytest.mark.parametrize("then_raise", [False, True], ids=["closes", "closes-then-raises"])
def test_a_render_that_closes_its_writer_ends_its_followers_stream_only_when_it_returns(
        cache, then_raise) -> None:
    # A follower (a player) of a render that wrote inside `with writer:` and then raised
    # was shown a finished stream at the close: it played the audio as complete, while
    # the render failed and nothing was stored. The stream now ends when render returns:
    # as finished when it is stored, as abandoned when the render raised.
    key = cache_key("closes, and only then fails")
    closed, go_on = threading.Event(), threading.Event()
    inside: dict[str, object] = {}

    def render(writer) -> None:
        with writer:
            writer.write(tone(key))
        inside["closed"] = writer.closed
        try:
            writer.write(tone(key, 10))
        except ValueError as exc:
            inside["write after close"] = str(exc)
        closed.set()
        go_on.wait(30)
        if then_raise:
            raise ConnectionError("TTS server went away after the last chunk")

    outcomes: dict[str, object] = {}

    def call() -> None:
        try:
            cache.get_or_render(key, render, samplerate=16000).release()
        except BaseException as exc:
            outcomes["renderer"] = exc

    def follow(blocks: list[np.ndarray]) -> None:
        try:
            for block in cache.follow(key, timeout=30):
                blocks.append(block)
                followed.set()
            outcomes["follower"] = "finished"
        except BaseException as exc:
            outcomes["follower"] = exc

    renderer = threading.Thread(target=call)
    renderer.start()
    assert closed.wait(30)
    blocks: list[np.ndarray] = []
    followed = threading.Event()
    follower = threading.Thread(target=follow, args=(blocks,))
    follower.start()
    assert followed.wait(30)
    follower.join(0.5)
    # The close did not end the stream: the follower still waits for the render.
    assert follower.is_alive(), outcomes
    go_on.set()
    renderer.join(30)
    follower.join(30)
    assert inside == {"closed": True, "write after close": "I/O operation on closed WavWriter"}
    np.testing.assert_array_equal(np.concatenate(blocks), tone(key))
    if then_raise:
        assert isinstance(outcomes["renderer"], ConnectionError), outcomes
        assert isinstance(outcomes["follower"], luna_shm.StreamAbandoned), outcomes
        assert cache.get(key) is None
    else:
        assert outcomes == {"follower": "finished"}
        with cache.get(key) as entry:
            np.testing.assert_array_equal(entry.array, tone(key))


def test_threads_waiting_on_a_failing_render_get_a_render_error(cache) -> None:
    key = cache_key("fails for everyone")
    started, release = threading.Event(), threading.Event()

    def slow_failure(writer) -> None:
        writer.write(tone(key)[:100])
        started.set()
        release.wait(30)
        raise RuntimeError("engine crashed")

    outcomes: list[object] = []

    def call(render) -> None:
        try:
            with cache.get_or_render(key, render, samplerate=16000) as entry:
                outcomes.append(entry.array.copy())
        except BaseException as exc:
            outcomes.append(exc)

    renderer = threading.Thread(target=call, args=(slow_failure,))
    renderer.start()
    assert started.wait(30)
    waiters = [threading.Thread(target=call, args=(lambda w: w.write(tone(key)),))
               for _ in range(3)]
    for thread in waiters:
        thread.start()
    # Each waiter blocks on the renderer's flock (give them time to get there).
    threading.Event().wait(0.3)
    release.set()
    for thread in [renderer, *waiters]:
        thread.join(60)
        assert not thread.is_alive()
    crashed = [o for o in outcomes if type(o) is RuntimeError]
    waited = [o for o in outcomes if isinstance(o, RenderError)]
    assert len(crashed) == 1 and "engine crashed" in str(crashed[0])
    assert waited, outcomes
    for error in waited:
        assert "engine crashed" in str(error) and key in str(error)
    # A waiter that came only after the failure rendered for itself.
    for other in outcomes:
        if not isinstance(other, BaseException):
            np.testing.assert_array_equal(other, tone(key))
    with cache.get_or_render(key, lambda w: w.write(tone(key)), samplerate=16000) as entry:
        np.testing.assert_array_equal(entry.array, tone(key))


def fail_then_wait_for_a_success(cache: AudioCache, key: str) -> list[int]:
    """Render key and fail; then wait for a second render of it in a thread, which
    succeeds, and check that the wait gets its audio. The inodes of the two renders' files."""
    inodes: list[int] = []

    def fails(writer) -> None:
        inodes.append(os.fstat(writer.fileno()).st_ino)
        writer.write(tone(key)[:10])
        raise ConnectionError("engine unreachable")

    with pytest.raises(ConnectionError):
        cache.get_or_render(key, fails, samplerate=16000)
    started = threading.Event()

    def succeeds(writer) -> None:
        inodes.append(os.fstat(writer.fileno()).st_ino)
        started.set()
        threading.Event().wait(0.02)
        writer.write(tone(key))

    renderer = threading.Thread(
        target=lambda: cache.get_or_render(key, succeeds, samplerate=16000).release())
    renderer.start()
    assert started.wait(30)
    with cache.get_or_render(key, succeeds, samplerate=16000, timeout=30) as entry:
        np.testing.assert_array_equal(entry.array, tone(key))
    renderer.join(30)
    assert len(inodes) == 2  # the wait rendered nothing itself
    return inodes


def test_a_waiter_is_not_given_an_earlier_failure_on_a_disk_that_reuses_inode_numbers(
        private_dirs, monkeypatch) -> None:
    # No usable RAM disk: the cache lives in the disk temp dir (ext4 here, which gives a
    # new file the inode number of the one just removed). A failed render leaves a note
    # naming its file's inode for its waiters; the next render's file may get that number.
    monkeypatch.setenv("LUNA_SHM_DISABLE", "1")
    reused = 0
    with AudioCache(f"t{uuid.uuid4().hex[:8]}") as disk_cache:
        assert disk_cache.directory.startswith(private_dirs.fallback)
        for round_ in range(20):
            first, second = fail_then_wait_for_a_success(disk_cache, cache_key(f"{round_}"))
            reused += first == second
    if not reused:
        pytest.skip(f"{private_dirs.fallback}'s filesystem never reused an inode number")


def test_threads_asking_for_one_key_render_it_once(cache) -> None:
    key = cache_key("once")
    renders: list[int] = []
    gate = threading.Event()

    def render(writer) -> None:
        renders.append(1)
        gate.wait(0.2)
        for block in np.array_split(tone(key), 10):
            writer.write(block)

    results: list[np.ndarray] = []

    def caller() -> None:
        with cache.get_or_render(key, render, samplerate=16000) as entry:
            results.append(entry.array.copy())

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert renders == [1]
    assert len(results) == 8
    for audio in results:
        np.testing.assert_array_equal(audio, tone(key))


@contextlib.contextmanager
def render_in_flight(cache: AudioCache, key: str) -> Iterator[None]:
    """A thread renders key (one block written, then it waits) for the with block; at its
    end the render finishes and is stored."""
    started, release = threading.Event(), threading.Event()

    def slow(writer) -> None:
        writer.write(tone(key))
        started.set()
        release.wait(30)

    renderer = threading.Thread(
        target=lambda: cache.get_or_render(key, slow, samplerate=16000).release())
    renderer.start()
    try:
        assert started.wait(30)
        yield
    finally:
        release.set()
        renderer.join(30)


def test_a_wait_for_another_render_is_bounded_by_timeout(cache) -> None:
    key = cache_key("slow")
    with render_in_flight(cache, key):
        assert cache.live_path(key) is not None  # the hook follow_wav will use (issue 11)
        with pytest.raises(TimeoutError, match="waiting for another caller") as caught:
            call_with_deadline(lambda: cache.get_or_render(key, lambda w: w.write(tone(key)),
                                                           samplerate=16000, timeout=0.05))
        assert caught.value.errno == errno.ETIMEDOUT
    assert cache.live_path(key) is None


def test_get_or_render_with_timeout_0_takes_a_hit_and_renders_a_miss_without_waiting(
        cache) -> None:
    # "0 does not wait": it must still look. The loop checked its deadline before its
    # first look-up, so timeout=0 raised TimeoutError on a hit, and on a miss that no one
    # else was rendering.
    hit, miss = cache_key("stored"), cache_key("not stored")
    cache.put(hit, tone(hit), 16000).release()
    renders: list[str] = []

    def render(writer) -> None:
        renders.append("rendered")
        writer.write(tone(miss))

    with cache.get_or_render(hit, render, samplerate=16000, timeout=0) as entry:
        np.testing.assert_array_equal(entry.array, tone(hit))
    with cache.get_or_render(miss, render, samplerate=16000, timeout=0) as entry:
        np.testing.assert_array_equal(entry.array, tone(miss))
    assert renders == ["rendered"]
    slow = cache_key("slow")  # a wait for another caller's render still raises at once
    with (render_in_flight(cache, slow),
          pytest.raises(TimeoutError, match="waiting for another caller")):
        call_with_deadline(lambda: cache.get_or_render(slow, render, samplerate=16000,
                                                       timeout=0))


def test_encoded_entries_keep_their_bytes_and_suffix(cache) -> None:
    key = cache_key("cloud", engine="elevenlabs")
    mp3 = b"ID3\x04\x00" + bytes(range(256)) * 10
    with cache.put_bytes(key, mp3, suffix=".mp3") as entry:
        assert entry.path.endswith(f"{key}.mp3") and not entry.is_wav
    with cache.get(key) as hit:
        assert hit.read_bytes() == mp3
        with pytest.raises(ValueError, match="encoded audio, not a WAV"):
            _ = hit.array
    cache.put(key, tone(key), 16000).release()  # one entry per key: the WAV replaces it
    with cache.get(key) as hit:
        assert hit.is_wav and not os.path.exists(hit.path[:-4] + ".mp3")


def test_put_bytes_takes_any_bytes_like_view_even_a_strided_one_as_its_bytes_in_order(
        cache) -> None:
    key = cache_key("strided")
    data = bytes(range(200))
    strided = memoryview(np.frombuffer(data, dtype=np.uint8))[::2]  # not contiguous
    with cache.put_bytes(key, strided) as entry:
        assert entry.read_bytes() == data[::2]
    matrix = np.arange(12, dtype=np.int16).reshape(3, 4)
    with cache.put_bytes(key, memoryview(matrix.T)) as entry:  # Fortran order
        assert entry.read_bytes() == matrix.T.tobytes()
    with pytest.raises(ValueError, match="data is empty"):
        cache.put_bytes(key, memoryview(data)[::-1][:0])


def test_cleanup_all_temp_audio_never_touches_cache_entries(cache) -> None:
    key = cache_key("kept")
    cache.put(key, tone(key), 16000).release()
    luna_shm.write_wav(None, tone(key), 16000)  # an ordinary unused temp file
    assert luna_shm.cleanup_all_temp_audio() == 1
    assert key in cache
    with cache.get(key) as hit:
        np.testing.assert_array_equal(hit.array, tone(key))


def test_leftovers_of_a_crash_are_removed_when_the_cache_opens(cache, tmp_path) -> None:
    key = cache_key("crashed")
    directory = cache.directory
    for name in (f".{key}.{os.urandom(12).hex()}.part",
                 f".{key}.{os.urandom(12).hex()}.unstored.wav"):
        with open(f"{directory}/{name}", "wb") as f:
            f.write(b"RIFF half a file")
    # A dead renderer's .live file: a WavWriter's WAV, as it was when the process died.
    with luna_shm.WavWriter(tmp_path / "live.wav", 16000) as writer:
        writer.write(tone(key)[:100])
        with open(tmp_path / "live.wav", "rb") as f, open(f"{directory}/{key}.live", "wb") as g:
            g.write(f.read())
    with AudioCache(cache.name, max_bytes=100_000) as again:
        assert sorted(os.listdir(again.directory)) == ["lock"]
        assert again.get(key) is None
        with again.get_or_render(key, lambda w: w.write(tone(key)), samplerate=16000) as e:
            np.testing.assert_array_equal(e.array, tone(key))


FOREIGN_NAMES = ["backup.part", "song.live", "x.unstored.txt", "my-notes.outcome",
                 ".backup.1234.part", f"{'a' * 64}.outcome", f".{'b' * 64}.part.txt"]


def test_opening_clearing_and_destroying_never_remove_files_named_like_leftovers(
        cache) -> None:
    directory = cache.directory
    old = os.stat(directory).st_mtime - 3600  # older than the minute a note is kept
    for name in FOREIGN_NAMES:
        with open(f"{directory}/{name}", "w") as f:
            f.write("mine")
        os.utime(f"{directory}/{name}", (old, old))
    os.mkdir(f"{directory}/.{'c' * 64}.{os.urandom(12).hex()}.part")  # the shape, not a file
    AudioCache(cache.name).close()  # the sweep at open
    cache.clear()
    with pytest.raises(OSError, match=r"\(not the cache's\) and 5 more") as caught:
        cache.destroy()  # 8 names kept (7 files, a directory), 3 of them shown
    assert caught.value.errno == errno.ENOTEMPTY and not cache.closed
    assert str(caught.value).count("(not the cache's)") == 3
    for name in FOREIGN_NAMES:
        with open(f"{directory}/{name}") as f:
            assert f.read() == "mine"
    assert len(os.listdir(directory)) == len(FOREIGN_NAMES) + 2  # the directory, the lock


ODD_FILES = {
    "fifo .live": lambda path: os.mkfifo(path + ".live"),
    "fifo entry": lambda path: os.mkfifo(path + ".wav"),
    "symlink entry": lambda path: os.symlink("/etc/hostname", path + ".wav"),
    "old directory note": lambda path: (os.mkdir(path + ".outcome"),
                                        os.utime(path + ".outcome", (0, 0))),
}


@pytest.mark.parametrize("odd", list(ODD_FILES), ids=list(ODD_FILES))
def test_a_fifo_symlink_or_directory_named_like_the_cache_s_files_is_never_opened_or_removed(
        cache, odd) -> None:
    key = cache_key(f"odd {odd}")
    ODD_FILES[odd](f"{cache.directory}/{key}")
    before = sorted(os.listdir(cache.directory))
    call_with_deadline(lambda: AudioCache(cache.name).close(), deadline=30)  # sweeps
    assert call_with_deadline(lambda: cache.get(key), deadline=30) is None
    assert key not in cache.entries() and cache.stats().entries == 0
    if odd == "fifo .live":  # no render ever ends that one: refused, naming it
        with pytest.raises(FileExistsError, match=rf"cannot render '{key}': a file that is "
                                                  "not the cache's has the name of its "
                                                  "render") as caught:
            call_with_deadline(lambda: cache.get_or_render(
                key, lambda w: w.write(tone(key)), samplerate=16000), deadline=30)
        assert caught.value.filename == f"{cache.directory}/{key}.live"
    else:  # rendered, but kept beside it, never renamed over it
        entry = call_with_deadline(lambda: cache.get_or_render(
            key, lambda w: w.write(tone(key)), samplerate=16000), deadline=30)
        with entry:
            assert entry.stored == (odd == "old directory note")
            np.testing.assert_array_equal(entry.array, tone(key))
        cache.discard(key)
    cache.clear()
    assert set(before) <= set(os.listdir(cache.directory))  # with an unstored render's note
    odd_file = next(name for name in before if name != "lock")
    assert not stat.S_ISREG(os.lstat(f"{cache.directory}/{odd_file}").st_mode)


def test_counters_are_shared_by_every_instance_of_a_name(cache) -> None:
    key = cache_key("counted")
    cache.put(key, tone(key), 16000).release()
    with AudioCache(cache.name) as other:
        other.get(key).release()
        assert other.get(cache_key("absent")) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    with AudioCache(cache.name) as third:  # a later process sees them too
        assert (third.stats().hits, third.stats().misses) == (1, 1)


def test_a_held_entry_warns_when_leaked_and_works_in_with(cache) -> None:
    key = cache_key("leak")
    entry = cache.put(key, tone(key), 16000)
    with pytest.warns(ResourceWarning, match="unclosed CachedAudio"):
        del entry
        import gc
        gc.collect()
    with cache.get(key) as hit:
        assert not hit.closed
    assert hit.closed
    hit.release()  # again: nothing


def test_destroy_removes_the_cache_directory(private_dirs) -> None:
    cache = AudioCache("gone")
    key = cache_key("x")
    cache.put(key, tone(key), 16000).release()
    cache.destroy()
    assert os.listdir(private_dirs.ram) == []


def test_the_command_line_shows_lists_and_clears_a_cache(private_dirs) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LUNA_SHM_DISABLE"}
    env.update(LUNA_SHM_DIR=private_dirs.ram, TMPDIR=private_dirs.fallback,
               PYTHONPATH=LIBRARY_PATH)

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "luna_shm", "cache", *args],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    with AudioCache("cli") as cache:
        keys = [cache_key(f"cli {i}") for i in range(2)]
        for key in keys:
            cache.put(key, tone(key), 16000).release()
        held = cache.get(keys[0])
        stats = json.loads(run("stats", "--name", "cli", "--json"))
        assert (stats["entries"], stats["pinned"]) == (2, 1)
        listed = run("ls", "--name", "cli")
        assert all(key in listed for key in keys)
        assert "removed 1 entry" in run("clear", "--name", "cli")
        assert keys[0] in cache and keys[1] not in cache
        held.release()
        assert "entries: 1" in run("stats", "--name", "cli")
        cache.put(keys[1], tone(keys[1]), 16000).release()
        assert "removed 2 entries from cache 'cli'" in run("clear", "--name", "cli")
        cache.destroy()


def test_a_cache_left_open_warns_and_closes_its_lock_file(private_dirs) -> None:
    cache = AudioCache("leaky")
    lock_path = f"{cache.directory}/lock"

    def lock_files_open() -> int:
        found = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                found += os.readlink(f"/proc/self/fd/{fd}") == lock_path
            except OSError:
                pass
        return found

    assert lock_files_open() == 1
    with pytest.warns(ResourceWarning, match="unclosed AudioCache 'leaky'"):
        del cache
        import gc
        gc.collect()
    assert lock_files_open() == 0
    AudioCache("leaky").destroy()


def test_numpy_numbers_are_taken_wherever_the_cache_takes_a_number(private_dirs,
                                                                   tmp_path) -> None:
    (tmp_path / "disk").mkdir()
    for n, (integer, real) in enumerate([(np.int64, np.float64), (np.int32, np.float32),
                                         (np.uint32, np.float16)]):
        for ttl in (integer(60), real(60)):
            with AudioCache(f"np{n}", max_bytes=integer(100_000), ttl=ttl,
                            disk_dir=tmp_path / "disk",
                            disk_max_bytes=integer(200_000)) as cache:
                assert (cache.max_bytes, cache.ttl) == (100_000, 60)
                assert type(cache.max_bytes) is int and type(cache.ttl) in (int, float)
                key = cache_key("numpy", n=n)
                with cache.get_or_render(key, lambda w: w.write(tone(key)),  # noqa: B023
                                         samplerate=integer(16000), channels=integer(1),
                                         timeout=real(5)) as entry:
                    assert entry.samplerate == 16000
                for timeout in (integer(5), real(0.5), real("inf")):
                    assert len(list(cache.follow(key, timeout=timeout))) == 1
                    cache.get_or_render(key, print, samplerate=16000, timeout=timeout).release()
                cache.put(key, tone(key), integer(8000)).release()
                with cache.get(key) as hit:
                    assert hit.samplerate == 8000
                cache.destroy()


@pytest.mark.parametrize(("timeout", "error", "message"), [
    ("1", TypeError, "timeout must be None or a number of seconds, got '1'"),
    (True, TypeError, "timeout must be None or a number of seconds, got True"),
    (np.bool_(False), TypeError, "timeout must be None or a number of seconds, got"),
    (float("nan"), ValueError, "timeout must be None or >= 0 seconds, got nan"),
    (-1, ValueError, "timeout must be None or >= 0 seconds, got -1"),
    (np.float32(-0.5), ValueError,
     r"timeout must be None or >= 0 seconds, got np.float32\(-0.5\)"),
    (-(10**5000), ValueError,
     "timeout must be None or >= 0 seconds, got a negative int of 16610 bits"),
], ids=["str", "bool", "numpy bool", "nan", "negative", "negative numpy", "huge negative"])
def test_a_bad_timeout_is_refused_before_anything_else_happens(cache, timeout, error,
                                                                 message) -> None:
    key = cache_key("timeout")
    rendered: list[int] = []
    with pytest.raises(error, match=message):
        cache.get_or_render(key, lambda w: rendered.append(1), samplerate=16000,
                            timeout=timeout)
    with pytest.raises(error, match=message):
        cache.follow(key, timeout=timeout)  # at the call, not at the first block
    assert rendered == [] and cache.live_path(key) is None
    cache.put(key, tone(key), 16000).release()
    with pytest.raises(error, match=message):  # a hit too
        cache.get_or_render(key, lambda w: rendered.append(1), samplerate=16000,
                            timeout=timeout)


def test_get_or_render_checks_its_format_on_a_hit_too(cache) -> None:
    key = cache_key("format")
    cache.put(key, tone(key), 16000).release()
    with pytest.raises(ValueError, match="samplerate must be between 1 and 4294967295, got 0"):
        cache.get_or_render(key, print, samplerate=0)
    with pytest.raises(TypeError, match="channels must be an int, got '2'"):
        cache.get_or_render(key, print, samplerate=16000, channels="2")  # type: ignore[arg-type]


@pytest.mark.parametrize("render", [None, "render", 3], ids=["None", "str", "int"])
def test_get_or_render_refuses_a_render_that_is_not_callable_before_anything_else(
        cache, render) -> None:
    key = cache_key("not callable")
    with pytest.raises(TypeError, match=f"render must be a callable .*, got {render!r}"):
        cache.get_or_render(key, render, samplerate=16000)  # type: ignore[arg-type]
    cache.put(key, tone(key), 16000).release()  # on a hit too
    with pytest.raises(TypeError, match=f"render must be a callable .*, got {render!r}"):
        cache.get_or_render(key, render, samplerate=16000)  # type: ignore[arg-type]
    assert sorted(os.listdir(cache.directory)) == sorted(["lock", f"{key}.wav"])
    assert cache.stats().renders == 0


@pytest.mark.parametrize(("disk_dir", "error", "message"), [
    (3, TypeError, "disk_dir must be a str or os.PathLike.str., got 3"),
    (b"/tmp", TypeError, r"disk_dir must be a str or os.PathLike.str., got b'/tmp'"),
    ("", ValueError, "disk_dir must name a directory, got ''"),
], ids=["int", "bytes", "empty"])
def test_a_bad_disk_dir_is_named_and_leaves_nothing(private_dirs, disk_dir, error,
                                                    message) -> None:
    with pytest.raises(error, match=message):
        AudioCache("baddisk", disk_dir=disk_dir)
    assert os.listdir(private_dirs.ram) == []


def test_every_method_of_a_closed_cache_raises_value_error(private_dirs) -> None:
    cache = AudioCache("shut")
    key = cache_key("shut")
    cache.put(key, tone(key), 16000).release()
    assert not cache.closed
    cache.close()
    assert cache.closed
    calls = {
        "get": lambda: cache.get(key),
        "in": lambda: key in cache,
        "put": lambda: cache.put(key, tone(key), 16000),
        "put_bytes": lambda: cache.put_bytes(key, b"mp3"),
        "get_or_render": lambda: cache.get_or_render(key, print, samplerate=16000),
        "follow": lambda: cache.follow(key),
        "live_path": lambda: cache.live_path(key),
        "discard": lambda: cache.discard(key),
        "clear": cache.clear,
        "stats": cache.stats,
        "entries": cache.entries,
        "destroy": cache.destroy,
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="I/O operation on closed AudioCache 'shut'"):
            call()
            pytest.fail(f"{name} worked on a closed cache")
    cache.close()  # again: nothing
    with AudioCache("shut") as again:
        assert key in again
        again.destroy()


def test_destroy_after_a_failed_render_removes_its_note_and_closes_cleanly(
        private_dirs) -> None:
    cache = AudioCache("failed")
    key = cache_key("hi")
    with pytest.raises(ValueError, match="wrote no frames"):
        cache.get_or_render(key, lambda w: None, samplerate=16000)
    assert f"{key}.outcome" in os.listdir(cache.directory)  # the note for its waiters
    cache.destroy()
    assert os.listdir(private_dirs.ram) == []
    assert cache.closed
    with pytest.raises(ValueError, match="closed AudioCache 'failed'"):
        cache.stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del cache
        gc.collect()  # no "unclosed AudioCache"


def test_destroy_refuses_a_pinned_entry_or_a_file_not_its_own_and_stays_usable(
        private_dirs) -> None:
    cache = AudioCache("kept")
    key, other = cache_key("pinned"), cache_key("unpinned")
    cache.put(other, tone(other), 16000).release()
    pin = cache.put(key, tone(key), 16000)
    with pytest.raises(OSError, match=rf"{key}\.wav \(pinned\) \(the cache stays open\)"
                       ) as caught:
        cache.destroy()
    assert caught.value.errno == errno.ENOTEMPTY and caught.value.filename == cache.directory
    assert not cache.closed and cache.stats().entries == 1 and other not in cache
    pin.release()
    foreign = f"{cache.directory}/my-notes.outcome"  # named like a note, but not one
    with open(foreign, "w") as f:
        f.write("mine")
    with pytest.raises(OSError, match=r"my-notes\.outcome \(not the cache's\)") as caught:
        cache.destroy()
    assert caught.value.errno == errno.ENOTEMPTY
    with open(foreign) as f:
        assert f.read() == "mine"
    os.unlink(foreign)
    assert key not in cache  # unpinned by then: the failed destroy cleared it
    with cache.put(key, tone(key), 16000), cache.get(key) as hit:  # still usable
        np.testing.assert_array_equal(hit.array, tone(key))
    cache.destroy()
    assert cache.closed and os.listdir(private_dirs.ram) == []


def test_destroy_refuses_while_a_render_is_in_flight(cache) -> None:
    key = cache_key("in flight")
    with render_in_flight(cache, key), \
            pytest.raises(OSError, match=rf"{key}\.live \(being rendered\)"):
        cache.destroy()
    assert key in cache


@pytest.mark.parametrize("named", ["as itself", "through a symlink"])
def test_a_disk_dir_that_is_the_ram_dir_itself_is_refused_naming_it(private_dirs, tmp_path,
                                                                     named) -> None:
    disk_dir = private_dirs.ram
    if named == "through a symlink":
        disk_dir = str(tmp_path / "disk")
        os.symlink(private_dirs.ram, disk_dir)
    with pytest.raises(ValueError, match=rf"disk_dir must be another directory than the "
                                         rf"RAM dir .*, got '{re.escape(disk_dir)}'"):
        call_with_deadline(lambda: AudioCache("same", max_bytes=9000, disk_dir=disk_dir,
                                              ).put(cache_key("a"), tone("a"), 16000),
                           deadline=30)
    assert os.listdir(private_dirs.ram) == []


def test_a_put_replaces_the_key_s_entry_on_disk_too_so_a_restart_never_brings_it_back(
        private_dirs, tmp_path) -> None:
    key, other = cache_key("replaced"), cache_key("pushes it out")
    old, new = tone(key, 3000), tone(key, 3000)[::-1].copy()
    with AudioCache("spill", max_bytes=7000, disk_dir=tmp_path) as cache:
        cache.put(key, old, 16000).release()
        cache.put(other, tone(other, 3000), 16000).release()  # evicts key: spilled
        cache.put(key, new, 16000).release()  # the new audio of key (evicts other)
        ram = cache.directory
        assert cache.stats().disk_entries == 1  # other's: key's new audio was never spilled
    shutil.rmtree(ram)  # a reboot: the RAM disk is empty again
    with AudioCache("spill", max_bytes=7000, disk_dir=tmp_path) as cache:
        assert cache.get(key) is None  # a miss, never the audio the put replaced
        with cache.get(other) as entry:
            np.testing.assert_array_equal(entry.array, tone(other, 3000))


def test_a_key_spilled_as_wav_then_as_encoded_audio_gets_the_later_one(private_dirs,
                                                                       tmp_path) -> None:
    key, other = cache_key("wav, then mp3"), cache_key("pushes it out")
    mp3 = b"ID3 the newer audio " * 300
    with AudioCache("spill", max_bytes=7000, disk_dir=tmp_path) as cache:
        cache.put(key, tone(key, 3000), 16000).release()
        cache.put(other, tone(other, 3000), 16000).release()  # key.wav spilled
        cache.put_bytes(key, mp3, ".mp3").release()
        cache.put(other, tone(other, 3000), 16000).release()  # key.mp3 spilled too
        assert key not in cache
        with cache.get(key) as entry:  # reloaded from disk
            assert entry.path.endswith(".mp3") and entry.read_bytes() == mp3


@pytest.mark.parametrize("fault", ["missing disk dir", "refused disk dir"])
def test_a_failed_constructor_leaves_nothing_it_made_and_keeps_what_was_there(
        private_dirs, tmp_path, fault) -> None:
    disk = tmp_path / "disk"
    if fault == "refused disk dir":
        os.makedirs(disk / f"luna_cache-{os.geteuid()}-made", mode=0o700)
        os.chmod(disk / f"luna_cache-{os.geteuid()}-made", 0o770)
    with pytest.raises(OSError):
        AudioCache("made", disk_dir=disk)
    assert os.listdir(private_dirs.ram) == []
    if fault == "refused disk dir":  # not ours: it stays
        assert os.listdir(disk) == [f"luna_cache-{os.geteuid()}-made"]
    # A cache of that name already open elsewhere keeps its directory and entries.
    with AudioCache("made") as existing:
        key = cache_key("existing")
        existing.put(key, tone(key), 16000).release()
        with pytest.raises(OSError):
            AudioCache("made", disk_dir=disk)
        assert key in existing and existing.stats().entries == 1
        existing.destroy()


@pytest.mark.parametrize("empty", [np.zeros(0, np.int16), np.zeros((0, 2), np.float32), []],
                         ids=["mono", "stereo", "list"])
def test_put_refuses_audio_with_no_frames_as_get_or_render_and_put_bytes_do(cache,
                                                                              empty) -> None:
    key = cache_key("silence")
    with pytest.raises(ValueError, match=r"data has no frames \(got .*\): an empty render is "
                                         "never cached"):
        cache.put(key, empty, 16000)
    assert key not in cache and sorted(os.listdir(cache.directory)) == ["lock"]



CORRUPT = {
    "emptied": "os.truncate(path, 0)",
    "header cut": "os.truncate(path, 30)",
    "samples cut": "os.truncate(path, os.path.getsize(path) - 100)",
    "header overwritten": "fd = os.open(path, os.O_WRONLY); os.pwrite(fd, b'junk' * 8, 0)",
}


@pytest.mark.parametrize("damage", list(CORRUPT), ids=list(CORRUPT))
def test_get_or_render_renders_again_over_an_entry_another_process_damaged(
        cache, caplog, damage) -> None:
    key = cache_key(f"damaged {damage}")
    cache.put(key, tone(key), 16000).release()
    path = f"{cache.directory}/{key}.wav"
    subprocess.run([sys.executable, "-c", f"import os; path = {path!r}; {CORRUPT[damage]}"],
                   check=True, timeout=60)
    held = cache.get(key)
    assert held is not None
    with pytest.raises(luna_shm.WavError, match=re.escape(path)):
        held.array  # noqa: B018 -- get() hands out what is stored, as it is
    # Held by a caller, the damaged entry cannot go: get_or_render says why.
    with held, pytest.raises(luna_shm.WavError, match=re.escape(path)):
        cache.get_or_render(key, lambda w: w.write(tone(key)), samplerate=16000)
    renders: list[int] = []

    def render(writer) -> None:
        renders.append(1)
        writer.write(tone(key))

    with caplog.at_level("WARNING", logger="luna_shm"), \
            cache.get_or_render(key, render, samplerate=16000) as entry:
        np.testing.assert_array_equal(entry.array, tone(key))
    assert renders == [1]
    [message] = [record.getMessage() for record in caplog.records]
    assert message.startswith(f"luna_shm: removed the unreadable cache entry {path} (")
    assert message.endswith("); rendering it again")
    with cache.get(key) as again:  # stored whole this time
        np.testing.assert_array_equal(again.array, tone(key))


@pytest.mark.parametrize("first", ["wav", "mp3"])
def test_a_new_entry_of_another_type_replaces_a_held_one_for_every_later_look_up(
        cache, first) -> None:
    key = cache_key("said again by another engine")
    mp3 = b"ID3 the cloud's audio " * 100

    def store(kind: str) -> CachedAudio:
        return (cache.put(key, tone(key), 16000) if kind == "wav"
                else cache.put_bytes(key, mp3, ".mp3"))

    held = store(first)  # a player holds the old entry (its pin: a shared flock)
    old_path, old_bytes = held.path, held.read_bytes()
    # Stored "later" than the new one will be, as within one tick of the file clock, or
    # after the clock stepped back: the new one must win all the same.
    os.utime(old_path, ns=(time.time_ns(), time.time_ns() + 10**10))
    with store("mp3" if first == "wav" else "wav") as new:
        assert new.stored
        newer = new.path
    with cache.get(key) as hit:  # the new audio, never the held old one's
        assert hit.path == newer
    with open(old_path, "rb") as played:  # the holder's file stays, whole, under its name
        assert played.read() == old_bytes
    held.release()
    with cache.get(key) as hit:
        assert hit.path == newer
    # Once no one holds it, the old one goes: at the first look-up that comes to it (a
    # WAV is looked for first), else at the key's next commit (or as it is evicted).
    if first == "mp3":
        assert os.path.exists(old_path)
        cache.put(key, tone(key), 16000).release()
    assert sorted(os.listdir(cache.directory)) == [os.path.basename(newer), "lock"]
    assert cache.stats().entries == 1


def test_in_says_true_only_for_an_entry_get_would_hand_out(private_dirs, tmp_path) -> None:
    with AudioCache("contains", ttl=60) as cache:
        expired, linked, fifo, folder = (cache_key(f"in {i}") for i in range(4))
        held = cache.put(expired, tone(expired), 16000)  # held: the look-up cannot remove it
        past = os.stat(held.path).st_mtime - 61  # stored 61 s ago, without sleeping
        os.utime(held.path, (past, past))
        elsewhere = tmp_path / "elsewhere.wav"
        elsewhere.write_bytes(b"RIFF")
        os.symlink(elsewhere, f"{cache.directory}/{linked}.wav")
        os.mkfifo(f"{cache.directory}/{fifo}.wav")
        os.mkdir(f"{cache.directory}/{folder}.wav")
        for key in (expired, linked, fifo, folder):
            assert cache.get(key) is None
            assert key not in cache, key
        held.release()
        cache.clear()
        os.unlink(f"{cache.directory}/{linked}.wav")
        os.unlink(f"{cache.directory}/{fifo}.wav")
        os.rmdir(f"{cache.directory}/{folder}.wav")
        cache.destroy()


@pytest.mark.parametrize(("timeout", "error"), [(-1, ValueError), (float("nan"), ValueError),
                                                ("1", TypeError), (True, TypeError)])
def test_get_refuses_a_timeout_that_is_not_seconds_naming_it(private_dirs, timeout: object,
                                                             error: type[Exception]) -> None:
    with AudioCache("bad-timeout") as cache:
        with pytest.raises(error, match="timeout"):
            cache.get(cache_key("x"), timeout=timeout)
        cache.destroy()


def _look_at_a_cache_whose_lock_file_is_read_only(directory: str) -> dict[str, object]:
    """As uid 65534, in directory (its own): a cache whose lock file is then made 0444
    (a monitoring account's view), looked at through the CLI and the API."""
    from luna_shm import cli

    os.environ["LUNA_SHM_DIR"] = directory
    key = cache_key("watched")
    with AudioCache("watched") as cache:
        cache.put(key, np.arange(100, dtype=np.int16), 24000).release()
        lock = f"{cache.directory}/lock"
    os.chmod(lock, 0o444)
    out: dict[str, object] = {"lock": lock}
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        out["cli"] = [cli.main(["cache", "stats", "--name", "watched", "--json"]),
                      cli.main(["cache", "ls", "--name", "watched"])]
    out["shown"] = shown.getvalue()
    with AudioCache("watched") as cache:
        out["entries"] = [k for k, _, _ in cache.entries()]
        with cache.get(key) as hit:
            out["hit"] = hit.array[:3].tolist()
        for what, change in (("put", lambda: cache.put(key, np.ones(9, np.int16), 24000)),
                             ("discard", lambda: cache.discard(key))):
            try:
                change()
            except PermissionError as exc:
                out[what] = [exc.errno, exc.filename, str(exc)]
    out["files"] = sorted(os.listdir(os.path.dirname(lock)))
    return out


def test_a_cache_whose_lock_file_is_read_only_to_its_user_can_be_looked_at(ram) -> None:
    _, readable = closed_and_readable_dirs(str(ram))
    out: Any = as_other_user(_look_at_a_cache_whose_lock_file_is_read_only, readable)
    key = cache_key("watched")
    # Found in review: PermissionError (EACCES) naming the lock file, from the open.
    assert out["cli"] == [0, 0]
    stats, listing = out["shown"].split("\n", 1)
    assert json.loads(stats)["entries"] == 1 and listing.startswith(key)
    assert out["entries"] == [key] and out["hit"] == [0, 1, 2]
    for what in ("put", "discard"):  # refused before anything is touched, saying why
        assert out[what][:2] == [errno.EACCES, out["lock"]]
        assert "can only be looked at" in out[what][2]
    assert out["files"] == sorted([f"{key}.wav", "lock"])


@pytest.mark.parametrize("call", ["get_or_render", "follow"])
def test_a_render_that_asks_for_its_own_key_raises_instead_of_waiting_for_itself(
        cache, call) -> None:
    # A render that asks the cache for the key it is rendering (a sentence splitter
    # whose one sentence has the text's own key) waited for itself: for ever with no
    # timeout, and with one a TimeoutError blaming "another caller".
    key, other = cache_key("own key"), cache_key("other key")
    seen: list[BaseException] = []

    def inner(writer) -> None:
        writer.write(tone(other, 100))

    def render(writer) -> None:
        writer.write(tone(key, 100))
        with cache.get_or_render(other, inner, samplerate=16000) as entry:  # works
            assert np.array_equal(entry.array, tone(other, 100))
        try:
            if call == "get_or_render":
                cache.get_or_render(key, inner, samplerate=16000)
            else:
                list(cache.follow(key))
        except RuntimeError as exc:
            seen.append(exc)
        writer.write(tone(key, 100))

    entry = call_with_deadline(
        lambda: cache.get_or_render(key, render, samplerate=16000), 10)
    with entry:
        assert np.array_equal(entry.array, np.concatenate([tone(key, 100)] * 2))
    assert len(seen) == 1
    assert re.search(f"{call} of '{key}' was called from inside the render of '{key}' in "
                     "this thread: it would wait for itself", str(seen[0]))
    assert cache.stats().renders == 2


def test_follow_counts_one_miss_a_call_as_get_does(cache) -> None:
    # Found: follow looked up to three times (a render may end between its looks) and
    # counted each look: a follow of an unknown key counted 3 misses.
    key = cache_key("followed")
    with pytest.raises(KeyError, match="neither in the cache nor being rendered"):
        list(cache.follow(key))
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (0, 1)
    cache.put(key, tone(key), 16000).release()
    assert np.array_equal(np.concatenate(list(cache.follow(key))), tone(key))
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (1, 1)


@pytest.mark.parametrize("held", [True, False], ids=["held", "unheld"])
def test_a_put_over_its_key_s_entry_in_a_full_cache_takes_that_entry_s_room(
        private_dirs, held) -> None:
    # Found: the room a new entry needs was made as if the key's entry it replaces were
    # to stay: over a held one (a client still playing it) with no other entry to
    # evict, the put was kept unstored and the key became a miss; over an unheld one, a
    # least recently used entry of another key was evicted first, for nothing.
    with AudioCache("replacing", max_bytes=10_000) as cache:
        key, other = cache_key("replaced"), cache_key("innocent")
        cache.put(other, tone(other, 900), 8000).release()  # 1,844 bytes, used first
        old = cache.put(key, tone(key, 4000), 8000)  # 8,044 bytes: 9,888 in all
        if not held:
            old.release()
        new_audio = tone(other, 4000)
        with cache.put(key, new_audio, 8000) as new:
            assert new.stored
        assert cache.stats().evictions == 0
        assert other in cache
        old.release()
        with cache.get(key) as hit:
            assert np.array_equal(hit.array, new_audio)
        stats = cache.stats()
        assert (stats.entries, stats.bytes) == (2, 9888)
        assert cache._ram.counters()[0] == 9888
        cache.destroy()


@pytest.mark.parametrize("how", ["abort", "with block left by an exception"])
def test_a_render_that_aborts_its_writer_and_returns_is_not_stored(cache, how) -> None:
    # Found: a render that aborted its writer (or left `with writer:` by an exception it
    # then caught) and returned was stored: its followers had been told the render
    # failed (StreamAbandoned), and the entry's header said "aborted" for ever, so
    # follow_wav of the stored entry's path raised StreamAbandoned too.
    key = cache_key(f"aborted by {how}")
    followed: list[object] = []
    started, first = threading.Event(), threading.Event()

    def follow() -> None:
        started.wait(10)
        frames = 0
        try:
            for block in cache.follow(key, timeout=10):
                frames += len(block)
                first.set()
            followed.append(frames)
        except luna_shm.StreamAbandoned as exc:
            followed.append(exc)
        finally:
            first.set()

    def render(writer) -> None:
        writer.write(tone(key, 100))
        started.set()
        first.wait(10)  # the follower has the first block
        if how == "abort":
            writer.abort()
            return
        with contextlib.suppress(ConnectionError), writer:
            raise ConnectionError("the engine went away")

    follower = threading.Thread(target=follow)
    follower.start()
    with pytest.raises(ValueError, match=f"the render of '{key}' aborted its writer"):
        cache.get_or_render(key, render, samplerate=16000)
    follower.join(10)
    assert len(followed) == 1 and isinstance(followed[0], luna_shm.StreamAbandoned)
    assert cache.get(key) is None
    assert set(os.listdir(cache.directory)) <= {"lock", f"{key}.outcome"}
    with cache.get_or_render(key, lambda w: w.write(tone(key, 100)),
                             samplerate=16000) as entry:  # the next caller renders afresh
        assert np.array_equal(entry.array, tone(key, 100))
