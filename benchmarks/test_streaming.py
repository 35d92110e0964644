"""Streaming: one 20 ms chunk (960 bytes) appended per call, WavWriter against SoundFile.write."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cases as bench


@pytest.mark.parametrize("name", [c.name for c in bench.cases_of_kind("stream")])
def test_stream(run_case: Callable[..., Any], name: str) -> None:
    run_case(name)
