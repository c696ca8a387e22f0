"""Incremental reading of a large JSON document: its containers are walked and their elements
decoded one at a time (``json.JSONDecoder.raw_decode`` on a sliding text buffer), so only the current
element and one chunk of text are ever in memory. Used by :mod:`cellseg.data.coco` for LIVECell's
annotation files (hundreds of megabytes).

    s = JsonStream(open(path, encoding="utf-8"), path)
    s.take("{"); key = s.value(); s.take(":"); for item in s.elements(): ...
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from cellseg.errors import CellsegError

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
#: characters read per refill of the sliding buffer.
CHUNK = 1 << 22


class JsonStream:
    """Incremental reader of one JSON text: containers are walked, their elements decoded one by one.

    Only the current element (plus one chunk) is ever held as text or as Python objects.
    """

    def __init__(self, f: TextIO, path: Path) -> None:
        self.f, self.path = f, path
        self.buf, self.pos, self.consumed = "", 0, 0

    def _more(self, size: int = 0) -> bool:
        data = self.f.read(size or CHUNK)
        if not data:
            return False
        self.consumed += self.pos
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def fail(self, what: str, pos: int | None = None) -> None:
        at = self.consumed + (self.pos if pos is None else pos)
        raise CellsegError(f"{self.path}: not valid JSON at character {at} ({what})")

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the text)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def take(self, expected: str) -> str:
        """Consume the next character, which must be one of ``expected``."""
        c = self.peek()
        if not c or c not in expected:
            self.fail(f"expected one of {expected!r}, found {c or 'the end'!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        """Decode the next JSON value."""
        self.peek()
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self._more(max(CHUNK, len(self.buf) - self.pos)):  # incomplete: read as much again, retry
                    continue
                self.fail(e.msg, e.pos)
            if end == len(self.buf) and self._more():  # a number may go on in the next chunk
                continue
            self.pos = end
            return obj

    def elements(self) -> Iterator[Any]:
        """The items of a list, or the values of an object, at the current position."""
        close = "]" if self.take("[{") == "[" else "}"
        if self.peek() == close:
            self.pos += 1
            return
        while True:
            if close == "}":
                if not isinstance(self.value(), str):
                    self.fail("expected a string key")
                self.take(":")
            yield self.value()
            if self.take("," + close) == close:
                return
