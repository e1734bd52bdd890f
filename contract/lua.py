"""The Redis Lua scripts: read from their `.lua` files, registered with a client, and the keys they are given.

Each script is a file of its own under contract/scripts/, or under worker/scripts/ for those that only the worker runs
(the webhook outbox's claims, the answer cache): a script lives in the package whose code runs it. A file opens with
a header comment that says what the script does, the KEYS and ARGV it takes, in order, and what it returns; its first
lines bind them to named locals. The Python side passes its keys as a frozen dataclass (`ScriptKeys`) whose fields
are in the header's order.

Redis runs a script as one chunk of Lua (EVAL, EVALSHA), with no `require`: a step that several scripts share must be
in the text of each. So the shared steps are prelude files, contract/scripts/lib/*.lua (a level's never-started set,
a job's end, a batch's items), and a script names those it needs on a `-- prelude:` line of its header: the loader
prepends them, in that order, when it first reads the script. The text is read once per process; redis-py's
`register_script` sends its SHA (EVALSHA), and the text only when Redis does not hold it yet.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from importlib import resources
from typing import Any, ClassVar

import redis
from redis.commands.core import Script

SCRIPTS_FOLDER = "scripts"
PRELUDE_LINE = re.compile(r"^-- prelude: (.+)$", re.MULTILINE)


@functools.cache
def source(name: str, package: str = "contract") -> str:
    """The text of script `name` (its file `<package>/scripts/<name>.lua`), its preludes first."""
    folder = resources.files(package) / SCRIPTS_FOLDER
    text = (folder / f"{name}.lua").read_text(encoding="utf-8")
    found = PRELUDE_LINE.search(text)
    preludes = found.group(1).split() if found else []
    return "".join((folder / prelude).read_text(encoding="utf-8") + "\n" for prelude in preludes) + text


def register(client: redis.Redis, name: str, package: str = "contract") -> Script:
    """Script `name` registered with `client`: call it with `keys=` and `args=`."""
    return client.register_script(source(name, package))


class ScriptFields:
    """A script's KEYS or ARGV as a frozen dataclass: its fields in the order the script's header documents them; a
    field that is a tuple stands for as many entries."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def as_list(self) -> list[Any]:
        """The entries, in order, as a script takes them."""
        entries: list[Any] = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            entries += list(value) if isinstance(value, tuple) else [value]
        return entries


class ScriptKeys(ScriptFields):
    """A script's KEYS (see ScriptFields)."""

    def keys(self) -> list[str]:
        """The KEYS list, in the order of the script's header."""
        return [str(key) for key in self.as_list()]


class ScriptArgs(ScriptFields):
    """A script's ARGV (see ScriptFields)."""

    def args(self) -> list[Any]:
        """The ARGV list, in the order of the script's header."""
        return self.as_list()
