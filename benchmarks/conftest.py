"""Benchmark fixtures: one private workspace per session, and a case timed by pytest-benchmark.

The cases themselves live in cases.py beside this file (shared with ``python cases.py``).
Every case runs in a fresh directory inside the session's private RAM and disk
dirs; nothing else on the machine is touched. The machine's description, the
load average at the end and the targets go into the ``--benchmark-json`` output
under ``"luna_shm"`` for ``benchmarks/report.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import cases as bench

_WORKSPACE = pytest.StashKey[bench.Workspace]()
_MEDIANS = pytest.StashKey[dict[str, float]]()
_P99S = pytest.StashKey[dict[str, float]]()
_TARGETS = pytest.StashKey[list[bench.TargetResult]]()


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run without pytest-benchmark, and set up the session's stores."""
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError(
            "the benchmarks need pytest-benchmark: install the bench extra "
            "(pip install -e '.[bench]')")
    config.stash[_MEDIANS] = {}
    config.stash[_P99S] = {}
    config.stash[_TARGETS] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run test_target.py last, so that it can use the medians of everything before it."""
    items.sort(key=lambda item: item.path.name == "test_target.py")


@pytest.fixture(scope="session")
def workspace(pytestconfig: pytest.Config) -> Iterator[bench.Workspace]:
    """The session's private RAM and disk dirs (removed at the end)."""
    with bench.Workspace() as ws:
        pytestconfig.stash[_WORKSPACE] = ws
        yield ws


@pytest.fixture(scope="session")
def medians(pytestconfig: pytest.Config) -> dict[str, float]:
    """Case name -> median seconds of every case timed in this session so far."""
    return pytestconfig.stash[_MEDIANS]


@pytest.fixture(scope="session")
def p99s(pytestconfig: pytest.Config) -> dict[str, float]:
    """Case name -> 99th percentile seconds of every case timed in this session so far."""
    return pytestconfig.stash[_P99S]


@pytest.fixture(scope="session")
def record_target(pytestconfig: pytest.Config) -> Callable[[bench.TargetResult], None]:
    """Keep a target's outcome for the terminal summary and the JSON output."""
    return pytestconfig.stash[_TARGETS].append


@pytest.fixture
def run_case(benchmark: Any, workspace: bench.Workspace, medians: dict[str, float],
             p99s: dict[str, float]) -> Callable[..., Any]:
    """Time one case by name through pytest-benchmark; return its stats.

    The case's untimed per-round step (removing the previous call's file)
    runs as pedantic's setup; rounds come from the case's own calibration.
    """

    def run(name: str, **extra: Any) -> Any:
        case = bench.case_by_name(name)
        missing = case.missing()
        if missing:
            pytest.skip(f"{', '.join(missing)} not installed")
        benchmark.group = case.group
        benchmark.extra_info.update(case.info(), **extra)
        with workspace.prepared(case) as prepared:
            benchmark.pedantic(prepared.fn, setup=prepared.before_round,
                               rounds=prepared.rounds, warmup_rounds=0, iterations=1)
        stats = benchmark.stats.stats
        medians.setdefault(case.name, stats.median)
        p99s.setdefault(case.name, bench.percentile(stats.data, 99))
        return stats

    return run


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any,
                                 output_json: dict[str, Any]) -> None:
    """Add the machine, the end-of-run load and the targets to the JSON output."""
    ws = config.stash.get(_WORKSPACE, None)
    output_json["luna_shm"] = {
        "machine": bench.describe_machine(ws),
        "load average at end": bench.loadavg(),
        "targets": [
            {"text": o.target.text, "measured": o.measured, "limit": o.limit,
             "verdict": o.verdict, "value": o.value, "met": o.met, "hard": o.target.hard}
            for o in config.stash.get(_TARGETS, [])
        ],
    }


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                            ) -> None:
    """Print every target with its measured value and verdict."""
    outcomes = config.stash.get(_TARGETS, [])
    if not outcomes:
        return
    terminalreporter.section("luna_shm targets (medians of this run)")
    for line in bench.format_targets(outcomes):
        terminalreporter.write_line(line)
