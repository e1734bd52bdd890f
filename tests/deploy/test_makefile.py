"""The Makefile's logic, read with `make -n` (it prints what it would run, and runs nothing) on a venv of the test's.

A venv is stood for by its stamp files: `make` decides from them alone what to install.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.environment import ROOT

TORCH_VERSION = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]  # type: ignore[index]


def dry_run(venv: Path, *variables: str) -> list[str]:
    """The commands `make up` would run with these variables (NAME=value), one per line."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH", "MODELS", "MAKEFLAGS")}
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", str(ROOT), "up", f"VENV={venv}", *variables],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture
def cpu_venv(tmp_path: Path) -> Path:
    """A venv that `make up` made with the default TORCH=cpu: its torch stamp, and the rest installed since."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / f".torch-cpu-{TORCH_VERSION}").touch()
    (venv / ".installed").touch()  # newer than pyproject.toml
    return venv


def test_an_installed_venv_with_the_same_torch_installs_nothing(cpu_venv: Path) -> None:
    commands = dry_run(cpu_venv, "TORCH=cpu")

    assert commands == [f"{cpu_venv}/bin/blipq up "], commands


def test_a_change_of_torch_installs_the_other_build_first(cpu_venv: Path) -> None:
    commands = "\n".join(dry_run(cpu_venv, "TORCH=cuda"))

    assert f"{cpu_venv}/bin/pip uninstall --yes torch" in commands, commands
    assert f'{cpu_venv}/bin/pip install "torch=={TORCH_VERSION}";' in commands
    assert f"touch {cpu_venv}/.torch-cuda-{TORCH_VERSION}" in commands
    assert f"rm -f {cpu_venv}/.torch-*" in commands, "the CPU stamp goes: going back to cpu installs it again"
    assert "pip install -e" not in commands, "the rest is not installed again"
    assert commands.endswith(f"{cpu_venv}/bin/blipq up "), "torch first, then the service"


def test_a_fresh_venv_gets_torch_then_the_rest(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    commands = dry_run(venv)

    torch_at = next(n for n, line in enumerate(commands) if f"touch {venv}/.torch-cpu-{TORCH_VERSION}" in line)
    rest_at = next(n for n, line in enumerate(commands) if 'pip install -e ".[dev]"' in line)
    assert torch_at < rest_at < len(commands) - 1
    assert f'"torch=={TORCH_VERSION}+cpu"' in "\n".join(commands)


def test_models_real_swaps_both_models_and_models_demo_neither(cpu_venv: Path) -> None:
    real = dry_run(cpu_venv, "MODELS=real")[-1]
    demo = dry_run(cpu_venv)[-1]

    assert 'BLIPQ_MODEL="${BLIPQ_MODEL:-Salesforce/blip-vqa-base}"' in real, real
    assert 'BLIPQ_CAPTION_MODEL="${BLIPQ_CAPTION_MODEL:-Salesforce/blip-image-captioning-base}"' in real, real
    assert "BLIPQ_" not in demo, demo
    bad = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "up", f"VENV={cpu_venv}", "MODELS=huge"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0 and "MODELS is demo" in bad.stderr, bad.stderr
