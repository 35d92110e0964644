"""The C floors of the benchmarks: bare system calls, compiled on first use, never shipped.

``python benchmarks/floors.py`` builds the cffi module ``_luna_floors`` next to this
file (``make bench`` does it first); importing this module builds it when it is
missing. Each wrapper raises ``OSError(errno, strerror, path)`` on failure.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

CDEF = """
int floor_write(const char *path, const void *header, uint64_t header_len,
                const void *data, uint64_t data_len);
int floor_read(const char *path, uint64_t offset, void *dst, uint64_t len);
int floor_touch_excl(const char *path, unsigned int mode);
int floor_map(const char *path);
int floor_append(int fd, uint64_t offset, const void *data, uint64_t len);
void floor_copy(void *dst, const void *src, uint64_t len);
"""


def build() -> None:
    """Compile floors.c into the cffi module _luna_floors, in this directory."""
    from cffi import FFI

    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source("_luna_floors", "#include <stdint.h>\n" + CDEF,
                       sources=[str(HERE / "floors.c")],
                       extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"])
    builder.compile(tmpdir=str(HERE / "build"), target=str(HERE / "_luna_floors.*"))


def _module() -> ModuleType:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    try:
        return importlib.import_module("_luna_floors")
    except ImportError:
        build()
        return importlib.import_module("_luna_floors")


_floors = _module()
_ffi: Any = _floors.ffi
_lib: Any = _floors.lib


def _check(rc: int, path: str) -> None:
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc), path)


def floor_write(path: str, header: bytes, data: np.ndarray) -> None:
    """open(O_CREAT|O_TRUNC) + one writev of header and data + close."""
    with _ffi.from_buffer(data) as buf:
        _check(_lib.floor_write(os.fsencode(path), header, len(header), buf, len(buf)), path)


def floor_read(path: str, offset: int, dest: np.ndarray) -> None:
    """open + one preadv of dest.nbytes at offset into dest + close."""
    with _ffi.from_buffer(dest, require_writable=True) as buf:
        _check(_lib.floor_read(os.fsencode(path), offset, buf, len(buf)), path)


def touch_excl(path: str, mode: int = 0o600) -> None:
    """open(O_CREAT|O_EXCL|O_NOFOLLOW) + close: the least a safely created file costs."""
    _check(_lib.floor_touch_excl(os.fsencode(path), mode), path)


def map_file(path: str) -> None:
    """open + fstat + mmap of the whole file + close + munmap: the least a view costs."""
    _check(_lib.floor_map(os.fsencode(path)), path)


def copy(dest: np.ndarray, data: np.ndarray) -> None:
    """C memcpy of data's bytes into dest's memory (both C-contiguous, dest large enough)."""
    if dest.nbytes < data.nbytes:
        raise ValueError(f"dest holds {dest.nbytes} bytes, data has {data.nbytes}")
    with _ffi.from_buffer(dest, require_writable=True) as out, _ffi.from_buffer(data) as src:
        _lib.floor_copy(out, src, data.nbytes)


def append(fd: int, offset: int, data: np.ndarray) -> None:
    """One pwritev of data at offset: the least a streamed chunk costs (a header kept in
    a mapping is updated by a store, no system call)."""
    with _ffi.from_buffer(data) as buf:
        _check(_lib.floor_append(fd, offset, buf, len(buf)), str(fd))


if __name__ == "__main__":
    build()  # again: floors.c may have changed since the module was built
    print(f"built {_floors.__file__}")
