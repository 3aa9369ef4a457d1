"""Named SQL blocks loaded once from a package's `.sql` file.

A file holds blocks that start with a `-- name: <name>` line; Python code asks for
`queries["insert_batch"]` instead of carrying SQL in strings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*([a-z0-9_]+)\s*$", re.MULTILINE)


class QueryNotFound(KeyError):
    """No query of that name in the file."""


class Queries(Mapping[str, str]):
    """The named blocks of one SQL file."""

    def __init__(self, blocks: dict[str, str], origin: str) -> None:
        self._blocks = blocks
        self._origin = origin

    def __getitem__(self, name: str) -> str:
        try:
            return self._blocks[name]
        except KeyError:
            raise QueryNotFound(f"no query {name!r} in {self._origin}") from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)


def parse(text: str, origin: str = "<string>") -> Queries:
    blocks: dict[str, str] = {}
    matches = list(_NAME.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() : end].strip()
        if match.group(1) in blocks:
            raise ValueError(f"query {match.group(1)!r} is defined twice in {origin}")
        blocks[match.group(1)] = body
    return Queries(blocks, origin)


def load(package: str, filename: str = "queries.sql") -> Queries:
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    return parse(text, f"{package}/{filename}")
