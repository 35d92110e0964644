"""What a user meets when installing.

Without a C compiler, pip stops with one clear line; the Makefile's venv and its wheel checks
follow the interpreter that PYTHON names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

NOT_SOURCES = shutil.ignore_patterns(".venv*", "build", "dist", ".git", "*.so", "*.egg-info",
                                     "__pycache__", ".pytest_cache", ".hypothesis",
                                     ".mypy_cache", ".ruff_cache", "bench-report")


def test_pip_install_without_a_c_compiler_says_a_compiler_is_needed(tmp_path: Path) -> None:
    source = tmp_path / "luna_shm"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "PIP_NO_INPUT": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(tmp_path / "wheels"), str(source)],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "luna_shm: building the C layer needs a working C compiler (gcc or clang" in (
        done.stdout + done.stderr)
    assert not (tmp_path / "wheels").exists() or not list((tmp_path / "wheels").iterdir())


# The Makefile's choice of interpreters, asked of make itself (the real Makefile, a venv dir
# of the test's own): make's --eval adds a target that prints a variable of the Makefile.
WHICH_PYTHON = ("import os, sys; "
                "print('%d.%d' % sys.version_info[:2], os.path.realpath(sys.executable))")


def _which_python(command: str) -> str | None:
    """'major.minor real-path' of a CPython command (as the Makefile names it), or None."""
    try:
        done = subprocess.run([command, "-c", WHICH_PYTHON], capture_output=True, text=True,
                              timeout=60)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _another_python() -> str:
    """A CPython 3.11+ other than the one running the tests; skip when there is none."""
    ours = _which_python(sys.executable)
    assert ours is not None
    for version in ("3.11", "3.12", "3.13"):
        found = shutil.which(f"python{version}")
        candidates = [found] if found else []
        candidates += sorted(str(p) for p in
                             Path.home().glob(f".pyenv/versions/{version}*/bin/python"))
        for command in candidates:
            which = _which_python(command)
            if which is not None and which.split()[0] != ours.split()[0]:
                return command
    pytest.skip("no CPython 3.11+ here but the one running the tests")


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None or not (REPO / "Makefile").exists():
        pytest.skip("needs make and the project's Makefile")
    # Not the flags and variables of a `make test` that runs this test.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_dist_check_installs_the_wheel_into_each_interpreter_once_whatever_python_is() -> None:
    # Before, the list was PYTHON then a 3.12 and a 3.13: PYTHON=python3.13 checked 3.13
    # twice (as python3.13 and as pyenv's 3.13.0/bin/python) and 3.11 never.
    other = _another_python()
    for python in (sys.executable, other):
        done = _make(f"PYTHON={python}", "--eval", "print-dist-pythons: ; @echo $(DIST_PYTHONS)",
                     "print-dist-pythons")
        assert done.returncode == 0, done.stderr
        found = [_which_python(p) for p in done.stdout.split()]
        assert found[0] == _which_python(python)
        assert _which_python(sys.executable) in found and _which_python(other) in found
        assert len(found) == len(set(found)), found


def test_make_makes_the_venv_again_only_when_python_names_another_interpreter(
        tmp_path: Path) -> None:
    # Before, a .venv made by one Python was kept whatever PYTHON named. Only the record's
    # rule runs here (the venv itself takes a minute to make): a venv it removed is made
    # again by the rules that depend on the record.
    venv = tmp_path / "venv"
    record = venv / ".made-by"
    other = _another_python()
    kept = venv / "kept"
    for python, made_again in ((sys.executable, True), (sys.executable, False),
                               (other, True), (other, False), (sys.executable, True)):
        done = _make(f"PYTHON={python}", f"VENV={venv}", str(record))
        assert done.returncode == 0, done.stderr
        assert record.read_text().strip() == _which_python(python)
        assert kept.exists() is not made_again, (python, done.stdout)
        kept.touch()
        assert _make(f"PYTHON={python}", f"VENV={venv}", "-q", str(record)).returncode == 0


def test_make_keeps_a_venv_made_before_the_record_by_the_same_interpreter(
        tmp_path: Path) -> None:
    # A .venv from before the Makefile kept a record is asked once which interpreter it runs
    # on; its record is dated as the venv, so the install steps after it do not run again.
    venv = tmp_path / "venv"
    ours = _which_python(sys.executable)
    assert ours is not None
    base = ours.split(maxsplit=1)[1]
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (venv / ".installed-runtime").touch()
    done = _make(f"VENV={venv}", f"PYTHON={sys.executable}", str(venv / ".made-by"))
    assert done.returncode == 0, done.stderr
    assert (venv / ".installed-runtime").exists()
    assert (venv / ".made-by").read_text().strip() == ours
    # The install step is up to date (the sources are older than its stamp, made just now).
    assert _make(f"VENV={venv}", f"PYTHON={sys.executable}", "-q",
                 str(venv / ".installed-runtime")).returncode == 0
