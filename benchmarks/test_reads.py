"""Reads of 500 KB (int16 and float32): mmap, mmap + touching every sample, copy, peers, floor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cases as bench


@pytest.mark.parametrize("name", [c.name for c in bench.cases_of_kind("read")])
def test_read(run_case: Callable[..., Any], name: str) -> None:
    run_case(name)
