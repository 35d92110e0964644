"""cffi build script (API mode): compiles csrc/*.c into luna_shm._native; the cdef is
read from csrc/luna_shm.h, the one declaration of the C API."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))

HEADER = HERE / "luna_shm.h"
BEGIN, END = "@cffi-cdef-begin", "@cffi-cdef-end"

# The capabilities are #if-computed in the header, so cffi asks the compiler for them.
CAPABILITIES = """
#define LUNA_HAS_MEMFD ...
#define LUNA_HAS_O_TMPFILE ...
"""


def read_cdef(header: Path = HEADER) -> str:
    """The cffi cdef: the capabilities, then the header's declarations between its markers
    (from the line after the one holding BEGIN to the line before the one holding END).

    The header is the one declaration of the C API: the compiler checks the C against it,
    cffi the Python binding, and tests/test_c_api.py the type stub src/luna_shm/_native.pyi.
    """
    lines = header.read_text(encoding="utf-8").splitlines()
    begin = next(i for i, line in enumerate(lines) if BEGIN in line)
    # The marker comment itself may span lines: start after the line that closes it.
    while "*/" not in lines[begin]:
        begin += 1
    end = next(i for i in range(begin + 1, len(lines)) if END in lines[i])
    return CAPABILITIES + "\n".join(lines[begin + 1 : end]) + "\n"


ffibuilder = FFI()
ffibuilder.cdef(read_cdef())
ffibuilder.set_source(
    "luna_shm._native",
    '#include "luna_shm.h"',
    sources=SOURCES,
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    # -O3 -fno-trapping-math: the sample conversion loops vectorize (convert.c).
    extra_compile_args=["-std=gnu11", "-O3", "-fno-trapping-math", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
