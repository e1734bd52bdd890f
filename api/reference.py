"""The docs' reference pages generated from the code: never written twice, never out of date.

- docs/configuration.md, from the settings models (`api.settings.configuration_markdown`);
- docs/errors.md, from the error registry (`worker.contract.errors.errors_markdown`).

`python -m api.reference` (or `make reference`) writes them; `python -m api.reference --check` exits 1 naming each
page that differs from what the code gives, and tests/test_reference.py fails the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def pages() -> dict[Path, str]:
    """Each generated page and the text the code gives it."""
    from api.settings import configuration_markdown
    from worker.contract.errors import errors_markdown

    return {DOCS / "configuration.md": configuration_markdown(), DOCS / "errors.md": errors_markdown()}


def stale_pages() -> list[Path]:
    """The generated pages whose file is missing or differs from the code."""
    return [path for path, text in pages().items() if not path.exists() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.reference", description=__doc__.splitlines()[0])
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
