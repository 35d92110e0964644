"""p50/p99 of the 500 KB write while another process writes and fsyncs a large file to disk.

The disk load is bounded (256 MB on disk, two minutes of life) and stops with
its case; compare with the same methods in the quiet "write int16-500K" groups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cases as bench


@pytest.mark.parametrize("name", [c.name for c in bench.cases_of_kind("tail-write")])
def test_tail_latency(run_case: Callable[..., Any], name: str) -> None:
    run_case(name)
