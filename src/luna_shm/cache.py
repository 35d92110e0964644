"""AudioCache: a bounded TTS cache on the RAM disk, shared by every process of this user.

``cache_key(text, voice=..., engine=..., **options)`` names an utterance;
``AudioCache(name)`` is a directory of complete entry files (0600, in a 0700
directory per cache name and user inside our RAM dir) that every process
opening the same name shares. ``get(key)`` returns a :class:`CachedAudio`
pinned while held; ``get_or_render(key, render, ...)`` renders a missing key
once, whatever the number of callers in this and other processes.

The index is the directory itself, files and atomic renames (see the README,
"A TTS cache", for why not SQLite):

* ``<key>.wav`` (or ``<key>.<suffix>`` for encoded audio) is a committed entry:
  it only ever appears complete, by ``rename``. Its mtime is when it was
  stored (the TTL clock), its atime when it was last used or stored (the LRU clock).
* A holder of an entry keeps a shared flock on it (the pin); evicting takes
  the exclusive flock without waiting and unlinks under it, so a pinned entry
  is never removed, by any process.
* ``<key>.live`` is the entry being rendered: a WAV that a :class:`WavWriter`
  fills, whose header is valid after every chunk. The renderer holds an
  exclusive flock on it; waiters block on a shared flock, which the kernel
  grants when the renderer finished, failed or died.
* ``lock`` serialises what changes the set of entries (commit, eviction,
  discard, clear): the RAM tier never holds more than ``max_bytes`` of
  committed entries, checked and made true under it, before a rename.
* ``stats`` holds the shared counters; ``.<key>.<24 hex digits>.part`` files are in
  flight, ``.<key>.<24 hex digits>.unstored.<suffix>`` is audio too large to store.
  Every sweep and :meth:`AudioCache.destroy` remove only regular files of exactly
  these shapes (a ``.live`` file also starts as a render's WAV, a note as a note):
  whatever else is in the directory is not the cache's, and stays.
* ``<key>.outcome`` is the note a failed (or unstored) render leaves for its
  waiters, naming its file by inode number; the key's next render removes it
  before it starts (a disk may reuse the number), a sweep after a minute,
  :meth:`AudioCache.destroy` at once.

A kill -9 at any point leaves committed entries complete and at most in-flight
files (partials, a stale ``.live``), which the next pass under the lock removes.
"""

from __future__ import annotations

import collections as _collections
import errno as _errno
import fcntl as _fcntl
import functools as _functools
import hashlib as _hashlib
import json as _json
import math as _math
import os as _os
import re as _re
import stat as _stat
import struct as _struct
import threading as _threading
import time as _time
import warnings as _warnings
import weakref as _weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from luna_shm import _lowlevel, _newfile, _resource, encoding, formats, placement
from luna_shm._resource import FileResource
from luna_shm.errors import LunaShmError, WavError
from luna_shm.follow import follow_wav
from luna_shm.wav import mapped_samples
from luna_shm.writer import WavWriter

__all__ = ["AudioCache", "CacheStats", "CachedAudio", "RenderError", "cache_key"]

_T = TypeVar("_T")

DIR_PREFIX = "luna_cache-"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_DISK_MAX_BYTES = 1024 * 1024 * 1024
# Encoded entries (put_bytes): a small fixed table, so that a lookup is a few stats,
# never a directory scan. ".wav" is first: the common case costs one open.
ENCODED_SUFFIXES = (".mp3", ".ogg", ".opus", ".flac", ".aac", ".m4a", ".webm")
ENTRY_SUFFIXES = (".wav", *ENCODED_SUFFIXES)
_KEY = _re.compile(r"[A-Za-z0-9_-]{1,128}")
_NAME = _re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_LIVE = ".live"
_OUTCOME = ".outcome"
_OUTCOME_START = _re.compile(rb"[0-9]{1,20} [0-9]{1,10} ")
# A .live file is a WavWriter's WAV: its header has the live-stream state chunk.
_LIVE_START = _re.compile(rb"RIFF.{4}WAVE.{0,96}JUNK\x08\x00\x00\x00lsst", _re.DOTALL)
_PART = ".part"
# The mode of an entry that a newer entry of its key, of another type, replaced while a
# caller held it (its holder's path must go on naming it): look-ups pass it by, and it
# goes once no one holds it. Entries are made 0600; only a commit makes one 0400.
_SUPERSEDED = 0o400
_UNSTORED = ".unstored"
_LOCK_NAME = "lock"
# The exact shapes of the in-flight names (see _token and _Tier.new_part): a sweep and
# destroy() touch only these, never a user's "backup.part" or "x.unstored.txt".
_ANY_SUFFIX = "|".join(_re.escape(suffix) for suffix in ENTRY_SUFFIXES)
_PART_NAME = _re.compile(rf"\.[A-Za-z0-9_-]{{1,128}}(?:{_ANY_SUFFIX})?\.[0-9a-f]{{24}}"
                         rf"{_re.escape(_PART)}")
_UNSTORED_NAME = _re.compile(rf"\.[A-Za-z0-9_-]{{1,128}}\.[0-9a-f]{{24}}"
                             rf"{_re.escape(_UNSTORED)}(?:{_ANY_SUFFIX})")
# The lock file also holds the shared counters: little-endian uint64s, read and written
# under the lock. "bytes" is the committed bytes of the tier, kept so that a commit that
# fits costs no directory scan; it is only ever too high (it grows before a rename and
# shrinks after an unlink), and every scan (at open, and whenever it says "full" and the
# last scan's queue cannot make room) sets it to the truth again: so the bound holds even
# after a kill -9 between the two (too high, it only keeps the tier below its bound).
# "encoded" goes from 0 to 1 once encoded audio is stored (it widens every look-up).
_COUNTERS = ("bytes", "hits", "misses", "evictions", "renders", "spills", "reloads",
             "encoded")
_NOT_STATS = ("bytes", "encoded")
_COUNTERS_FORMAT = _struct.Struct(f"<{len(_COUNTERS)}Q")


class RenderError(LunaShmError, RuntimeError):
    """The render of a key that this caller waited for failed (in this or another process)."""


def cache_key(text: str, *, voice: object = None, engine: object = None,
              **options: object) -> str:
    """A stable key for an utterance: the SHA-256 of a canonical JSON form of the arguments.

    The same arguments give the same key in every process and Python version
    (keys sorted, no whitespace, floats as their shortest repr). numpy scalars count
    as the Python numbers of their value (``np.int64(1)`` as ``1``).

    Args:
        text: what is said.
        voice, engine, options: anything else the audio depends on; JSON values
            only (str, int, float, bool, None, lists and str-keyed dicts of them).

    Returns:
        64 lowercase hex digits.

    Raises:
        TypeError: text is not a str, a value is not JSON, or a dict has a key that is
            not a str (JSON would turn ``1`` and ``None`` into ``"1"`` and ``"null"``, so
            two different values would get one key); the message names where.
        ValueError: a float is NaN or infinite, an int has more than 4300 digits, a
            str holds a lone surrogate (it has no UTF-8 form), a list or dict
            contains itself, or lists and dicts are nested more than 100 deep.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {_lowlevel.brief(text)}")
    form = {"text": _json_form("text", text, ()), "voice": _json_form("voice", voice, ()),
            "engine": _json_form("engine", engine, ()),
            "options": {name: _json_form(name, value, ()) for name, value in options.items()}}
    try:
        canonical = _json.dumps(form, sort_keys=True, ensure_ascii=False,
                                separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # sys.set_int_max_str_digits lowered below 4300 digits
        raise ValueError(f"cache_key arguments have no canonical JSON form: {exc}") from None
    return _hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# Ints of more digits than this have no str form under Python's default limit (and the
# limit is a per-process setting: a key must not depend on it).
_MAX_KEY_INT = 10**4300
# Lists and dicts nested deeper than this are refused (a ValueError naming the argument):
# the form is built, and json.dumps writes it, by recursion, which ends in RecursionError
# far sooner than any real option needs (the interpreter's limit is a per-process setting).
_MAX_KEY_DEPTH = 100


def _utf8_str(where: str, text: str) -> str:
    """text, when it has a UTF-8 form (no lone surrogate); else ValueError naming where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"cache_key argument {where} holds a lone surrogate "
                         f"{text[exc.start]!r} at index {exc.start}, which has no UTF-8 "
                         f"form: got {_lowlevel.brief(text)}") from None
    return text


def _json_form(where: str, value: object, within: tuple[int, ...]) -> object:
    """value as plain JSON values (numpy scalars as Python numbers), checked so that
    json.dumps gives its one canonical form; where names it in an error (``speed['a'][0]``),
    within holds the ids of the lists and dicts around it (a cycle is refused)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _utf8_str(where, value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        number = int(value)
        if not -_MAX_KEY_INT < number < _MAX_KEY_INT:
            raise ValueError(f"cache_key argument {where} is too large an int for a key (at "
                             f"most 4300 digits), got {_lowlevel.brief(number)}")
        return number
    if isinstance(value, float | np.floating):
        real = float(value)
        if not _math.isfinite(real):
            raise ValueError(f"cache_key arguments must be finite numbers: {where} is {real!r}")
        return real
    if isinstance(value, list | tuple | dict):
        if id(value) in within:
            raise ValueError(f"cache_key argument {where} contains itself")
        if len(within) >= _MAX_KEY_DEPTH:
            argument = where.partition("[")[0]  # the whole path would be 100 indexes long
            raise ValueError(f"cache_key argument {argument} is nested more than "
                             f"{_MAX_KEY_DEPTH} lists or dicts deep")
        inner = (*within, id(value))
        if isinstance(value, dict):
            form: dict[str, object] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise TypeError(f"cache_key argument {where} has a dict key that is not a "
                                    f"str: {_lowlevel.brief(key)} (only str-keyed dicts have "
                                    "one JSON form)")
                name = _utf8_str(f"{where} (a dict key)", key)
                form[name] = _json_form(f"{where}[{_lowlevel.brief(key)}]", item, inner)
            return form
        return [_json_form(f"{where}[{i}]", item, inner) for i, item in enumerate(value)]
    raise TypeError(f"cache_key arguments must be JSON values (str, int, float, bool, None, "
                    f"lists and str-keyed dicts of them): {where} is a {type(value).__name__}, "
                    f"{_lowlevel.brief(value)}")


def _token() -> str:
    """A random name part for an in-flight file (names are also created exclusively):
    24 lowercase hex digits, the shape _PART_NAME and _UNSTORED_NAME look for."""
    return _os.urandom(12).hex()


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (see cache_key), got {_lowlevel.brief(key)}")
    if not _KEY.fullmatch(key):
        raise ValueError(f"key must be 1 to 128 characters of A-Z, a-z, 0-9, '_' or '-' "
                         f"(cache_key makes one), got {key!r}")
    return key


def _check_bytes(what: str, value: object, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    return formats.check_int(what, value, minimum=1)


def _check_ttl(ttl: object) -> float:
    """ttl as float seconds > 0 (formats.check_seconds, which also takes numpy numbers)."""
    try:
        seconds = formats.check_seconds("ttl", ttl, optional=True)
    except ValueError:
        seconds = 0.0  # negative or NaN: the message below says what ttl must be
    if not seconds > 0:
        raise ValueError(f"ttl must be None or > 0 seconds, got {_lowlevel.brief(ttl)}")
    return seconds


def _entry_name(name: str) -> tuple[str, str] | None:
    """(key, suffix) when name is a committed entry's file name, else None."""
    key, dot, suffix = name.rpartition(".")
    if not dot or f".{suffix}" not in ENTRY_SUFFIXES or not _KEY.fullmatch(key):
        return None
    return key, f".{suffix}"


@dataclass(frozen=True)
class CacheStats:
    """What :meth:`AudioCache.stats` counts (the counters are shared by all processes)."""

    entries: int
    bytes: int
    max_bytes: int
    pinned: int
    hits: int
    misses: int
    evictions: int
    renders: int
    spills: int
    reloads: int
    disk_entries: int
    disk_bytes: int


class CachedAudio(FileResource):
    """A cache entry pinned while held: never evicted, by any process, until released.

    Attributes:
        key: the entry's key.
        path: the entry's file: a complete WAV, or the stored encoded file.
        stored: False for audio that was rendered but not stored (larger than the
            cache's bound, or every entry pinned): path is then a file of its own
            in the cache directory, removed once no one holds it.
        live: reserved for issue 11 (always False here): True will mean the entry is
            still being rendered and :meth:`blocks` follows it as it grows.

    Use it in ``with`` or call :meth:`release` (the same as ``close()``). Threads may
    share one: a release in one thread while another reads :attr:`array` leaves the
    reader with the array or ``ValueError`` (closed).
    """

    key: str = ""
    stored: bool = True
    live: bool = False
    _array: np.ndarray | None = None
    _samplerate: int | None = None

    _size: int = -1

    def __init__(self, cell: _lowlevel.FdCell, path: str, key: str, *, stored: bool = True,
                 size: int = -1) -> None:
        self.key = key
        self.stored = stored
        self._size = size
        self._own(cell, path)
        # A forked child that kept the pin would keep the entry from eviction, discard and
        # clear (in every process) after this process released it, for as long as it lives.
        self._let_go_at_fork()

    @property
    def is_wav(self) -> bool:
        """True for a WAV entry (array and samplerate work), False for encoded audio."""
        return self.path.endswith(".wav")

    def _load(self) -> tuple[np.ndarray, int]:
        """(array, samplerate), mapped on first use."""
        self._check_open()  # before the lock: a forked child never waits for it
        if not self.is_wav:
            raise ValueError(f"{self.path} holds encoded audio, not a WAV: read its bytes "
                             "(read_bytes) or hand its path to a decoder")
        with self._lock:
            self._busy = True  # first: a handler may run at any call from here on
            try:
                self._check_open()  # released by another thread meanwhile
                array, samplerate = self._array, self._samplerate
                if array is None or samplerate is None:
                    self._map()
                    array, samplerate = self._array, self._samplerate
            finally:
                self._end_use()
        assert array is not None and samplerate is not None
        return array, samplerate

    def _map(self) -> None:
        """Parse and map the file (under the lock, open)."""
        # Parsed and mapped through the pinned descriptor: no second open, and the very
        # file our flock holds (a put of the same key may have renamed a newer one over
        # the name meanwhile).
        size = self._size if self._size >= 0 else _os.fstat(self._fd).st_size
        info = _lowlevel.wav_parse_fd(self._fd, size, self.path)
        mapping = _lowlevel.Mapping(self._fd, info.data_offset + info.data_bytes,
                                    writable=False, populate=False, filename=self.path)
        samples = mapped_samples(mapping, info)
        self._array = samples if info.channels == 1 else samples.reshape(-1, info.channels)
        self._samplerate = info.samplerate

    @property
    def array(self) -> np.ndarray:
        """The samples: a read-only zero-copy view of the entry, shaped like read_wav's.

        Raises:
            ValueError: the entry is encoded audio, or was released.
            WavError: the file is not a WAV we can read.
        """
        array = self._array  # read once: a release in another thread drops it
        return array if array is not None else self._load()[0]

    @property
    def samplerate(self) -> int:
        """The entry's sample rate (WAV entries)."""
        samplerate = self._samplerate
        return samplerate if samplerate is not None else self._load()[1]

    def read_bytes(self) -> bytes:
        """The whole file's bytes (for encoded entries: the MP3, Opus... as stored)."""
        # Under the entry's lock: a release in another thread closes the descriptor.
        return self._use_fd(lambda fd: _os.pread(fd, _os.fstat(fd).st_size, 0))

    def blocks(self) -> Iterator[np.ndarray]:
        """The audio as blocks of frames, in order.

        A CachedAudio is always a complete entry, so this yields the whole array once;
        to play an entry while another caller still renders it, use
        :meth:`AudioCache.follow`.
        """
        yield self.array

    def release(self) -> None:
        """Unpin the entry (the same as :meth:`close`); calling it again does nothing.

        An array taken from :attr:`array` stays valid: its mapping keeps the file.
        """
        self.close()

    def _release(self) -> None:
        self._array = None
        if not self.stored and self._pid == _resource.current_pid:
            _remove_unstored(self._fd, self.path, self.key)

    def __repr__(self) -> str:
        state = "released" if self.closed else "pinned"
        return f"<CachedAudio {self.key!r} {self.path!r} {state}>"


def _open_private_dir(parent: str, name: str, what: str) -> tuple[_lowlevel.FdCell, bool]:
    """Make (0700) or open parent/name, refusing a symlink, another user's dir or an open one.
    (the fd cell of the directory, True when this call made it)."""
    path = f"{parent}/{name}"
    try:
        _os.mkdir(path, 0o700)
        made = True
    except FileExistsError:
        made = False
    cell = _lowlevel.fd_cell()
    try:
        fd = _lowlevel.open_at(path, _os.O_RDONLY | _os.O_DIRECTORY | _os.O_NOFOLLOW, cell=cell)
    except OSError as exc:
        if exc.errno in (_errno.ELOOP, _errno.ENOTDIR):
            kind = "a symbolic link" if _os.path.islink(path) else "not a directory"
            raise PermissionError(_errno.EPERM, f"refusing the {what} directory: it is {kind}",
                                  path) from None
        raise
    st = _os.fstat(fd)
    if st.st_uid != _os.geteuid():
        _lowlevel.release(cell)
        raise PermissionError(_errno.EPERM, f"refusing the {what} directory: it belongs to "
                              f"uid {st.st_uid}", path)
    if st.st_mode & 0o077:
        _lowlevel.release(cell)
        raise PermissionError(_errno.EPERM, f"refusing the {what} directory: mode "
                              f"{_stat.S_IMODE(st.st_mode):o} lets others in (want 700)", path)
    return cell, made


# The tiers and caches whose thread locks (and pending counts) a forked child makes anew
# at once, before any of its threads can take them.
_made_anew_in_child: _weakref.WeakSet[Any] = _weakref.WeakSet()


def _make_anew_in_child() -> None:
    for each in list(_made_anew_in_child):
        each._after_fork_in_child()


_os.register_at_fork(after_in_child=_make_anew_in_child)


class _TierLock:
    """``with tier.locked():``: a class, not a contextlib generator, which a signal
    handler that raises as it yields would leave suspended holding both locks (until
    collected: a cleanup that takes the lock meanwhile, in the same thread, hangs).

    Left open: a handler that raises in the instant after the mutex's acquire()
    returns leaves the mutex held (no Python-level __enter__ can close that window;
    a ``with`` on a lock does, in C, but this one also takes a flock)."""

    __slots__ = ("deadline", "exclusive", "tier")

    def __init__(self, tier: _Tier, exclusive: bool, deadline: float | None) -> None:
        self.tier = tier
        self.exclusive = exclusive
        self.deadline = deadline

    def __enter__(self) -> None:
        tier = self.tier
        lock_path = tier.path(_LOCK_NAME)
        if self.deadline is None:
            tier.thread_lock.acquire()
        elif not tier.thread_lock.acquire(timeout=max(0.0, self.deadline - _time.monotonic())):
            raise TimeoutError(_errno.ETIMEDOUT, f"timed out waiting for the {tier.what}'s "
                               "lock (another thread holds it)", lock_path)
        if tier.pid != _os.getpid():
            # Under the thread lock, which the child made anew (_after_fork_in_child):
            # one thread of a forked child opens the child's lock fd, and the others use
            # it. (Two that both did closed each other's fd, or left one holding a flock
            # on an fd nobody would unlock: the child hung.) On failure only the thread
            # lock is let go: an unlock through the inherited fd would be the parent's.
            try:
                tier._after_fork()
            except BaseException:
                tier.thread_lock.release()
                raise
        try:  # whatever raises from here on (a handler, right after the flock is granted)
            # Checked under the mutex, which close() takes too: a cache that another
            # thread closed meanwhile has no lock file, and its number may be another
            # file's by now (a flock or a counter written there would be that file's).
            tier.check_open()
            _lock_by(tier.lock_fd, exclusive=self.exclusive, deadline=self.deadline,
                     what=f"the {tier.what}'s lock (another process holds it)", path=lock_path)
            # Everything done under the lock goes by path: a directory swapped for a
            # symlink (or another directory) since the open would be followed there.
            tier.check_in_place()
        except BaseException:
            tier.release()
            raise

    def __exit__(self, *exc: object) -> None:
        self.tier.release()


def dir_name(name: str) -> str:
    """The name of the directory of this user's cache called name (in the RAM dir, and in
    a disk_dir): ``luna_cache-<uid>-<name>``."""
    return f"{DIR_PREFIX}{_os.geteuid()}-{name}"


class _Tier:
    """One directory of entries (the RAM tier, or the disk tier) and its lock.

    A tier whose lock file cannot be opened for writing (a read-only mount, a lock file
    of mode 0444: a monitoring view) opens it read-only, as flock works on any open
    file: it can be looked at (stats, entries, get), and whatever would change it raises
    write_error's errno naming the lock file (check_writable), before touching anything.
    """

    # Why the lock file was opened read-only (EACCES, EPERM or EROFS), else None.
    write_error: OSError | None = None

    def __init__(self, parent: str, name: str, max_bytes: int, what: str) -> None:
        self.cache_name = name
        self.name = dir_name(name)
        self.directory = f"{parent}/{self.name}"
        self.max_bytes = max_bytes
        self.what = what
        dir_cell, self.made = _open_private_dir(parent, self.name, what)
        opened = _os.fstat(dir_cell[0])
        self.identity = (opened.st_dev, opened.st_ino)
        self.lock_cell = _lowlevel.fd_cell()  # owns lock_fd
        try:
            self.lock_fd = self._open_lock(_LOCK_NAME, dir_cell[0], self.lock_cell)
        except BaseException as exc:
            if self.made:
                _rmdir_quietly(self.directory)
            if isinstance(exc, OSError):  # named by dir_fd: say where
                raise OSError(exc.errno, exc.strerror, self.path(_LOCK_NAME)) from exc
            raise
        finally:
            _lowlevel.release(dir_cell)
        self.pid = _os.getpid()
        self.thread_lock = _threading.Lock()
        _made_anew_in_child.add(self)

    def _after_fork_in_child(self) -> None:
        """Right after a fork, in the child: a thread lock of its own (a thread of the
        parent may have held the parent's at the fork, and does not exist here), and a
        lock fd of its own at once (_after_fork). The inherited fd shares the parent's
        open file description, with the flock a parent thread may hold right now: kept by
        a child that never uses the cache, it would keep that flock for as long as the
        child lives once the parent is killed, and every process of the cache would wait.
        When the reopen fails (the directory was removed), the first locked call tries
        again, under the thread lock, and raises."""
        self.thread_lock = _threading.Lock()
        if self.lock_fd < 0:  # closed
            return
        try:
            self._after_fork()
        except OSError:
            pass

    def path(self, name: str) -> str:
        return f"{self.directory}/{name}"

    def _open_lock(self, name: str, dir_fd: int | None, cell: _lowlevel.FdCell) -> int:
        """Open the lock file (name, relative to dir_fd when given) into cell: read-write,
        made if missing; read-only, with write_error set, when write access is refused.
        A refused read-only open raises the first refusal."""
        try:
            return _lowlevel.open_at(name, _os.O_RDWR | _os.O_CREAT | _os.O_NOFOLLOW,
                                     dir_fd=dir_fd, cell=cell)
        except OSError as exc:
            if exc.errno not in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
                raise
            refused = exc
        try:
            fd = _lowlevel.open_at(name, _os.O_RDONLY | _os.O_NOFOLLOW, dir_fd=dir_fd,
                                   cell=cell)
        except OSError:
            raise refused from None
        code = refused.errno or _errno.EACCES
        self.write_error = OSError(code, f"the {self.what} can only be looked at here: its "
                                   "lock file could not be opened for writing "
                                   f"({_os.strerror(code)})", self.path(_LOCK_NAME))
        return fd

    def check_writable(self) -> None:
        """Raise (the errno that refused write access, naming the lock file) when the
        tier was opened read-only; see the class docstring."""
        error = self.write_error
        if error is not None:
            raise OSError(error.errno, error.strerror, error.filename)

    def check_open(self) -> None:
        """ValueError once the tier was closed (its cache closed or destroyed)."""
        if self.lock_fd < 0:
            raise ValueError(f"I/O operation on closed AudioCache {self.cache_name!r}")

    def in_place(self) -> bool:
        """True while directory names the directory this tier opened, and its lock file
        the file whose flock we take (nobody moved, removed or replaced them)."""
        try:
            self.check_in_place()
        except OSError:
            return False
        return True

    def check_in_place(self) -> None:
        """Raise unless the tier is in place (see in_place): FileNotFoundError when the
        directory is gone, PermissionError when another file has its name (a symlink to
        someone's own directory, say), whose files are then never touched."""
        try:
            st = _os.lstat(self.directory)
        except FileNotFoundError:
            raise FileNotFoundError(_errno.ENOENT, f"the {self.what} directory was removed "
                                    "after the cache opened", self.directory) from None
        if (st.st_dev, st.st_ino) != self.identity or not _stat.S_ISDIR(st.st_mode):
            kind = ("a symbolic link" if _stat.S_ISLNK(st.st_mode) else
                    "another directory" if _stat.S_ISDIR(st.st_mode) else "not a directory")
            raise PermissionError(_errno.EPERM, f"refusing the {self.what} directory: it was "
                                  f"replaced after the cache opened (it is now {kind})",
                                  self.directory)
        if self.lock_fd >= 0 and not _newfile.still_named(self.lock_fd, self.path(_LOCK_NAME)):
            raise PermissionError(_errno.EPERM, f"refusing the {self.what} directory: its "
                                  "lock file was removed or replaced after the cache opened",
                                  self.path(_LOCK_NAME))

    def _after_fork(self) -> None:
        # The parent's lock fd shares its open file description with the parent:
        # a flock on it would not exclude the parent. Open our own, and close our copy
        # of the parent's (the parent's flock stays: it holds its own descriptor).
        self.check_in_place()  # before an O_CREAT by path
        cell = _lowlevel.fd_cell()
        fd = self._open_lock(self.path(_LOCK_NAME), None, cell)
        inherited, self.lock_cell, self.lock_fd = self.lock_cell, cell, fd
        _lowlevel.release(inherited)
        self.pid = _os.getpid()

    def locked(self, exclusive: bool = True, deadline: float | None = None) -> _TierLock:
        """Hold the tier's lock (``with tier.locked():``): across threads (a mutex) and
        processes (a flock). deadline (time.monotonic()), when given, bounds the wait:
        TimeoutError (ETIMEDOUT) naming the lock file."""
        return _TierLock(self, exclusive, deadline)

    def release(self) -> None:
        """Let go of the tier's lock (unlocking a flock not held is harmless)."""
        try:
            if self.lock_fd >= 0:  # else closed: no flock to let go of
                _fcntl.flock(self.lock_fd, _fcntl.LOCK_UN)
        finally:
            self.thread_lock.release()

    def counters(self) -> list[int]:
        """The shared counters (under the lock)."""
        raw = _os.pread(self.lock_fd, _COUNTERS_FORMAT.size, 0)
        if len(raw) < _COUNTERS_FORMAT.size:
            return [0] * len(_COUNTERS)
        return list(_COUNTERS_FORMAT.unpack(raw))

    def add(self, deltas: dict[str, int]) -> list[int]:
        """Add deltas to the shared counters (under the lock); the new values."""
        self.check_writable()
        values = self.counters()
        for i, name in enumerate(_COUNTERS):
            values[i] = max(0, values[i] + deltas.get(name, 0))
        _os.pwrite(self.lock_fd, _COUNTERS_FORMAT.pack(*values), 0)
        return values

    def set_bytes(self, total: int) -> None:
        """Record the committed bytes a scan found (under the lock)."""
        self.check_writable()
        values = self.counters()
        values[0] = total
        _os.pwrite(self.lock_fd, _COUNTERS_FORMAT.pack(*values), 0)

    def entries(self) -> list[tuple[str, _os.stat_result]]:
        """(name, lstat) of each committed entry (call under the lock for a consistent view)."""
        found = []
        with _os.scandir(self.directory) as scan:
            for item in scan:
                if _entry_name(item.name) is None:
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if _stat.S_ISREG(st.st_mode):
                    found.append((item.name, st))
        return found

    def remove_if_unpinned(self, name: str, only: int | None = None) -> bool:
        """Unlink name under its exclusive flock, taken without waiting; False when held,
        or when name is gone or not a regular file (nothing of ours to remove). An entry's
        bytes leave the shared count (under the lock). Any other failure to open it
        (EMFILE, EACCES...) raises, naming it: "pinned" would be a lie.

        only, an fd of a file a caller judged stale (expired, unreadable) and then let go
        of: unlink name only while it still names that file. Another process may have
        stored a fresh entry under the name since, which is not the caller's to remove
        (entry names change only under the lock: checked under it, the answer holds)."""
        self.check_writable()
        path = self.path(name)
        if only is not None and not _newfile.still_named(only, path):
            return False
        cell = _lowlevel.fd_cell()
        fd = _open_regular(path, cell)  # a symlink or FIFO of that name is not ours
        if fd is None:
            return False
        try:
            if not _lowlevel.lock(fd, exclusive=True):
                return False
            if not _newfile.still_named(fd, path):
                return False
            size = _os.fstat(fd).st_size
            try:
                _os.unlink(path)
            except FileNotFoundError:
                # Its owner removed it after dropping its lock (a render's partial):
                # gone all the same, and not by us (its bytes were never ours to count).
                return False
        finally:
            _lowlevel.release(cell)
        if _entry_name(name) is not None:
            self.add({"bytes": -size})
        return True

    def kind(self, name: str) -> str | None:
        """What name is to the cache: "entry", "live" (a render), "part" or "unstored"
        (in flight), "note" (an outcome note), or None when it is not the cache's (any
        other shape, or not a regular file). The one test that sweep() and leftovers()
        share: a file the cache did not make is never removed, whatever it is named."""
        path = self.path(name)
        if _entry_name(name) is not None:
            kind = "entry"
        elif _PART_NAME.fullmatch(name):
            kind = "part"
        elif _UNSTORED_NAME.fullmatch(name):
            kind = "unstored"
        elif name.endswith(_LIVE) and _KEY.fullmatch(name[:-len(_LIVE)]):
            # "song.live" is key-shaped too: the WAV header of a render tells them apart.
            head = _regular_head(path, 128)
            return "live" if head is not None and _LIVE_START.match(head) else None
        elif name.endswith(_OUTCOME) and _KEY.fullmatch(name[:-len(_OUTCOME)]):
            # A note is also checked inside: "<inode> <pid> " at its start.
            return "note" if _note_owner(path) is not None else None
        else:
            return None
        try:
            st = _os.lstat(path)
        except FileNotFoundError:
            return None
        return kind if _stat.S_ISREG(st.st_mode) else None

    def sweep(self) -> int:
        """Remove leftovers no live process holds: partials, stale .live files, outcome
        notes older than a minute, unstored audio (each by its exact shape, see kind).
        Under the lock."""
        self.check_writable()
        removed = 0
        now = _time.time()
        with _os.scandir(self.directory) as scan:
            names = [item.name for item in scan]
        for name in names:
            if _entry_name(name) is not None:
                continue  # entries are evicted, never swept: no lstat of each (see kind)
            kind = self.kind(name)
            if kind in ("part", "unstored"):
                removed += self.remove_if_unpinned(name)
            elif kind == "note":
                try:
                    if now - _os.lstat(self.path(name)).st_mtime > 60:
                        _os.unlink(self.path(name))
                except FileNotFoundError:
                    pass
            elif kind == "live" and _stale_live(self.path(name)):
                removed += 1
        return removed

    def new_part(self, name: str) -> tuple[str, _lowlevel.FdCell]:
        """A new in-flight file for name: (path, its fd cell) with a shared flock held from
        before its name appeared, so that no sweep (in any process) removes it while we
        live."""
        self.check_writable()
        path = self.path(f".{name}.{_token()}{_PART}")
        cell = _lowlevel.fd_cell()
        _lowlevel.create_locked(self.directory, path, cell=cell)
        return path, cell

    def undo(self) -> None:
        """Close, and remove the directory again when this tier made it (an AudioCache
        whose construction failed leaves nothing of its own).

        Another process can have opened the same cache in the moment since the mkdir:
        the directory is removed only when no one holds its lock and nothing but the
        lock file is in it (a process that opened it between our mkdir and now would
        find its files gone: an OSError, in a window of microseconds, never data lost).
        """
        try:
            if self.made and _lowlevel.lock(self.lock_fd, exclusive=True):
                with _os.scandir(self.directory) as scan:
                    alone = [item.name for item in scan] == [_LOCK_NAME]
                if alone:
                    _unlink_quietly(self.path(_LOCK_NAME))
                    _rmdir_quietly(self.directory)
        finally:
            # No thread uses a tier whose cache is not made yet; and a call cut short
            # inside the mutex's open window (see _TierLock) leaves it held for ever.
            self.close(wait=False)

    def leftovers(self) -> tuple[list[str], list[str]]:
        """What keeps the directory after a clear (under the lock): (the outcome notes of
        failed renders, ours to remove; every other name but the lock file, each with
        why it stays: a pinned entry, a render or write in flight, a file not ours)."""
        notes: list[str] = []
        kept: list[str] = []
        why = {"entry": "pinned", "live": "being rendered", "part": "in use",
               "unstored": "in use", None: "not the cache's"}
        with _os.scandir(self.directory) as scan:
            names = [item.name for item in scan if item.name != _LOCK_NAME]
        for name in names:
            kind = self.kind(name)
            if kind == "note":
                notes.append(name)
            elif kind is not None or _os.path.lexists(self.path(name)):  # else: just gone
                kept.append(f"{name} ({why[kind]})")
        return notes, sorted(kept)

    def close(self, *, wait: bool = True) -> None:
        """Close the lock file; again does nothing. Under the mutex, so that no thread
        holding the tier's lock has its lock file closed under it (see _TierLock).

        wait=False (the leak finalizer, a failed construction) closes it without the
        mutex: no thread uses the tier (the cache is collected, or was never made), or it
        is interpreter exit, when a daemon thread may hold the mutex for ever (or a call
        cut short in its open window left it held). In a forked child the
        mutex may be held by a thread that was not copied: the child's copy of the file
        is closed without it."""
        if not wait or self.pid != _os.getpid():
            self._close_file()
            return
        with self.thread_lock:
            self._close_file()

    def _close_file(self) -> None:
        if self.lock_fd >= 0:
            self.lock_fd = -1
            _lowlevel.release(self.lock_cell)


def _lock_by(fd: int, *, exclusive: bool, deadline: float | None, what: str,
             path: str) -> None:
    """Take fd's flock, waiting until deadline (time.monotonic()) at most; None waits as
    long as it takes. Past the deadline: TimeoutError (ETIMEDOUT) saying what it waited
    for and naming path. flock has no timeout of its own: a bounded wait polls, backing
    off from 0.5 ms to 20 ms (the holder of an entry's or the cache's lock lets go
    within microseconds, unless it is stopped or stuck, which is what the bound is for)."""
    if deadline is None:
        _lowlevel.lock(fd, exclusive=exclusive, wait=True)
        return
    pause = 0.0005
    while not _lowlevel.lock(fd, exclusive=exclusive):
        if _time.monotonic() >= deadline:
            raise TimeoutError(_errno.ETIMEDOUT, f"timed out waiting for {what}", path)
        _time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _is_render_file(fd: int) -> bool:
    """True when fd (a regular file) starts as a render's .live file: a WavWriter's WAV."""
    return _LIVE_START.match(_os.pread(fd, 128, 0)) is not None


def _stale_live(path: str) -> bool:
    """Remove path when it is a .live file no renderer holds (the renderer died); True if so.
    A file of that name that is not a render's (see _Tier.kind) is never removed."""
    cell = _lowlevel.fd_cell()
    try:
        fd = _open_regular(path, cell)
    except OSError:
        return False
    if fd is None:
        return False
    try:
        if not _is_render_file(fd) or not _lowlevel.lock(fd, exclusive=True):
            return False  # a renderer (or a waiter, for a moment) holds it
        _remove_dead_live(fd, path)
        return True
    finally:
        _lowlevel.release(cell)


def _remove_stale(tier: _Tier, name: str, fd: int, deadline: float | None = None) -> bool:
    """Remove tier's entry name, which a look-up found stale (expired, or not a WAV it
    can read) through fd, unless it is pinned or name no longer names that file; True
    when removed. The look-up's own shared flock on fd goes first (it would refuse the
    removal); fd stays open, so the check under the lock compares with that very file.

    Why not by name alone: between the look-up letting go of the file and the lock,
    another process can store a fresh entry under the name, which is not stale.
    A tier opened read-only removes nothing: the look-up passes the entry by."""
    if tier.write_error is not None:
        return False
    _fcntl.flock(fd, _fcntl.LOCK_UN)
    with tier.locked(deadline=deadline):
        return tier.remove_if_unpinned(name, only=fd)


class _Replaced(Exception):
    """A reload's source on the disk tier stopped being the key's newest audio during
    the copy (see AudioCache._commit): the copy is not stored."""


def _still_newest(source: CachedAudio) -> bool:
    """True while the pinned disk entry source is still its key's entry: named by its
    path and not superseded by a newer entry of another type."""
    return (_newfile.still_named(source.fileno(), source.path)
            and _stat.S_IMODE(_os.fstat(source.fileno()).st_mode) != _SUPERSEDED)


def _remove_or_supersede(tier: _Tier, name: str) -> None:
    """Remove tier's entry name, which a newer entry of its key replaces; one a caller
    holds (a reload copying it, a hit) is superseded instead, so that no look-up ever
    takes it again and the first that finds it unheld removes it (under the lock)."""
    if not tier.remove_if_unpinned(name):
        _supersede(tier.path(name))


def _supersede(path: str) -> None:
    """Mark the held entry at path as replaced by a newer entry of its key, of another
    type (under the lock, before the newer one's rename): look-ups pass it by from now
    on, and the first that finds it unheld removes it. A holder's path still names it."""
    cell = _lowlevel.fd_cell()
    fd = _open_regular(path, cell)
    if fd is None:
        return
    try:
        if _newfile.still_named(fd, path):
            _os.fchmod(fd, _SUPERSEDED)
    finally:
        _lowlevel.release(cell)


def _remove_dead_live(fd: int, path: str) -> None:
    """Remove the .live file path (open as fd, exclusively locked: its renderer died) if
    it still has that name, and first any outcome note naming its inode: a note of an
    earlier render whose file had the same number, which the dead one never got to drop
    (see AudioCache._render). Its waiters then find neither, and elect a new renderer."""
    if not _newfile.still_named(fd, path):
        return
    note = path[:-len(_LIVE)] + _OUTCOME
    if _note_owner(note) == _os.fstat(fd).st_ino:
        _unlink_quietly(note)
    _unlink_quietly(path)


class AudioCache:
    """A bounded cache of rendered audio on the RAM disk, shared by this user's processes.

    Args:
        name: the cache's name: 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '-'.
            Every process of this user that opens the same name shares the entries.
        max_bytes: the RAM tier never holds more committed bytes than this (an entry
            being rendered aside); least recently used entries go first.
        ttl: seconds an entry stays valid after it was stored (an int or float, numpy
            ones too, > 0; NaN is refused); None (or infinity) keeps it.
        disk_dir: a directory for a second tier, kept across restarts: entries evicted
            from RAM spill there (within disk_max_bytes) and a RAM miss reloads them.
            Not the RAM dir itself (a ValueError).
        disk_max_bytes: the disk tier's bound (default 1 GiB).

    Raises:
        TypeError, ValueError: a bad name, size, ttl or disk_dir, named in the message.
        PermissionError: the cache directory is a symlink, belongs to another user
            or lets others in.
        OSError: the directory cannot be made or opened.
    """

    _finalizer: _weakref.finalize  # type: ignore[type-arg]

    def __init__(self, name: str = "default", *, max_bytes: int = DEFAULT_MAX_BYTES,
                 ttl: float | None = None, disk_dir: str | _os.PathLike[str] | None = None,
                 disk_max_bytes: int | None = None) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {_lowlevel.brief(name)}")
        if not _NAME.fullmatch(name):
            raise ValueError(f"name must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or "
                             f"'-' (not starting with '.'), got {name!r}")
        self.name = name
        self.max_bytes = _check_bytes("max_bytes", max_bytes) or 0
        self.ttl = None if ttl is None else _check_ttl(ttl)
        disk_max = _check_bytes("disk_max_bytes", disk_max_bytes, optional=True)
        disk_text = None
        if disk_dir is not None:
            disk_text = _lowlevel.path_argument(disk_dir, "a str or os.PathLike[str]",
                                                name="disk_dir")
            if not disk_text:
                raise ValueError("disk_dir must name a directory, got ''")
            _check_not_the_ram_dir(disk_text, placement.current().directory)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._counts_lock = _threading.Lock()
        self._counts_pid = _resource.current_pid
        _made_anew_in_child.add(self)
        self._encoded = False
        # The RAM entries the last eviction scan did not come to: (name, inode, atime_ns),
        # least recently used first (see _evict_queued). Used under the RAM lock only.
        self._victims: _collections.deque[tuple[str, int, int]] = _collections.deque()
        ram = _Tier(placement.current().directory, name, self.max_bytes, "cache")
        disk: _Tier | None = None
        try:
            if disk_text is not None:
                disk = _Tier(_os.path.abspath(disk_text), name,
                             disk_max or DEFAULT_DISK_MAX_BYTES, "disk cache")
            if ram.write_error is None:  # else: looked at, never changed (see _Tier)
                with ram.locked():
                    ram.sweep()
                    ram.set_bytes(sum(st.st_size for _, st in ram.entries()))
            if disk is not None and disk.write_error is None:
                with disk.locked():  # a killed process's spills in flight
                    disk.sweep()
        except BaseException:
            # A failed constructor leaves nothing it made (a directory that was there
            # before, and may be in use, stays).
            if disk is not None:
                disk.undo()
            ram.undo()
            raise
        self._ram, self._disk = ram, disk
        tiers = [ram] if disk is None else [ram, disk]
        self._finalizer = _weakref.finalize(self, _warn_leak, tiers, name, _os.getpid())

    @property
    def directory(self) -> str:
        """The RAM tier's directory."""
        return self._ram.directory

    @property
    def closed(self) -> bool:
        """True once :meth:`close` or :meth:`destroy` ran: every other method raises then."""
        return self._ram.lock_fd < 0

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on closed AudioCache {self.name!r}")

    # ---- counters ------------------------------------------------------------------

    def _count(self, what: str, n: int = 1) -> None:
        if self._counts_pid != _resource.current_pid:
            self._forget_parent_counts()
        with self._counts_lock:
            self._counts[what] += n

    def _after_fork_in_child(self) -> None:
        self._forget_parent_counts()

    def _forget_parent_counts(self) -> None:
        """In a forked child: the counts not yet written out are the parent's, which
        it will write itself; start from zero (with a lock of our own: another thread
        of the parent may have held its lock at the fork)."""
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._counts_lock = _threading.Lock()
        self._counts_pid = _resource.current_pid

    def _flush_counts(self) -> dict[str, int]:
        """Add this process's counts to the shared ones; the totals. Under the RAM lock.
        (Hits and misses are counted here first: a hit takes no lock.) A cache opened
        read-only writes nothing: the totals add this process's counts, kept."""
        if self._counts_pid != _resource.current_pid:
            self._forget_parent_counts()
        if self._ram.write_error is not None:
            with self._counts_lock:
                mine = [self._counts[name] for name in _COUNTERS]
            shared = self._ram.counters()
            return {name: shared[i] + mine[i] for i, name in enumerate(_COUNTERS)}
        with self._counts_lock:
            pending, self._counts = self._counts, dict.fromkeys(_COUNTERS, 0)
        return dict(zip(_COUNTERS, self._ram.add(pending), strict=True))

    def _suffixes(self) -> tuple[str, ...]:
        """The entry suffixes to look for: ".wav" alone until encoded audio was stored
        in this cache (by any process), so that a miss costs one failed open."""
        if not self._encoded:  # one pread, no lock: the flag only ever goes from 0 to 1
            offset = 8 * _COUNTERS.index("encoded")
            fd = self._ram.lock_fd
            self._ram.check_open()  # closed by another thread since the call began
            try:
                self._encoded = _os.pread(fd, 8, offset) not in (b"", bytes(8))
            except OSError as exc:
                # Closed by another thread after we read the number (a number reused
                # meanwhile by another file only makes look-ups try every suffix, never
                # a wrong hit).
                if exc.errno == _errno.EBADF:
                    self._ram.check_open()
                raise
        return ENTRY_SUFFIXES if self._encoded else (".wav",)

    # ---- look-ups ------------------------------------------------------------------

    def _open_entry(self, tier: _Tier, key: str, deadline: float | None = None
                    ) -> CachedAudio | None:
        """Pin the committed entry of key in tier, or None (missing, evicted, expired).
        deadline (time.monotonic()) bounds the waits for the entry's lock and the
        tier's: TimeoutError (ETIMEDOUT) naming the file."""
        for suffix in ENTRY_SUFFIXES:
            path = tier.path(key + suffix)
            cell = _lowlevel.fd_cell()
            opened = _open_regular(path, cell)  # a symlink or FIFO there: not an entry
            if opened is None:
                if suffix == ".wav" and tier is self._ram and len(self._suffixes()) == 1:
                    return None  # no encoded audio in this cache: one open decides
                continue
            fd = opened
            try:
                # An evictor holds the exclusive lock around a spill and an unlink, a
                # renderer from its commit until its entry is pinned: waiting is brief,
                # unless that process is stopped or stuck (deadline bounds it then).
                _lock_by(fd, exclusive=False, deadline=deadline,
                         what=f"the lock of the entry of {key!r} (another process holds it)",
                         path=path)
                st = _os.fstat(fd)
                if st.st_nlink == 0:  # evicted while we waited
                    _lowlevel.release(cell)
                    continue
                if _stat.S_IMODE(st.st_mode) == _SUPERSEDED:  # the key has a newer entry
                    _remove_stale(tier, key + suffix, fd, deadline)
                    _lowlevel.release(cell)
                    continue
                if self._expired(st, _time.time()):
                    _remove_stale(tier, key + suffix, fd, deadline)
                    _lowlevel.release(cell)
                    continue
                try:
                    _os.utime(fd, ns=(_time.time_ns(), st.st_mtime_ns))  # the LRU clock
                except OSError as exc:
                    # A cache on a file system remounted read-only still serves its
                    # hits (its LRU clock stops); anything else names the entry.
                    if exc.errno != _errno.EROFS:
                        _raise_named(exc, path)
                        raise
            except BaseException:
                _lowlevel.release(cell)
                raise
            return CachedAudio(cell, path, key, size=st.st_size)
        return None

    def get(self, key: str, *, timeout: float | None = None) -> CachedAudio | None:
        """The entry of key, pinned until released, or None on a miss.

        A RAM miss with a disk tier reloads the entry from disk into RAM.

        Args:
            key: see :func:`cache_key`.
            timeout: seconds to wait for the locks a hit takes (an int or float, numpy
                ones too, >= 0; 0 does not wait); None or infinity waits as long as it
                takes. Another process holds an entry's lock for an instant (a renderer
                storing it, an eviction): only one that is stopped or stuck there makes
                a get wait, and a server that must answer bounds that wait.

        Raises:
            TypeError, ValueError: key is not a key (see :func:`cache_key`), or a bad
                timeout (NaN is refused).
            TimeoutError: timeout passed while another process held the entry's lock
                (or the cache's), ETIMEDOUT, naming the file.
        """
        self._check_open()
        _check_key(key)
        limit = formats.check_timeout(timeout)
        return self._get(key, None if limit is None else _time.monotonic() + limit)

    def _get(self, key: str, deadline: float | None) -> CachedAudio | None:
        """get(), its waits bounded by deadline (time.monotonic(); None: no bound)."""
        found = self._open_entry(self._ram, key, deadline)
        if found is None and self._disk is not None:
            found = self._reload(key, deadline)
        self._count("hits" if found is not None else "misses")
        return found

    def __contains__(self, key: str) -> bool:
        """True when key has a RAM entry that :meth:`get` would hand out (a regular file,
        not expired, not replaced); a disk-tier entry is not looked at."""
        self._check_open()
        return self._present(_check_key(key))

    # ---- storing -------------------------------------------------------------------

    def _make_room(self, size: int) -> bool:
        """Under the RAM lock: make size more bytes fit (the shared count grows by them);
        False when they cannot (nothing is stored then). A cache that looks full evicts
        from the queue of its last scan (see _evict_queued); when that is not enough it
        is scanned: expired entries go, then the least recently used unpinned ones."""
        tier = self._ram
        if size > tier.max_bytes:
            return False
        total = tier.counters()[0]
        if total + size > tier.max_bytes:
            total = self._evict_queued(total, size)
        if total + size > tier.max_bytes:
            total = self._evict_scanned(size)
            tier.set_bytes(total)
            if total + size > tier.max_bytes:
                return False
        tier.add({"bytes": size})  # before the rename: too high, never too low
        return True

    def _evict_scanned(self, size: int) -> int:
        """Scan the RAM tier (under its lock) and evict until size more bytes fit: expired
        entries first, then the least recently used unpinned ones; the committed bytes
        left. The entries it did not come to are queued, oldest first, for the next
        commits that find the cache full (_evict_queued): a full cache is scanned once
        per queue, not once per commit (a scan of 10,000 entries takes tens of ms)."""
        tier = self._ram
        tier.sweep()  # unstored audio a killed process never released, too
        now = _time.time()
        kept = []
        for name, st in tier.entries():
            expired = self._expired(st, now)
            if expired and tier.remove_if_unpinned(name):
                continue
            kept.append((name, st))
        total = sum(st.st_size for _, st in kept)
        kept.sort(key=lambda item: item[1].st_atime_ns)
        tried = 0
        for name, st in kept:
            if total + size <= tier.max_bytes:
                break
            tried += 1
            if self._evict(name):
                total -= st.st_size
        self._victims = _collections.deque(
            (name, st.st_ino, st.st_atime_ns) for name, st in kept[tried:])
        return total

    def _evict_queued(self, total: int, size: int) -> int:
        """Evict the entries the last scan queued, oldest first, until size more bytes
        fit in total (the shared count, lowered by what goes); the new total.

        Exactly LRU, across processes: an entry is evicted only while it is the very file
        the scan saw (inode) with the access time it saw. One used since (a hit, in any
        process, sets its atime), replaced or gone leaves the queue: what a scan did not
        see, or saw changed, was stored or used after every entry still queued."""
        tier = self._ram
        queue = self._victims
        now = _time.time()
        while queue and total + size > tier.max_bytes:
            name, ino, atime_ns = queue.popleft()
            try:
                st = _os.lstat(tier.path(name))
            except FileNotFoundError:
                continue
            if (st.st_ino, st.st_atime_ns) != (ino, atime_ns):
                continue
            if self._expired(st, now):
                if tier.remove_if_unpinned(name):  # it lowers the shared count itself
                    total -= st.st_size
            elif self._evict(name):
                tier.add({"bytes": -st.st_size})
                total -= st.st_size
        return total

    def _evict(self, name: str) -> bool:
        """Evict one RAM entry (spilling it to disk first); False when it is pinned."""
        path = self._ram.path(name)
        cell = _lowlevel.fd_cell()
        fd = _open_regular(path, cell)
        if fd is None:
            return not _os.path.lexists(path)  # gone; else not an entry: never ours to evict
        try:
            if not _lowlevel.lock(fd, exclusive=True) or not _newfile.still_named(fd, path):
                return False
            if self._disk is not None and _stat.S_IMODE(_os.fstat(fd).st_mode) != _SUPERSEDED:
                try:
                    self._spill(fd, name)
                except OSError as exc:
                    placement.logger.warning("luna_shm: could not spill %s to %s: %s",
                                             path, self._disk.directory, exc)
            _os.unlink(path)
            self._count("evictions")
            return True  # the caller recounts the bytes
        finally:
            _lowlevel.release(cell)

    def _copy_in(self, tier: _Tier, src_fd: int, name: str, *, sync: bool
                 ) -> tuple[str, _lowlevel.FdCell]:
        """Copy src_fd to a new locked partial in tier: (its path, its fd cell); mtime kept."""
        st = _os.fstat(src_fd)
        part, cell = tier.new_part(name)
        fd = cell[0]
        try:
            offset = 0
            while offset < st.st_size:
                # sendfile, not copy_file_range: that one refuses RAM -> disk (EXDEV)
                # on the kernels that are still common.
                sent = _os.sendfile(fd, src_fd, offset, st.st_size - offset)
                if sent == 0:
                    break
                offset += sent
            _os.utime(fd, ns=(_time.time_ns(), st.st_mtime_ns))
            if sync:
                _os.fsync(fd)
        except BaseException as exc:
            _lowlevel.release(cell)
            _unlink_quietly(part)
            _raise_named(exc, part)
            raise
        return part, cell

    def _spill(self, src_fd: int, name: str) -> None:
        disk = self._disk
        assert disk is not None
        size = _os.fstat(src_fd).st_size
        if size > disk.max_bytes:
            return
        part, part_cell = self._copy_in(disk, src_fd, name, sync=True)
        try:
            self._store_on_disk(disk, part, name, size)
        finally:
            _lowlevel.release(part_cell)

    def _store_on_disk(self, disk: _Tier, part: str, name: str, size: int) -> None:
        with disk.locked():
            key = name.rpartition(".")[0]
            for suffix in ENTRY_SUFFIXES:  # one entry per key: a spilled WAV of a key
                if key + suffix != name:    # now stored as MP3 must not win over it
                    _remove_or_supersede(disk, key + suffix)
            entries = [(n, st) for n, st in disk.entries() if n != name]
            total = sum(st.st_size for _, st in entries)
            entries.sort(key=lambda item: item[1].st_atime_ns)
            for victim, st in entries:
                if total + size <= disk.max_bytes:
                    break
                if disk.remove_if_unpinned(victim):
                    total -= st.st_size
            if total + size > disk.max_bytes:
                _os.unlink(part)
                return
            _os.rename(part, disk.path(name))
        self._count("spills")

    def _reload(self, key: str, deadline: float | None) -> CachedAudio | None:
        """Copy key's disk entry back into RAM and pin it there; None when there is none.

        The disk copy stays pinned until the commit, which stores the RAM copy only while
        that disk copy is still the key's newest audio (see _commit): a put, or a spill
        of another type, in another process during the copy made it old."""
        disk = self._disk
        assert disk is not None
        for _ in range(3):  # a third replacement during our copies: a miss
            held = self._open_entry(disk, key, deadline)
            if held is None:
                return None
            with held:
                name = _os.path.basename(held.path)
                part, cell = self._with_room(
                    _os.fstat(held.fileno()).st_size,
                    _functools.partial(self._copy_in, self._ram, held.fileno(), name,
                                       sync=False))
                try:
                    entry = self._commit(key, part, name, cell, source=held,
                                         deadline=deadline)
                except _Replaced:
                    found = self._open_entry(self._ram, key, deadline)  # a put's, if any
                    if found is not None:
                        return found
                    continue
            self._count("reloads")
            return entry
        return None

    def _commit(self, key: str, part_path: str, name: str,
                cell: _lowlevel.FdCell = None, *, source: CachedAudio | None = None,
                deadline: float | None = None) -> CachedAudio:
        """Pin the complete file at part_path and give it the entry name under the lock;
        when it does not fit, keep it as unstored audio. The caller's file is consumed.
        Unless it was reloaded from the disk tier, the key's disk entries go: one entry
        per key, and a spill of an older one must not come back after a restart.
        cell, when given, holds an fd already open on it holding a flock (it becomes the
        entry's); on failure it is released and the file removed.

        source: the pinned disk entry a reload copied part_path from. Every change of a
        key's disk entries happens under the RAM lock (a commit drops them, an eviction
        spills), so checked under it, "source is still named and not superseded" means
        no newer audio of the key was stored since the copy began; else _Replaced is
        raised (nothing stored, the file removed). deadline bounds the wait for the
        lock (a reload for a get with a timeout)."""
        if cell is None:
            cell = _lowlevel.fd_cell()
            fd = _lowlevel.open_at(part_path, _os.O_RDONLY | _os.O_NOFOLLOW, cell=cell)
            try:
                _lowlevel.lock(fd, exclusive=False, wait=True)
            except BaseException:
                _lowlevel.release(cell)
                raise
        fd = cell[0]
        try:
            st = _os.fstat(fd)
            size = st.st_size
            # Stored now is used now: the LRU clock (atime) of a render would otherwise be
            # when its file was made, before every hit during the render, and the next
            # eviction would take the entry just stored. mtime (the TTL clock) is kept.
            _os.utime(fd, ns=(_time.time_ns(), st.st_mtime_ns))
            final = self._ram.path(name)
            with self._ram.locked(deadline=deadline):
                if source is not None and not _still_newest(source):
                    raise _Replaced(source.path)
                self._flush_counts()
                if not self._foreign(name) and self._make_room(size):
                    if name != key + ".wav" and not self._suffixes()[1:]:
                        self._ram.add({"encoded": 1})
                        self._encoded = True
                    replaced = 0
                    for suffix in self._suffixes():  # one entry per key, whatever its type
                        if key + suffix == name:
                            # A render's too: an expired entry someone holds is there.
                            replaced = self._named_size(name)
                        else:  # held: it stays, superseded
                            _remove_or_supersede(self._ram, key + suffix)
                    # The key's disk copies go before the rename, never after: killed
                    # between the two, an older copy would outlive the new entry (an
                    # eviction that cannot spill, a reboot) and come back in its place.
                    if self._disk is not None and source is None:
                        self._drop_from_disk(key)
                    _os.rename(part_path, final)
                    # The old entry leaves the count (a pinned one lives on unnamed) after
                    # the rename, never before: killed between the two, the count would be
                    # too low, and later commits would fill the tier past its bound.
                    if replaced:
                        self._ram.add({"bytes": -replaced})
                    return CachedAudio(cell, final, key)
            suffix = name[len(key):]
            unstored = self._ram.path(f".{key}.{_token()}{_UNSTORED}{suffix}")
            _os.rename(part_path, unstored)
            return CachedAudio(cell, unstored, key, stored=False)
        except BaseException as exc:
            _lowlevel.release(cell)
            _unlink_quietly(part_path)
            _raise_named(exc, part_path)  # os.utime on an fd names no file
            raise

    def _drop_from_disk(self, key: str) -> None:
        """Remove key's disk-tier entries, older than the one just stored in RAM (under
        the RAM lock: RAM, then disk, as a spill takes them). One the disk tier cannot
        remove (a read-only or failing disk) stays, with a warning logged: the new
        entry is stored, and its caller gets it, not an OSError that says otherwise."""
        disk = self._disk
        assert disk is not None
        try:
            with disk.locked():
                for suffix in ENTRY_SUFFIXES:
                    _remove_or_supersede(disk, key + suffix)
        except OSError as exc:
            placement.logger.warning("luna_shm: could not remove the older entry of %r from "
                                     "the disk tier %s (a restart may bring it back): %s",
                                     key, disk.directory, exc)

    def _foreign(self, name: str) -> bool:
        """True when something that is not a regular file (a symlink, a FIFO, a directory:
        never the cache's) has the entry name: a commit keeps its audio unstored rather
        than rename over it."""
        try:
            return not _stat.S_ISREG(_os.lstat(self._ram.path(name)).st_mode)
        except FileNotFoundError:
            return False

    def _named_size(self, name: str) -> int:
        """The size of the RAM entry name, 0 when there is none (under the lock)."""
        try:
            return _os.lstat(self._ram.path(name)).st_size
        except FileNotFoundError:
            return 0

    def put(self, key: str, data: object, samplerate: int, *,
            subtype: str | None = None) -> CachedAudio:
        """Store data as key's WAV entry (replacing any) and return it pinned.

        Args:
            key: see :func:`cache_key`.
            data, samplerate, subtype: as for :func:`luna_shm.write_wav`.

        Returns:
            The entry; ``stored`` is False when it is larger than max_bytes or every
            other entry is pinned (the audio is still there until released).

        Raises:
            TypeError, ValueError: a bad key, data, samplerate or subtype; data with no
                frames (as for get_or_render and put_bytes, empty audio is never cached).
            OSError: the RAM disk refused the file; nothing is left of it.
        """
        self._check_open()
        _check_key(key)
        enc = encoding.plan(data, samplerate, subtype)
        if enc.nbytes == 0:
            raise ValueError(f"data has no frames (got {_lowlevel.brief(data)}): an empty "
                             "render is never cached")
        def write(fd: int, part: str) -> None:
            _lowlevel.write_wav_fd(fd, enc.spec, encoding.data_chunk(enc), part)

        part, cell = self._new_part_written(key, enc.nbytes, write)
        return self._commit(key, part, key + ".wav", cell)

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview,
                  suffix: str = ".mp3") -> CachedAudio:
        """Store encoded audio (e.g. MP3 from a cloud TTS) as key's entry and return it pinned.

        Args:
            key: see :func:`cache_key`.
            data: the encoded file's bytes: bytes, bytearray or a memoryview (one that is
                not contiguous is stored as its bytes in order, copied once).
            suffix: one of .mp3, .ogg, .opus, .flac, .aac, .m4a, .webm.

        Raises:
            TypeError, ValueError: a bad key, data or suffix; empty data.
            OSError: the RAM disk refused the file; nothing is left of it.
        """
        self._check_open()
        _check_key(key)
        if suffix not in ENCODED_SUFFIXES:
            raise ValueError(f"suffix must be one of {', '.join(ENCODED_SUFFIXES)}, "
                             f"got {suffix!r}")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes-like, got {_lowlevel.brief(data)}")
        view = memoryview(data)
        if not view.nbytes:
            raise ValueError("data is empty: an empty render is never cached")
        # A strided view (a slice with a step, a transposed array) has no flat bytes of its
        # own to cast: its bytes, in order, are copied once.
        view = (view if view.c_contiguous else memoryview(view.tobytes())).cast("B")
        def write(fd: int, part: str) -> None:
            rest = view
            while rest:
                rest = rest[_os.write(fd, rest):]

        part, cell = self._new_part_written(key, view.nbytes, write)
        return self._commit(key, part, key + suffix, cell)

    def _new_part_written(self, key: str, nbytes: int, write: Callable[[int, str], None]
                          ) -> tuple[str, _lowlevel.FdCell]:
        """A new locked partial of key that write(fd, path) filled with about nbytes:
        (its path, its fd cell). When the RAM disk is full, the cache's own unpinned
        entries make room (see _room_on_ram_disk) and it is written once more. On
        failure nothing is left, and the OSError names the partial (ENOSPC: with the
        full RAM disk's hint)."""
        def attempt() -> tuple[str, _lowlevel.FdCell]:
            part, cell = self._ram.new_part(key)
            try:
                write(cell[0], part)
            except BaseException as exc:
                _lowlevel.release(cell)
                _unlink_quietly(part)
                _raise_named(exc, part)
                raise
            return part, cell

        return self._with_room(nbytes, attempt)

    def _with_room(self, nbytes: int, attempt: Callable[[], _T]) -> _T:
        """attempt(), and once more when it failed for a full RAM disk (ENOSPC) and the
        cache's own unpinned entries made room for nbytes (see _room_on_ram_disk)."""
        try:
            return attempt()
        except OSError as exc:
            if exc.errno != _errno.ENOSPC or not self._room_on_ram_disk(nbytes):
                raise
        return attempt()

    def _room_on_ram_disk(self, nbytes: int) -> bool:
        """Evict the least recently used unpinned entries (spilling them to the disk tier)
        until the file system under the cache has room for nbytes more; True when it has.

        max_bytes bounds the cache, not the RAM disk: with the default 256 MiB in a
        container whose /dev/shm is 64 MB, the cache's own entries fill it, and without
        this every later put would fail with ENOSPC while nothing is ever evicted."""
        tier = self._ram
        needed = nbytes + _ROOM_MARGIN

        def free() -> int:
            return _lowlevel.room_on(tier.directory)

        def room() -> bool:
            return free() >= needed

        with tier.locked():
            tier.sweep()  # unstored audio a killed process never released, too
            entries = sorted(tier.entries(), key=lambda item: item[1].st_atime_ns)
            if free() + sum(st.st_blocks * 512 for _, st in entries) < needed:
                return False  # even all of them would not do: keep them
            for name, _ in entries:
                if room():
                    break
                self._evict(name)
            tier.set_bytes(sum(st.st_size for _, st in tier.entries()))
            return room()

    # ---- single-flight rendering --------------------------------------------------

    def live_path(self, key: str) -> str | None:
        """The WAV of key being rendered now (valid after every chunk), or None.

        :meth:`follow` plays it while it renders; so does ``follow_wav`` of this path.
        """
        self._check_open()
        path = self._ram.path(_check_key(key) + _LIVE)
        return path if _os.path.exists(path) else None

    def follow(self, key: str, *, timeout: float | None = None) -> Iterator[np.ndarray]:
        """The audio of key as soon as it exists, in blocks of frames, in order.

        A stored entry gives its samples at once (one block, a copy). An entry that
        another caller (in any process) is rendering now is followed as it grows:
        each block as soon as the renderer wrote it (:func:`luna_shm.follow_wav` of
        the in-flight WAV), so a second caller of a sentence plays it while the first
        one still renders it.

        Args:
            key: a key from :func:`cache_key`.
            timeout: seconds to wait for the render's next block, or for a stored
                entry's lock (a number >= 0; None or infinity: no limit).

        Raises:
            TypeError, ValueError: a bad key or timeout (raised by the call itself).
            KeyError: key is neither stored nor being rendered now (at the first block).
            ValueError: the entry is encoded audio (see :meth:`put_bytes`).
            StreamAbandoned: the render failed or its process died (a WavError): the
                next :meth:`get_or_render` renders it again.
            TimeoutError: no new block for timeout seconds.
        """
        self._check_open()
        _check_key(key)
        return self._follow(key, formats.check_timeout(timeout))

    def _follow(self, key: str, limit: float | None) -> Iterator[np.ndarray]:
        # A render can end between the two looks (its file is renamed into the entry):
        # look again; a third time is another render, which we follow.
        for _ in range(3):
            entry = self._get(key, None if limit is None else _time.monotonic() + limit)
            if entry is not None:
                with entry:
                    yield entry.array.copy()
                return
            live = self.live_path(key)
            if live is None:
                continue
            cell = _lowlevel.fd_cell()
            fd = _open_regular(live, cell)
            if fd is None:
                continue
            try:
                # Through the open file: the renderer's rename into the entry, or the
                # removal of a failed render, does not take it away from the follower.
                yield from follow_wav(f"/proc/self/fd/{fd}", timeout=limit)
            finally:
                _lowlevel.release(cell)
            return
        raise KeyError(f"{key!r} is neither in the cache nor being rendered")

    def get_or_render(self, key: str, render: Callable[[WavWriter], object], *,
                      samplerate: int, channels: int = 1, dtype: Any = "int16",
                      timeout: float | None = None) -> CachedAudio:
        """The entry of key; on a miss, render it once, whatever the number of callers.

        The first caller (in any process) calls ``render(writer)``, which writes the
        audio into a :class:`WavWriter` in the cache directory; the others wait
        for it (no CPU: a flock the kernel grants when the renderer ends) and get
        the same entry. A render that raises or writes no frames is never stored:
        the renderer gets its exception, its waiters a :class:`RenderError` (a waiter
        that wakes only after the next render of the key began waits for that one).
        When the renderer's process dies, one waiter renders again.

        Args:
            key: see :func:`cache_key`.
            render: called with the writer; its return value is ignored. It may close
                the writer (``with writer:``): what it wrote is stored all the same. A
                child it forks that leaves it (``sys.exit``, an exception) leaves the
                render to the parent; one that returns from it gets ``RuntimeError``.
            samplerate, channels, dtype: the writer's format.
            timeout: seconds to wait for another caller's render, and for the locks a
                hit takes (see :meth:`get`), in all (an int or float, numpy ones too,
                >= 0; 0 does not wait); None or infinity waits as long as it runs.

        Returns:
            The entry, pinned (``stored`` False when it was too large to keep).

        Raises:
            TypeError, ValueError: a bad key, render (not callable), samplerate,
                channels, dtype or timeout (NaN is refused), checked before anything else.
            RenderError: the render this caller waited for failed.
            WavError: the stored entry is not a WAV we can read (another process
                truncated or overwrote it) and another caller holds it; unheld, it
                is removed (with a warning logged) and the key rendered again.
            TimeoutError: timeout passed while another caller rendered, or held the
                entry's lock (a renderer stopped while it stored the entry).
            OSError: the RAM disk refused the entry.
            Whatever ``render`` raised, in the caller that ran it.
        """
        self._check_open()
        _check_key(key)
        # Checked up front, hit or miss: a bad argument never depends on the cache's state.
        if not callable(render):
            raise TypeError(f"render must be a callable taking the WavWriter, got "
                            f"{_lowlevel.brief(render)}")
        formats.check_samplerate(samplerate)
        formats.check_channels(channels)
        formats.check_dtype(dtype)
        limit = formats.check_timeout(timeout)
        deadline = None if limit is None else _time.monotonic() + limit
        live = self._ram.path(key + _LIVE)
        while True:
            # Every pass, not only a wait, is bounded: whatever makes the loop go round
            # again (a render that keeps ending before we wait) never outlasts timeout.
            if deadline is not None and _time.monotonic() > deadline:
                raise TimeoutError(_errno.ETIMEDOUT, "timed out waiting for another caller "
                                   f"to render {key!r}", live)
            found = self._get(key, deadline)
            if found is not None and self._readable(found, deadline):
                return found
            writer, part = self._start_render(key, samplerate, channels, dtype)
            if writer is not None:
                return self._render(key, writer, part, render)
            outcome = self._wait(key, deadline)
            if outcome is not None:
                return outcome

    def _readable(self, entry: CachedAudio, deadline: float | None) -> bool:
        """True when entry (a hit) can be read. A WAV entry that does not parse (another
        process truncated or overwrote it) is released and removed, and False returned
        for the caller to render the key again; when it cannot be removed (another
        caller holds it), its WavError is raised."""
        if not entry.is_wav:
            return True
        try:
            entry._load()  # the header parsed and the samples mapped, as .array would
        except WavError as exc:
            # Removed only while its name still names this very file (see _remove_stale):
            # a fresh entry another process stored meanwhile is looked up, not removed.
            # Its disk-tier copy, if any, goes with the commit of the render that follows.
            held = _lowlevel.fd_cell()
            _lowlevel.dup(entry.fileno(), cell=held, filename=entry.path)
            entry.release()
            try:
                if _remove_stale(self._ram, _os.path.basename(entry.path), held[0],
                                 deadline):
                    placement.logger.warning("luna_shm: removed the unreadable cache entry "
                                             "%s (%s); rendering it again", entry.path, exc)
                    return False
                if _newfile.still_named(held[0], entry.path):
                    raise  # another caller holds it
                return False  # replaced (or removed) by another process: look again
            finally:
                _lowlevel.release(held)
        return True

    def _start_render(self, key: str, samplerate: int, channels: int, dtype: Any
                      ) -> tuple[_RenderWriter | None, str]:
        """Become key's renderer: a writer whose file is now key.live, exclusively locked.
        (None, "") when another live renderer has it."""
        self._ram.check_writable()  # a cache opened read-only renders nothing
        live = self._ram.path(key + _LIVE)
        for _ in range(8):
            part = self._ram.path(f".{key}.{_token()}{_PART}")
            writer: _RenderWriter | None = self._with_room(
                0, _functools.partial(_RenderWriter, part, samplerate, channels, dtype))
            assert writer is not None
            writer.make_room = self._room_on_ram_disk
            try:
                # Nobody else knows the partial's name: the upgrade to exclusive is
                # immediate (unless a sweep holds it for a moment: then we wait).
                _lowlevel.lock(writer.fileno(), exclusive=True, wait=True)
                while True:
                    try:
                        _os.link(part, live)  # the election: one link wins
                    except FileNotFoundError:
                        # flock's upgrade drops the shared lock first: a sweep in another
                        # process took the partial in that moment. Make a new one.
                        break
                    except FileExistsError:
                        if _stale_live(live):
                            continue  # its renderer died: link again
                        return None, ""
                    _os.unlink(part)
                    writer.path = live
                    if self._present(key):
                        # A renderer committed between our miss and our link (its rename
                        # took the .live name away): no second render, go and get it.
                        _unlink_quietly(live)
                        return None, ""
                    done, writer = writer, None
                    return done, live
            finally:
                if writer is not None:
                    # Unlinked before the close drops its flock: a sweep never finds
                    # an unlocked partial of ours that we are about to remove.
                    _unlink_quietly(part)
                    writer.close()
        raise OSError(_errno.EAGAIN, "the render file kept vanishing", live)  # pragma: no cover

    def _present(self, key: str) -> bool:
        """True when key has a committed RAM entry that get() would hand out: a regular
        file, not expired (an expired one that a caller still holds cannot be removed,
        and a render replaces it, as a put would)."""
        now = _time.time()
        for suffix in self._suffixes():
            try:
                st = _os.lstat(self._ram.path(key + suffix))
            except FileNotFoundError:
                continue
            if (_stat.S_ISREG(st.st_mode) and not self._expired(st, now)
                    and _stat.S_IMODE(st.st_mode) != _SUPERSEDED):
                return True
        return False

    def _expired(self, st: _os.stat_result, now: float) -> bool:
        """True when the entry st describes was stored more than ttl seconds before now
        (its mtime is the TTL clock)."""
        return self.ttl is not None and now - st.st_mtime > self.ttl

    def _render(self, key: str, writer: _RenderWriter, live: str,
                render: Callable[[WavWriter], object]) -> CachedAudio:
        """Run render into writer (whose file is key.live, exclusively locked), store the
        result, then let the waiters go: by then the entry, or the outcome, is there.

        The render may close the writer (``with writer:`` is common): the cache takes what
        it needs before calling it, a second descriptor of the same open file (pin), which
        shares the writer's flock and keeps it after the writer closes. So the waiters
        sleep on until the entry is stored (or the render failed), and the entry stays
        pinned for our caller."""
        self._count("renders")
        owner = _resource.current_pid
        ino = _os.fstat(writer.fileno()).st_ino
        # A note an earlier render of key left goes now, before a waiter can read it: a
        # filesystem that reuses inode numbers (ext4) may have given our file the number
        # it names. Late waiters of that render wait for this one instead.
        note = self._ram.path(key + _OUTCOME)
        if _note_owner(note) is not None:  # a note; anything else of that name is not ours
            _unlink_quietly(note)
        pin = _lowlevel.fd_cell()
        try:
            _lowlevel.dup(writer.fileno(), cell=pin, filename=live)  # EMFILE names it
            # A helper the render forks (a multiprocessing worker of the engine) must not
            # keep the exclusive flock: the waiters would sleep while it lives, after this
            # process failed or died (the writer lets go of its own fd at a fork).
            _resource.close_in_child(pin)
            writer.rendering = True
            try:
                render(writer)
            finally:
                writer.rendering = False
            if _resource.current_pid != owner:
                raise RuntimeError(
                    f"a child forked inside the render of {key!r} returned from it: the "
                    f"render belongs to process {owner}; end the child with os._exit()")
            if writer.frames == 0:  # after a close too: the frames its file holds
                raise ValueError(f"the render of {key!r} wrote no frames: not cached")
            entry = self._commit(key, live, key + ".wav", pin)
            if not entry.stored:
                self._write_outcome(key, ino, "unstored " + entry.path)
        except BaseException as exc:
            if _resource.current_pid != owner:
                # A child forked inside render that leaves it (sys.exit unwinds its copy
                # of our stack): the render, its file, its note and its waiters are the
                # parent's, which goes on rendering.
                raise
            self._write_outcome(key, ino, f"{type(exc).__name__}: {exc}")
            # Our file, through the pin, or the writer when the dup failed (a failed
            # commit released the pin, and removed the file, itself).
            held = pin[0] if pin[0] >= 0 else -1 if writer.closed else writer.fileno()
            if held >= 0 and _newfile.still_named(held, live):
                _unlink_quietly(live)
            # Its followers (AudioCache.follow) raise StreamAbandoned, after a render that
            # closed the writer too (its close left the stream live, see _RenderWriter).
            writer.abort()
            _lowlevel.release(pin)  # the last descriptor: the waiters wake to the note
            raise
        # Exclusive -> shared on the open file: the waiters wake now, and find the entry.
        _lowlevel.lock(entry.fileno(), exclusive=False)
        writer.close()
        return entry

    def _write_outcome(self, key: str, ino: int, text: str) -> None:
        path = self._ram.path(key + _OUTCOME)
        try:
            part, cell = self._ram.new_part(key)
        except OSError:
            return
        try:
            _os.write(cell[0], f"{ino} {_os.getpid()} {text}".encode("utf-8", "replace"))
            _os.rename(part, path)
        except OSError:
            _unlink_quietly(part)
        finally:
            _lowlevel.release(cell)

    def _wait(self, key: str, deadline: float | None) -> CachedAudio | None:
        """Wait for key's renderer: None to look again (it stored the entry, died, or was
        done before we looked), unstored audio, or RenderError when the render failed."""
        live = self._ram.path(key + _LIVE)
        cell = _lowlevel.fd_cell()
        # A child another thread forks while this one waits must not keep the shared
        # flock the kernel grants it: the entry the render becomes would stay pinned, and
        # a waiter that finds the renderer dead would wait for the child to take its own.
        _resource.close_in_child(cell)
        fd = _open_regular(live, cell)
        if fd is None:
            try:
                regular = _stat.S_ISREG(_os.lstat(live).st_mode)
            except FileNotFoundError:
                return None
            if regular:
                return None  # a new render's, since our open: look again
        if fd is None or not _is_render_file(fd):
            # Not a render's file, so no render ends it: waiting (or electing again)
            # would go on for ever. Never ours to remove either.
            _lowlevel.release(cell)
            raise FileExistsError(_errno.EEXIST, f"cannot render {key!r}: a file that is "
                                  "not the cache's has the name of its render", live)
        try:
            ino = _os.fstat(fd).st_ino
            # A caller that wants audio before the render ends uses follow() instead.
            # The renderer holds an exclusive flock until the entry is stored (or it
            # failed, or died): the kernel grants our shared one then, no polling.
            _lock_by(fd, exclusive=False, deadline=deadline,
                     what=f"another caller to render {key!r}", path=live)
            if _newfile.still_named(fd, live):
                # A renderer that ends renames or removes its .live file before it
                # lets go of the lock: still named, it died. Remove it (exclusive, so
                # that no other waiter is between its lock and this check) and let
                # the loop elect a new renderer.
                _lowlevel.lock(fd, exclusive=True, wait=True)
                _remove_dead_live(fd, live)
                return None
            outcome = self._read_outcome(key, ino)
        finally:
            _lowlevel.release(cell)
        if outcome is None:
            return None
        pid, text = outcome
        if text.startswith("unstored "):
            path = text[len("unstored "):]
            held = _lowlevel.fd_cell()
            if _open_regular(path, held) is None:
                return None
            _lowlevel.lock(held[0], exclusive=False, wait=True)
            return CachedAudio(held, path, key, stored=False)
        raise RenderError(f"rendering {key!r} failed in process {pid}: {text}")

    def _read_outcome(self, key: str, ino: int) -> tuple[str, str] | None:
        """(pid, text) that the renderer of the file ino left for its waiters, or None.
        The waiter holds that file open, so no later file has its inode number; a note
        of an earlier file with that number was removed when this file's render began
        (or, if it died first, with its .live name)."""
        head = _regular_head(self._ram.path(key + _OUTCOME), 1 << 16)  # never a FIFO's open
        try:
            owner, pid, text = (head or b"").decode("utf-8").split(" ", 2)
        except ValueError:
            return None
        return (pid, text) if owner == str(ino) else None

    # ---- removal and stats ---------------------------------------------------------

    def discard(self, key: str) -> bool:
        """Remove key's entry from both tiers unless it is pinned; True if one was removed.

        Raises:
            TypeError, ValueError: key is not a key (see :func:`cache_key`).
            OSError: an entry could not be opened to take its lock (EMFILE, ...), naming
                it (never a False as if it were pinned).
        """
        self._check_open()
        _check_key(key)
        removed = False
        for tier in (self._ram, self._disk):
            if tier is None:
                continue
            with tier.locked():
                for suffix in ENTRY_SUFFIXES:
                    removed |= tier.remove_if_unpinned(key + suffix)
        return removed

    def clear(self) -> int:
        """Remove every unpinned entry (both tiers) and leftovers; return how many entries."""
        self._check_open()
        removed = 0
        for tier in (self._ram, self._disk):
            if tier is None:
                continue
            with tier.locked():
                for name, _ in tier.entries():
                    removed += tier.remove_if_unpinned(name)
                tier.sweep()
        return removed

    def destroy(self) -> None:
        """Clear the cache and remove its directories (when no entry is pinned), then close.

        Meant for when no other process uses the cache (tests, examples, uninstall).
        It removes only what it knows as the cache's own: entries, the notes that failed
        renders leave for their waiters, leftovers no process holds, and the lock file.

        Raises:
            OSError: ENOTEMPTY when an entry is still pinned, a render or a write is in
                flight (in any process), or a directory holds a file that is not the
                cache's: the message names them, nothing but unpinned entries was
                removed and the cache stays open (release and call again). Any other
                OSError, or a process that uses the cache meanwhile, leaves the cache
                closed: the directories may then still be there.
            ValueError: the cache is closed.
        """
        self._check_open()
        self.clear()
        tiers = [tier for tier in (self._ram, self._disk) if tier is not None]
        for tier in tiers:
            with tier.locked():
                _, kept = tier.leftovers()
            if kept:
                shown = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3
                                               else "")
                raise OSError(_errno.ENOTEMPTY, f"cannot destroy the {tier.what} "
                              f"{self.name!r}: {shown} (the cache stays open)", tier.directory)
        # Nothing is held: from here on the cache ends closed, whatever fails.
        self._finalizer.detach()
        try:
            for tier in tiers:
                with tier.locked():
                    notes, _ = tier.leftovers()
                    for note in notes:
                        _unlink_quietly(tier.path(note))
                    _unlink_quietly(tier.path(_LOCK_NAME))
                tier.close()
                _os.rmdir(tier.directory)
        finally:
            for tier in tiers:
                tier.close()

    def stats(self) -> CacheStats:
        """Entries and bytes now (a consistent view, under the lock) and the shared counters."""
        self._check_open()
        with self._ram.locked():
            totals = self._flush_counts()
            entries = self._ram.entries()
            pinned = sum(1 for name, _ in entries if _is_pinned(self._ram.path(name)))
        disk_entries: list[tuple[str, _os.stat_result]] = []
        if self._disk is not None:
            with self._disk.locked():
                disk_entries = self._disk.entries()
        return CacheStats(
            entries=len(entries), bytes=sum(st.st_size for _, st in entries),
            max_bytes=self.max_bytes, pinned=pinned,
            disk_entries=len(disk_entries), disk_bytes=sum(st.st_size for _, st in disk_entries),
            **{k: totals.get(k, 0) for k in _COUNTERS if k not in _NOT_STATS},
        )

    def entries(self) -> list[tuple[str, str, _os.stat_result]]:
        """(key, path, lstat) of each RAM entry, least recently used first."""
        self._check_open()
        with self._ram.locked():
            entries = self._ram.entries()
        entries.sort(key=lambda item: item[1].st_atime_ns)
        return [(name.rpartition(".")[0], self._ram.path(name), st) for name, st in entries]

    def close(self) -> None:
        """Write this process's counters out and close the lock files; again does nothing."""
        if getattr(self, "_ram", None) is None or self._ram.lock_fd < 0:
            return
        self._finalizer.detach()
        if _os.getpid() == self._ram.pid and self._ram.in_place():
            try:
                with self._ram.locked():
                    self._flush_counts()
            except ValueError:
                if not self.closed:
                    raise
                return  # another thread closed it meanwhile
        self._ram.close()
        if self._disk is not None:
            self._disk.close()

    def __enter__(self) -> AudioCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AudioCache {self.name!r} in {self.directory!r}, max {self.max_bytes} bytes>"


class _RenderWriter(WavWriter):
    """The WavWriter a render streams into: before a chunk that the RAM disk may have no
    room for, the cache's own unpinned entries make room (make_room, see
    AudioCache._room_on_ram_disk). A render cannot simply be run again, so the room is
    looked at before the write (fstatvfs), only when what was free at the last look,
    less what was written since, may not hold the chunk: another process that fills the
    RAM disk meanwhile still ends the render with ENOSPC.

    While render(writer) runs (rendering, set by AudioCache._render), close() and abort()
    end the render's writing but not its stream: whether the stream ends as finished or
    as failed is known only when render returns. A render that closes its writer (``with
    writer:``) and then raises must not have shown its followers a finished stream of
    audio that is never stored; they learn that it failed (StreamAbandoned)."""

    make_room: Callable[[int], bool] | None = None
    _free = 0
    rendering = False
    _closed_by_render = False

    @property
    def closed(self) -> bool:
        return self._closed_by_render or super().closed

    def _check_open(self) -> None:
        if self._closed_by_render:
            raise ValueError("I/O operation on closed WavWriter")
        super()._check_open()

    def close(self) -> None:
        if self.rendering and self._pid == _resource.current_pid:
            with self._lock:  # waits for a write in progress, as WavWriter.close does
                self._closed_by_render = True
            return
        self._closed_by_render = False
        super().close()

    def write(self, chunk: object) -> None:
        nbytes = int(getattr(chunk, "nbytes", 0))
        if self.make_room is not None and nbytes + _ROOM_MARGIN > self._free:
            self._free = _lowlevel.room_on(self.fileno())
            if nbytes + _ROOM_MARGIN > self._free:
                self.make_room(nbytes)
                self._free = _lowlevel.room_on(self.fileno())
        super().write(chunk)
        self._free -= nbytes


# Room for a file's header and its last, partly filled page, beyond its samples.
_ROOM_MARGIN = 2 * _os.sysconf("SC_PAGE_SIZE")


def _check_not_the_ram_dir(disk_dir: str, ram_dir: str) -> None:
    """ValueError naming disk_dir when it is the RAM dir itself (however named): the two
    tiers would be one directory with one lock file, which the first spill, holding the
    RAM tier's flock, would wait for through its second open for ever."""
    try:
        disk, ram = _os.stat(disk_dir), _os.stat(ram_dir)
    except OSError:
        return  # a missing disk_dir is reported by the tier that opens it
    if (disk.st_dev, disk.st_ino) == (ram.st_dev, ram.st_ino):
        raise ValueError(f"disk_dir must be another directory than the RAM dir {ram_dir!r} "
                         f"(the cache's first tier), got {disk_dir!r}")


def _warn_leak(tiers: list[_Tier], name: str, owner_pid: int) -> None:
    # Counters not yet written out are lost (they need the lock, which a finalizer must
    # not wait for); the entries themselves are all on disk already.
    if owner_pid == _os.getpid():
        _warnings.warn(f"unclosed AudioCache {name!r}", ResourceWarning, stacklevel=2)
    for tier in tiers:
        try:
            tier.close(wait=False)
        except OSError:
            pass


def _open_regular(path: str, cell: _lowlevel.FdCell) -> int | None:
    """Open path read-only into cell when it is a regular file; None (cell released) when
    it is gone, a symlink, or not a regular file: a FIFO named like an entry must not
    block the open (O_NONBLOCK), nor a symlink lead elsewhere (O_NOFOLLOW). Any other
    OSError is raised, naming path."""
    try:
        fd = _lowlevel.open_at(path, _os.O_RDONLY | _os.O_NOFOLLOW | _os.O_NONBLOCK, cell=cell)
    except OSError as exc:
        if exc.errno in (_errno.ENOENT, _errno.ELOOP):
            return None
        raise
    if not _stat.S_ISREG(_os.fstat(fd).st_mode):
        _lowlevel.release(cell)
        return None
    return fd


def _remove_unstored(fd: int, path: str, key: str) -> None:
    """Remove the unstored audio open at fd when no one else holds it (an exclusive flock
    taken without waiting) and path still names it, with the note that pointed the
    render's waiters to it. Called as its holder lets go (a forked child's copy never):
    the RAM disk does not keep audio no one can look up."""
    if not _lowlevel.lock(fd, exclusive=True) or not _newfile.still_named(fd, path):
        return
    note = f"{_os.path.dirname(path)}/{key}{_OUTCOME}"
    if _note_owner(note) == _os.fstat(fd).st_ino:
        _unlink_quietly(note)
    _unlink_quietly(path)


def _regular_head(path: str, size: int) -> bytes | None:
    """The first size bytes of path, or None when it is not a regular file (a symlink,
    a FIFO, a directory: opened without blocking and never followed) or is gone."""
    cell = _lowlevel.fd_cell()
    try:
        fd = _open_regular(path, cell)
    except OSError:
        return None
    if fd is None:
        return None
    try:
        return _os.pread(fd, size, 0)
    finally:
        _lowlevel.release(cell)


def _note_owner(path: str) -> int | None:
    """The inode number in an outcome note at path, or None when path is not a regular
    file that starts as _write_outcome writes one: "<inode> <pid> "."""
    head = _regular_head(path, 48)
    start = None if head is None else _OUTCOME_START.match(head)
    return None if start is None else int(start.group().split()[0])


def _is_pinned(path: str) -> bool:
    cell = _lowlevel.fd_cell()
    try:
        fd = _open_regular(path, cell)
    except OSError:
        return False
    if fd is None:
        return False
    try:
        return not _lowlevel.lock(fd, exclusive=True)
    finally:
        _lowlevel.release(cell)


def _raise_named(exc: BaseException, path: str) -> None:
    """When exc is an OSError without a file name, raise it again naming path (os.write
    and os.sendfile name none, and an EFBIG or ENOSPC must say which file), as the file
    writers do (_newfile.explain_full_disk); else return, for the caller to re-raise exc
    as it is."""
    if isinstance(exc, OSError):
        named = _newfile.explain_full_disk(exc, path)
        if named is not exc:
            raise named.with_traceback(exc.__traceback__) from None


def _rmdir_quietly(path: str) -> None:
    """Remove an empty directory; leave it when it is not empty or gone (OSError)."""
    try:
        _os.rmdir(path)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        _os.unlink(path)
    except FileNotFoundError:
        pass

