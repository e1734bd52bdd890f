"""Where the repository is, and what to do when a tool a test needs is missing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]


def in_ci() -> bool:
    """Whether the suite runs in CI (CI=true), which installs every tool a test needs."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_tool(reason: str, install: str) -> NoReturn:
    """A tool a test needs is not here: skip on a developer's machine, saying how to `install` it; fail in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI installs it: see .ci/run and the dev extras of pyproject.toml)")
    pytest.skip(f"{reason}: {install}")
