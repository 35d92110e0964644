"""Build a C test program of tests/c/ with all of csrc/*.c under AddressSanitizer and
UndefinedBehaviorSanitizer (alignment checks included), for the tests that run them.

The build skips its test, with the compiler's own words, only when a capability
probe fails: no gcc or clang, or a tiny program built with the sanitizers does not
build or run here. A build failure of our own C is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import REPO

SANITIZE = ["-fsanitize=address,undefined", "-fsanitize=alignment", "-fno-sanitize-recover=all"]
STRICT = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g", "-O1", "-fno-omit-frame-pointer"]
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0:strict_string_checks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "UndefinedBehaviorSanitizer",
                   "runtime error:")
# Run without arguments, the probe must exit 0; with one, it reads a float at an odd
# address, which the alignment check must report.
_PROBE = """\
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    (void)argv;
    char *p = malloc(16);
    memset(p, 0, 16);
    float f = *(float *)(void *)(p + (argc - 1));
    free(p);
    return f != 0.0f;
}
"""


def _probe(compiler: str, work: Path, env: dict[str, str]) -> str | None:
    """None when compiler builds and runs a sanitized program that reports a misaligned
    load; otherwise why not (and env loses LeakSanitizer when only that cannot run)."""
    source = work / "probe.c"
    source.write_text(_PROBE)
    binary = work / f"probe_{Path(compiler).name}"
    built = subprocess.run([compiler, *SANITIZE, str(source), "-o", str(binary)],
                           capture_output=True, text=True, env=env)
    if built.returncode != 0:
        return f"{compiler} cannot build with {' '.join(SANITIZE)}: {built.stderr[-400:]}"
    ran = subprocess.run([str(binary)], capture_output=True, text=True, env=env)
    if ran.returncode != 0:  # LeakSanitizer needs ptrace-like access: run without it
        env["ASAN_OPTIONS"] = env["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0")
        ran = subprocess.run([str(binary)], capture_output=True, text=True, env=env)
    if ran.returncode != 0:
        return f"a program built by {compiler} with sanitizers does not run: {ran.stderr[-400:]}"
    ran = subprocess.run([str(binary), "misaligned"], capture_output=True, text=True, env=env)
    if ran.returncode == 0 or "misaligned" not in ran.stderr:
        return f"{compiler}'s -fsanitize=alignment does not report a misaligned load here"
    return None


def build_sanitized(program: str, work: Path, *, with_csrc: bool = True,
                    defines: tuple[str, ...] = ()) -> tuple[Path, dict[str, str]]:
    """tests/c/<program> + csrc/*.c built with the sanitizers into work; (binary, env).

    with_csrc=False builds the program alone (it #includes the C file it tests, to reach
    that file's static state). defines are macros to build with (-D each: the fallbacks
    LUNA_NO_MEMFD and LUNA_NO_O_TMPFILE, say). env holds the sanitizer options and
    TMPDIR=work (the compiler's temp files too).
    """
    env = {**os.environ, **SANITIZER_ENV, "TMPDIR": str(work)}
    reasons = []
    for name in ("gcc", "clang"):
        compiler = shutil.which(name)
        if compiler is None:
            reasons.append(f"{name} is not installed")
            continue
        why_not = _probe(compiler, work, env)
        if why_not is None:
            break
        reasons.append(why_not)
    else:
        pytest.skip("no sanitizer build of the C layer here: " + "; ".join(reasons))
    binary = work / Path(program).stem
    sources = sorted(str(p) for p in (REPO / "csrc").glob("*.c")) if with_csrc else []
    built = subprocess.run(
        [compiler, *STRICT, "-pthread", *SANITIZE, *(f"-D{name}" for name in defines),
         "-I", str(REPO / "csrc"),
         str(REPO / "tests" / "c" / program), *sources, "-o", str(binary)],
        capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stderr
    return binary, env
