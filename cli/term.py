"""The CLI's own terminal output: styled lines and column tables, without importing rich on the common path.

rich takes ~20 ms to import, a tenth of `dstack ps` and as much as the command's own work. What the CLI prints
itself is a few styled lines and small tables, so those are written here, byte for byte as rich writes them when
they fit (tests/unit/test_term.py compares the two); rich is imported only for what it does and this does not:
a table wider than the terminal (folded or cut to fit), cells that are not plain printable ASCII (wide
characters), the spinner and the progress bars.

Whether there is a terminal, colours and the width follow rich's rules (TTY_COMPATIBLE, FORCE_COLOR, NO_COLOR,
TERM=dumb, COLUMNS, the size of whichever of stdin/stdout/stderr is a terminal), so both paths agree.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

# The styles the CLI uses, as rich writes them (SGR codes).
ATTRIBUTES = {"bold": "1", "dim": "2"}
COLORS = {"red": "31", "green": "32", "yellow": "33", "cyan": "36", "white": "37"}
RESET = "\x1b[0m"
DEFAULT_WIDTH = 80


class Term:
    """Output to stdout or stderr (looked up at each write, as rich does, so a redirected sys.stderr is honoured)."""

    def __init__(self, stderr: bool = False, environ: Mapping[str, str] | None = None, width: int | None = None):
        self.stderr = stderr
        self.environ = os.environ if environ is None else environ
        self._width = width

    @property
    def file(self) -> TextIO:
        return sys.stderr if self.stderr else sys.stdout

    @property
    def is_terminal(self) -> bool:
        tty_compatible = self.environ.get("TTY_COMPATIBLE", "")
        if tty_compatible in ("0", "1"):
            return tty_compatible == "1"
        force_color = self.environ.get("FORCE_COLOR")
        if force_color is not None:
            return force_color != ""
        try:
            return self.file.isatty()
        except (AttributeError, ValueError):  # no isatty, or closed
            return False

    @property
    def is_dumb(self) -> bool:
        return self.environ.get("TERM", "").lower() in ("dumb", "unknown")

    @property
    def styled(self) -> bool:
        """Whether escape codes are written at all."""
        return self.is_terminal and not self.is_dumb

    @property
    def width(self) -> int:
        if self._width is not None:
            return self._width
        if self.is_terminal and self.is_dumb:
            return DEFAULT_WIDTH
        width = 0
        for fd in (0, 1, 2):
            try:
                width = os.get_terminal_size(fd).columns
                break
            except (AttributeError, ValueError, OSError):
                continue
        columns = self.environ.get("COLUMNS", "")
        if columns.isdigit():
            width = int(columns)
        return width or DEFAULT_WIDTH

    def style(self, text: str, style: str = "") -> str:
        """`text` in `style` ("bold", "green", "bold red", ...); plain when not on a terminal."""
        if not style or not text or not self.styled:
            return text
        no_color = self.environ.get("NO_COLOR", "") != ""
        codes = []
        for word in style.split():
            if word in ATTRIBUTES:
                codes.append(ATTRIBUTES[word])
            elif word in COLORS:
                if not no_color:
                    codes.append(COLORS[word])
            else:
                raise ValueError(f"unknown style {word!r}")
        return f"\x1b[{';'.join(codes)}m{text}{RESET}" if codes else text

    def print(self, *parts: str | tuple[str, str]) -> None:
        """One line from parts: a str is written as it is (never read as markup), (text, style) styled."""
        line = "".join(p if isinstance(p, str) else self.style(*p) for p in parts)
        f = self.file
        f.write(line + "\n")
        f.flush()

    def table(
        self, headers: Sequence[str], rows: Sequence[Sequence[str | tuple[str, str]]], overflow: str = "ellipsis"
    ) -> None:
        """A table as rich's `Table(box=None, header_style="bold")`: bold headers, columns padded by one space.

        A cell is a str or (text, style); no text is read as markup. A table wider than the terminal is folded
        (overflow="fold") or cut with an ellipsis by rich."""
        cells = [[c if isinstance(c, tuple) else (c, "") for c in row] for row in rows]
        text = self.render_table(headers, cells, fold=overflow == "fold")
        if text is None:
            self._rich_table(headers, cells, overflow)
            return
        f = self.file
        f.write(text)
        f.flush()

    def render_table(
        self, headers: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]], fold: bool = False
    ) -> str | None:
        """The table as rich writes it, or None where rich is to write it: a cell that is not plain printable
        ASCII (rich measures and wraps those), or a table wider than the terminal unless `fold` (rich's
        overflow="fold", which `dstack ps` and `dstack agents` use: a deep queue's table is wider than 80
        columns, and rich costs such a `dstack ps` ~100 ms of CPU, as much as all the rest)."""
        widths = [len(h) for h in headers]
        for row in rows:
            if len(row) != len(headers):
                raise ValueError(f"a row of {len(row)} cells in a table of {len(headers)} columns")
            for i, (text, _) in enumerate(row):
                if not (text.isascii() and text.isprintable()):
                    return None
                widths[i] = max(widths[i], len(text))
        if not all(h.isascii() and h.isprintable() for h in headers):
            return None
        if sum(widths) + 2 * len(widths) > self.width:
            if not fold:
                return None
            folded = _folded_widths([w + 2 for w in widths], self.width)
            if folded is None:
                return None
            return self._render_folded(headers, rows, folded)
        pad = self.style(" ", "bold")
        lines = ["".join(pad + self.style(h.ljust(w), "bold") + pad for h, w in zip(headers, widths, strict=True))]
        for row in rows:
            lines.append(
                "".join(
                    " " + self.style(text.ljust(w), style) + " " for (text, style), w in zip(row, widths, strict=True)
                )
            )
        return "\n".join(lines) + "\n"

    def _render_folded(
        self, headers: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]], widths: list[int]
    ) -> str:
        """A table in columns of `widths` (padding included), each cell wrapped at its words and long words
        folded, as rich's Table(box=None) renders it: the header's lines at the bottom of its row and bold,
        padding included; a cell's lines at the top, its padding and the blank lines under it unstyled."""
        out: list[str] = []
        header_cells = [_wrap(h, w - 2) for h, w in zip(headers, widths, strict=True)]
        height = max(len(c) for c in header_cells)
        pad = self.style(" ", "bold")
        for n in range(height):
            line = []
            for cell, w in zip(header_cells, widths, strict=True):
                k = n - (height - len(cell))
                line.append(pad + self.style(cell[k], "bold") + pad if k >= 0 else self.style(" " * w, "bold"))
            out.append("".join(line))
        for row in rows:
            cells = [(_wrap(text, w - 2), style) for (text, style), w in zip(row, widths, strict=True)]
            height = max(len(c) for c, _ in cells)
            for n in range(height):
                out.append(
                    "".join(
                        " " + self.style(c[n], style) + " " if n < len(c) else " " * w
                        for (c, style), w in zip(cells, widths, strict=True)
                    )
                )
        return "\n".join(out) + "\n"

    def _rich_table(self, headers: Sequence[str], rows: list[list[tuple[str, str]]], overflow: str) -> None:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, header_style="bold")
        for h in headers:
            table.add_column(Text(h), overflow=overflow)  # type: ignore[arg-type]
        for row in rows:
            table.add_row(*(Text(text, style=style) for text, style in row))
        Console(file=self.file, highlight=False, width=self._width, _environ=self.environ).print(table)


# rich's table layout and word wrap (rich/table.py, rich/_wrap.py, rich/_ratio.py, rich/text.py), for plain
# printable ASCII, where a character is a cell: the same arithmetic, so the same bytes (tests/unit/test_term.py).

_WORD = re.compile(r"\s*\S+\s*")
_TRAILING_SPACE = re.compile(r"\s+$")


def _ratio_reduce(total: int, ratios: list[int], maximums: list[int], values: list[int]) -> list[int]:
    ratios = [ratio if maximum else 0 for ratio, maximum in zip(ratios, maximums, strict=True)]
    total_ratio = sum(ratios)
    if not total_ratio:
        return values[:]
    remaining = total
    result = []
    for ratio, maximum, value in zip(ratios, maximums, values, strict=True):
        if ratio and total_ratio > 0:
            distributed = min(maximum, round(ratio * remaining / total_ratio))
            result.append(value - distributed)
            remaining -= distributed
            total_ratio -= ratio
        else:
            result.append(value)
    return result


def _folded_widths(widths: list[int], max_width: int) -> list[int] | None:
    """Column widths (padding included) narrowed to `max_width` as rich narrows a table's: the widest columns
    first, then all evenly. None where a column would have no room for text (rich's corner cases)."""
    if max_width < 1:
        return None
    widths = [min(w, max_width) for w in widths]
    excess = sum(widths) - max_width
    while sum(widths) and excess > 0:  # Table._collapse_widths: every column wraps
        widest = max(widths)
        second = max(w if w != widest else 0 for w in widths)
        if not widest - second:
            break
        ratios = [1 if w == widest else 0 for w in widths]
        widths = _ratio_reduce(excess, ratios, [min(excess, widest - second)] * len(widths), widths)
        excess = sum(widths) - max_width
    if excess > 0:  # the last resort: every column loses the same
        widths = _ratio_reduce(excess, [1] * len(widths), widths, widths)
    return widths if min(widths) >= 3 else None


def _wrap(text: str, width: int) -> list[str]:
    """`text`'s lines at `width`, each padded to it: rich's Text.wrap with overflow="fold", justify="left"."""
    breaks: list[int] = []  # rich/_wrap.py divide_line
    offset = 0
    match = _WORD.match(text, 0)
    while match is not None:
        start, end = match.span()
        word = match.group(0)
        length = len(word.rstrip())
        if width - offset >= length:
            offset += len(word)
        elif length > width:
            chunks = [word[i : i + width] for i in range(0, len(word), width)]
            for i, chunk in enumerate(chunks):
                if start:
                    breaks.append(start)
                if i == len(chunks) - 1:
                    offset = len(chunk)
                else:
                    start += len(chunk)
        elif offset and start:
            breaks.append(start)
            offset = len(word)
        match = _WORD.match(text, end)
    lines = [text[a:b] for a, b in zip([0, *breaks], [*breaks, len(text)], strict=True)]
    out = []
    for line in lines:
        if len(line) > width and (space := _TRAILING_SPACE.search(line)) is not None:  # Text.rstrip_end
            line = line[: len(line) - min(len(space.group(0)), len(line) - width)]
        out.append(line[:width].ljust(width))
    return out
