"""The shared life cycle of objects that own an open file: close, with, leaks."""

from __future__ import annotations

import warnings as _warnings
import weakref as _weakref
from types import TracebackType
from typing import Self

from luna_shm import _lowlevel


def _warn_leak(fd: int, what: str) -> None:
    _warnings.warn(f"unclosed {what}", ResourceWarning, stacklevel=2)
    try:
        _lowlevel.close(fd)
    except OSError:
        pass


class FileResource:
    """Base for objects that hold an fd (and its flock) until :meth:`close`.

    Class-level defaults let a half-built object be closed or collected safely;
    a leaked object warns ``ResourceWarning`` and its fd is closed.
    """

    _fd: int = -1
    _finalizer: _weakref.finalize | None = None  # type: ignore[type-arg]
    path: str = ""

    def _own(self, fd: int, path: str) -> None:
        """Take ownership of fd for path (closed on close() or on leak)."""
        self._fd = fd
        self.path = path
        self._finalizer = _weakref.finalize(self, _warn_leak, fd,
                                            f"{type(self).__name__} {path!r}")

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (or before the object was fully built)."""
        return self._fd < 0

    def fileno(self) -> int:
        """The open file descriptor (for handing to another process)."""
        self._check_open()
        return self._fd

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"I/O operation on closed {type(self).__name__}")

    def _release(self) -> None:
        """Subclass hook: drop what refers to the file before its fd closes."""

    def close(self) -> None:
        """Release the file; calling it again does nothing."""
        if self._fd < 0:
            return
        self._release()
        if self._finalizer is not None:
            self._finalizer.detach()
        fd, self._fd = self._fd, -1
        _lowlevel.close(fd)

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
