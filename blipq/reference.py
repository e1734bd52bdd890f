"""The docs' reference pages generated from the code: never written twice, never out of date.

- docs/configuration.md, from the settings models of every process (`configuration_markdown` below);
- docs/errors.md, from the error registry (`contract.errors.errors_markdown`).

`python -m blipq.reference` (or `make reference`) writes them; `python -m blipq.reference --check` exits 1 naming each
page that differs from what the code gives, and tests/unit/test_reference.py fails the same way. A tool of the
docs, beside both processes: it reads every process's settings model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic.fields import FieldInfo

from api.settings import ApiSettings
from blipq.settings import ClientSettings, UpSettings
from contract.errors import errors_markdown
from contract.settings import BlipqSettings, SharedSettings, field_extra, rule_of
from worker.settings import WorkerSettings  # importing it loads no torch

DOCS = Path(__file__).resolve().parent.parent / "docs"


def pages() -> dict[Path, str]:
    """Each generated page and the text the code gives it."""
    return {DOCS / "configuration.md": configuration_markdown(), DOCS / "errors.md": errors_markdown()}


def configuration_tables() -> list[tuple[str, str, type[BlipqSettings], list[str]]]:
    """Each table of the configuration page: its title, its introduction, its model and the fields it lists."""
    shared = list(SharedSettings.model_fields)

    def own(model: type[BlipqSettings]) -> list[str]:
        return [name for name in model.model_fields if name not in shared]

    return [
        ("Shared", "Read by the API and by every worker: give them the same values.", SharedSettings, shared),
        ("API (`blipq api`)", "Read by the API process.", ApiSettings, own(ApiSettings)),
        ("Worker (`blipq worker`)", "Read by each worker process.", WorkerSettings, own(WorkerSettings)),
        (
            "Local service (`blipq up`)",
            "Read by `blipq up`, besides the settings of the API and the workers it starts.",
            UpSettings,
            own(UpSettings),
        ),
        (
            "Client (`blipq ask`, `caption`, `tag`)",
            "Read by the commands that use a running service.",
            ClientSettings,
            own(ClientSettings),
        ),
    ]


def configuration_markdown() -> str:
    """docs/configuration.md: every BLIPQ_* variable of every process, from the settings models."""
    lines = [
        "# Configuration",
        "",
        "Every blipq process reads its settings from `BLIPQ_*` environment variables, once, at start. A variable that",
        "is unset or blank takes its default; lists are comma-separated. A value that breaks its rule stops the",
        "process with one line naming the variable, the value and the rule, such as",
        "`BLIPQ_WORKER_CONCURRENCY='0' must be at least 1`.",
        "",
        "This page is generated from the settings models (`api/settings.py`, `worker/settings.py`,",
        "`blipq/settings.py`, `contract/settings.py`) by `python -m blipq.reference`.",
    ]
    for title, introduction, model, names in configuration_tables():
        lines += ["", f"## {title}", "", introduction, "", "| Variable | Default | Rule | Description |"]
        lines.append("| --- | --- | --- | --- |")
        for name in names:
            if field_extra(model.model_fields[name], "derived"):
                continue
            field = model.model_fields[name]
            cells = [f"`{model.variable(name)}`", shown_default(field), rule_of(field), field.description or ""]
            lines.append("| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def shown_default(field: FieldInfo) -> str:
    """A field's default as the configuration page shows it."""
    noted = field_extra(field, "shown_default")
    if noted:
        return str(noted)
    default = field.default
    if default in ("", (), None):
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return "`" + ",".join(str(item) for item in default) + "`"
    return f"`{default}`"


def stale_pages() -> list[Path]:
    """The generated pages whose file is missing or differs from the code."""
    return [path for path, text in pages().items() if not path.exists() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blipq.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for path in stale:
            print(f"{path.relative_to(DOCS.parent)} differs from the code: run `make reference`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in pages().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
