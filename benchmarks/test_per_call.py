"""Fixed cost per call: 16-sample WAVs and one 20 ms chunk, each beside its C floor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cases as bench


@pytest.mark.parametrize("name", [c.name for c in bench.cases_of_kind("per-call")])
def test_per_call(run_case: Callable[..., Any], name: str) -> None:
    run_case(name)
