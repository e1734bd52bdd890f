"""The docs' generated reference pages (configuration, error codes) say what the code says."""

from __future__ import annotations

from blipq.reference import DOCS, pages


def test_each_generated_docs_page_is_what_the_code_gives() -> None:
    generated = pages()
    assert {path.name for path in generated} == {"configuration.md", "errors.md"}
    for path, text in generated.items():
        assert path.exists(), f"{path.relative_to(DOCS.parent)} is missing: run `make reference`"
        assert path.read_text() == text, f"{path.relative_to(DOCS.parent)} differs from the code: run `make reference`"
