"""The documented target, checked from the benchmark's own statistics; the others recorded.

``test_documented_target`` times AudioPool write + read_wav(mmap=False) of
500 KB on the RAM disk through pytest-benchmark and fails when its median is
not under 0.2 ms. Every other target of the issue is recorded (terminal
summary and the JSON output), never failed on: they are ratios to watch, and a
missed one is explained in the report. This file runs last (see conftest.py)
so that it reuses the medians of the cases timed before it; run alone, it
times the cases it needs itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cases as bench

HARD = [t for t in bench.TARGETS if t.hard]
RECORDED = [t for t in bench.TARGETS if not t.hard]


@pytest.mark.parametrize("target", HARD, ids=lambda t: "pool-write-read-500K-under-0.2ms")
def test_documented_target(run_case: Callable[..., Any], record_target: Any,
                           target: bench.Target) -> None:
    stats = run_case(target.cases[0], target_check=True)
    outcome = bench.evaluate_targets({target.cases[0]: stats.median}, [target])[0]
    record_target(outcome)
    assert stats.median < target.limit, (
        f"{target.text}: median {bench.format_seconds(stats.median)} over "
        f"{stats.rounds} rounds ({outcome.verdict})")


@pytest.mark.parametrize("target", RECORDED, ids=[f"target-{i}" for i in range(len(RECORDED))])
def test_target_is_recorded(workspace: bench.Workspace, medians: dict[str, float],
                            p99s: dict[str, float], record_target: Any,
                            target: bench.Target) -> None:
    for name in target.cases:
        if name not in medians:
            case = bench.case_by_name(name)
            if case.missing():
                continue  # "not measured" in the record
            result = bench.measure(workspace, case)
            medians[name], p99s[name] = result.median, result.p99
    record_target(bench.evaluate_targets(medians, [target], p99s)[0])
