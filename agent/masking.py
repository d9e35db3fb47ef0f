"""Masks the team's secrets in a job's log lines before they leave the agent (so they are never
stored or shown): each value, its base64 form, and each line of a multi-line value become `***`.
Values shorter than MIN_LENGTH are not masked (`dstack secrets add` warns about them)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

MIN_LENGTH = 4
MASK = "***"


class Masker:
    def __init__(self, values: Iterable[str]) -> None:
        patterns: set[str] = set()
        for value in values:
            b64 = base64.b64encode(value.encode()).decode()
            for p in (value, b64, b64.rstrip("="), *value.splitlines()):
                if len(p) >= MIN_LENGTH:
                    patterns.add(p)
        # Longest first, so a value is masked whole rather than only the line of it that matches first.
        ordered = sorted(patterns, key=len, reverse=True)
        self._re = re.compile("|".join(re.escape(p) for p in ordered)) if ordered else None
        # A value holding a newline could match across two lines of a block: such blocks are masked line by line.
        self._across_lines = any("\n" in p for p in ordered)

    def mask(self, text: str) -> str:
        return self._re.sub(MASK, text) if self._re is not None else text

    def mask_lines(self, text: str) -> str:
        """Lines joined by "\n", each masked as `mask` masks it alone (the mask holds no newline)."""
        if self._re is None:
            return text
        if self._across_lines:
            return "\n".join(self._re.sub(MASK, line) for line in text.split("\n"))
        return self._re.sub(MASK, text)
