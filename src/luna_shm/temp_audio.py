"""Temporary audio files on the RAM disk: the drop-in helper API.

``get_temp_audio_path(".wav")`` returns ``/dev/shm/luna_audio_<uuid4 hex>.wav``
(or the same name in the fallback temp dir); the file appears when something
writes it, as with the helper it replaces (``create=True`` reserves it now,
empty, mode 0600). ``with temp_audio_path() as path:`` removes it afterwards,
whatever happened. ``cleanup_temp_audio(path)`` removes what
get_temp_audio_path made, ``cleanup_all_temp_audio()`` all our unused files,
and neither ever touches a file that is not ours or that a live process holds.
"Holds" means a flock, as every luna_shm writer, buffer and pool slot keeps: a
program that merely has the file open (a player's ``open()``) is not seen, and
keeps reading it after the unlink (Linux frees the data at its last close).
"""

from __future__ import annotations

import contextlib as _contextlib
import errno as _errno
import os as _os
import re as _re
import stat as _stat
import time as _time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from luna_shm import _lowlevel, _newfile, formats, placement
from luna_shm.placement import (
    AUDIO_PREFIX,
    DAEMON_PREFIX,
    FALLBACK_DIR,
    RAM_DISK_DIR,
)

__all__ = [
    "AUDIO_PREFIX",
    "DAEMON_PREFIX",
    "FALLBACK_DIR",
    "RAM_DISK_DIR",
    "cleanup_all_temp_audio",
    "cleanup_temp_audio",
    "get_temp_audio_path",
    "is_using_ram_disk",
    "iter_unused_temp_audio",
    "refresh_temp_dir",
    "temp_audio_path",
    "temp_dir",
]

# The longest path Linux takes (PATH_MAX): a refused path is named whole up to this.
_PATH_MAX = 4096

# A last check of a file about to be removed: (name, open fd, its fstat) -> keep it?
Verify = Callable[[str, int, _os.stat_result], bool]


def get_temp_audio_path(
    suffix: str = ".wav",
    prefix: str = AUDIO_PREFIX,
    *,
    create: bool = False,
    size_hint: int | None = None,
) -> str:
    """Return a new temp audio path: ``<dir>/<prefix><uuid4 hex><suffix>``.

    By default nothing is created: the file appears when the TTS engine (or
    :func:`write_wav`, ``ffmpeg``, ...) writes it, so that ``os.path.exists(path)``
    still tells whether it was written, and a tool that refuses to overwrite
    works. The uuid4 token makes a name race impractical.

    Args:
        suffix: file name ending, e.g. ``".wav"``; no ``/`` or NUL.
        prefix: file name start; :func:`cleanup_temp_audio` removes a file made
            with any prefix, :func:`cleanup_all_temp_audio` only ``luna_audio_``
            and ``luna_daemon_`` ones.
        create: True reserves the name now: an empty private file (mode 0600,
            created exclusively, retried on collision like :func:`tempfile.mkstemp`).
        size_hint: bytes the file will hold, an int >= 0 (numpy integers too);
            when the RAM disk has less free, the file goes to the fallback dir.

    Returns:
        The absolute path, in the RAM disk when usable, else the fallback dir.

    Raises:
        TypeError, ValueError: for a bad suffix, prefix or size_hint.
        OSError: when no directory can take the file.
    """
    if (size_hint is None and create is False and type(suffix) is str and suffix == ".wav"
            and type(prefix) is str and prefix == AUDIO_PREFIX):
        # The defaults are valid name parts: the common call costs a uuid4 and a
        # format, nothing more (placement's directory is cached).
        return _newfile.new_temp_name(suffix, prefix)
    _newfile.check_name_part("suffix", suffix)
    _newfile.check_name_part("prefix", prefix)
    hint = _newfile.check_size_hint(size_hint)
    if not formats.check_flag("create", create):
        return _newfile.new_temp_name(suffix, prefix, size_hint=hint)
    path, cell = _newfile.with_disk_fallback(
        lambda on_disk: _newfile.create_temp_file(suffix, prefix, size_hint=hint,
                                                  on_disk=on_disk))
    _lowlevel.release(cell)
    return path


@_contextlib.contextmanager
def temp_audio_path(
    suffix: str = ".wav",
    prefix: str = AUDIO_PREFIX,
    *,
    create: bool = False,
    size_hint: int | None = None,
) -> Iterator[str]:
    """A context manager that yields a new temp audio path and always removes the file.

    ``with temp_audio_path(".wav") as path: engine.render(text, path)``: on leaving
    the block, whether the writer succeeded, raised, or never wrote anything, the
    file is removed with :func:`cleanup_temp_audio` (so a file a live buffer,
    writer or pool still holds is left to its holder). When the block raised, a
    failure to remove is logged on the ``luna_shm`` logger and the block's own
    exception goes on. A child forked inside the block that leaves it (``sys.exit``
    unwinds the block in the child too) removes nothing: the file is its parent's.

    Args:
        suffix, prefix, create, size_hint: as for :func:`get_temp_audio_path`.

    Returns:
        A context manager; ``as`` gives the absolute path (a str).

    Raises:
        TypeError, ValueError: for a bad suffix, prefix or size_hint.
        OSError: when no directory can take the file (create=True), or when the
            file cannot be removed after a block that did not raise.
    """
    path = get_temp_audio_path(suffix, prefix, create=create, size_hint=size_hint)
    # Its own dir, as it is now: the block may change LUNA_SHM_DIR or TMPDIR.
    made_in = (_os.path.dirname(path),)
    owner = _os.getpid()
    try:
        yield path
    except BaseException:
        # A child forked inside the block that leaves it (sys.exit unwinds the copy of
        # the parent's stack) must not remove the file its parent is still writing.
        if _os.getpid() == owner:
            try:
                _cleanup(path, made_in)
            except (OSError, ValueError) as exc:
                placement.logger.warning("luna_shm: could not remove %s after a failure: %s",
                                         path, exc)
        raise
    if _os.getpid() == owner:
        _cleanup(path, made_in)


def is_our_name(name: str) -> bool:
    """True for a file name that our prefixes mark as ours, or one of our partial writes
    (``.luna_audio_.partial_<token>``; no other hidden name)."""
    return name.startswith(placement.OUR_PREFIXES) or _newfile.is_partial_name(name)


def _open_dir(directory: str) -> _lowlevel.FdCell:
    """Open one of our dirs without following a symlink at its last component: the fd
    cell that owns its fd (see _lowlevel.fd_cell)."""
    cell = _lowlevel.fd_cell()
    _lowlevel.open_at(directory, _os.O_RDONLY | _os.O_DIRECTORY | _os.O_NOFOLLOW, cell=cell)
    return cell


# A token as _new_token makes it: 32 hex digits of a uuid4 (version nibble 4,
# RFC 4122 variant 8-b), somewhere in the name between a prefix and a suffix.
_TOKEN = _re.compile(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}")


def is_made_name(name: str) -> bool:
    """True for a file name that get_temp_audio_path could have made: one of our
    prefixes, or any prefix and suffix around a uuid4 hex token."""
    return name.startswith(placement.OUR_PREFIXES) or _TOKEN.search(name) is not None


def cleanup_temp_audio(path: str | _os.PathLike[str] | None) -> bool:
    """Remove a temp file that :func:`get_temp_audio_path` made; True if this call removed it.

    The rule: a file of yours that sits directly in one of our two dirs, whose name
    is ``<prefix><uuid4 hex><suffix>`` as get_temp_audio_path makes them (any prefix,
    e.g. ``myapp_``) or starts with ``luna_audio_``/``luna_daemon_``, is removed,
    unless a live process uses it. A symlink is removed itself, never its target; a
    FIFO, socket or device is left alone (whether a live process uses it cannot be
    seen without disturbing that process: remove it yourself when it is done).

    Args:
        path: a path returned by :func:`get_temp_audio_path` (str or PathLike).
            None and ``""`` are accepted and remove nothing, so that
            ``path = None; try: ... finally: cleanup_temp_audio(path)`` works.

    Returns:
        True when this call removed the file. False when nothing was removed: the
        path is None or empty, the file is already gone, a live process (in this
        process or another) holds it: a ``WavBuffer``, ``WavWriter``, ``AudioPool``
        slot or an atomic write in progress, or it is a FIFO, socket or device
        (logged at DEBUG on the ``luna_shm`` logger).

    Raises:
        TypeError: path is not a str or PathLike of str (or None); the message
            names what was passed.
        ValueError: the path is not ours: not absolute, its parent is not exactly
            one of our two dirs (or is a symlink), or its name has neither our
            prefixes nor a uuid4 token.
        IsADirectoryError: a directory stands at the name.
        PermissionError: the file belongs to another user.
        OSError: the file cannot be opened to test whether it is held (EMFILE,
            ENFILE) or cannot be removed (EROFS, ...), with the whole path as
            filename. (A file of yours with mode 000 cannot be tested: False.)
    """
    return _cleanup(path, placement.our_dirs())


def _cleanup(path: object, our_dirs: tuple[str, ...]) -> bool:
    """cleanup_temp_audio, with the dirs whose files count as ours given."""
    if path is None:
        return False
    text = _lowlevel.path_argument(path, "str, os.PathLike[str] or None")
    if not text:
        return False
    # Named whole up to PATH_MAX (a real path is never longer), by its length beyond.
    shown = _lowlevel.brief(text, _PATH_MAX)
    if "\0" in text:
        raise ValueError(f"path contains a NUL byte: {shown}")
    if not _os.path.isabs(text):
        raise ValueError(f"refusing to remove {shown}: not an absolute path")
    parent, name = _os.path.split(text)
    if parent not in our_dirs:
        raise ValueError(
            f"refusing to remove {shown}: its directory is not one of ours "
            f"({', '.join(our_dirs)})"
        )
    if not is_made_name(name):
        raise ValueError(
            f"refusing to remove {shown}: the name lacks our prefixes "
            f"({AUDIO_PREFIX!r}, {DAEMON_PREFIX!r}) and the uuid4 hex token that "
            "get_temp_audio_path puts in every name"
        )
    try:
        dir_cell = _open_dir(parent)
    except FileNotFoundError:
        return False
    except OSError as exc:
        # O_DIRECTORY|O_NOFOLLOW on a symlink fails with ENOTDIR on Linux, ELOOP elsewhere.
        if exc.errno in (_errno.ELOOP, _errno.ENOTDIR):
            what = "a symlink" if _os.path.islink(parent) else "not a directory"
            raise ValueError(f"refusing to remove {shown}: {parent} is {what}") from None
        raise
    dir_fd: int = dir_cell[0]
    try:
        try:
            st = _os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:  # EACCES (a dir we may list, not search), ENAMETOOLONG
            raise _lowlevel.named(exc, text, relative=name) from None
        if _stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(_errno.EISDIR, "not removing a directory", text)
        if st.st_uid != _os.geteuid():
            raise PermissionError(_errno.EPERM, "file belongs to another user", text)
        if _stat.S_ISREG(st.st_mode):
            # The same check as cleanup_all_temp_audio: unlinked under our exclusive
            # flock, so never while a buffer, writer, pool slot or partial holds it.
            found = _examine(dir_fd, name, st, where=parent)
            if found == _UNUSED:
                return True
            placement.logger.debug("luna_shm: cleanup_temp_audio left %s: %s", text,
                                   _LEFT_BECAUSE[found])
            return False
        if _stat.S_ISLNK(st.st_mode):  # the link itself: nothing to hold
            return _unlink_checked(dir_fd, name, (st.st_dev, st.st_ino), parent)
        # A FIFO, socket or device: no flock says whether a live process uses it (a
        # daemon listening on a socket, a player about to open a FIFO), and asking
        # would disturb them (a connect, an open that wakes a blocked reader).
        placement.logger.debug(
            "luna_shm: cleanup_temp_audio left %s: a FIFO, socket or device is never "
            "removed (whether a live process uses it cannot be seen)", text)
        return False
    finally:
        _lowlevel.release(dir_cell)


# What _examine found: a file no live process holds (removed when asked), a file a
# live process holds, a file this process cannot open to test its lock (mode 000), or
# nothing to report (vanished, replaced, or refused by verify).
_UNUSED, _HELD, _UNTESTABLE, _SKIP = "unused", "held", "untestable", "skip"

# Why cleanup_temp_audio left a regular file, for its DEBUG line.
_LEFT_BECAUSE = {
    _HELD: "held by a live process",
    _UNTESTABLE: "its mode lets this process neither read nor write it, so whether a live "
                 "process holds it cannot be tested (chmod it first)",
    _SKIP: "it vanished or was replaced meanwhile",
}


# Opening a file to test its lock: these errors mean it vanished or is no longer a
# regular file at that name (a link: ELOOP; a socket: ENXIO): nothing to examine.
_GONE_ERRNOS = frozenset({_errno.ENOENT, _errno.ELOOP, _errno.ENXIO, _errno.ENOTDIR})


def _examine(
    dir_fd: int, name: str, st: _os.stat_result, *, where: str, remove: bool = True,
    verify: Verify | None = None,
) -> str:
    """Whether a live process holds name (the file st describes, in the directory where
    names); unlink it when not and remove=True. Returns _UNUSED, _HELD, _UNTESTABLE or
    _SKIP.

    Buffers, writers and pool slots hold a shared flock for their lifetime: if
    we can take the exclusive lock, nobody alive is using the file (a lock we
    only tested is released at once, with the fd). verify(name, fd, fstat),
    called under the exclusive lock, can refuse the file (_SKIP).

    Raises:
        OSError: the file cannot be opened to test its lock (EMFILE, ENFILE, ...)
            or removed (EROFS, ...), naming its path.
    """
    cell = _lowlevel.fd_cell()  # the exclusive lock: never a child's
    flags = _os.O_NOFOLLOW | _os.O_NONBLOCK
    try:
        try:
            fd = _lowlevel.open_at(name, _os.O_RDONLY | flags, dir_fd=dir_fd, cell=cell)
        except PermissionError:  # a write-only file of ours: flock takes any open mode
            fd = _lowlevel.open_at(name, _os.O_WRONLY | flags, dir_fd=dir_fd, cell=cell)
    except PermissionError:
        # Mode 000: its lock cannot be tested, so it is neither removed nor counted
        # (`luna-shm status` and clean agree); chmod makes it examinable again.
        return _UNTESTABLE
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS:
            return _SKIP
        # EMFILE, ENOMEM, ...: a file whose lock could not be tested is not "held".
        raise OSError(exc.errno, exc.strerror, f"{where}/{name}") from None
    try:
        opened = _os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            return _SKIP  # replaced under us
        if not _lowlevel.lock(fd, exclusive=True):  # a failure: named below
            return _HELD  # in use by a live process
        if verify is not None and not verify(name, fd, opened):
            return _SKIP
        # The name could have been renamed over while we locked: the removal checks
        # that it still names the file we hold; a dry run asks the name once more.
        if remove:
            return _UNUSED if _unlink_checked(dir_fd, name, (st.st_dev, st.st_ino),
                                              where) else _SKIP
        again = _os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return _UNUSED if (again.st_dev, again.st_ino) == (st.st_dev, st.st_ino) else _SKIP
    except FileNotFoundError:
        return _SKIP
    except OSError as exc:  # fstat, flock, stat: named by its path, as the docstring says
        raise _lowlevel.named(exc, f"{where}/{name}", relative=name) from None
    finally:
        _lowlevel.release(cell)


def _unlink_checked(dir_fd: int, name: str, identity: tuple[int, int], where: str) -> bool:
    """Unlink name (in the directory where) only while it names the file whose
    (st_dev, st_ino) is identity; True if it did.

    A check then an unlink of the name leaves an instant in which another process can
    rename a file it holds over the name, and the unlink would take that one. So the
    entry is first moved to a fresh hidden name of ours (a rename is atomic), checked
    there, and removed only if it is the file examined; another file goes back under
    its name. A process killed in between leaves the file under that hidden name,
    which cleanup_all_temp_audio recognises.

    Raises:
        OSError: the rename, the check or the unlink failed (EROFS, EPERM, EIO...),
            naming the path; the file is back under its name (unless giving it back
            failed too: then a warning says where it is).
    """
    claim = _newfile.partial_name()
    try:
        _os.rename(name, claim, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, f"{where}/{name}") from None
    moved: _os.stat_result | None = None
    try:
        moved = _os.stat(claim, dir_fd=dir_fd, follow_symlinks=False)
        if (moved.st_dev, moved.st_ino) == identity:
            _os.unlink(claim, dir_fd=dir_fd)
            return True
    except FileNotFoundError:
        return False  # another cleanup took it from the hidden name
    except OSError as exc:
        # The file is under our hidden name and stays: give it its name back, so that
        # a failed removal leaves the directory as it found it (the caller may retry).
        is_dir = moved is not None and _stat.S_ISDIR(moved.st_mode)
        _put_back(dir_fd, claim, name, where, is_dir=is_dir)
        raise OSError(exc.errno, exc.strerror, f"{where}/{name}") from None
    _put_back(dir_fd, claim, name, where, is_dir=_stat.S_ISDIR(moved.st_mode))
    return False


def remove_if_same(path: str, identity: tuple[int, int]) -> bool:
    """Remove path only while it names the file whose (st_dev, st_ino) is identity (a
    file of ours, e.g. a pool's slot); True if this call removed it.

    Another file at path (renamed over it, before or during this call) is left where it
    is: a name that already names another file is not touched, and the removal itself
    goes through the hidden name that :func:`_unlink_checked` checks.

    Raises:
        OSError: the directory cannot be opened, or the file removed (EROFS, ...),
            naming the path; a path or directory that is gone is no error.
    """
    parent, name = _os.path.split(path)
    try:
        dir_cell = _open_dir(parent)
    except FileNotFoundError:
        return False
    try:
        try:
            st = _os.stat(name, dir_fd=dir_cell[0], follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _lowlevel.named(exc, path, relative=name) from None
        if (st.st_dev, st.st_ino) != identity:
            return False
        return _unlink_checked(dir_cell[0], name, identity, parent)
    finally:
        _lowlevel.release(dir_cell)


def _put_back(dir_fd: int, claim: str, name: str, where: str, *, is_dir: bool) -> None:
    """Give a file that _unlink_checked moved by mistake its name back, without
    replacing whatever took the name meanwhile: a link, then the hidden name goes (a
    directory, which cannot be linked, is renamed back: that replaces at most an empty
    directory)."""
    try:
        if is_dir:
            _os.rename(claim, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        _os.link(claim, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        _os.unlink(claim, dir_fd=dir_fd)
    except OSError as exc:
        placement.logger.warning(
            "luna_shm: a file renamed over %s/%s while it was being removed stays at "
            "%s/%s: %s", where, name, where, claim, exc.strerror)


def iter_unused_temp_audio(
    *, older_than: float | None = None, remove: bool = False
) -> Iterator[tuple[str, _os.stat_result]]:
    """Yield ``(path, stat)`` for each of our temp files that no live process uses.

    This is the selection of :func:`cleanup_all_temp_audio`: regular files with
    our prefixes, owned by this user, in our two dirs, whose flock no live
    process holds, and (with older_than) last modified longer ago than that.
    No lock is held while the caller handles a yielded file.

    Args:
        older_than: seconds (an int, a float or a numpy number); when given, only
            files last modified longer ago. ``math.inf`` (or an int too large for a
            float) selects nothing: no file is that old.
        remove: unlink each file (while holding its exclusive lock) before
            yielding it; False only lists them, for a dry run.

    Returns:
        An iterator of (absolute path, the file's lstat result).

    Raises:
        TypeError, ValueError: older_than is not a number of seconds >= 0 (a
            bool and NaN are refused), or remove is not a bool (remove="no" must
            never remove), raised by this call, before iterating.
        OSError: while iterating, after the other dir was done: one of our dirs
            exists but cannot be read (EACCES, EMFILE, ...). A missing dir, or a
            symlink or non-directory at its name, holds nothing of ours.
    """
    remove = formats.check_flag("remove", remove)
    cutoff = None
    if older_than is not None:
        # Before the iterator: a bad value raises at the call. time - inf = -inf, which
        # no file's mtime is before: an infinite age selects nothing.
        cutoff = _time.time() - formats.check_seconds("older_than", older_than)
    return _iter_unused(cutoff, remove)


def _iter_unused(
    cutoff: float | None, remove: bool
) -> Iterator[tuple[str, _os.stat_result]]:
    # A directory that cannot be read does not stop the other one from being
    # cleaned; its error is raised once both were tried.
    failure: OSError | None = None
    for directory in placement.our_dirs():
        try:
            yield from _unused_in(directory, is_our_name, cutoff, remove)
        except OSError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def open_scanned_dir(directory: str) -> _lowlevel.FdCell | None:
    """Open one of our dirs for a scan (its fd cell); None when nothing of ours can be there.

    A missing dir holds nothing; neither does a symlink or a non-directory at its
    name (ELOOP/ENOTDIR), since we never make files through one (placement
    refuses a symlinked RAM dir and resolves TMPDIR). Any other failure (EACCES,
    EMFILE, ...) raises: a dir we cannot read is not a clean one.
    """
    try:
        return _open_dir(directory)
    except OSError as exc:
        if exc.errno in (_errno.ENOENT, _errno.ENOTDIR, _errno.ELOOP):
            return None
        raise


class ScannedFile(NamedTuple):
    """One of this user's files that :func:`scan_our_files` found."""

    name: str  # its name in the directory
    path: str  # directory/name
    stat: _os.stat_result  # its lstat, taken before it was examined
    held: bool  # a live process holds it: no cleanup removes it


def scan_our_files(
    directory: str, wanted: Callable[[str], bool], *, cutoff: float | None = None,
    remove: bool = False, verify: Verify | None = None,
) -> Iterator[ScannedFile]:
    """The one scan of our dirs: ``luna-shm status`` counts what it yields, and
    cleanup_all_temp_audio, ``luna-shm clean`` and a pool's reclaim remove the
    files it yields with held=False.

    Yields this user's regular files in directory whose names are wanted, last
    modified before cutoff (if given), each examined under an exclusive flock
    attempt: held=True when a live process holds it. Links, FIFOs, directories,
    other users' files, files that vanish or are replaced meanwhile, and files
    verify(name, fd, fstat) refuses are not yielded. With remove=True each
    unheld file is unlinked, under its exclusive lock, before it is yielded.

    Raises:
        OSError: directory exists but cannot be read (see :func:`open_scanned_dir`);
            or, after every other file was done, the first file that could not be
            examined or removed (EMFILE, EROFS, an immutable file, ...), named whole.
    """
    dir_cell = open_scanned_dir(directory)
    if dir_cell is None:
        return
    # A forked child may go on with this generator: its fd number must not be closed
    # (and reused for another directory) under it.
    _lowlevel.keep_in_child(dir_cell)
    dir_fd: int = dir_cell[0]
    uid = _os.geteuid()
    # A file that cannot be examined or removed does not stop the others; the first
    # such error is raised at the end.
    failure: OSError | None = None
    try:
        try:
            with _os.scandir(dir_fd) as entries:  # scandir(fd) dups it: EMFILE names nothing
                names = [e.name for e in entries if wanted(e.name)]
        except OSError as exc:
            raise _newfile.explain_full_disk(exc, directory) from None
        for name in names:
            try:
                st = _os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not _stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                    continue
                if cutoff is not None and st.st_mtime > cutoff:
                    continue
                found = _examine(dir_fd, name, st, where=directory, remove=remove,
                                 verify=verify)
            except FileNotFoundError:
                continue
            except OSError as exc:  # the stat's names only the name: named whole
                failure = failure or _lowlevel.named(exc, f"{directory}/{name}",
                                                     relative=name)
                continue
            if found in (_UNUSED, _HELD):
                yield ScannedFile(name, f"{directory}/{name}", st, found == _HELD)
    finally:
        _lowlevel.release(dir_cell)
    if failure is not None:
        raise failure


def _unused_in(
    directory: str, wanted: Callable[[str], bool], cutoff: float | None, remove: bool,
    verify: Verify | None = None,
) -> Iterator[tuple[str, _os.stat_result]]:
    """(path, lstat) of the unheld files of :func:`scan_our_files`."""
    for found in scan_our_files(directory, wanted, cutoff=cutoff, remove=remove,
                                verify=verify):
        if not found.held:
            yield found.path, found.stat


def cleanup_all_temp_audio(*, older_than: float | None = None) -> int:
    """Remove all our temp files (both prefixes, both dirs); return how many.

    Only regular files owned by this user are removed; links, FIFOs,
    directories, other users' files and files in use (locked by a live
    process) are left alone. Files vanishing meanwhile are fine.
    :func:`iter_unused_temp_audio` lists the same files without removing them.

    Args:
        older_than: seconds (an int, a float or a numpy number); when given, only
            files last modified longer ago. ``math.inf`` (or an int too large for a
            float) removes nothing: no file is that old.

    Returns:
        The number of files this call removed.

    Raises:
        TypeError, ValueError: older_than is not a number of seconds >= 0 (a
            bool and NaN are refused).
        OSError: one of our dirs exists but cannot be read (EACCES, EMFILE, ...),
            with that dir as filename, or a file of ours cannot be examined or
            removed (EROFS, an immutable file, ...), named whole; everything else
            is cleaned first. A missing dir, or a symlink or non-directory at its
            name, counts as empty.
    """
    return sum(1 for _ in iter_unused_temp_audio(older_than=older_than, remove=True))


def temp_dir() -> str:
    """The directory new temp audio goes to now."""
    return placement.current().directory


def is_using_ram_disk() -> bool:
    """True when the directory in use is a writable directory that lives in RAM."""
    return placement.current().in_ram


def refresh_temp_dir() -> str:
    """Probe the directories again (after a mount change) and return the one in use."""
    return placement.refresh().directory


def remove_unused_files(directory: str, name_prefix: str, *, verify: Verify | None = None
                        ) -> int:
    """Remove this user's regular files in directory whose names start with name_prefix
    and that no live process holds locked; return how many. verify(name, fd, fstat)
    is asked under the file's exclusive lock, just before the unlink: False keeps it."""
    found = _unused_in(directory, lambda name: name.startswith(name_prefix), None, True,
                       verify)
    return sum(1 for _ in found)
