"""The benchmark cases of luna_shm and its peers, defined once for pytest-benchmark and a table.

``python benchmarks/cases.py [--quick]`` prints the table (median, p99, ratios to
soundfile and to the floor, targets met or missed); ``make bench`` runs the same
cases under pytest-benchmark and writes the report. Neither ships with the library.

A :class:`Case` is a name, a group, a method label and a setup: ``setup(ctx)``
prepares whatever the case needs inside its private directory ``ctx.directory``
and returns the zero-argument callable that is timed. ``ctx.each_round(fn)``
registers untimed work to do before every timed call (removing the file the
previous call wrote, so that every write is to a fresh file); ``ctx.on_close``
registers cleanup. Every group times the library beside its peers
(python-soundfile, scipy, the stdlib ``wave`` module, plain ``open``) and beside
a floor (the bare system calls in C, a numpy copy) in the same run, on the RAM
disk and on the disk temp dir, so that ratios say more than absolute numbers.

Nothing here touches a shared directory: a :class:`Workspace` makes one
private directory inside the RAM disk (``$LUNA_SHM_DIR`` or ``/dev/shm``) and
one inside the disk temp dir, gives each case a fresh subdirectory, points
``LUNA_SHM_DIR`` and ``TMPDIR`` at them while the case runs (so the library's
own temp files and :func:`cleanup_all_temp_audio` see nothing else), and
removes both at the end.

soundfile and scipy are optional: a case that needs them reports what is
missing (:meth:`Case.missing`) and is skipped. Numbers from one run on one
machine are only that: compare ratios within a run, and rerun before believing
a surprise.

Public names:
    Case, CaseDir, Workspace, Result, Target, TargetResult,
    all_cases, quick_cases, cases_of_kind, case_by_name, case_name,
    measure, run, evaluate_targets, TARGETS, percentile,
    format_table, format_targets, format_seconds, describe_machine, loadavg, Progress
"""

from __future__ import annotations

import contextlib as _contextlib
import errno as _errno
import functools as _functools
import importlib as _importlib
import itertools as _itertools
import math as _math
import os as _os
import platform as _platform
import shutil as _shutil
import subprocess as _subprocess
import sys as _sys
import tempfile as _tempfile
import time as _time
import uuid as _uuid
import wave as _wave
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

import floors
from luna_shm import _lowlevel, placement
from luna_shm.buffer import WavBuffer, create_wav_buffer, prefault_stats, prefault_wav_buffers
from luna_shm.placement import AUDIO_PREFIX
from luna_shm.pool import AudioPool
from luna_shm.temp_audio import cleanup_all_temp_audio, cleanup_temp_audio, get_temp_audio_path
from luna_shm.wav import read_wav, write_wav
from luna_shm.writer import WavWriter

__all__ = [
    "TARGETS",
    "Case",
    "CaseDir",
    "Progress",
    "Result",
    "Target",
    "TargetResult",
    "Workspace",
    "all_cases",
    "case_by_name",
    "case_name",
    "cases_of_kind",
    "describe_machine",
    "evaluate_targets",
    "format_seconds",
    "format_table",
    "format_targets",
    "loadavg",
    "measure",
    "percentile",
    "quick_cases",
    "run",
]

KIB = 1024
MIB = 1024 * KIB
SAMPLERATE = 24000
SIZE_500K = 500 * KIB  # 125 pages of 4 KiB
SCALING_SIZES = (10 * KIB, 100 * KIB, 500 * KIB, 5 * MIB, 50 * MIB)
CHUNK_FRAMES = 480  # 20 ms at 24 kHz: 960 bytes of int16
CLEANUP_FILES = 10_000
LOCATIONS = ("ram", "disk")

# The disk load of the tail-latency cases: one process writing 1 MiB blocks
# and fsyncing every 16 MiB, never more than this many bytes on disk, and
# stopping by itself after this many seconds even if nobody stops it.
DISK_LOAD_MAX_BYTES = 256 * MIB
DISK_LOAD_MAX_SECONDS = 120.0

# Roles of a case within its group: ratios are taken against "soundfile" and "floor".
OURS = "luna_shm"
SOUNDFILE = "soundfile"
PEER = "peer"
FLOOR = "floor"
REFERENCE = "reference"

# Method labels that targets refer to.
M_WRITE_WAV = "write_wav"
M_POOL_WRITE = "AudioPool.write_wav"
M_BUFFER = "create_wav_buffer, filled in place"
M_BUFFER_NEW = "create_wav_buffer(), filled (no reserve)"
M_BUFFER_PREFAULT = "create_wav_buffer(), prefault reserve ready, filled"
M_BUFFER_PREFAULT_CLOSED = "create_wav_buffer(), prefault reserve ready, filled + closed"
M_BUFFER_PREFAULT_BURST = "create_wav_buffer(), prefault reserve, back to back, filled"
M_SF_WRITE = "soundfile.write"
M_SCIPY_WRITE = "scipy.io.wavfile.write"
M_WAVE_WRITE = "wave"
M_OPEN_WRITE = "open/write"
M_FLOOR_WRITE = "C floor: open+writev+close"
M_NUMPY_COPY = "numpy copy (no file)"
M_READ_MMAP = "read_wav (mmap)"
M_READ_MMAP_COPY = "read_wav (mmap) + copy"
M_READ_COPY = "read_wav (copy)"
M_SF_READ = "soundfile.read"
M_SCIPY_READ = "scipy.io.wavfile.read"
M_SCIPY_READ_MMAP = "scipy.io.wavfile.read (mmap)"
M_WAVE_READ = "wave"
M_FLOOR_READ = "C floor: open+preadv+close"
M_READ_DECODE = "read_wav(dtype=float32)"
M_SF_READ_FLOAT = "soundfile.read(dtype=float32)"
M_READ_OUT = "read_wav(out=array)"
M_SMALL_WRITE = "write_wav (new file)"
M_SMALL_READ = "read_wav(mmap=False)"
M_SMALL_VIEW = "read_wav (view)"
M_SMALL_POOL = "AudioPool.write_wav + release"
# The same with memfd slots: no name to check, so no watch to ask (what the watch costs).
M_SMALL_POOL_ANON = "AudioPool(anonymous=True).write_wav + release"
# No luna_shm and no system call: how fast this interpreter runs plain Python just now. This
# machine changes speed between runs (and within one); absolute targets of a few microseconds
# are read beside it.
M_PYTHON_REFERENCE = "Python reference: a call that makes a 10-attribute object"
M_SMALL_NAME = "get_temp_audio_path(create=False)"
M_SMALL_CHUNK = "WavWriter.write (20 ms chunk)"
M_FLOOR_MAP = "C floor: open+fstat+mmap+close+munmap"
M_FLOOR_APPEND = "C floor: pwritev of the chunk"
M_FLOOR_READ_NEW = "C floor into a new np.empty array"
M_CONVERT = "write_wav(subtype=PCM_16)"
M_POOL_CONVERT = "AudioPool.write_wav(subtype=PCM_16)"
M_SF_CONVERT = "soundfile.write(subtype=PCM_16)"
M_ASTYPE_WRITE = "astype + write_wav"
M_ASTYPE_SCIPY = "astype + scipy.io.wavfile.write"
M_FLOOR_CONVERTED = "C floor: open+writev+close (already PCM_16)"
M_C_CONVERT = "C float->PCM_16 in memory (no file)"
M_RT_WRITE_WAV = "write_wav + read_wav(copy)"
M_RT_POOL = "AudioPool.write_wav + read_wav(copy)"
M_RT_SF = "soundfile.write + soundfile.read"
M_RT_SCIPY = "scipy write + read"
M_RT_FLOOR = "C floor: write + read"
M_RT_POOL_FLOOR = "C floor: memcpy into a mapped pool slot + read"
M_RC_OURS = "write_wav(None) + read_wav(copy) + cleanup_temp_audio"
M_RC_POOL = "AudioPool.write_wav + read_wav(copy) + release"
M_RC_SF = "soundfile.write + read + os.remove"
M_RC_FLOOR = "C floor: write + read + os.unlink"
M_STREAM_WRITER = "WavWriter.write"
M_STREAM_SF = "soundfile.SoundFile.write"
M_STREAM_FLOOR = "os.write (no header update)"
M_TEMP_PATH = "get_temp_audio_path(create=True)"
M_MKSTEMP = "tempfile.mkstemp + close"
M_TOUCH_FLOOR = "C floor: open(O_EXCL)+close"
M_CLEANUP = "cleanup_all_temp_audio()"
M_CLEANUP_FLOOR = "scandir + unlink (no lock checks)"

Setup = Callable[["CaseDir"], Callable[[], object]]


# ---- cases -------------------------------------------------------------------------


@_functools.cache
def _missing_module(module: str) -> bool:
    try:
        _importlib.import_module(module)
    except (ImportError, OSError):  # soundfile raises OSError without libsndfile
        return True
    return False


def _peer(module: str) -> Any:
    """An optional peer module (soundfile, scipy.io.wavfile), imported when a case needs it."""
    return _importlib.import_module(module)


@dataclass(frozen=True)
class Case:
    """One timed operation, with what it belongs to and how long to run it.

    Attributes:
        name: unique, ``kind/variant/location/method``.
        group: ``kind variant location``: the cases that are compared side by side.
        method: what is timed, as a label (unique within the group).
        setup: called with a :class:`CaseDir`; returns the zero-argument callable to time.
        kind: write, convert, read, roundtrip, roundtrip+cleanup, scale-write,
            scale-read, stream, temp-path, cleanup or tail-write.
        variant: the data, e.g. ``int16-500K``.
        location: "ram" (a private dir on the RAM disk) or "disk" (on the disk temp dir).
        nbytes: bytes of audio one call moves (0 when that means nothing).
        role: luna_shm, soundfile, peer, floor or reference.
        requires: optional modules the case imports.
        budget: seconds of timed calls to aim for; the rounds are clamped to
            [min_rounds, max_rounds].
        quick: part of ``benchmarks/cases.py --quick``.
    """

    name: str
    group: str
    method: str
    setup: Setup
    kind: str
    variant: str
    location: str
    nbytes: int
    role: str
    requires: tuple[str, ...] = ()
    budget: float = 1.0
    min_rounds: int = 30
    max_rounds: int = 3000
    quick: bool = False

    def missing(self) -> list[str]:
        """The optional modules this case needs that cannot be imported."""
        return [module for module in self.requires if _missing_module(module)]

    def info(self) -> dict[str, Any]:
        """The case's description as plain JSON values (for pytest-benchmark's extra_info)."""
        return {
            "case": self.name,
            "group": self.group,
            "method": self.method,
            "kind": self.kind,
            "variant": self.variant,
            "location": self.location,
            "nbytes": self.nbytes,
            "role": self.role,
        }


def case_name(kind: str, variant: str, location: str, method: str) -> str:
    """The unique name of a case: ``kind/variant/location/method``."""
    return f"{kind}/{variant}/{location}/{method}"


def _size_label(nbytes: int) -> str:
    if nbytes % MIB == 0:
        return f"{nbytes // MIB}M"
    return f"{nbytes // KIB}K"


class _Builder:
    """Collects the cases of one kind/variant/location group."""

    def __init__(self, kind: str, variant: str, location: str, nbytes: int, **defaults: Any
                 ) -> None:
        self.kind, self.variant, self.location, self.nbytes = kind, variant, location, nbytes
        self.defaults = defaults
        self.cases: list[Case] = []

    def add(self, method: str, role: str, setup: Setup, *, requires: tuple[str, ...] = (),
            **options: Any) -> None:
        settings = {**self.defaults, **options}
        self.cases.append(Case(
            name=case_name(self.kind, self.variant, self.location, method),
            group=f"{self.kind} {self.variant} {self.location}",
            method=method, setup=setup, kind=self.kind, variant=self.variant,
            location=self.location, nbytes=self.nbytes, role=role, requires=requires,
            **settings,
        ))


# ---- the context a case runs in -------------------------------------------------------


class CaseDir:
    """What a case's setup gets: its private directory and hooks around the timed calls.

    Attributes:
        directory: a fresh directory of this case alone, on the RAM disk or the disk.
        location: "ram" or "disk".
        disk_dir: the run's private directory on the disk (for the disk-load process).
        before_round: untimed work before every timed call, or None.
    """

    def __init__(self, directory: str, location: str, disk_dir: str) -> None:
        self.directory = directory
        self.location = location
        self.disk_dir = disk_dir
        self.before_round: Callable[[], None] | None = None
        self._closers: list[Callable[[], object]] = []

    def path(self, name: str = "audio.wav") -> str:
        """A path named name inside this case's directory."""
        return f"{self.directory}/{name}"

    def each_round(self, fn: Callable[[], None]) -> None:
        """Run fn, untimed, before every timed call."""
        self.before_round = fn

    def on_close(self, fn: Callable[[], object]) -> None:
        """Run fn when the case is done (in reverse order of registration)."""
        self._closers.append(fn)

    def close(self) -> None:
        """Run the registered cleanups; the first error is raised after all ran."""
        error: BaseException | None = None
        while self._closers:
            try:
                self._closers.pop()()
            except BaseException as exc:  # re-raised below, after the other cleanups
                error = error or exc
        if error is not None:
            raise error


def _unlink(path: str) -> None:
    with _contextlib.suppress(FileNotFoundError):
        _os.unlink(path)


def _fresh_file(ctx: CaseDir, write: Callable[[str], object]) -> Callable[[], object]:
    """Time write(path) on a path that does not exist yet (removed, untimed, before each call)."""
    path = ctx.path("fresh.wav")
    ctx.each_round(lambda: _unlink(path))
    return lambda: write(path)


@_functools.lru_cache(maxsize=8)
def _audio(dtype: str, frames: int) -> np.ndarray:
    """Deterministic mono test audio (a tone with a little noise), read-only."""
    rng = np.random.default_rng(frames)
    t = np.arange(frames, dtype=np.float64) / SAMPLERATE
    signal = 0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.05 * rng.standard_normal(frames)
    np.clip(signal, -1.0, 1.0, out=signal)
    array = (signal * 32767).astype("<i2") if dtype == "int16" else signal.astype("<f4")
    array.setflags(write=False)
    return array


def _reference_file(ctx: CaseDir, data: np.ndarray, subtype: str | None = None
                    ) -> tuple[str, int, bytes]:
    """Write data once with write_wav; return (path, data offset, the header bytes)."""
    path = write_wav(ctx.path("reference.wav"), data, SAMPLERATE, subtype=subtype)
    fd, info = _lowlevel.wav_open(path)
    _lowlevel.close(fd)
    with open(path, "rb") as f:
        header = f.read(info.data_offset)
    return path, info.data_offset, header


def _wait_for_reserve(deadline: float = 2.0) -> None:
    """Wait (untimed) until the prefault reserve is full again after the last call took a
    file: the cases "reserve ready" time a call that finds one, as calls spaced by a
    render do. The "back to back" case shows calls that come faster than refills."""
    end = _time.monotonic() + deadline
    while prefault_stats().files < prefault_stats().per_size and _time.monotonic() < end:
        _time.sleep(0.0002)
    # Then 0.5 ms more for the thread to go back to sleep, this CPU kept busy (a CPU of
    # this VM that idles, even for a fraction of a millisecond, makes the next call slower).
    settled = _time.perf_counter() + 0.0005
    while _time.perf_counter() < settled:
        _time.sleep(0)


def _pool(ctx: CaseDir, nbytes: int) -> AudioPool:
    pool = AudioPool(slots=1, max_bytes=nbytes, timeout=5.0)
    ctx.on_close(pool.close)
    return pool


# ---- writes ----------------------------------------------------------------------------


def _write_cases(location: str, dtype: str, nbytes: int, *, kind: str = "write",
                 all_methods: bool = True, **defaults: Any) -> list[Case]:
    itemsize = 2 if dtype == "int16" else 4
    frames = nbytes // itemsize
    subtype = "PCM_16" if dtype == "int16" else "FLOAT"
    b = _Builder(kind, f"{dtype}-{_size_label(nbytes)}", location, nbytes, **defaults)
    quick = location == "ram" and dtype == "int16" and kind == "write"

    def data() -> np.ndarray:
        return _audio(dtype, frames)

    def ours(ctx: CaseDir) -> Callable[[], object]:
        d = data()
        return _fresh_file(ctx, lambda p: write_wav(p, d, SAMPLERATE))

    def pool(ctx: CaseDir) -> Callable[[], object]:
        d, p = data(), _pool(ctx, nbytes)
        return lambda: p.write_wav(d, SAMPLERATE).release()

    def buffer(ctx: CaseDir) -> Callable[[], object]:
        d = data()

        def fill(path: str) -> None:
            with create_wav_buffer(frames, SAMPLERATE, dtype=d.dtype, path=path) as buf:
                buf.array[:] = d
        return _fresh_file(ctx, fill)

    def new_buffer(ctx: CaseDir, *, reserve: bool = False, wait: bool = True,
                   close: bool = False) -> Callable[[], object]:
        # A new temp file (path=None) filled in place: the timed call ends when the WAV
        # is complete, as write_wav's does; closing is timed only with close=True.
        d = data()
        if reserve:
            prefault_wav_buffers()
            ctx.on_close(lambda: prefault_wav_buffers(0))
        made: list[WavBuffer] = []

        def release() -> None:
            while made:
                buf = made.pop()
                buf.close()
                _unlink(buf.path)

        def before() -> None:
            release()
            if reserve and wait:
                _wait_for_reserve()

        def fill() -> None:
            buf = create_wav_buffer(frames, SAMPLERATE, dtype=d.dtype)
            made.append(buf)
            buf.array[:] = d
            if close:
                buf.close()
        ctx.on_close(release)
        ctx.each_round(before)
        return fill

    def sf(ctx: CaseDir) -> Callable[[], object]:
        d, soundfile = data(), _peer("soundfile")
        return _fresh_file(ctx, lambda p: soundfile.write(p, d, SAMPLERATE, subtype=subtype))

    def scipy(ctx: CaseDir) -> Callable[[], object]:
        d, wavfile = data(), _peer("scipy.io.wavfile")
        return _fresh_file(ctx, lambda p: wavfile.write(p, SAMPLERATE, d))

    def stdlib_wave(ctx: CaseDir) -> Callable[[], object]:
        samples = data().data

        def write(path: str) -> None:
            with _wave.open(path, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(SAMPLERATE)
                w.writeframes(samples)
        return _fresh_file(ctx, write)

    def plain(ctx: CaseDir) -> Callable[[], object]:
        d = data()
        _, _, header = _reference_file(ctx, d)
        blob = header + d.tobytes()

        def write(path: str) -> None:
            with open(path, "wb") as f:
                f.write(blob)
        return _fresh_file(ctx, write)

    def floor(ctx: CaseDir) -> Callable[[], object]:
        d = data()
        _, _, header = _reference_file(ctx, d)
        return _fresh_file(ctx, lambda p: floors.floor_write(p, header, d))

    def copy(ctx: CaseDir) -> Callable[[], object]:
        d = data()
        dest = np.zeros_like(d)
        return lambda: np.copyto(dest, d)

    b.add(M_WRITE_WAV, OURS, ours, quick=quick)
    b.add(M_POOL_WRITE, OURS, pool, quick=quick)
    if all_methods:
        b.add(M_BUFFER, OURS, buffer)
    if all_methods and location == "ram":  # the reserve serves the RAM disk only
        b.add(M_BUFFER_NEW, OURS, new_buffer)
        b.add(M_BUFFER_PREFAULT, OURS, _functools.partial(new_buffer, reserve=True),
              quick=quick)
        b.add(M_BUFFER_PREFAULT_CLOSED, OURS,
              _functools.partial(new_buffer, reserve=True, close=True))
        b.add(M_BUFFER_PREFAULT_BURST, OURS,
              _functools.partial(new_buffer, reserve=True, wait=False))
    b.add(M_SF_WRITE, SOUNDFILE, sf, requires=("soundfile",), quick=quick)
    if all_methods:
        b.add(M_SCIPY_WRITE, PEER, scipy, requires=("scipy.io.wavfile",))
        if dtype == "int16":
            b.add(M_WAVE_WRITE, PEER, stdlib_wave)
        b.add(M_OPEN_WRITE, PEER, plain)
    b.add(M_FLOOR_WRITE, FLOOR, floor, quick=quick)
    b.add(M_NUMPY_COPY, REFERENCE, copy)
    return b.cases


def _convert_cases(location: str) -> list[Case]:
    """float32 in [-1, 1] -> a 500 KB PCM_16 WAV (256,000 frames: 1 MB of float32 in)."""
    frames = SIZE_500K // 2
    b = _Builder("convert", "float32-to-PCM_16-500K", location, SIZE_500K)
    quick = location == "ram"

    def data() -> np.ndarray:
        return _audio("float32", frames)

    def ours(ctx: CaseDir) -> Callable[[], object]:
        d = data()
        return _fresh_file(ctx, lambda p: write_wav(p, d, SAMPLERATE, subtype="PCM_16"))

    def pool(ctx: CaseDir) -> Callable[[], object]:
        d, p = data(), _pool(ctx, SIZE_500K)
        return lambda: p.write_wav(d, SAMPLERATE, subtype="PCM_16").release()

    def sf(ctx: CaseDir) -> Callable[[], object]:
        d, soundfile = data(), _peer("soundfile")
        return _fresh_file(ctx, lambda p: soundfile.write(p, d, SAMPLERATE, subtype="PCM_16"))

    def astype(ctx: CaseDir) -> Callable[[], object]:
        d = data()
        return _fresh_file(ctx, lambda p: write_wav(p, (d * 32767).astype(np.int16),
                                                    SAMPLERATE))

    def astype_scipy(ctx: CaseDir) -> Callable[[], object]:
        d, wavfile = data(), _peer("scipy.io.wavfile")
        return _fresh_file(ctx, lambda p: wavfile.write(p, SAMPLERATE,
                                                        (d * 32767).astype(np.int16)))

    def floor(ctx: CaseDir) -> Callable[[], object]:
        pcm = _audio("int16", frames)
        _, _, header = _reference_file(ctx, pcm)
        return _fresh_file(ctx, lambda p: floors.floor_write(p, header, pcm))

    def convert_only(ctx: CaseDir) -> Callable[[], object]:
        d = data()
        dest = np.zeros(frames, dtype=np.int16)
        return lambda: _lowlevel.float_to_pcm_into(d, dest, 16)

    b.add(M_CONVERT, OURS, ours, quick=quick)
    b.add(M_POOL_CONVERT, OURS, pool)
    b.add(M_SF_CONVERT, SOUNDFILE, sf, requires=("soundfile",), quick=quick)
    b.add(M_ASTYPE_WRITE, PEER, astype)
    b.add(M_ASTYPE_SCIPY, PEER, astype_scipy, requires=("scipy.io.wavfile",))
    b.add(M_FLOOR_CONVERTED, FLOOR, floor)
    b.add(M_C_CONVERT, REFERENCE, convert_only)
    return b.cases


# ---- reads -----------------------------------------------------------------------------


def _read_cases(location: str, dtype: str, nbytes: int, *, kind: str = "read",
                all_methods: bool = True, **defaults: Any) -> list[Case]:
    itemsize = 2 if dtype == "int16" else 4
    frames = nbytes // itemsize
    b = _Builder(kind, f"{dtype}-{_size_label(nbytes)}", location, nbytes, **defaults)
    quick = location == "ram" and dtype == "int16" and kind == "read"

    def prepared(ctx: CaseDir) -> tuple[str, int, np.ndarray]:
        d = _audio(dtype, frames)
        path, offset, _ = _reference_file(ctx, d)
        return path, offset, d

    def mmap(ctx: CaseDir) -> Callable[[], object]:
        path, _, _ = prepared(ctx)
        return lambda: read_wav(path)

    def mmap_copy(ctx: CaseDir) -> Callable[[], object]:
        # Touches every sample (page faults on the mapping) and ends with an owned
        # array, like read_wav(copy): a copy costs far less than numpy's int16 sum.
        path, _, _ = prepared(ctx)
        return lambda: read_wav(path)[0].copy()

    def copy(ctx: CaseDir) -> Callable[[], object]:
        path, _, _ = prepared(ctx)
        return lambda: read_wav(path, mmap=False)

    def sf(ctx: CaseDir) -> Callable[[], object]:
        path, _, _ = prepared(ctx)
        soundfile = _peer("soundfile")
        return lambda: soundfile.read(path, dtype=dtype)

    def scipy(ctx: CaseDir) -> Callable[[], object]:
        path, _, _ = prepared(ctx)
        wavfile = _peer("scipy.io.wavfile")
        return lambda: wavfile.read(path, mmap=False)

    def scipy_mmap(ctx: CaseDir) -> Callable[[], object]:
        path, _, _ = prepared(ctx)
        wavfile = _peer("scipy.io.wavfile")
        return lambda: wavfile.read(path, mmap=True)

    def stdlib_wave(ctx: CaseDir) -> Callable[[], object]:
        path, _, _ = prepared(ctx)

        def read() -> np.ndarray:
            with _wave.open(path, "rb") as w:
                return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return read

    def floor(ctx: CaseDir) -> Callable[[], object]:
        path, offset, d = prepared(ctx)
        dest = np.zeros_like(d)  # allocated and touched once, outside the timing
        return lambda: floors.floor_read(path, offset, dest)

    def floor_new(ctx: CaseDir) -> Callable[[], object]:
        # What an owned result costs at least: the floor plus a new array's memory.
        path, offset, d = prepared(ctx)
        return lambda: floors.floor_read(path, offset, np.empty_like(d))

    b.add(M_READ_MMAP, OURS, mmap, quick=quick)
    b.add(M_READ_MMAP_COPY, OURS, mmap_copy)
    b.add(M_READ_COPY, OURS, copy, quick=quick)
    b.add(M_SF_READ, SOUNDFILE, sf, requires=("soundfile",), quick=quick)
    if all_methods:
        b.add(M_SCIPY_READ, PEER, scipy, requires=("scipy.io.wavfile",))
        b.add(M_SCIPY_READ_MMAP, PEER, scipy_mmap, requires=("scipy.io.wavfile",))
        if dtype == "int16":
            b.add(M_WAVE_READ, PEER, stdlib_wave)
    b.add(M_FLOOR_READ, FLOOR, floor, quick=quick)
    b.add(M_FLOOR_READ_NEW, REFERENCE, floor_new)
    return b.cases


# ---- convert-on-read --------------------------------------------------------------------


def _decode_cases(location: str) -> list[Case]:
    """PCM_16 and PCM_24 files of 500 KB read as float32 (what ASR models want), beside
    soundfile doing the same, our plain read of the file's own type and the floor."""
    cases: list[Case] = []
    for subtype, dtype in (("PCM_16", "int16"), ("PCM_24", "int32")):
        sample_bytes = 2 if subtype == "PCM_16" else 3
        frames = SIZE_500K // sample_bytes
        b = _Builder("read-convert", f"{subtype}-to-float32-500K", location, SIZE_500K)

        def prepared(ctx: CaseDir, subtype: str = subtype, dtype: str = dtype,
                     frames: int = frames) -> tuple[str, int, int]:
            d = _audio(dtype, frames)
            path, offset, _ = _reference_file(ctx, d, subtype)
            return path, offset, frames * (2 if subtype == "PCM_16" else 3)

        def ours(ctx: CaseDir, prepared: Callable[..., tuple[str, int, int]] = prepared
                 ) -> Callable[[], object]:
            path, _, _ = prepared(ctx)
            return lambda: read_wav(path, dtype="float32")

        def copy(ctx: CaseDir, prepared: Callable[..., tuple[str, int, int]] = prepared
                 ) -> Callable[[], object]:
            path, _, _ = prepared(ctx)
            return lambda: read_wav(path, mmap=False)

        def sf(ctx: CaseDir, prepared: Callable[..., tuple[str, int, int]] = prepared
               ) -> Callable[[], object]:
            path, _, _ = prepared(ctx)
            soundfile = _peer("soundfile")
            return lambda: soundfile.read(path, dtype="float32")

        def floor(ctx: CaseDir, prepared: Callable[..., tuple[str, int, int]] = prepared
                  ) -> Callable[[], object]:
            path, offset, nbytes = prepared(ctx)
            dest = np.zeros(nbytes, np.uint8)
            return lambda: floors.floor_read(path, offset, dest)

        b.add(M_READ_DECODE, OURS, ours)
        b.add(M_READ_COPY, OURS, copy)
        b.add(M_SF_READ_FLOAT, SOUNDFILE, sf, requires=("soundfile",))
        b.add(M_FLOOR_READ, FLOOR, floor)
        cases += b.cases
    return cases


def _read_out_cases(location: str) -> list[Case]:
    """A 50 MB int16 file read into a caller's array, beside the floor reading into one."""
    frames = 50 * MIB // 2
    b = _Builder("read-out", "int16-50M", location, 50 * MIB, budget=1.0, min_rounds=5,
                 max_rounds=40)

    def prepared(ctx: CaseDir) -> tuple[str, int, np.ndarray]:
        d = _audio("int16", frames)
        path, offset, _ = _reference_file(ctx, d)
        return path, offset, np.zeros_like(d)  # allocated and touched outside the timing

    def ours(ctx: CaseDir) -> Callable[[], object]:
        path, _, dest = prepared(ctx)
        return lambda: read_wav(path, out=dest)

    def floor(ctx: CaseDir) -> Callable[[], object]:
        path, offset, dest = prepared(ctx)
        return lambda: floors.floor_read(path, offset, dest)

    b.add(M_READ_OUT, OURS, ours)
    b.add(M_FLOOR_READ, FLOOR, floor)
    return b.cases


# ---- fixed cost per call -------------------------------------------------------------------


class _TenAttributes:
    """The Python reference's object: what a result object of ours costs to make."""

    def __init__(self, value: int) -> None:
        self.a = self.b = self.c = self.d = self.e = value
        self.f = self.g = self.h = self.i = self.j = value


def _small_cases() -> list[Case]:
    """A 16-sample WAV (and one 20 ms chunk) on the RAM disk: what each call costs beyond the
    system calls it cannot avoid, each beside its C floor in the same run."""
    b = _Builder("per-call", "int16-16-samples", "ram", 32, budget=0.3, min_rounds=500,
                 max_rounds=5000)
    tiny = np.arange(16, dtype=np.int16)

    def prepared(ctx: CaseDir) -> tuple[str, int]:
        path, offset, _ = _reference_file(ctx, tiny)
        return path, offset

    def write_new(ctx: CaseDir) -> Callable[[], object]:
        return _fresh_file(ctx, lambda p: write_wav(p, tiny, SAMPLERATE))

    def floor_write(ctx: CaseDir) -> Callable[[], object]:
        _, _, header = _reference_file(ctx, tiny)
        return _fresh_file(ctx, lambda p: floors.floor_write(p, header, tiny))

    def read_copy(ctx: CaseDir) -> Callable[[], object]:
        path, _ = prepared(ctx)
        return lambda: read_wav(path, mmap=False)

    def floor_read(ctx: CaseDir) -> Callable[[], object]:
        path, offset = prepared(ctx)
        dest = np.zeros_like(tiny)
        return lambda: floors.floor_read(path, offset, dest)

    def view(ctx: CaseDir) -> Callable[[], object]:
        path, _ = prepared(ctx)
        return lambda: read_wav(path)

    def floor_map(ctx: CaseDir) -> Callable[[], object]:
        path, _ = prepared(ctx)
        return lambda: floors.map_file(path)

    def pool(ctx: CaseDir, anonymous: bool = False) -> Callable[[], object]:
        p = AudioPool(slots=2, max_bytes=4096, anonymous=anonymous)
        ctx.on_close(p.close)
        return lambda: p.write_wav(tiny, SAMPLERATE).release()

    def name(ctx: CaseDir) -> Callable[[], object]:
        return get_temp_audio_path

    chunk = _audio("int16", CHUNK_FRAMES)

    def writer(ctx: CaseDir) -> Callable[[], object]:
        w = WavWriter(ctx.path("stream.wav"), SAMPLERATE)
        ctx.on_close(w.close)
        return lambda: w.write(chunk)

    def floor_append(ctx: CaseDir) -> Callable[[], object]:
        fd = _os.open(ctx.path("floor_stream.wav"), _os.O_RDWR | _os.O_CREAT | _os.O_CLOEXEC,
                      0o600)
        ctx.on_close(lambda: _os.close(fd))
        offset = _itertools.count(44, chunk.nbytes)
        return lambda: floors.append(fd, next(offset), chunk)

    b.add(M_SMALL_WRITE, OURS, write_new)
    b.add(M_FLOOR_WRITE, FLOOR, floor_write)
    b.add(M_SMALL_READ, OURS, read_copy)
    b.add(M_FLOOR_READ, REFERENCE, floor_read)
    b.add(M_SMALL_VIEW, OURS, view)
    b.add(M_FLOOR_MAP, REFERENCE, floor_map)
    b.add(M_SMALL_POOL, OURS, pool)
    b.add(M_SMALL_POOL_ANON, OURS, lambda ctx: pool(ctx, anonymous=True))
    b.add(M_SMALL_NAME, OURS, name)
    b.add(M_PYTHON_REFERENCE, REFERENCE, lambda ctx: lambda: _TenAttributes(16))
    b.add(M_SMALL_CHUNK, OURS, writer)
    b.add(M_FLOOR_APPEND, REFERENCE, floor_append)
    return b.cases


# ---- round trips -----------------------------------------------------------------------


def _roundtrip_cases(location: str) -> list[Case]:
    frames = SIZE_500K // 2
    variant = "int16-500K"
    rt = _Builder("roundtrip", variant, location, SIZE_500K)
    rc = _Builder("roundtrip+cleanup", variant, location, SIZE_500K)
    quick = location == "ram"

    def data() -> np.ndarray:
        return _audio("int16", frames)

    def ours(ctx: CaseDir) -> Callable[[], object]:
        d = data()

        def step(path: str) -> None:
            write_wav(path, d, SAMPLERATE)
            read_wav(path, mmap=False)
        return _fresh_file(ctx, step)

    def pool(ctx: CaseDir) -> Callable[[], object]:
        d, p = data(), _pool(ctx, SIZE_500K)

        def step() -> None:
            with p.write_wav(d, SAMPLERATE) as pooled:
                read_wav(pooled.path, mmap=False)
        return step

    def sf(ctx: CaseDir) -> Callable[[], object]:
        d, soundfile = data(), _peer("soundfile")

        def step(path: str) -> None:
            soundfile.write(path, d, SAMPLERATE, subtype="PCM_16")
            soundfile.read(path, dtype="int16")
        return _fresh_file(ctx, step)

    def scipy(ctx: CaseDir) -> Callable[[], object]:
        d, wavfile = data(), _peer("scipy.io.wavfile")

        def step(path: str) -> None:
            wavfile.write(path, SAMPLERATE, d)
            wavfile.read(path, mmap=False)
        return _fresh_file(ctx, step)

    def floor(ctx: CaseDir) -> Callable[[], object]:
        d = data()
        _, offset, header = _reference_file(ctx, d)
        dest = np.zeros_like(d)

        def step(path: str) -> None:
            floors.floor_write(path, header, d)
            floors.floor_read(path, offset, dest)
        return _fresh_file(ctx, step)

    def pool_floor(ctx: CaseDir) -> Callable[[], object]:
        # The physical limit of a pool round trip: a C memcpy into an already-mapped,
        # pre-faulted slot (one of a real AudioPool), then C open + preadv + close of it.
        d, p = data(), _pool(ctx, SIZE_500K)
        held = p.acquire(frames, SAMPLERATE)
        ctx.on_close(held.release)
        fd, info = _lowlevel.wav_open(held.path)
        _lowlevel.close(fd)
        slot, path, offset, dest = held.array, held.path, info.data_offset, np.zeros_like(d)

        def step() -> None:
            floors.copy(slot, d)
            floors.floor_read(path, offset, dest)
        return step

    def ours_cleanup(ctx: CaseDir) -> Callable[[], object]:
        d = data()

        def step() -> None:
            path = write_wav(None, d, SAMPLERATE)
            read_wav(path, mmap=False)
            cleanup_temp_audio(path)
        return step

    def sf_cleanup(ctx: CaseDir) -> Callable[[], object]:
        d, soundfile = data(), _peer("soundfile")
        path = ctx.path("fresh.wav")

        def step() -> None:
            soundfile.write(path, d, SAMPLERATE, subtype="PCM_16")
            soundfile.read(path, dtype="int16")
            _os.remove(path)
        return step

    def floor_cleanup(ctx: CaseDir) -> Callable[[], object]:
        d = data()
        _, offset, header = _reference_file(ctx, d)
        dest = np.zeros_like(d)
        path = ctx.path("fresh.wav")

        def step() -> None:
            floors.floor_write(path, header, d)
            floors.floor_read(path, offset, dest)
            _os.unlink(path)
        return step

    rt.add(M_RT_WRITE_WAV, OURS, ours)
    rt.add(M_RT_POOL, OURS, pool, quick=quick)
    rt.add(M_RT_SF, SOUNDFILE, sf, requires=("soundfile",), quick=quick)
    rt.add(M_RT_SCIPY, PEER, scipy, requires=("scipy.io.wavfile",))
    rt.add(M_RT_FLOOR, FLOOR, floor, quick=quick)
    rt.add(M_RT_POOL_FLOOR, REFERENCE, pool_floor, quick=quick)
    rc.add(M_RC_OURS, OURS, ours_cleanup)
    rc.add(M_RC_POOL, OURS, pool)
    rc.add(M_RC_SF, SOUNDFILE, sf_cleanup, requires=("soundfile",))
    rc.add(M_RC_FLOOR, FLOOR, floor_cleanup)
    return rt.cases + rc.cases


# ---- scaling, streaming, temp files ------------------------------------------------------


def _scaling_cases(location: str) -> list[Case]:
    cases: list[Case] = []
    for nbytes in SCALING_SIZES:
        # Few rounds for the big ones: a 50 MB call takes tens of milliseconds.
        rounds = {"budget": 0.5, "min_rounds": 5 if nbytes >= 5 * MIB else 20,
                  "max_rounds": 1000}
        cases += _write_cases(location, "int16", nbytes, kind="scale-write",
                              all_methods=False, **rounds)
        cases += _read_cases(location, "int16", nbytes, kind="scale-read",
                             all_methods=False, **rounds)
    return cases


def _stream_cases(location: str) -> list[Case]:
    b = _Builder("stream", "int16-20ms-chunks", location, CHUNK_FRAMES * 2,
                 budget=0.5, min_rounds=200, max_rounds=3000)
    quick = location == "ram"

    def chunk() -> np.ndarray:
        return _audio("int16", CHUNK_FRAMES)

    def ours(ctx: CaseDir) -> Callable[[], object]:
        c = chunk()
        writer = WavWriter(ctx.path("stream.wav"), SAMPLERATE)
        ctx.on_close(writer.close)
        return lambda: writer.write(c)

    def sf(ctx: CaseDir) -> Callable[[], object]:
        c, soundfile = chunk(), _peer("soundfile")
        out = soundfile.SoundFile(ctx.path("stream.wav"), "w", SAMPLERATE, 1, "PCM_16")
        ctx.on_close(out.close)
        return lambda: out.write(c)

    def floor(ctx: CaseDir) -> Callable[[], object]:
        c = chunk().data
        fd = _os.open(ctx.path("stream.raw"),
                      _os.O_WRONLY | _os.O_CREAT | _os.O_TRUNC | _os.O_CLOEXEC, 0o600)
        ctx.on_close(lambda: _os.close(fd))
        return lambda: _os.write(fd, c)

    b.add(M_STREAM_WRITER, OURS, ours, quick=quick)
    b.add(M_STREAM_SF, SOUNDFILE, sf, requires=("soundfile",), quick=quick)
    b.add(M_STREAM_FLOOR, FLOOR, floor)
    return b.cases


def _temp_cases(location: str) -> list[Case]:
    temp = _Builder("temp-path", "create", location, 0, budget=0.3, min_rounds=200,
                    max_rounds=3000)
    cleanup = _Builder("cleanup", f"{CLEANUP_FILES}-files", location, 0, budget=1.0,
                       min_rounds=3, max_rounds=5)

    def ours(ctx: CaseDir) -> Callable[[], object]:
        return _functools.partial(get_temp_audio_path, create=True)

    def mkstemp(ctx: CaseDir) -> Callable[[], object]:
        def step() -> None:
            fd, _ = _tempfile.mkstemp(".wav", AUDIO_PREFIX, ctx.directory)
            _os.close(fd)
        return step

    def touch(ctx: CaseDir) -> Callable[[], object]:
        counter = _itertools.count()
        return lambda: floors.touch_excl(f"{ctx.directory}/f{next(counter)}.wav")

    def make_files(directory: str) -> None:
        for _ in range(CLEANUP_FILES):
            name = f"{directory}/{AUDIO_PREFIX}{_uuid.uuid4().hex}.wav"
            _os.close(_os.open(name, _os.O_WRONLY | _os.O_CREAT | _os.O_EXCL | _os.O_CLOEXEC,
                               0o600))

    def cleanup_all(ctx: CaseDir) -> Callable[[], object]:
        ctx.each_round(lambda: make_files(ctx.directory))

        def step() -> None:
            removed = cleanup_all_temp_audio()
            if removed != CLEANUP_FILES:  # the environment pointed somewhere else
                raise RuntimeError(f"cleanup_all_temp_audio removed {removed} files, "
                                   f"expected {CLEANUP_FILES}")
        return step

    def scandir_unlink(ctx: CaseDir) -> Callable[[], object]:
        ctx.each_round(lambda: make_files(ctx.directory))

        def step() -> None:
            with _os.scandir(ctx.directory) as entries:
                for entry in entries:
                    if entry.name.startswith(AUDIO_PREFIX):
                        _os.unlink(entry.path)
        return step

    temp.add(M_TEMP_PATH, OURS, ours, quick=location == "ram")
    temp.add(M_MKSTEMP, PEER, mkstemp)
    temp.add(M_TOUCH_FLOOR, FLOOR, touch)
    cleanup.add(M_CLEANUP, OURS, cleanup_all)
    cleanup.add(M_CLEANUP_FLOOR, FLOOR, scandir_unlink)
    return temp.cases + cleanup.cases


# ---- tail latency under disk load ----------------------------------------------------------

_DISK_LOAD_SCRIPT = r"""
import os, sys, time
path, max_bytes, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + seconds
block = os.urandom(1 << 20)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
print("writing", flush=True)
written = 0
try:
    while time.monotonic() < deadline:
        os.write(fd, block)
        written += len(block)
        if written % (16 << 20) == 0:
            os.fsync(fd)
        if written >= max_bytes:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            written = 0
finally:
    os.close(fd)
    os.unlink(path)
"""


def _start_disk_load(ctx: CaseDir) -> None:
    """Start a process that writes and fsyncs a large file in the run's private disk dir.

    It is bounded (DISK_LOAD_MAX_BYTES on disk, DISK_LOAD_MAX_SECONDS of life)
    and stopped, its file removed, when the case closes.
    """
    fd, path = _tempfile.mkstemp(".bin", "disk_load_", ctx.disk_dir)
    _os.close(fd)
    child = _subprocess.Popen(
        [_sys.executable, "-c", _DISK_LOAD_SCRIPT, path, str(DISK_LOAD_MAX_BYTES),
         str(DISK_LOAD_MAX_SECONDS)],
        stdout=_subprocess.PIPE, stdin=_subprocess.DEVNULL, text=True)

    def stop() -> None:
        child.terminate()
        try:
            child.wait(timeout=10)
        except _subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        _unlink(path)

    ctx.on_close(stop)
    assert child.stdout is not None
    if child.stdout.readline().strip() != "writing":
        raise RuntimeError("the disk-load process did not start")
    _time.sleep(0.3)  # let the first fsync reach the disk queue


TAIL_QUIET = "disk quiet"
TAIL_BUSY = "disk busy"


def _tail_cases(location: str) -> list[Case]:
    """Each method timed with the disk quiet, then at once with the disk busy.

    The two runs of a method are next to each other in time, so that a change
    of the machine's state between groups (fresh-page costs here vary several
    times over minutes) does not pass for the effect of the disk load.
    """
    b = _Builder("tail-write", "int16-500K", location, SIZE_500K,
                 budget=1.5, min_rounds=300, max_rounds=1000)
    plain = {case.method: case for case in _write_cases(location, "int16", SIZE_500K)}

    def loaded(inner: Setup) -> Setup:
        def setup(ctx: CaseDir) -> Callable[[], object]:
            _start_disk_load(ctx)
            return inner(ctx)
        return setup

    for method in (M_WRITE_WAV, M_POOL_WRITE, M_SF_WRITE, M_FLOOR_WRITE):
        case = plain[method]
        b.add(f"{method} | {TAIL_QUIET}", REFERENCE, case.setup, requires=case.requires)
        b.add(f"{method} | {TAIL_BUSY}", REFERENCE, loaded(case.setup),
              requires=case.requires)
    return b.cases


# ---- all of them -------------------------------------------------------------------------


@_functools.cache
def all_cases() -> tuple[Case, ...]:
    """Every case, in the order they run (groups together, RAM before disk)."""
    cases: list[Case] = []
    for location in LOCATIONS:
        cases += _write_cases(location, "int16", SIZE_500K)
        cases += _write_cases(location, "float32", SIZE_500K)
        cases += _convert_cases(location)
        cases += _read_cases(location, "int16", SIZE_500K)
        cases += _read_cases(location, "float32", SIZE_500K)
        cases += _decode_cases(location)
        cases += _roundtrip_cases(location)
        cases += _stream_cases(location)
        cases += _temp_cases(location)
    for location in LOCATIONS:
        cases += _scaling_cases(location)
    cases += _small_cases()
    for location in LOCATIONS:
        cases += _read_out_cases(location)
    for location in LOCATIONS:
        cases += _tail_cases(location)
    names = [case.name for case in cases]
    if len(set(names)) != len(names):  # pragma: no cover - a mistake in this file
        raise AssertionError("benchmark case names are not unique")
    return tuple(cases)


def quick_cases() -> tuple[Case, ...]:
    """The few cases of ``benchmarks/cases.py --quick`` (RAM disk only)."""
    return tuple(case for case in all_cases() if case.quick)


def cases_of_kind(*kinds: str) -> tuple[Case, ...]:
    """The cases of these kinds (write, read, roundtrip, ...), in running order."""
    return tuple(case for case in all_cases() if case.kind in kinds)


def case_by_name(name: str) -> Case:
    """The case called name; KeyError when there is none."""
    for case in all_cases():
        if case.name == name:
            return case
    raise KeyError(name)


# ---- running -----------------------------------------------------------------------------


@_contextlib.contextmanager
def _environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the block."""
    saved = {key: _os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                _os.environ.pop(key, None)
            else:
                _os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                _os.environ.pop(key, None)
            else:
                _os.environ[key] = value


def _loadavg() -> str:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


@dataclass
class Prepared:
    """A case ready to time: the callable, its untimed per-round step, and how many rounds."""

    fn: Callable[[], object]
    before_round: Callable[[], None] | None
    rounds: int

    def time_rounds(self) -> list[float]:
        """Run the rounds; return the seconds each timed call took."""
        clock, fn, before = _time.perf_counter, self.fn, self.before_round
        times = []
        for _ in range(self.rounds):
            if before is not None:
                before()
            start = clock()
            fn()
            times.append(clock() - start)
        return times


class Workspace:
    """Private directories for one benchmark run, removed by :meth:`close`.

    ``ram`` is a fresh directory inside the RAM disk (``$LUNA_SHM_DIR`` or
    ``/dev/shm``), ``disk`` one inside the disk temp dir (``$TMPDIR`` or ``/tmp``).

    Raises:
        OSError: there is no usable RAM disk, or the directories cannot be made.
    """

    ram = ""
    disk = ""

    def __init__(self) -> None:
        self.ram_base = placement.ram_dir()
        self.disk_base = placement.fallback_dir()
        problem = placement.ram_dir_problem(self.ram_base)
        if problem is not None:
            raise OSError(_errno.ENODEV, f"no RAM disk to benchmark: {problem}", self.ram_base)
        self.loadavg_start = _loadavg()
        self.ram = _tempfile.mkdtemp(prefix="luna_shm_bench_", dir=self.ram_base)
        try:
            self.disk = _tempfile.mkdtemp(prefix="luna_shm_bench_", dir=self.disk_base)
        except BaseException:
            _shutil.rmtree(self.ram, ignore_errors=True)
            raise

    def close(self) -> None:
        """Remove both private directories; calling it again does nothing."""
        for directory in (self.ram, self.disk):
            if directory:
                _shutil.rmtree(directory, ignore_errors=True)
        self.ram = self.disk = ""

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_contextlib.contextmanager
    def prepared(self, case: Case, *, quick: bool = False) -> Iterator[Prepared]:
        """Set the case up in a fresh private directory and calibrate its rounds.

        While the block runs, LUNA_SHM_DIR and TMPDIR point at private dirs only
        (the case's own one for its location), and LUNA_SHM_DISABLE=1 sends the
        library's temp files to the disk for the "disk" location.
        """
        if not self.ram:
            raise ValueError("the benchmark workspace is closed")
        in_ram = case.location == "ram"
        directory = _tempfile.mkdtemp(prefix="case_", dir=self.ram if in_ram else self.disk)
        env = {
            "LUNA_SHM_DIR": directory if in_ram else self.ram,
            "TMPDIR": self.disk if in_ram else directory,
            "LUNA_SHM_DISABLE": None if in_ram else "1",
        }
        ctx = CaseDir(directory, case.location, self.disk)
        try:
            with _environment(env):
                try:
                    fn = case.setup(ctx)
                    yield Prepared(fn, ctx.before_round, _calibrate(case, fn, ctx, quick))
                finally:
                    ctx.close()
        finally:
            _shutil.rmtree(directory, ignore_errors=True)


# --quick: a few seconds for the whole subset.
_QUICK_BUDGET, _QUICK_MIN_ROUNDS, _QUICK_MAX_ROUNDS = 0.05, 5, 50


def _calibrate(case: Case, fn: Callable[[], object], ctx: CaseDir, quick: bool) -> int:
    """Warm up (1-2 untimed-for-the-result calls) and choose rounds to fill the case's budget."""
    estimate = _math.inf
    for _ in range(1 if quick else 2):
        if ctx.before_round is not None:
            ctx.before_round()
        start = _time.perf_counter()
        fn()
        estimate = min(estimate, _time.perf_counter() - start)
    if quick:
        budget, low, high = _QUICK_BUDGET, _QUICK_MIN_ROUNDS, _QUICK_MAX_ROUNDS
    else:
        budget, low, high = case.budget, case.min_rounds, case.max_rounds
    return max(low, min(high, int(budget / max(estimate, 1e-7))))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of values by the nearest-rank method."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, _math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Result:
    """The timings of one case: seconds per call, one entry per round."""

    case: Case
    times: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return float(np.median(self.times))

    @property
    def p99(self) -> float:
        """99th percentile seconds per call (nearest rank)."""
        return percentile(self.times, 99)

    @property
    def rounds(self) -> int:
        """How many calls were timed."""
        return len(self.times)


def measure(workspace: Workspace, case: Case, *, quick: bool = False) -> Result:
    """Set up, calibrate and time one case in the workspace.

    Args:
        workspace: the run's private directories.
        case: what to time.
        quick: few rounds (``benchmarks/cases.py --quick``).

    Returns:
        The case's :class:`Result`.
    """
    with workspace.prepared(case, quick=quick) as prepared:
        return Result(case, tuple(prepared.time_rounds()))


class Progress:
    """A one-line progress bar on a stream (a line per step when it is not a terminal)."""

    def __init__(self, stream: TextIO, total: int, width: int = 24) -> None:
        self.stream = stream
        self.total = total
        self.width = width
        self.tty = stream.isatty()

    def step(self, index: int, label: str) -> None:
        """Show that step index (0-based) of total, called label, is running."""
        done = self.width * index // max(1, self.total)
        bar = "#" * done + "." * (self.width - done)
        text = f"bench [{bar}] {index + 1}/{self.total} {label}"
        if self.tty:
            self.stream.write("\r" + text[:110].ljust(110))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """Print a message on its own line."""
        if self.tty:
            self.stream.write("\r" + " " * 110 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the bar's line."""
        if self.tty:
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()


def run(cases: Iterable[Case], *, quick: bool = False, progress: Progress | None = None
        ) -> list[Result]:
    """Time cases one after another in a fresh private workspace.

    Args:
        cases: the cases to run; those whose optional modules are missing are skipped
            (with a note on the progress stream).
        quick: few rounds per case.
        progress: where to show progress, or None.

    Returns:
        One :class:`Result` per case that ran, in order.
    """
    todo = list(cases)
    results: list[Result] = []
    with Workspace() as workspace:
        for index, case in enumerate(todo):
            missing = case.missing()
            if missing:
                if progress is not None:
                    progress.note(f"skipped {case.name}: {', '.join(missing)} not installed")
                continue
            if progress is not None:
                progress.step(index, f"{case.group}: {case.method}")
            results.append(measure(workspace, case, quick=quick))
    if progress is not None:
        progress.finish()
    return results


# ---- targets -------------------------------------------------------------------------------

_RT = "roundtrip/int16-500K"


@dataclass(frozen=True)
class Target:
    """One promise of the issue, checked against medians of named cases.

    kind "under": median(cases[0]) < limit seconds.
    kind "within": median(cases[0]) / median(cases[1]) <= limit.
    kind "faster": median(cases[1]) / median(cases[0]) >= limit (cases[0] is ours).
    kind "linear": (median(cases[1]) / median(cases[0])) / (size ratio) <= limit.
    kind "over": median(cases[0]) - median(cases[1]) <= limit seconds (a fixed cost).
    kind "tail": p99(cases[0]) / median(cases[0]) <= limit (needs the p99s).
    """

    text: str
    kind: str
    cases: tuple[str, ...]
    limit: float
    hard: bool = False
    size_ratio: float = 1.0


@dataclass(frozen=True)
class TargetResult:
    """A target with its measured value and whether it was met (None: not measured)."""

    target: Target
    value: float | None
    met: bool | None

    @property
    def measured(self) -> str:
        """The measured value as text."""
        if self.value is None:
            return "not measured"
        if self.target.kind in ("under", "over"):
            return format_seconds(self.value)
        if self.target.kind == "faster":
            return f"{self.value:.2f}x faster"
        if self.target.kind == "tail":
            return f"p99 {self.value:.2f}x the median"
        return f"{self.value:.3f}x"

    @property
    def limit(self) -> str:
        """The limit as text."""
        t = self.target
        if t.kind == "under":
            return f"< {format_seconds(t.limit)}"
        if t.kind == "over":
            return f"<= {format_seconds(t.limit)} over the floor"
        if t.kind == "faster":
            return f">= {t.limit:g}x faster"
        if t.kind == "tail":
            return f"p99 <= {t.limit:g}x the median"
        return f"<= {t.limit:.2f}x"

    @property
    def verdict(self) -> str:
        """met / missed by how much / not measured."""
        if self.value is None or self.met is None:
            return "not measured"
        t = self.target
        if t.kind in ("under", "over"):
            factor = self.value / t.limit
        elif t.kind == "faster":
            factor = t.limit / self.value
        else:
            factor = self.value / t.limit
        if self.met:
            return f"met ({1 / factor:.2f}x margin)"
        return f"MISSED by {(factor - 1) * 100:.1f}%"


def _targets() -> tuple[Target, ...]:
    def n(kind: str, variant: str, location: str, method: str) -> str:
        return case_name(kind, variant, location, method)

    targets = [
        Target("AudioPool write + read_wav(mmap=False) of 500 KB under 0.2 ms "
               "(the documented promise; test_target.py fails above it)",
               "under", (n("roundtrip", "int16-500K", "ram", M_RT_POOL),), 0.2e-3, hard=True),
        Target("AudioPool write + read_wav(mmap=False) of 500 KB under 0.06 ms (RAM disk)",
               "under", (n("roundtrip", "int16-500K", "ram", M_RT_POOL),), 0.06e-3),
        Target("AudioPool write + read back >= 5x faster than soundfile.write + "
               "soundfile.read (RAM disk)", "faster",
               (n("roundtrip", "int16-500K", "ram", M_RT_POOL),
                n("roundtrip", "int16-500K", "ram", M_RT_SF)), 5.0),
        Target("AudioPool write + read_wav(mmap=False) of 500 KB within 1.25x of its physical "
               "limit, C memcpy into the mapped slot + C open + preadv + close (RAM disk)",
               "within", (n("roundtrip", "int16-500K", "ram", M_RT_POOL),
                          n("roundtrip", "int16-500K", "ram", M_RT_POOL_FLOOR)), 1.25),
        Target("AudioPool write + read back >= 7x faster than soundfile.write + "
               "soundfile.read (RAM disk)", "faster",
               (n("roundtrip", "int16-500K", "ram", M_RT_POOL),
                n("roundtrip", "int16-500K", "ram", M_RT_SF)), 7.0),
    ]
    for location in LOCATIONS:
        where = "RAM disk" if location == "ram" else "disk temp dir"
        targets += [
            Target(f"fresh-file write_wav within 1.10x of the C create+writev+close floor "
                   f"({where}, 500 KB)", "within",
                   (n("write", "int16-500K", location, M_WRITE_WAV),
                    n("write", "int16-500K", location, M_FLOOR_WRITE)), 1.10),
            Target(f"read_wav(mmap=False) within 1.10x of the readv floor ({where}, 500 KB)",
                   "within", (n("read", "int16-500K", location, M_READ_COPY),
                              n("read", "int16-500K", location, M_FLOOR_READ)), 1.10),
        ]
    targets.append(
        Target("read_wav(mmap=False) within 1.05x of the readv floor (RAM disk, 500 KB; "
               "issue 13's tighter limit)", "within",
               (n("read", "int16-500K", "ram", M_READ_COPY),
                n("read", "int16-500K", "ram", M_FLOOR_READ)), 1.05))
    targets += [
        Target("create_wav_buffer within 1.2x of a fresh write_wav (500 KB, RAM disk; "
               "prefault reserve ready, the array filled)", "within",
               (n("write", "int16-500K", "ram", M_BUFFER_PREFAULT),
                n("write", "int16-500K", "ram", M_WRITE_WAV)), 1.2),
        Target("read_wav zero-copy open under 0.015 ms (RAM disk, 500 KB)", "under",
               (n("read", "int16-500K", "ram", M_READ_MMAP),), 0.015e-3),
        Target("float32 -> PCM_16 convert-on-write of 500 KB >= 5x faster than "
               "soundfile.write doing the same conversion (RAM disk)", "faster",
               (n("convert", "float32-to-PCM_16-500K", "ram", M_CONVERT),
                n("convert", "float32-to-PCM_16-500K", "ram", M_SF_CONVERT)), 5.0),
    ]
    for subtype in ("PCM_16", "PCM_24"):
        variant = f"{subtype}-to-float32-500K"
        targets += [
            Target(f"read_wav(dtype=float32) of a 500 KB {subtype} file >= 5x faster than "
                   "soundfile.read(dtype=float32) (RAM disk)", "faster",
                   (n("read-convert", variant, "ram", M_READ_DECODE),
                    n("read-convert", variant, "ram", M_SF_READ_FLOAT)), 5.0),
            Target(f"read_wav(dtype=float32) of a 500 KB {subtype} file within 1.3x of our "
                   "plain copy read of it (RAM disk)", "within",
                   (n("read-convert", variant, "ram", M_READ_DECODE),
                    n("read-convert", variant, "ram", M_READ_COPY)), 1.3),
        ]
    targets += [
        Target("read_wav(path, out=array) of 50 MB within 1.05x of the preadv floor into "
               "the same array (RAM disk)", "within",
               (n("read-out", "int16-50M", "ram", M_READ_OUT),
                n("read-out", "int16-50M", "ram", M_FLOOR_READ)), 1.05),
        Target("write_wav of a 16-sample WAV to a new file at most 3 us over C create + "
               "writev + close", "over",
               (n("per-call", "int16-16-samples", "ram", M_SMALL_WRITE),
                n("per-call", "int16-16-samples", "ram", M_FLOOR_WRITE)), 3e-6),
        Target("read_wav(mmap=False) of a 16-sample WAV at most 2 us over C open + preadv + "
               "close", "over",
               (n("per-call", "int16-16-samples", "ram", M_SMALL_READ),
                n("per-call", "int16-16-samples", "ram", M_FLOOR_READ)), 2e-6),
        Target("read_wav (view) of a 16-sample WAV at most 4 us over C open + fstat + mmap + "
               "close + munmap", "over",
               (n("per-call", "int16-16-samples", "ram", M_SMALL_VIEW),
                n("per-call", "int16-16-samples", "ram", M_FLOOR_MAP)), 4e-6),
        Target("AudioPool.write_wav + release of a 16-sample WAV under 3 us in all", "under",
               (n("per-call", "int16-16-samples", "ram", M_SMALL_POOL),), 3e-6),
        Target("get_temp_audio_path(create=False) under 3 us", "under",
               (n("per-call", "int16-16-samples", "ram", M_SMALL_NAME),), 3e-6),
        Target("WavWriter.write of a 20 ms chunk at most 2 us over C pwritev of the chunk",
               "over", (n("per-call", "int16-16-samples", "ram", M_SMALL_CHUNK),
                        n("per-call", "int16-16-samples", "ram", M_FLOOR_APPEND)), 2e-6),
        Target("WavWriter 20 ms chunks >= 3x faster per chunk than "
               "soundfile.SoundFile.write (RAM disk)", "faster",
               (n("stream", "int16-20ms-chunks", "ram", M_STREAM_WRITER),
                n("stream", "int16-20ms-chunks", "ram", M_STREAM_SF)), 3.0),
    ]
    for location in LOCATIONS:
        where = "RAM disk" if location == "ram" else "disk temp dir"
        targets.append(Target(
            f"AudioPool.write_wav of 500 KB while another process writes and fsyncs to the "
            f"disk: p99 at most 3x the median ({where})", "tail",
            (n("tail-write", "int16-500K", location, f"{M_POOL_WRITE} | {TAIL_BUSY}"),), 3.0))
    for location in LOCATIONS:
        where = "RAM disk" if location == "ram" else "disk temp dir"
        for size in ("5M", "50M"):
            targets += [
                Target(f"{size}B write_wav within 1.10x of the floor ({where})", "within",
                       (n("scale-write", f"int16-{size}", location, M_WRITE_WAV),
                        n("scale-write", f"int16-{size}", location, M_FLOOR_WRITE)), 1.10),
                Target(f"{size}B read_wav(mmap=False) within 1.10x of the floor ({where})",
                       "within",
                       (n("scale-read", f"int16-{size}", location, M_READ_COPY),
                        n("scale-read", f"int16-{size}", location, M_FLOOR_READ)), 1.10),
            ]
        targets += [
            Target(f"write_wav cost linear in size: time per byte at 50 MB <= 1.10x that "
                   f"at 5 MB ({where})", "linear",
                   (n("scale-write", "int16-5M", location, M_WRITE_WAV),
                    n("scale-write", "int16-50M", location, M_WRITE_WAV)), 1.10,
                   size_ratio=10.0),
            Target(f"read_wav(mmap=False) cost linear in size: time per byte at 50 MB <= "
                   f"1.10x that at 5 MB ({where})", "linear",
                   (n("scale-read", "int16-5M", location, M_READ_COPY),
                    n("scale-read", "int16-50M", location, M_READ_COPY)), 1.10,
                   size_ratio=10.0),
        ]
    targets += [
        Target("get_temp_audio_path() with the file created under 0.015 ms (RAM disk)",
               "under", (n("temp-path", "create", "ram", M_TEMP_PATH),), 0.015e-3),
        Target(f"cleanup_all_temp_audio() on {CLEANUP_FILES:,} files under 0.2 s (RAM disk)",
               "under", (n("cleanup", f"{CLEANUP_FILES}-files", "ram", M_CLEANUP),), 0.2),
    ]
    return tuple(targets)


TARGETS: tuple[Target, ...] = _targets()


def evaluate_targets(medians: Mapping[str, float],
                     targets: Sequence[Target] = TARGETS,
                     p99s: Mapping[str, float] | None = None) -> list[TargetResult]:
    """Check each target against medians (seconds per call, by case name).

    Args:
        medians: case name -> median seconds; a target whose cases are not all
            there is "not measured".
        targets: which targets (all by default).
        p99s: case name -> 99th percentile seconds, for the "tail" targets (without
            it they are "not measured").

    Returns:
        One :class:`TargetResult` per target, in order.
    """
    results = []
    for target in targets:
        values = [medians.get(name) for name in target.cases]
        if any(v is None or v <= 0 for v in values):
            results.append(TargetResult(target, None, None))
            continue
        v = [float(x) for x in values if x is not None]
        if target.kind == "tail":
            p99 = (p99s or {}).get(target.cases[0])
            if p99 is None:
                results.append(TargetResult(target, None, None))
                continue
            value = p99 / v[0]
            met = value <= target.limit
        elif target.kind == "under":
            value, met = v[0], v[0] < target.limit
        elif target.kind == "within":
            value = v[0] / v[1]
            met = value <= target.limit
        elif target.kind == "faster":
            value = v[1] / v[0]
            met = value >= target.limit
        elif target.kind == "over":
            value = v[0] - v[1]
            met = value <= target.limit
        elif target.kind == "linear":
            value = (v[1] / v[0]) / target.size_ratio
            met = value <= target.limit
        else:  # pragma: no cover - a mistake in this file
            raise ValueError(f"unknown target kind {target.kind!r}")
        results.append(TargetResult(target, value, met))
    return results


# ---- output ------------------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    """A duration in milliseconds with sensible precision (or seconds from 1 s)."""
    if seconds >= 1:
        return f"{seconds:.3f} s"
    ms = seconds * 1e3
    if ms < 0.1:
        return f"{ms:.4f} ms"
    if ms < 10:
        return f"{ms:.3f} ms"
    return f"{ms:.1f} ms"


def _ratios(results: Sequence[Result]) -> dict[str, tuple[float | None, float | None]]:
    """case name -> (x faster than soundfile, x the floor) within its group."""
    by_group: dict[str, dict[str, float]] = {}
    for r in results:
        if r.case.role in (SOUNDFILE, FLOOR):
            by_group.setdefault(r.case.group, {})[r.case.role] = r.median
    ratios = {}
    for r in results:
        refs = by_group.get(r.case.group, {})
        sf, floor = refs.get(SOUNDFILE), refs.get(FLOOR)
        ratios[r.case.name] = (sf / r.median if sf else None,
                               r.median / floor if floor else None)
    return ratios


def format_table(results: Sequence[Result]) -> list[str]:
    """The results as text lines: one block per group, one row per method.

    Columns: median and p99 per call, rounds, how many times faster than
    soundfile is (soundfile's median / this median, in the same group), and
    the time as a multiple of the floor's (this median / the floor's).
    """
    ratios = _ratios(results)
    width = max([len(r.case.method) for r in results] + [20]) + 2
    head = (f"{'':{width}}{'median':>12}{'p99':>12}{'rounds':>8}"
            f"{'faster than soundfile':>23}{'x floor':>10}")
    lines = [head]
    group = None
    for r in results:
        if r.case.group != group:
            group = r.case.group
            lines.append(group)
        sf, floor = ratios[r.case.name]
        sf_text = "-" if sf is None else f"{sf:.2f}x"
        floor_text = "-" if floor is None else f"{floor:.2f}x"
        lines.append(f"  {r.case.method:{width - 2}}{format_seconds(r.median):>12}"
                     f"{format_seconds(r.p99):>12}{r.rounds:>8}{sf_text:>23}{floor_text:>10}")
    return lines


def format_targets(outcomes: Sequence[TargetResult]) -> list[str]:
    """Targets as text lines: verdict, measured value, limit, and the target's text."""
    lines = []
    for o in outcomes:
        lines.append(f"  {o.verdict}: {o.measured} (limit {o.limit}) - {o.target.text}")
    return lines


def _fs_type(path: str) -> str:
    try:
        st = _os.stat(path)
    except OSError as exc:
        return f"unknown ({exc.strerror})"
    name = placement.mount_fs_type((_os.major(st.st_dev), _os.minor(st.st_dev)))
    return name or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _platform.processor() or "unknown"


def describe_machine(workspace: Workspace | None = None) -> dict[str, str]:
    """The machine a run is on: CPU, cores, kernel, Python, numpy, peers, filesystems.

    Args:
        workspace: the run's workspace, for the filesystems of its directories
            (else the RAM dir and disk temp dir luna_shm would use now).

    Returns:
        Label -> text, in display order.
    """
    ram = workspace.ram_base if workspace else placement.ram_dir()
    disk = workspace.disk_base if workspace else placement.fallback_dir()
    info = {
        "CPU": _cpu_model(),
        "cores": str(_os.cpu_count()),
        "kernel": f"{_platform.system()} {_platform.release()}",
        "Python": f"{_platform.python_implementation()} {_platform.python_version()}",
        "numpy": np.__version__,
    }
    if not _missing_module("soundfile"):
        soundfile = _peer("soundfile")
        info["soundfile"] = (f"{soundfile.__version__} "
                             f"(libsndfile {soundfile.__libsndfile_version__})")
    if not _missing_module("scipy"):
        info["scipy"] = str(_peer("scipy").__version__)
    info["RAM dir"] = f"{ram} ({_fs_type(ram)})"
    info["disk temp dir"] = f"{disk} ({_fs_type(disk)})"
    info["load average at start"] = workspace.loadavg_start if workspace else _loadavg()
    return info


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages from /proc/loadavg ("unknown" elsewhere)."""
    return _loadavg()


def main(argv: Sequence[str] | None = None, out: TextIO = _sys.stdout) -> int:
    """``python benchmarks/cases.py [--quick]``: run the cases and print the table."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="benchmarks/cases.py",
        description="Time luna_shm side by side with soundfile, scipy, the stdlib and the C "
        "floors, on the RAM disk and the disk temp dir, in private directories removed "
        "afterwards; print median, p99 and the ratios, with the targets met or missed. The "
        "full run takes minutes; --quick runs a small subset in seconds.")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset with few rounds (a few seconds)")
    args = parser.parse_args(argv)
    cases = quick_cases() if args.quick else all_cases()
    results = run(cases, quick=args.quick, progress=Progress(_sys.stderr, len(cases)))
    machine = describe_machine()
    print(f"luna_shm bench{' --quick' if args.quick else ''}: {len(results)} cases on "
          f"{machine['CPU']}, {machine['cores']} cores, {machine['kernel']}; "
          f"RAM dir {machine['RAM dir']}, disk temp dir {machine['disk temp dir']}", file=out)
    for line in format_table(results):
        print(line, file=out)
    measured = [outcome for outcome in evaluate_targets(
        {result.case.name: result.median for result in results},
        p99s={result.case.name: result.p99 for result in results})
        if outcome.value is not None]
    if measured:
        print("targets:", file=out)
        for line in format_targets(measured):
            print(line, file=out)
    note = " (--quick: few rounds, expect noise)" if args.quick else ""
    print(f"times are per call: median and 99th percentile of the rounds shown{note}; "
          "ratios are within one group of this run", file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
