"""The shared life cycle of objects that own a file, a pool or a slot: close, with, leaks,
fork."""

from __future__ import annotations

import os as _os
import threading as _threading
import warnings as _warnings
import weakref as _weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, Self, SupportsIndex, TypeVar

from luna_shm import _lowlevel

_T = TypeVar("_T")

# The id of this process. A forked child sets it again before any of its own Python
# code runs (os.register_at_fork), so "was this object made in this process?" is one
# int comparison on the hot path: obj._pid != _resource.current_pid. Read it as
# ``_resource.current_pid`` (an attribute look-up), never ``from ... import``: a copy
# would keep the parent's value.
current_pid: int = _os.getpid()


# The objects a forked child lets go of at once (Resource._let_go_at_fork).
_let_go_in_child: _weakref.WeakSet[Resource] = _weakref.WeakSet()


def _after_fork_in_child() -> None:
    global current_pid
    current_pid = _os.getpid()
    failed: BaseException | None = None
    for resource in list(_let_go_in_child):
        try:
            resource._let_go()
        except Exception as exc:  # a bug: every other object still lets go, then it shows
            failed = failed or exc
    _let_go_in_child.clear()
    if failed is not None:
        raise failed


_os.register_at_fork(after_in_child=_after_fork_in_child)


def inherited_error(what: str, owner_pid: int) -> RuntimeError:
    """The error an object made by process owner_pid raises when a forked child uses it."""
    return RuntimeError(
        f"{what} belongs to process {owner_pid}, which made it; this process "
        f"({current_pid}) is a forked child and cannot use it: make a new one here"
    )


def _warn_leak(cell: _lowlevel.FdCell, what: str, owner_pid: int) -> None:
    # In a forked child (its interpreter exit, or its garbage collector) the object
    # is only an inherited copy: close the child's fd quietly. Closing it never drops
    # the parent's flock, which belongs to the open file description they share.
    if owner_pid == current_pid:
        _warnings.warn(f"unclosed {what}", ResourceWarning, stacklevel=2)
    try:
        _lowlevel.release(cell)
    except OSError:
        pass


class OwnedHere:
    """Base of objects that own open files (fds, flocks, mappings) in this process: they
    are never pickled or copied. A pickle would carry fd numbers that mean nothing in
    another process; a copy would share this object's fds and state with a second
    owner, and each would close them under the other. Both raise a TypeError saying
    what to pass instead."""

    __slots__ = ()

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        # pickle, copy.copy and copy.deepcopy all come here (none has a __copy__).
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled or copied: it owns open files in "
            f"this process, which a pickle cannot carry and a copy would share; give "
            f"another process the path (or the cache's name) to open there, and use this "
            f"object itself here")


class Resource(OwnedHere):
    """Base of every luna_shm object that owns something until :meth:`close`.

    It belongs to the process that made it (``_pid``), leaves its ``with`` block
    closed, and a finalizer runs ``on_leak`` when it is collected unclosed (which
    warns ``ResourceWarning`` in the owner process and only lets go of the child's
    copies in a forked child). Subclasses say what closing and being closed mean.
    """

    _pid: int = -1
    _finalizer: _weakref.finalize | None = None  # type: ignore[type-arg]
    _uses = 0  # uses running (nested ones: signal handlers'), in the thread holding the lock
    _close_after = False  # a close asked for during them (by a signal handler)

    def _track(self, on_leak: Callable[..., None], *args: Any) -> None:
        """Belong to this process, and call on_leak(*args) if collected unclosed.

        on_leak must not refer to self (a finalizer that does keeps it alive forever).
        """
        self._pid = current_pid
        self._finalizer = _weakref.finalize(self, on_leak, *args)

    def _untrack(self) -> None:
        """Closed on purpose: the leak finalizer will not run."""
        if self._finalizer is not None:
            self._finalizer.detach()

    def _let_go_at_fork(self) -> None:
        """Have every child forked from now on let go of its copies at once (see _let_go).

        For an object whose open files, held by a child too, would keep their locks and
        delay their last close: a WavWriter's followers learn from those that the writer
        died; a pool's slot files stay flock-held, out of every reclaim, while a child
        lives after the pool's process was killed.
        """
        _let_go_in_child.add(self)

    def _let_go(self) -> None:
        """In a forked child, right after the fork (no other thread exists, and a lock
        the parent's threads held may stay held: take none): close the child's copies
        of what the object holds. Subclasses that call _let_go_at_fork say how."""

    def _begin_use(self) -> None:
        """The start of a use that a close must not cut into (under the object's
        reentrant lock, right before the use's ``try``, whose ``finally`` calls
        :meth:`_end_use`): a close from now on waits for its end. One that a handler
        makes before the count is up closes at once, which the use's own look at the
        object then sees.

        Uses are counted, not flagged: a signal handler may use the object inside a
        use, and the end of its use must not leave the outer one unguarded.
        """
        self._uses += 1

    def _end_use(self) -> None:
        """The end of a use, once its ``finally`` (under the lock) has taken the count down
        itself (``self._uses -= 1``, then this call): at the end of the outermost use, a
        close that a signal handler asked for meanwhile is made.

        The count goes down in the ``finally``, not here: a handler may run as a call
        starts, and one that raised there (Ctrl-C) left the count up, so every later
        close took itself for one asked inside a use and never closed.
        """
        if self._close_after and not self._uses:
            self._close_after = False
            self._close_now()

    def _close_now(self) -> None:  # pragma: no cover - every subclass that counts uses says
        """What close() does at once, or at the end of the use it waited for."""
        raise NotImplementedError

    def _check_ours(self) -> None:
        """RuntimeError naming the owner when a forked child uses an inherited object."""
        if self._pid != current_pid:
            raise inherited_error(self._name(), self._pid)

    def _name(self) -> str:
        """How an error names this object: built only when one is raised (a repr of a
        path costs a few hundred ns, on paths that check every call)."""
        return type(self).__name__

    @property
    def closed(self) -> bool:  # pragma: no cover - every subclass says
        """True once the object was closed (or released)."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - every subclass says
        """Let go of what the object owns; calling it again does nothing."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class FileResource(Resource):
    """Base for objects that hold an fd (and its flock) until :meth:`close`.

    Class-level defaults let a half-built object be closed or collected safely;
    a leaked object warns ``ResourceWarning`` and its fd is closed.

    Fork: the object belongs to the process that made it. In a forked child
    every use raises ``RuntimeError`` naming the owner's pid; ``close()`` there
    (and the child's exit, however it leaves) only closes the child's copy of
    the fd and never touches the file, its lock or its name. An object that
    asked for it (:meth:`_let_go_at_fork`) has the child's copies closed right
    at the fork.

    Threads: a use of the fd (or of what maps it) that a close in another thread
    must not cut into runs under the object's lock, counted: ``with self._lock:``,
    :meth:`_begin_use` at once, then, in a ``try`` whose ``finally`` calls
    :meth:`_end_use`, a look that the object is still open and the use. close()
    takes the lock too, so it waits for such a use; called by a signal handler that
    interrupted its own thread's use (the lock is reentrant), it closes as the
    outermost use ends. Uses are counted, not flagged: a handler may use the object
    inside a use, and the end of its use must not leave the outer one unguarded.
    Closing under a use would leave it the closed descriptor, or another file's,
    opened since under its number.
    """

    _fd: int = -1  # the fd in _fd_cell, as a plain int for the hot paths
    _fd_cell: _lowlevel.FdCell = None
    path: str = ""
    # A half-built object's close takes the class's lock; _own gives each its own.
    _lock: _threading.RLock = _threading.RLock()

    def _own(self, cell: _lowlevel.FdCell, path: str) -> None:
        """Take over the fd in cell for path (closed on close() or on leak)."""
        self._lock = _threading.RLock()
        self._fd_cell = cell
        self._fd = cell[0]
        self.path = path
        self._track(_warn_leak, cell, f"{type(self).__name__} {path!r}", current_pid)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (or before the object was fully built)."""
        return self._fd < 0

    def fileno(self) -> int:
        """The open file descriptor (for handing to another process)."""
        self._check_open()
        return self._fd

    def _name(self) -> str:
        return f"{type(self).__name__} {self.path!r}"

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"I/O operation on closed {type(self).__name__}")
        self._check_ours()

    def _release(self) -> None:
        """Subclass hook: drop what refers to the file before its fd closes."""

    def _let_go(self) -> None:
        """In a forked child, right after the fork: close the child's copy of the fd (and
        drop what _release drops: a mapping holds the open file too), so that the file's
        lock and last close stay the parent's alone. The object still belongs to the
        parent: every use raises RuntimeError naming it, close() does nothing more."""
        if self._fd < 0:
            return
        self._release()
        self._untrack()
        try:
            _lowlevel.release(self._fd_cell)
        except OSError:
            pass

    def _use_fd(self, use: Callable[[int], _T]) -> _T:
        """use(fd) under the object's lock while it is open (ValueError when closed): a
        close in another thread, or by a signal handler in this one, waits for it to
        return, so that use never has the descriptor closed under it, or another file's
        opened since under its number (send_wav hands it to another process)."""
        self._check_open()  # before the lock: a forked child never waits for it
        with self._lock:
            self._begin_use()  # first: a handler may run at any call from here on
            try:
                self._check_open()  # closed by another thread, or a handler, meanwhile
                return use(self._fd)
            finally:
                self._uses -= 1  # here, before any call: see _end_use
                self._end_use()

    def close(self) -> None:
        """Release the file; calling it again does nothing. Waits for a use of the file
        in progress in another thread; called by a signal handler that interrupted
        this thread's use, it closes as that use ends.

        In a forked child this closes only the child's copy of the descriptor.
        """
        if self._pid != current_pid:
            self._close_now()  # the lock may be held by a thread not copied here
            return
        with self._lock:
            if self._uses:
                self._close_after = True
                return
            self._close_now()

    def _close_now(self) -> None:
        if self._fd < 0:
            return
        self._release()
        self._untrack()
        self._fd = -1
        _lowlevel.release(self._fd_cell)

    def __enter__(self) -> Self:
        self._check_open()
        return self
