"""Where temp audio goes: the RAM disk when it is really usable, else the temp dir.

The RAM dir is ``$LUNA_SHM_DIR`` or ``/dev/shm``; it is used only when it is a
writable directory on tmpfs/ramfs (not a devtmpfs), not a symlink, and not
world-writable without the sticky bit. ``LUNA_SHM_DISABLE=1`` forces the
fallback dir (any value but empty, ``0``, ``false``, ``no`` or ``off``), which is
``$TMPDIR`` when it is a directory this user can write in (like :mod:`tempfile`),
or ``/tmp``, with symbolic links resolved.

The choice is cached per value of those three variables, with both dirs as
absolute paths resolved when it was made (a relative ``LUNA_SHM_DIR`` does not
move with a later ``os.chdir``); :func:`refresh` probes again (after a mount
changed, say). Each reason to fall back is logged
once on the ``luna_shm`` logger.
"""

from __future__ import annotations

import logging as _logging
import os as _os
import stat as _stat
import threading as _threading
from dataclasses import dataclass

from luna_shm import _lowlevel

RAM_DISK_DIR = "/dev/shm"
FALLBACK_DIR = "/tmp"
AUDIO_PREFIX = "luna_audio_"
DAEMON_PREFIX = "luna_daemon_"
OUR_PREFIXES = (AUDIO_PREFIX, DAEMON_PREFIX)

_RAM_FS_NAMES = frozenset({"tmpfs", "ramfs"})

logger = _logging.getLogger("luna_shm")


@dataclass(frozen=True)
class Placement:
    """The directory in use, whether it lives in RAM, and why it was chosen."""

    directory: str
    in_ram: bool
    reason: str
    ram_dir: str
    fallback_dir: str


def _configured_ram_dir(configured: str | None) -> str:
    """$LUNA_SHM_DIR (configured) made absolute, or /dev/shm; left relative when it cannot
    be resolved (its working directory was removed: os.getcwd fails), which _choose
    refuses."""
    if not configured:
        return RAM_DISK_DIR
    try:
        return _os.path.abspath(configured)
    except OSError:  # FileNotFoundError from os.getcwd
        return configured


# LUNA_SHM_DISABLE values that leave the RAM disk on (compared in lower case).
_NOT_DISABLED = frozenset({"", "0", "false", "no", "off"})


def _configured_fallback_dir(configured: str | None) -> str:
    """$TMPDIR (configured) when this user can make files there, else /tmp; resolved."""
    # As tempfile does, a TMPDIR this user cannot make files in is passed over: every
    # file would fail there, while /tmp takes them.
    if (configured and _os.path.isdir(configured)
            and _os.access(configured, _os.W_OK | _os.X_OK, effective_ids=True)):
        chosen = configured
    else:
        chosen = FALLBACK_DIR
    # Resolved: cleanup opens our dirs with O_NOFOLLOW, so a symlinked TMPDIR, or a
    # /tmp that is a symlink itself (/tmp -> /private/tmp), would leave every file
    # made through it impossible to clean up.
    return _os.path.realpath(chosen)


def ram_dir() -> str:
    """The RAM-disk candidate: ``$LUNA_SHM_DIR`` or ``/dev/shm``, as an absolute path.

    A relative ``$LUNA_SHM_DIR`` is resolved once, against the working directory
    of the moment the placement is chosen (see :func:`current`); a later
    ``os.chdir`` changes nothing until :func:`refresh`.
    """
    return current().ram_dir


def fallback_dir() -> str:
    """The disk temp dir: ``$TMPDIR`` when it names a directory this user can write
    in, else ``/tmp`` (resolved once, like :func:`ram_dir`)."""
    return current().fallback_dir


def our_dirs() -> tuple[str, ...]:
    """The directories whose files with our prefixes are ours to clean up."""
    chosen = current()
    ram, fallback = chosen.ram_dir, chosen.fallback_dir
    return (ram,) if ram == fallback or _same_directory(ram, fallback) else (ram, fallback)


def _same_directory(a: str, b: str) -> bool:
    """True when a and b name one directory (a symlinked parent gives it two spellings),
    so that it is scanned once: counted once by status, listed once by a dry run. A
    symlink at the last component is not followed (lstat): it is no dir of ours."""
    try:
        first, second = _os.lstat(a), _os.lstat(b)
    except OSError:
        return False
    return _stat.S_ISDIR(first.st_mode) and (first.st_dev, first.st_ino) == (
        second.st_dev, second.st_ino)


def mount_fs_type(dev: tuple[int, int]) -> str | None:
    """The filesystem type of the mount with this device number, from mountinfo; None
    when there is no mountinfo to read (no /proc here).

    Raises:
        OSError: mountinfo could not be read now (EMFILE: a process at its fd limit).
            A guess made then would be cached as the placement for the life of the
            process (a tmpfs subdirectory taken for a disk dir), so the caller is told.
    """
    wanted = f"{dev[0]}:{dev[1]}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            for line in mountinfo:
                fields = line.split()
                if len(fields) > 2 and fields[2] == wanted and "-" in fields:
                    return fields[fields.index("-") + 1]
    except (FileNotFoundError, PermissionError):
        return None
    return None


def lives_in_ram(path: str, info: _lowlevel.FsInfo | None = None) -> bool:
    """True when directory path is on tmpfs or ramfs (a devtmpfs does not count).

    Raises:
        OSError: mountinfo could not be read now (see mount_fs_type).
    """
    if info is None:
        try:
            info = _lowlevel.fs_probe(path)
        except OSError:
            return False
    if not info.is_dir or not info.is_ram_fs:
        return False
    # devtmpfs reports the tmpfs magic too: ask which mount this really is.
    fs_name = mount_fs_type(info.dev)
    if fs_name is None:
        return info.is_mount_point
    return fs_name in _RAM_FS_NAMES


def _writable_ram(path: str) -> bool:
    """True when directory path lives in RAM and we can write in it (what
    is_using_ram_disk promises of the fallback dir too: a read-only tmpfs is no use)."""
    try:
        info = _lowlevel.fs_probe(path)
    except OSError:
        return False
    return info.writable and lives_in_ram(path, info)


def ram_dir_problem(path: str) -> str | None:
    """Why path cannot serve as our RAM disk, or None when it can."""
    try:
        info = _lowlevel.fs_probe(path)
    except OSError as exc:
        return f"{path} cannot be examined ({exc.strerror})"
    if info.is_symlink:
        return f"{path} is a symbolic link (refused: it could point anywhere)"
    if not info.is_dir:
        return f"{path} is not a directory"
    if info.mode & _stat.S_IWOTH and not info.mode & _stat.S_ISVTX:
        return f"{path} is world-writable without the sticky bit (others could swap our files)"
    if info.uid not in (0, _os.geteuid()):
        return f"{path} is owned by another user (uid {info.uid})"
    if not info.writable:
        return f"{path} is not writable ({_os.strerror(info.write_errno)})"
    if not lives_in_ram(path, info):
        # By its mount's type where mountinfo names it: a devtmpfs has tmpfs's magic.
        fs_name = mount_fs_type(info.dev)
        kind = fs_name if fs_name is not None else f"type {info.fs_type:#x}"
        return f"{path} is not a RAM disk (filesystem {kind})"
    return None


_lock = _threading.Lock()


def _new_lock_in_child() -> None:
    # Another thread of the parent may have held the lock at the fork: that thread does
    # not exist in the child, which would wait for it for ever on its next placement call.
    global _lock
    _lock = _threading.Lock()


_os.register_at_fork(after_in_child=_new_lock_in_child)

# The values of LUNA_SHM_DIR, LUNA_SHM_DISABLE and TMPDIR (bytes, or str where os.environ
# keeps no bytes; None when unset).
_EnvironmentKey = tuple[bytes | str | None, bytes | str | None, bytes | str | None]
_cache: dict[_EnvironmentKey, Placement] = {}  # at most one: the last key probed
_refreshes = 0  # how many refresh() calls began: a probe begun before one is not cached
_logged: set[str] = set()


def log_once(message: str, level: int = _logging.WARNING, *, key: str | None = None) -> None:
    """Log message on the luna_shm logger the first time it is seen (until refresh()).

    Args:
        message: the line to log.
        level: its logging level.
        key: what makes it the same event again, when the message carries numbers
            that change every time (a file's size, the bytes free): only the first
            message of a key is logged, and only the key is remembered. Without a key
            every distinct message counts as a new event, and is remembered for as long
            as the process lives.
    """
    with _lock:
        seen = message if key is None else key
        if seen in _logged:
            return
        _logged.add(seen)
    logger.log(level, message)


def _unresolved_problem(ram: str) -> str | None:
    """Why a RAM dir that stayed relative (see _configured_ram_dir) is not used."""
    if _os.path.isabs(ram):
        return None
    return (f"LUNA_SHM_DIR {ram!r} is relative and the working directory it is relative "
            "to is gone")


def _choose(key: _EnvironmentKey) -> Placement:
    """The placement for the environment whose values key holds (see _environment_key):
    those values alone, never os.environ read again, which another thread may have
    changed since, so that the placement cached under key is key's."""
    configured_ram, disable, configured_fallback = (
        None if value is None else _os.fsdecode(value) for value in key)
    # The only place the environment's paths are resolved: every later call
    # uses these absolute paths, whatever the working directory is by then.
    ram = _configured_ram_dir(configured_ram)
    fallback = _configured_fallback_dir(configured_fallback)
    if (disable or "").strip().lower() not in _NOT_DISABLED:
        reason = "LUNA_SHM_DISABLE is set"
        log_once(f"luna_shm: using {fallback}: {reason}", _logging.INFO)
        return Placement(fallback, _writable_ram(fallback), reason, ram, fallback)
    problem = _unresolved_problem(ram) or ram_dir_problem(ram)
    if problem is None:
        return Placement(ram, True, f"{ram} is a writable RAM disk", ram, fallback)
    log_once(f"luna_shm: falling back to {fallback}: {problem}")
    return Placement(fallback, _writable_ram(fallback), problem, ram, fallback)


# CPython keeps os.environ's contents in a dict of bytes (os.environ._data), updated by
# every os.environ change. Reading it directly costs about 0.05 us a key instead of 1 us
# through os.environ.get (which encodes the key and decodes the value each time), and
# current() runs on every new file. A probe decodes the values of that one read (_choose).
_ENV_BYTES: dict[bytes, bytes] | None = getattr(_os.environ, "_data", None)
if not isinstance(_ENV_BYTES, dict) or not all(isinstance(k, bytes) for k in _ENV_BYTES):
    _ENV_BYTES = None


def _environment_key() -> _EnvironmentKey:
    """What the cached placement depends on: LUNA_SHM_DIR, LUNA_SHM_DISABLE and TMPDIR,
    read once (a probe uses these very values: see _choose)."""
    if _ENV_BYTES is not None:
        return (_ENV_BYTES.get(b"LUNA_SHM_DIR"), _ENV_BYTES.get(b"LUNA_SHM_DISABLE"),
                _ENV_BYTES.get(b"TMPDIR"))
    env = _os.environ
    return (env.get("LUNA_SHM_DIR"), env.get("LUNA_SHM_DISABLE"), env.get("TMPDIR"))


def current() -> Placement:
    """The placement for the present environment (cached, see :func:`refresh`)."""
    key = _environment_key()
    placement = _cache.get(key)
    if placement is None:
        refreshes = _refreshes
        placement = _choose(key)
        with _lock:
            # A refresh() since the probe began may have seen the directories change
            # (a mount, a removal): its choice stays; this call still returns its own.
            if refreshes == _refreshes:
                _cache.clear()
                _cache[key] = placement
    return placement


def refresh() -> Placement:
    """Forget the cached choice and probe the directories again."""
    global _refreshes
    with _lock:
        _refreshes += 1
        _cache.clear()
        _logged.clear()
    return current()
