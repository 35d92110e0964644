"""Build wiring only: the C layer is compiled by cffi from csrc/build.py.

The extension uses only CPython's limited API (cffi builds it so), so the wheel
is tagged abi3: one wheel serves CPython 3.11 and every later version.
"""

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError


class BuildExtNeedingCompiler(build_ext):
    """build_ext whose failure to find or run a C compiler says so in one line."""

    def run(self) -> None:
        try:
            super().run()
        except (CCompilerError, CompileError, ExecError, PlatformError) as exc:
            raise SystemExit(
                "luna_shm: building the C layer needs a working C compiler (gcc or clang; "
                f"on Debian/Ubuntu: apt-get install gcc python3-dev): {exc}"
            ) from None


setup(
    cffi_modules=["csrc/build.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtNeedingCompiler},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
