"""Every public argument, every wrong value: one table, one rule.

The house rule: bad input gets a clear exception that says what was wrong, naming the
argument and what the caller passed; a refused call leaves no file and no descriptor
behind. Each row below is (call, value, expected exception, message pattern); the test
runs the call in private dirs, checks the exception and its message, and lists the dirs
and /proc/self/fd before and after.

The values are the ones a user plausibly passes by mistake (why each group is there is
said where it is made); the second table holds values a peer (numpy, python-soundfile,
os) takes and so do we.
"""

from __future__ import annotations

import gc
import math
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from luna_shm import (
    AudioCache,
    AudioPool,
    LunaShmError,
    PooledWav,
    WavBuffer,
    WavWriter,
    cache_key,
    cleanup_all_temp_audio,
    cleanup_temp_audio,
    create_wav_buffer,
    follow_wav,
    get_temp_audio_path,
    iter_unused_temp_audio,
    iter_wav_stream,
    prefault_wav_buffers,
    read_wav,
    recv_wav,
    save_temp_audio,
    send_wav,
    temp_audio_path,
    write_wav,
)

RATE = 8000
AUDIO = np.zeros(16, np.int16)


@dataclass
class World:
    """What the calls work on, all made before the 'before' listing: a source WAV, an
    output path, a pool with a held slot, a WavBuffer, a WavWriter and a cache holding
    one entry."""

    ram: Path
    fallback: Path
    source: str
    out: str
    fifo: str
    pool: AudioPool
    pooled: PooledWav
    buffer: WavBuffer
    writer: WavWriter
    cache: AudioCache
    key: str


@pytest.fixture
def world(private_dirs: Any) -> Iterator[World]:
    ram, fallback = Path(private_dirs.ram), Path(private_dirs.fallback)
    source = str(ram / "source.wav")
    write_wav(source, AUDIO, RATE)
    fifo = str(ram / "player.fifo")
    os.mkfifo(fifo)
    pool = AudioPool(slots=2, max_bytes=4096, timeout=5)  # one slot held, one free
    cache = AudioCache("badargs", max_bytes=1 << 20)
    key = cache_key("hello")
    cache.put(key, AUDIO, RATE).release()
    # The private dirs go with everything in them: closing is enough.
    with pool, cache, pool.acquire(16, RATE) as pooled, create_wav_buffer(16, RATE) as buffer, \
            WavWriter(str(ram / "live.wav"), RATE) as writer:
        yield World(ram, fallback, source, str(ram / "out.wav"), fifo, pool, pooled, buffer,
                    writer, cache, key)


def _files(world: World) -> set[str]:
    """Every file and dir under the private dirs (the cache's own directory too)."""
    found: set[str] = set()
    for top in (world.ram, world.fallback):
        for root, dirs, files in os.walk(top):
            found.update(os.path.join(root, name) for name in dirs + files)
    return found


def _fds() -> set[str]:
    gc.collect(1)  # an fd cell dropped with a frame is closed by the collector (young)
    return set(os.listdir("/proc/self/fd"))


def _first(iterable: Any) -> object:
    for item in iterable:
        return item
    return None


# ---- the calls: one per (callable, argument); each takes the world and the value -----------

Call = Callable[[World, Any], object]


def _new_pool(**kwargs: Any) -> None:
    AudioPool(**{"slots": 1, "max_bytes": 1024, **kwargs}).close()


def _new_cache(**kwargs: Any) -> None:
    AudioCache(**{"name": "other", **kwargs}).destroy()


def _recv(world: World, max_bytes: Any) -> object:
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(5)  # nothing is sent: a value taken times out, never hangs
        return recv_wav(right, max_bytes=max_bytes)


def _render(writer: WavWriter) -> None:
    writer.write(AUDIO)


INT_CALLS: dict[str, Call] = {
    "write_wav(samplerate=)": lambda w, v: write_wav(w.out, AUDIO, v),
    "write_wav(path=None, samplerate=)": lambda w, v: write_wav(None, AUDIO, v),
    "create_wav_buffer(frames=)": lambda w, v: create_wav_buffer(v, RATE),
    "create_wav_buffer(samplerate=)": lambda w, v: create_wav_buffer(16, v),
    "create_wav_buffer(channels=)": lambda w, v: create_wav_buffer(16, RATE, v),
    "WavBuffer.truncate(frames=)": lambda w, v: w.buffer.truncate(v),
    "WavWriter(samplerate=)": lambda w, v: WavWriter(w.out, v),
    "WavWriter(channels=)": lambda w, v: WavWriter(w.out, RATE, v),
    "AudioPool(slots=)": lambda w, v: _new_pool(slots=v),
    "AudioPool(max_bytes=)": lambda w, v: _new_pool(max_bytes=v),
    "AudioPool.write_wav(samplerate=)": lambda w, v: w.pool.write_wav(AUDIO, v),
    "AudioPool.acquire(frames=)": lambda w, v: w.pool.acquire(v, RATE),
    "AudioPool.acquire(samplerate=)": lambda w, v: w.pool.acquire(16, v),
    "AudioPool.acquire(channels=)": lambda w, v: w.pool.acquire(16, RATE, v),
    "PooledWav.truncate(frames=)": lambda w, v: w.pooled.truncate(v),
    "prefault_wav_buffers(max_bytes=)": lambda w, v: prefault_wav_buffers(v),
    "prefault_wav_buffers(per_size=)": lambda w, v: prefault_wav_buffers(0, per_size=v),
    "get_temp_audio_path(size_hint=)": lambda w, v: get_temp_audio_path(size_hint=v),
    "temp_audio_path(size_hint=)": lambda w, v: temp_audio_path(size_hint=v).__enter__(),
    "iter_wav_stream(chunk_frames=)": lambda w, v: _first(iter_wav_stream(w.source,
                                                                          chunk_frames=v)),
    "recv_wav(max_bytes=)": _recv,
    "AudioCache(max_bytes=)": lambda w, v: _new_cache(max_bytes=v),
    "AudioCache(disk_max_bytes=)": lambda w, v: _new_cache(disk_max_bytes=v),
    "AudioCache.put(samplerate=)": lambda w, v: w.cache.put(cache_key("p"), AUDIO, v),
    "AudioCache.get_or_render(samplerate=)": lambda w, v: w.cache.get_or_render(
        cache_key("r"), _render, samplerate=v),
    "AudioCache.get_or_render(channels=)": lambda w, v: w.cache.get_or_render(
        cache_key("r"), _render, samplerate=RATE, channels=v),
}

# The argument each call names in its messages, and the least value it takes.
def _argument(call: str) -> str:
    return call.rsplit("(", 1)[1].rsplit(" ", 1)[-1].rstrip("=)")


_MINIMUM_ZERO = {"WavBuffer.truncate(frames=)", "PooledWav.truncate(frames=)",
                 "create_wav_buffer(frames=)", "AudioPool.acquire(frames=)",
                 "prefault_wav_buffers(max_bytes=)", "get_temp_audio_path(size_hint=)",
                 "temp_audio_path(size_hint=)", "recv_wav(max_bytes=)"}
# Calls whose argument has an upper bound that 2**64 passes (the others are caps: any
# size is a valid cap, and a pool of 2**64 slots is ENOSPC naming the numbers).
_BOUNDED = {"write_wav(samplerate=)", "write_wav(path=None, samplerate=)",
            "create_wav_buffer(frames=)", "create_wav_buffer(samplerate=)",
            "create_wav_buffer(channels=)", "WavBuffer.truncate(frames=)",
            "WavWriter(samplerate=)", "WavWriter(channels=)", "AudioPool(max_bytes=)",
            "AudioPool.write_wav(samplerate=)", "AudioPool.acquire(frames=)",
            "AudioPool.acquire(samplerate=)", "AudioPool.acquire(channels=)",
            "PooledWav.truncate(frames=)", "AudioCache.put(samplerate=)",
            "AudioCache.get_or_render(samplerate=)", "AudioCache.get_or_render(channels=)"}

# Not ints at all: None (an unset option), the str and bytes a config file or a CLI gives,
# bools (True as samplerate would be a 1 Hz file), floats that int() would silently cut
# (1.5) or that are no number (NaN, inf), a numpy float, a list and a dict (a whole
# record passed where one field was meant), a complex number.
NOT_INTS: dict[str, Any] = {"None": None, "the str '8000'": "8000", "the bytes b'8000'": b"8000",
            "True": True, "False": False, "numpy's True": np.True_, "1.5": 1.5,
            "8000.0": 8000.0, "NaN": math.nan, "inf": math.inf,
            "numpy's float64(8000.0)": np.float64(8000.0), "a list [8000]": [8000],
            "a dict": {"samplerate": 8000}, "a complex number": 1 + 2j}


# Calls whose argument takes None (no limit, no hint, the default).
_OPTIONAL = {"get_temp_audio_path(size_hint=)", "temp_audio_path(size_hint=)",
             "iter_wav_stream(chunk_frames=)", "recv_wav(max_bytes=)",
             "AudioCache(disk_max_bytes=)"}


def _int_rows() -> Iterator[Any]:
    for call, fn in INT_CALLS.items():
        name = _argument(call)
        for label, value in NOT_INTS.items():
            if value is None and call in _OPTIONAL:
                continue
            yield pytest.param(fn, value, TypeError, rf"^{name} must be an int, got ",
                               id=f"{call} refuses {label} with a TypeError naming {name}")
        below = -1 if call in _MINIMUM_ZERO else 0
        for value in (below, -(2**63)):
            yield pytest.param(fn, value, ValueError, rf"^{name} must be (>=|between) .*"
                               rf"got {value}$",
                               id=f"{call} refuses {value} (below its least value) with a "
                                  f"ValueError naming it")
        if call in _BOUNDED:
            huge: Any
            for huge in (2**64, 10**30, np.uint64(2**63)):
                yield pytest.param(fn, huge, ValueError, rf"{name}.*{int(huge)}",
                                   id=f"{call} refuses the huge {int(huge)} with a "
                                      "ValueError naming it, never an OverflowError")


# ---- flags: True or False only --------------------------------------------------------------

FLAG_CALLS: dict[str, Call] = {
    "write_wav(atomic=)": lambda w, v: write_wav(w.out, AUDIO, RATE, atomic=v),
    "read_wav(mmap=)": lambda w, v: read_wav(w.source, mmap=v),
    "read_wav(always_2d=)": lambda w, v: read_wav(w.source, always_2d=v),
    "create_wav_buffer(anonymous=)": lambda w, v: create_wav_buffer(16, RATE, anonymous=v),
    "AudioPool(anonymous=)": lambda w, v: _new_pool(anonymous=v),
    "get_temp_audio_path(create=)": lambda w, v: get_temp_audio_path(create=v),
    "iter_unused_temp_audio(remove=)": lambda w, v: iter_unused_temp_audio(remove=v),
}
# Truthiness would do the opposite of what was meant: "no", "false" and "0" are true; None
# and 0 are an unset option or a C habit; 1.5 and a list are no answer at all.
NOT_FLAGS: dict[str, Any] = {
    "None": None, "the str 'no'": "no", "the str 'false'": "false", "the int 0": 0,
    "the int 1": 1, "1.5": 1.5, "an empty list": []}


def _flag_rows() -> Iterator[Any]:
    for call, fn in FLAG_CALLS.items():
        name = _argument(call)
        for label, value in NOT_FLAGS.items():
            yield pytest.param(fn, value, TypeError,
                               rf"^{name} must be True or False, got {re.escape(repr(value))}$",
                               id=f"{call} refuses {label} with a TypeError naming {name}")


# ---- durations in seconds: timeouts, ages, ttl ------------------------------------------------

SECONDS_CALLS: dict[str, Call] = {
    "AudioPool(timeout=)": lambda w, v: _new_pool(timeout=v),
    "follow_wav(timeout=)": lambda w, v: _first(follow_wav(w.source, timeout=v)),
    "iter_wav_stream(timeout=)": lambda w, v: _first(iter_wav_stream(w.source, timeout=v)),
    "cleanup_all_temp_audio(older_than=)": lambda w, v: cleanup_all_temp_audio(older_than=v),
    "iter_unused_temp_audio(older_than=)": lambda w, v: iter_unused_temp_audio(older_than=v),
    "AudioCache(ttl=)": lambda w, v: _new_cache(ttl=v),
    "AudioCache.get(timeout=)": lambda w, v: w.cache.get(w.key, timeout=v),
    "AudioCache.follow(timeout=)": lambda w, v: w.cache.follow(w.key, timeout=v),
    "AudioCache.get_or_render(timeout=)": lambda w, v: w.cache.get_or_render(
        w.key, _render, samplerate=RATE, timeout=v),
    "AudioCache.put(timeout=)": lambda w, v: w.cache.put(w.key, AUDIO, RATE, timeout=v),
    "AudioCache.put_bytes(timeout=)": lambda w, v: w.cache.put_bytes(w.key, b"x", timeout=v),
    "AudioCache.discard(timeout=)": lambda w, v: w.cache.discard(w.key, timeout=v),
    "AudioCache.destroy(timeout=)": lambda w, v: w.cache.destroy(timeout=v),
    "AudioCache.close(timeout=)": lambda w, v: w.cache.close(timeout=v),
}
# Not numbers: what a config file gives ("10"), bools (True is no timeout), a list, a
# dict, a complex number. Numbers that are no duration: negative ones, NaN, -inf.
NOT_SECONDS: dict[str, Any] = {
    "the str '10'": "10", "the bytes b'10'": b"10", "True": True, "False": False,
    "numpy's True": np.True_, "a list [10]": [10], "a dict": {"seconds": 10},
    "a complex number": 1 + 2j}
BAD_SECONDS: dict[str, Any] = {"-1": -1, "-0.5": -0.5, "NaN": math.nan, "-inf": -math.inf,
               "numpy's float64(NaN)": np.float64("nan")}


def _seconds_rows() -> Iterator[Any]:
    for call, fn in SECONDS_CALLS.items():
        name = _argument(call)
        for label, value in NOT_SECONDS.items():
            yield pytest.param(fn, value, TypeError,
                               rf"^{name} must be (None or )?a number of seconds, got "
                               rf"{re.escape(repr(value))}$",
                               id=f"{call} refuses {label} with a TypeError naming {name}")
        for label, value in BAD_SECONDS.items():
            yield pytest.param(fn, value, ValueError,
                               rf"^{name} must be (None or )?(>=|>) 0 seconds, got "
                               rf"{re.escape(repr(value))}$",
                               id=f"{call} refuses {label} with a ValueError naming {name}")


# ---- sample types and subtypes ------------------------------------------------------------

DTYPE_CALLS: dict[str, Call] = {
    "create_wav_buffer(dtype=)": lambda w, v: create_wav_buffer(16, RATE, 1, v),
    "WavWriter(dtype=)": lambda w, v: WavWriter(w.out, RATE, 1, v),
    "AudioPool.acquire(dtype=)": lambda w, v: w.pool.acquire(16, RATE, 1, v),
    "read_wav(dtype=)": lambda w, v: read_wav(w.source, dtype=v),
    "AudioCache.get_or_render(dtype=)": lambda w, v: w.cache.get_or_render(
        cache_key("r"), _render, samplerate=RATE, dtype=v),
}
# Types a WAV does not hold (int8, int64, float16, complex, bool, object), a subtype name
# where a dtype is wanted, and values that are no type at all.
NOT_DTYPES: dict[str, Any] = {"'int8'": "int8", "'int64'": "int64", "'float16'": "float16",
              "'complex64'": "complex64", "bool": bool, "object": object,
              "the subtype name 'PCM_16'": "PCM_16", "1.5": 1.5, "True": True,
              "a dict": {"dtype": "int16"}, "the bytes b'int16'": b"int16x",
              # A sample where its type is wanted: numpy would take its dtype silently.
              "numpy's float64(1.5)": np.float64(1.5), "numpy's int16(3)": np.int16(3)}


def _dtype_rows() -> Iterator[Any]:
    for call, fn in DTYPE_CALLS.items():
        values = dict(NOT_DTYPES)
        if call != "read_wav(dtype=)":  # None is read_wav's "the file's own type"
            values["None"] = None
        for label, value in values.items():
            yield pytest.param(fn, value, TypeError,
                               rf"^dtype must be one of uint8, int16, int32, float32 or float64, "
                               rf"got {re.escape(repr(value))}",
                               id=f"{call} refuses {label} with a TypeError naming dtype")


SUBTYPE_CALLS: dict[str, Call] = {
    "write_wav(subtype=)": lambda w, v: write_wav(w.out, AUDIO, RATE, subtype=v),
    "AudioPool.write_wav(subtype=)": lambda w, v: w.pool.write_wav(AUDIO, RATE, subtype=v),
    "AudioCache.put(subtype=)": lambda w, v: w.cache.put(cache_key("p"), AUDIO, RATE,
                                                         subtype=v),
}
# Names soundfile does not know ("PCM_8", "pcm16", ""), bits as a number, a bool, bytes.
NOT_SUBTYPES: dict[str, Any] = {
    "'PCM_8'": "PCM_8", "'pcm16'": "pcm16", "''": "", "16": 16, "True": True,
    "the bytes b'PCM_16'": b"PCM_16"}


def _subtype_rows() -> Iterator[Any]:
    for call, fn in SUBTYPE_CALLS.items():
        for label, value in NOT_SUBTYPES.items():
            yield pytest.param(fn, value, ValueError,
                               rf"^unknown subtype {re.escape(repr(value))}: use one of ",
                               id=f"{call} refuses {label} with a ValueError naming the subtype")


# ---- paths --------------------------------------------------------------------------------

PATH_CALLS: dict[str, Call] = {
    "write_wav(path=)": lambda w, v: write_wav(v, AUDIO, RATE),
    "write_wav(path=, atomic=True)": lambda w, v: write_wav(v, AUDIO, RATE, atomic=True),
    "read_wav(path=)": lambda w, v: read_wav(v),
    "create_wav_buffer(path=)": lambda w, v: create_wav_buffer(16, RATE, path=v),
    "WavWriter(path=)": lambda w, v: WavWriter(v, RATE),
    "follow_wav(path=)": lambda w, v: _first(follow_wav(v, timeout=5)),
    "iter_wav_stream(path=)": lambda w, v: _first(iter_wav_stream(v, timeout=5)),
    "cleanup_temp_audio(path=)": lambda w, v: cleanup_temp_audio(v),
}
# A number (a file descriptor), a list of paths, an open file's name confused with the
# file: TypeErrors. bytes paths are refused on purpose: every path we return is a str, and
# a read_wav(bytes) is most often a whole WAV in memory (its message says so).
NOT_PATHS: dict[str, Any] = {"the int 3": 3, "1.5": 1.5, "a list of paths": ["a.wav"],
             "the bytes path b'a.wav'": b"a.wav"}


def _path_rows() -> Iterator[Any]:
    for call, fn in PATH_CALLS.items():
        for label, value in NOT_PATHS.items():
            yield pytest.param(fn, value, TypeError,
                               rf"^path must be str(, | or )os\.PathLike\[str\]( or None)?, got "
                               rf"{re.escape(repr(value))}$",
                               id=f"{call} refuses {label} with a TypeError naming path")
        yield pytest.param(lambda w, v, fn=fn: fn(w, str(w.ram / v)), "a\0b.wav", ValueError,
                           r"^path contains a NUL byte: ",
                           id=f"{call} refuses a path with a NUL byte with a ValueError")
    # A directory where a file is wanted: the OSError of the kernel, with errno and name.
    for call in ("write_wav(path=)", "write_wav(path=, atomic=True)", "read_wav(path=)",
                 "create_wav_buffer(path=)", "WavWriter(path=)", "follow_wav(path=)",
                 "iter_wav_stream(path=)"):
        fn = PATH_CALLS[call]
        yield pytest.param(lambda w, v, fn=fn: fn(w, str(w.ram)), None, IsADirectoryError,
                           r"Is a directory",
                           id=f"{call} refuses a directory with IsADirectoryError naming it")
    # A FIFO where a file is wanted (a player's pipe): refused at once, never opened (an
    # open would block until a writer came), never written over.
    for call in ("write_wav(path=)", "write_wav(path=, atomic=True)",
                 "create_wav_buffer(path=)", "WavWriter(path=)"):
        fn = PATH_CALLS[call]
        yield pytest.param(lambda w, v, fn=fn: fn(w, w.fifo), None, OSError,
                           r"not a regular file \(a FIFO\)",
                           id=f"{call} refuses a FIFO with EINVAL naming it")
    for call in ("read_wav(path=)", "follow_wav(path=)", "iter_wav_stream(path=)"):
        fn = PATH_CALLS[call]
        yield pytest.param(lambda w, v, fn=fn: fn(w, w.fifo), None, LunaShmError,
                           r"player\.fifo: not a regular file",
                           id=f"{call} refuses a FIFO with a WavError naming it")


# ---- audio arrays -------------------------------------------------------------------------

DATA_CALLS: dict[str, Call] = {
    "write_wav(data=)": lambda w, v: write_wav(w.out, v, RATE),
    "write_wav(path=None, data=)": lambda w, v: write_wav(None, v, RATE),
    "AudioPool.write_wav(data=)": lambda w, v: w.pool.write_wav(v, RATE),
    "AudioCache.put(data=)": lambda w, v: w.cache.put(cache_key("p"), v, RATE),
    "WavWriter.write(chunk=)": lambda w, v: w.writer.write(v),
}
# Sample types no WAV holds that numpy makes easily (object and str arrays from mixed
# lists, complex from an FFT, bool from a comparison, datetime), and the wrong number of
# dimensions: a scalar, a 3-D batch, no channel, more channels than a WAV holds
# (a transposed array). Then what is no array: None, a dict, a str, Python ints (which
# numpy makes int64), raw bytes, a ragged list.
WRONG_KIND: dict[str, Any] = {"an object array": np.array([1, "a"], object),
              "a complex array": np.zeros(4, complex), "a bool array": np.zeros(4, bool),
              "a datetime array": np.zeros(4, "datetime64[s]"),
              "a str array": np.array(["a", "b"]), "a structured array": np.zeros(4, "i2,i2"),
              # Numbers of a width or sign no WAV stores (int64: np.array of Python ints).
              "an int64 array": np.zeros(4, np.int64), "a uint64 array": np.zeros(4, np.uint64),
              "a uint32 array": np.zeros(4, np.uint32), "a uint16 array": np.zeros(4, np.uint16),
              "an int8 array": np.zeros(4, np.int8), "a float16 array": np.zeros(4, np.float16)}
WRONG_SHAPE: dict[str, Any] = {"a 0-d array": (np.array(1, np.int16), r"got 0-D shape \(\)"),
               "a 3-d array": (np.zeros((2, 2, 2), np.int16), r"got 3-D shape \(2, 2, 2\)"),
               "an array with no channel": (np.zeros((4, 0), np.int16), r"has 0 channels"),
               "an array of 70000 channels": (np.zeros((2, 70000), np.int16),
                                              r"has 70000 channels")}
NOT_ARRAYS: dict[str, Any] = {"None": (None, TypeError, "got None"),
              "a dict": ({"a": 1}, TypeError, r"got \{'a': 1\}"),
              "a str": ("abc", TypeError, "got 'abc'"),
              "a list of Python ints": ([1, 2, 3], TypeError, "a list of Python ints"),
              "raw bytes": (b"\0\0" * 8, TypeError, "got raw bytes"),
              "a ragged list": ([[0.1, 0.2], [0.3]], ValueError, "is not an array of samples")}


def _data_rows() -> Iterator[Any]:
    for call, fn in DATA_CALLS.items():
        name = _argument(call)
        for label, value in WRONG_KIND.items():
            yield pytest.param(fn, value, TypeError,
                               rf"^{name} has unsupported sample dtype "
                               rf"{re.escape(str(value.dtype))}",
                               id=f"{call} refuses {label} with a TypeError naming {name} and "
                                  "its dtype")
        for label, (value, shown) in WRONG_SHAPE.items():
            yield pytest.param(fn, value, ValueError, rf"^{name} .*{shown}",
                               id=f"{call} refuses {label} with a ValueError naming {name} and "
                                  "its shape")
        for label, (value, error, shown) in NOT_ARRAYS.items():
            yield pytest.param(fn, value, error, rf"^{name} .*{shown}",
                               id=f"{call} refuses {label} naming {name}")


def _out_rows() -> Iterator[Any]:
    # out is filled in place: it must be a writable, C-contiguous array of a type read_wav
    # fills, with room for the file.
    call: Call = lambda w, v: read_wav(w.source, out=v)  # noqa: E731
    values = {"a list": ([0.0] * 16, TypeError, r"^out must be a numpy array, got \[0\.0"),
              "a 0-d array": (np.zeros((), np.int16), ValueError, r"^out must be .*shape \(\)"),
              "a 3-d array": (np.zeros((16, 1, 1), np.int16), ValueError,
                              r"^out must be .*shape \(16, 1, 1\)"),
              "a strided view": (np.zeros(32, np.int16)[::2], ValueError,
                                 r"^out must be .*contiguous=False"),
              "a read-only array": (np.frombuffer(bytes(32), np.int16), ValueError,
                                    r"^out must be .*writable=False"),
              "an int8 array": (np.zeros(16, np.int8), ValueError, r"^out must be .*got int8"),
              "a complex array": (np.zeros(16, complex), ValueError,
                                  r"^out must be .*got complex128"),
              "a byte-swapped array": (np.zeros(16, ">i2"), ValueError, r"^out must be .*>i2"),
              "an array too short": (np.zeros(15, np.int16), ValueError,
                                     r"^out has shape \(15,\), but .* has 16 frames")}
    for label, (value, error, pattern) in values.items():
        yield pytest.param(call, value, error, pattern,
                           id=f"read_wav(out=) refuses {label} naming out")


# ---- encoded bytes, names, keys and the rest ------------------------------------------------

def _other_rows() -> Iterator[Any]:
    def row(call: Call, value: object, error: type[BaseException], pattern: str,
            sentence: str) -> Any:
        return pytest.param(call, value, error, pattern, id=sentence)

    label: str
    value: Any
    error: type[BaseException]

    save: Call = lambda w, v: save_temp_audio(v)  # noqa: E731
    # Encoded audio is bytes: text, numbers, samples (an int16 array is no MP3) and
    # unordered containers are refused by name.
    for label, value in {"None": None, "a str": "abc", "the int 1": 1, "1.5": 1.5,
                         "an int16 array": np.zeros(4, np.int16),
                         # numpy exports no buffer of dates: memoryview() raises ValueError
                         "a datetime64 array": np.zeros(4, "datetime64[s]")}.items():
        yield row(save, value, TypeError, r"^data must be bytes, bytearray, memoryview or an "
                  r"iterable of them, got ", f"save_temp_audio(data=) refuses {label}")
    yield row(save, {"a": b"x"}, TypeError, r"^data must be .*ordered.*got a dict",
              "save_temp_audio(data=) refuses a dict, whose iteration yields its keys")
    yield row(save, {b"a"}, TypeError, r"^data must be .*ordered.*got a set",
              "save_temp_audio(data=) refuses a set, whose order is no audio's")
    yield row(save, [b"a", "b"], TypeError, r"^chunk 1 of data must be bytes",
              "save_temp_audio(data=) refuses a list with a str chunk, naming the chunk")
    for name in ("suffix", "prefix"):
        def saved(w: World, v: Any, name: str = name) -> object:
            return save_temp_audio(b"x", **{name: v})

        def made(w: World, v: Any, name: str = name) -> object:
            return get_temp_audio_path(**{name: v})

        for call, label in ((saved, f"save_temp_audio({name}=)"),
                            (made, f"get_temp_audio_path({name}=)")):
            yield row(call, None, TypeError, rf"^{name} must be a str, got None",
                      f"{label} refuses None with a TypeError naming {name}")
            yield row(call, b".x", TypeError, rf"^{name} must be a str, got b'\.x'",
                      f"{label} refuses bytes with a TypeError naming {name}")
            yield row(call, "a/b", ValueError, rf"^{name} must not contain '/'.*got 'a/b'",
                      f"{label} refuses a slash with a ValueError naming {name}")
            yield row(call, "a\0b", ValueError, rf"^{name} must not contain .*NUL",
                      f"{label} refuses a NUL byte with a ValueError naming {name}")
            yield row(call, "x" * 300, ValueError, rf"^{name} is too long",
                      f"{label} refuses 300 characters with a ValueError naming {name}")

    # Cache names and keys name files: only a few characters, never a path.
    for label, value in {"None": None, "the int 1": 1, "''": "", "'a/b'": "a/b",
                         "'.x'": ".x", "65 characters": "a" * 65}.items():
        error = TypeError if not isinstance(value, str) else ValueError
        yield row(lambda w, v: _new_cache(name=v), value, error, r"^name must be ",
                  f"AudioCache(name=) refuses {label} naming name")
    key_calls: dict[str, Call] = {
        "get": lambda w, v: w.cache.get(v), "put": lambda w, v: w.cache.put(v, AUDIO, RATE),
        "put_bytes": lambda w, v: w.cache.put_bytes(v, b"x"),
        "get_or_render": lambda w, v: w.cache.get_or_render(v, _render, samplerate=RATE),
        "follow": lambda w, v: w.cache.follow(v), "discard": lambda w, v: w.cache.discard(v),
        "live_path": lambda w, v: w.cache.live_path(v)}
    for method, fn in key_calls.items():
        for label, value in {"None": None, "bytes": b"k", "''": "", "'../x'": "../x",
                             "129 characters": "a" * 129}.items():
            error = TypeError if not isinstance(value, str) else ValueError
            yield row(fn, value, error, r"^key must be ",
                      f"AudioCache.{method}(key=) refuses {label} naming key")
    for label, value in {"None": None, "a str": "abc", "a list of bytes": [b"a"],
                         "a uint8 array": np.zeros(4, np.uint8)}.items():
        yield row(lambda w, v: w.cache.put_bytes(cache_key("b"), v), value, TypeError,
                  r"^data must be bytes-like, got ",
                  f"AudioCache.put_bytes(data=) refuses {label} naming data")
    for label, value in {"'.wav'": ".wav", "'mp3'": "mp3"}.items():
        yield row(lambda w, v: w.cache.put_bytes(cache_key("b"), b"x", v), value, ValueError,
                  r"^suffix must be one of \.mp3, .*, got '",
                  f"AudioCache.put_bytes(suffix=) refuses {label} naming suffix")
    # A wrong type is a TypeError (it was a ValueError, as if the value were a wrong str).
    for label, (value, shown) in {"None": (None, "None"), "bytes": (b".mp3", r"b'\.mp3'"),
                                  "the int 1": (1, "1")}.items():
        yield row(lambda w, v: w.cache.put_bytes(cache_key("b"), b"x", v), value, TypeError,
                  rf"^suffix must be a str, one of \.mp3, .*, got {shown}$",
                  f"AudioCache.put_bytes(suffix=) refuses {label} with a TypeError naming "
                  "suffix and the value")
    for label, value in {"None": None, "a str": "render", "the int 1": 1}.items():
        yield row(lambda w, v: w.cache.get_or_render(cache_key("r"), v, samplerate=RATE),
                  value, TypeError, r"^render must be a callable taking the WavWriter, got ",
                  f"AudioCache.get_or_render(render=) refuses {label} naming render")
    # cache_key: only JSON values, each with one canonical form.
    for label, value in {"None": None, "bytes": b"t", "the int 1": 1}.items():
        yield row(lambda w, v: cache_key(v), value, TypeError, r"^text must be a str, got ",
                  f"cache_key(text=) refuses {label} naming text")
    for label, (value, error, pattern) in {
            "bytes": (b"x", TypeError, r"must be JSON values .*speed is a bytes"),
            "NaN": (math.nan, ValueError, r"must be finite numbers: speed is nan"),
            "a numpy array": (np.zeros(2), TypeError, r"speed is a ndarray"),
            "a dict with an int key": ({1: 2}, TypeError, r"speed has a dict key that is not "
                                       r"a str")}.items():
        yield row(lambda w, v: cache_key("t", speed=v), value, error, pattern,
                  f"cache_key(**options) refuses {label}, naming the option")

    # The disk tier's directory: a path like the others, named as disk_dir.
    for label, (value, error, pattern) in {
            "the int 3": (3, TypeError, r"^disk_dir must be a str or os\.PathLike\[str\], got 3$"),
            "bytes": (b"/tmp", TypeError, r"^disk_dir must be a str or .*, got b'/tmp'$"),
            "a NUL byte": ("a\0b", ValueError, r"^disk_dir contains a NUL byte: 'a\\x00b'$"),
            "''": ("", ValueError, r"^disk_dir must name a directory, got ''$")}.items():
        yield row(lambda w, v: _new_cache(disk_dir=v), value, error, pattern,
                  f"AudioCache(disk_dir=) refuses {label} naming disk_dir")

    # The pool's naming and waiting policy.
    for label, (value, error) in {"''": ("", ValueError), "'a/b'": ("a/b", ValueError),
                                  "'a b'": ("a b", ValueError), "None": (None, TypeError),
                                  "the int 1": (1, TypeError)}.items():
        yield row(lambda w, v: _new_pool(prefix=v), value, error, r"^prefix must ",
                  f"AudioPool(prefix=) refuses {label} naming prefix")
    for label, (value, error) in {"'WAIT'": ("WAIT", ValueError), "None": (None, TypeError),
                                  "True": (True, TypeError)}.items():
        yield row(lambda w, v: _new_pool(when_busy=v), value, error,
                  rf"^when_busy must be 'wait' or 'grow', got {re.escape(repr(value))}$",
                  f"AudioPool(when_busy=) refuses {label} naming when_busy")
    for label, value in {"'RAW'": "RAW", "None": None, "'mp3'": "mp3"}.items():
        yield row(lambda w, v: _first(iter_wav_stream(w.source, header=v)), value, ValueError,
                  rf"^header must be 'wav' or 'raw', got {re.escape(repr(value))}$",
                  f"iter_wav_stream(header=) refuses {label} naming header")

    # Hand-offs need a Unix socket and a WavBuffer.
    for label, value in {"None": None, "an fd number": 3, "a str": "/run/tts.sock"}.items():
        yield row(lambda w, v: recv_wav(v), value, TypeError,
                  r"^recv_wav: sock must be a socket\.socket, got ",
                  f"recv_wav(sock=) refuses {label} naming sock")
        yield row(lambda w, v: send_wav(v, w.buffer), value, TypeError,
                  r"^send_wav: sock must be a socket\.socket, got ",
                  f"send_wav(sock=) refuses {label} naming sock")
    def over_inet(w: World, v: Any) -> object:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet:
            return v(inet, w)

    for label, value in {"recv_wav": lambda sock, w: recv_wav(sock),
                         "send_wav": lambda sock, w: send_wav(sock, w.buffer)}.items():
        yield row(over_inet, value, ValueError, rf"^{label}: sock must be an AF_UNIX socket ",
                  f"{label}(sock=) refuses a TCP socket with a ValueError naming sock")
    for label, value in {"None": None, "its path": "x.wav",
                         "an array": np.zeros(4, np.int16)}.items():
        def send(w: World, v: object) -> None:
            left, right = socket.socketpair()
            with left, right:
                send_wav(left, v)  # type: ignore[arg-type]
        yield row(send, value, TypeError, r"^send_wav: buf must be a WavBuffer, got ",
                  f"send_wav(buf=) refuses {label} naming buf")


# ---- the table -----------------------------------------------------------------------------

ROWS: list[Any] = [*_int_rows(), *_flag_rows(), *_seconds_rows(), *_dtype_rows(),
                   *_subtype_rows(), *_path_rows(), *_data_rows(), *_out_rows(),
                   *_other_rows()]


@pytest.mark.parametrize(("call", "value", "error", "pattern"), ROWS)
def test_a_wrong_value_is_refused_clearly_and_leaves_nothing(
        world: World, call: Call, value: object, error: type[BaseException],
        pattern: str) -> None:
    files, fds = _files(world), _fds()
    with pytest.raises(error) as info:
        call(world, value)
    message = str(info.value)
    assert re.search(pattern, message), message
    # Never one of the exceptions that mean the check was missed and something deeper
    # broke on the value.
    assert type(info.value) not in (AttributeError, IndexError, KeyError, ZeroDivisionError,
                                    OverflowError, AssertionError, SystemError)
    if isinstance(info.value, OSError) and not isinstance(info.value, TimeoutError):
        assert info.value.errno is not None and info.value.filename is not None
    del info
    assert _files(world) == files
    assert _fds() == fds


# ---- values a peer takes, and so do we ------------------------------------------------------

def _accepted() -> Iterator[Any]:
    def row(call: Call, value: object, sentence: str) -> Any:
        return pytest.param(call, value, id=sentence)

    value: Any

    # numpy integers are ints (soundfile takes np.int64(8000) as a samplerate: sizes and
    # rates computed with numpy arrive as numpy scalars).
    for value in (np.int64(RATE), np.uint32(RATE), np.int16(RATE)):
        kind = type(value).__name__
        yield row(lambda w, v: write_wav(w.out, AUDIO, v), value,
                  f"write_wav takes numpy's {kind} as a samplerate")
        yield row(lambda w, v: w.pool.write_wav(AUDIO, v).release(), value,
                  f"AudioPool.write_wav takes numpy's {kind} as a samplerate")
        yield row(lambda w, v: WavWriter(w.out, v, np.uint8(2)).close(),  # type: ignore[arg-type]
              value,
                  f"WavWriter takes numpy's {kind} as a samplerate and channels")
        yield row(lambda w, v: create_wav_buffer(np.int32(4), v).close(),  # type: ignore[arg-type]
              value,
                  f"create_wav_buffer takes numpy's {kind} as a samplerate and frames")
    # A Path wherever a path is taken (soundfile and open() take one).
    yield row(lambda w, v: write_wav(v, AUDIO, RATE), Path("out.wav"),
              "write_wav takes a relative Path")
    yield row(lambda w, v: read_wav(Path(w.source)), None, "read_wav takes a Path")
    yield row(lambda w, v: _first(follow_wav(Path(w.source), timeout=5)), None,
              "follow_wav takes a Path")
    # numpy's bool is a bool, numpy's float a number of seconds.
    yield row(lambda w, v: read_wav(w.source, mmap=v, always_2d=v), np.False_,
              "read_wav takes numpy's bool as mmap and always_2d")
    yield row(lambda w, v: _first(follow_wav(w.source, timeout=v)), np.float32(2.5),
              "follow_wav takes numpy's float32 as a timeout")
    yield row(lambda w, v: cleanup_all_temp_audio(older_than=v), np.int64(3600),
              "cleanup_all_temp_audio takes numpy's int64 as an age")
    # A dtype as numpy spells it: a type, a dtype object, a big-endian name.
    for value in (np.float32, np.dtype("float32"), ">f4", "f4"):
        yield row(lambda w, v: WavWriter(w.out, RATE, 1, v).close(), value,
                  f"WavWriter takes {value!r} as float32")
    # Subtypes in lower case, as soundfile takes them.
    yield row(lambda w, v: write_wav(w.out, AUDIO, RATE, subtype=v), "pcm_16",
              "write_wav takes a lower-case subtype")


@pytest.mark.parametrize(("call", "value"), [*_accepted()])
def test_a_value_a_peer_takes_is_taken(world: World, call: Call, value: object,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world.ram)
    call(world, value)
