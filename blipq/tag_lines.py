"""The OUT file of `blipq tag`: one JSON line per pair, what a re-run keeps of it, and the report at the end.

A pair is an image and a question (`{"image", "question", "status", "answer", "error"}`) or an image and a caption's
prompt (`{"image", "prompt", "status", "caption", "error"}`). A re-run keeps the lines of the settled pairs and does
not ask them again: those that succeeded, and those that failed for a permanent reason, which asking again would not
change (an invalid image, one over the limits, a URL the workers must not fetch: contract.errors.is_transient
says which). Every other pair (failed for a transient reason, canceled, expired, never answered) is asked again and
its line replaced.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.errors import is_transient

TEXT_KEYS = ("question", "prompt")  # what a line's text is: a question, or a caption's prompt
ANSWER_KEYS = {"question": "answer", "prompt": "caption"}  # and what answers it


@dataclass
class Tally:
    """What the run's pairs came to: succeeded, or the count of each error code; lines kept, and written this run."""

    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    kept: int = 0
    written: int = 0

    def add(self, record: dict[str, Any]) -> None:
        """Count one pair's line."""
        if record["status"] == "succeeded":
            self.succeeded += 1
        else:
            self.failed[error_code(record)] += 1


def pair_key(image: str, text_key: str, text: str) -> int:
    """A small hash that stands for one pair: memory holds one per pair settled, however many images."""
    return hash((image, text_key, text))


def error_code(record: dict[str, Any]) -> str:
    """The error code of a line that did not succeed (its status when it has none)."""
    error = record.get("error")
    given = error.get("code") if isinstance(error, dict) else None
    return str(given or record.get("status") or "unknown")


def keep_settled(out: Path) -> tuple[set[int], Tally]:
    """Rewrite an earlier run's OUT with its settled lines only, a line at a time; the keys of their pairs, and what
    they count for the report."""
    done: set[int] = set()
    tally = Tally()
    kept = out.with_name(out.name + ".kept")
    with kept.open("w", encoding="utf-8") as stream:
        if out.exists():
            with out.open(encoding="utf-8") as lines:
                for line in lines:
                    record = read_settled_line(line)
                    if record is None:
                        continue
                    key = next(key for key in TEXT_KEYS if key in record)
                    pair = pair_key(record["image"], key, record[key])
                    if pair not in done:
                        done.add(pair)
                        tally.add(record)
                        stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(kept, out)
    tally.kept = len(done)
    return done, tally


def read_settled_line(line: str) -> dict[str, Any] | None:
    """The record of a settled line of OUT (succeeded, or failed for a permanent reason), or None (a pair to ask
    again, a line cut short)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a line cut short by an interrupted run: its pair is asked again
    if not isinstance(record, dict) or not any(isinstance(record.get(key), str) for key in TEXT_KEYS):
        return None
    if not isinstance(record.get("image"), str):
        return None
    if record.get("status") == "succeeded":
        return record
    if record.get("status") == "failed" and not is_transient(error_code(record)):
        return record
    return None


def refused_records(image: str, text_key: str, texts: Iterable[str], error: dict[str, str]) -> list[dict[str, Any]]:
    """The `failed` lines of an image refused as a whole (before any model saw it), one per text asked of it."""
    return [
        {"image": image, text_key: text, "status": "failed", ANSWER_KEYS[text_key]: None, "error": error}
        for text in texts
    ]


def write_lines(out: Path, records: Iterable[dict[str, Any]], mode: str) -> None:
    """Write (or append) records to OUT as JSON lines, flushed: an interrupted run keeps what it wrote."""
    with out.open(mode, encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")


def report(tally: Tally) -> int:
    """0 when every pair succeeded; else 1, with the count of each error code on stderr."""
    total = tally.succeeded + sum(tally.failed.values())
    if not tally.failed:
        print(f"blipq tag: {total} answers, all succeeded", file=sys.stderr)
        return 0
    summary = ", ".join(f"{code}: {count}" for code, count in tally.failed.most_common())
    kept = f"; {tally.kept} lines kept from an earlier run, not asked again" if tally.kept else ""
    print(f"blipq tag: {sum(tally.failed.values())} of {total} answers failed ({summary}){kept}", file=sys.stderr)
    return 1
