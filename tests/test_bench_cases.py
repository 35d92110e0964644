"""`python benchmarks/cases.py --quick`, run as a real process in private dirs (no timing
assertions). The benchmarks live in the checkout, not in the package."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import LIBRARY_PATH, REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import cases as benchmark  # benchmarks/ is not a package: found through sys.path


def _soundfile_works() -> bool:
    try:
        import soundfile  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def run_bench(dirs, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python benchmarks/cases.py ARGS` with LUNA_SHM_DIR/TMPDIR at the private dirs."""
    env = {k: v for k, v in os.environ.items() if k != "LUNA_SHM_DISABLE"}
    env.update(LUNA_SHM_DIR=dirs.ram, TMPDIR=dirs.fallback, PYTHONPATH=LIBRARY_PATH)
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "cases.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def quick_run(private_dirs):
    """One `bench --quick` run, and the private dirs it ran in."""
    return run_bench(private_dirs, "--quick"), private_dirs


def test_bench_quick_exits_zero_and_prints_one_row_per_quick_case(quick_run) -> None:
    done, _ = quick_run
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = [line.strip() for line in done.stdout.splitlines() if line.startswith("  ")]
    expected = [case for case in benchmark.quick_cases() if not case.missing()]
    for case in expected:
        assert any(row.startswith(case.method) for row in rows), (case.method, done.stdout)
    for group in {case.group for case in expected}:
        assert group in done.stdout.splitlines()


def test_bench_quick_table_has_the_library_the_peer_and_the_floor(quick_run) -> None:
    done, _ = quick_run
    assert done.returncode == 0, done.stderr
    for method in ("write_wav", "AudioPool.write_wav", "C floor: open+writev+close",
                   "read_wav (copy)", "read_wav (mmap)", "C floor: open+preadv+close",
                   "AudioPool.write_wav + read_wav(copy)", "WavWriter.write",
                   "get_temp_audio_path(create=True)"):
        assert f"  {method} " in done.stdout, method
    if _soundfile_works():
        assert "  soundfile.write " in done.stdout
        assert "  soundfile.read " in done.stdout
    assert "median" in done.stdout and "p99" in done.stdout


def test_bench_quick_checks_the_documented_target(quick_run) -> None:
    done, _ = quick_run
    assert done.returncode == 0, done.stderr
    assert "targets:" in done.stdout
    assert "under 0.2 ms (the documented promise" in done.stdout


def test_bench_quick_shows_progress_on_stderr_only(quick_run) -> None:
    done, _ = quick_run
    assert done.returncode == 0, done.stderr
    assert "bench [" in done.stderr
    assert "bench [" not in done.stdout


def test_bench_leaves_nothing_behind_in_the_dirs_it_was_given(quick_run) -> None:
    done, dirs = quick_run
    assert done.returncode == 0, done.stderr
    assert os.listdir(dirs.ram) == []
    assert os.listdir(dirs.fallback) == []


def test_bench_rejects_unknown_options_without_a_traceback(private_dirs) -> None:
    done = run_bench(private_dirs, "--fast")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "unrecognized arguments: --fast" in done.stderr


def test_the_command_line_has_no_bench_command_any_more() -> None:
    from luna_shm import cli

    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["bench"])
    assert exc.value.code == 2
