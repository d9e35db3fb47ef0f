"""cli/term.py writes what rich writes (tables, styled lines), so that not importing rich changes nothing."""

from __future__ import annotations

import io
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dstack.cli.term import Term

STYLES = ["", "bold", "dim", "red", "green", "yellow", "cyan", "white"]
ENVIRONS = {
    "piped": {"TTY_COMPATIBLE": "0"},
    "terminal": {"FORCE_COLOR": "1", "TERM": "xterm-256color"},
    "no-color terminal": {"FORCE_COLOR": "1", "TERM": "xterm", "NO_COLOR": "1"},
    "dumb terminal": {"FORCE_COLOR": "1", "TERM": "dumb"},
}

cell_text = st.text(alphabet=string.ascii_letters + string.digits + " -_:;,.()[]/@#=*'\"", max_size=14)
cell = st.tuples(cell_text, st.sampled_from(STYLES))


def rich_table(headers: list[str], rows: list[list[tuple[str, str]]], environ: dict[str, str], width: int) -> str:
    table = Table(box=None, header_style="bold")
    for h in headers:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*(Text(text, style=style) for text, style in row))
    out = io.StringIO()
    # height too: with only a width, rich takes 80 columns on a dumb terminal
    Console(file=out, width=width, height=25, highlight=False, _environ=environ).print(table)
    return out.getvalue()


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[str], list[list[tuple[str, str]]]]:
    headers = draw(
        st.lists(st.sampled_from(["RUN", "WORKFLOW", "STATUS", "TAGS", "MESSAGE", "X"]), min_size=1, max_size=6)
    )
    rows = draw(st.lists(st.lists(cell, min_size=len(headers), max_size=len(headers)), max_size=5))
    return headers, rows


@settings(max_examples=200, deadline=None)
@given(tables(), st.sampled_from(sorted(ENVIRONS)), st.integers(min_value=10, max_value=120))
def test_a_table_that_fits_is_written_as_rich_writes_it(
    table: tuple[list[str], list[list[tuple[str, str]]]], env_name: str, width: int
) -> None:
    headers, rows = table
    environ = ENVIRONS[env_name]
    ours = Term(environ=environ, width=width).render_table(headers, rows)
    widths = [max([len(h), *(len(r[i][0]) for r in rows)]) for i, h in enumerate(headers)]
    fits = sum(widths) + 2 * len(widths) <= width
    assert (ours is not None) == fits
    if ours is not None:
        assert ours == rich_table(headers, rows, environ, width)
    else:  # one column narrower and rich folds it: the fast path must not be taken
        unbounded = Term(environ=environ, width=10_000).render_table(headers, rows)
        assert unbounded != rich_table(headers, rows, environ, width)


long_cell_text = st.text(alphabet=string.ascii_letters + string.digits + "   -_:;,.()#", max_size=60)


@st.composite
def wide_tables(draw: st.DrawFn) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Tables like `dstack ps`'s on a narrow terminal: long messages, words longer than a column, runs of spaces."""
    headers = draw(
        st.lists(
            st.sampled_from(["RUN", "WORKFLOW", "STATUS", "SUBMITTED", "TAGS", "MESSAGE", "X", "A B"]),
            min_size=1,
            max_size=7,
        )
    )
    cells = st.tuples(st.one_of(cell_text, long_cell_text), st.sampled_from(STYLES))
    rows = draw(st.lists(st.lists(cells, min_size=len(headers), max_size=len(headers)), max_size=6))
    return headers, rows


@settings(max_examples=400, deadline=None)
@given(wide_tables(), st.sampled_from(sorted(ENVIRONS)), st.integers(min_value=1, max_value=120))
def test_a_table_too_wide_is_folded_as_rich_folds_it(
    table: tuple[list[str], list[list[tuple[str, str]]]], env_name: str, width: int
) -> None:
    """`dstack ps` with a deep queue on an 80-column terminal: folded here, byte for byte as rich folds it,
    without importing rich (~100 ms of CPU of such a `dstack ps`)."""
    headers, rows = table
    environ = ENVIRONS[env_name]
    ours = Term(environ=environ, width=width).render_table(headers, rows, fold=True)
    if ours is not None:
        assert ours == rich_table(headers, rows, environ, width)
    else:  # only where a column would have fewer than 3 cells, padding included (rich's corner cases)
        assert width < 3 * len(headers)


def test_a_deep_queue_on_an_80_column_terminal_is_folded_without_rich(capsys: pytest.CaptureFixture[str]) -> None:
    headers = ["RUN", "WORKFLOW", "STATUS", "SUBMITTED", "TAGS", "MESSAGE"]
    row = [
        "hungry-turtle-1",
        "scale-gpu",
        ("pending", "white"),
        "3 min ago",
        "",
        "#198 (starts unknown) waiting: no agent is online",
    ]
    rows = [[c if isinstance(c, tuple) else (c, "") for c in row]] * 3
    for name, environ in ENVIRONS.items():
        term = Term(environ=environ, width=80)
        assert term.render_table(headers, rows, fold=True) == rich_table(headers, rows, environ, 80), name
        assert term.render_table(headers, rows) is None  # overflow="ellipsis" (the default) is still rich's


def test_cells_are_never_markup_and_wide_text_goes_to_rich(capsys: pytest.CaptureFixture[str]) -> None:
    term = Term(environ={"TTY_COMPATIBLE": "0"}, width=80)
    term.table(["RUN", "MESSAGE"], [["a", "exit [x] [/y]"], ["b", ("done", "green")]])
    assert capsys.readouterr().out == " RUN  MESSAGE       \n a    exit [x] [/y] \n b    done          \n"
    assert term.render_table(["RUN"], [[("ünïcode", "")]]) is None
    term.table(["RUN"], [["ünïcode [x]"]])  # rich measures it, and still reads no markup
    assert capsys.readouterr().out == " RUN         \n ünïcode [x] \n"


def test_a_table_too_wide_is_folded_by_rich(capsys: pytest.CaptureFixture[str]) -> None:
    Term(environ={"TTY_COMPATIBLE": "0"}, width=20).table(["RUN", "MESSAGE"], [["a", "x" * 30]], overflow="fold")
    out = capsys.readouterr().out
    assert "x" * 30 not in out and out.count("x") == 30


@pytest.mark.parametrize("env_name", sorted(ENVIRONS))
def test_styled_lines_are_written_as_rich_writes_them(env_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    environ = ENVIRONS[env_name]
    term = Term(stderr=True, environ=environ)
    term.print(("silly-frog-1", "bold"), " submitted")
    term.print(("run silly-frog-1 failed: exit code 1", "red"))
    term.print(("code: 1 file, 0 KiB uploaded", "dim"))
    term.print("plain [bold]not markup[/bold]")
    out = io.StringIO()
    rich = Console(file=out, highlight=False, width=200, _environ=environ)
    rich.print("[bold]silly-frog-1[/bold] submitted")
    rich.print("[red]run silly-frog-1 failed: exit code 1[/red]")
    rich.print("[dim]code: 1 file, 0 KiB uploaded[/dim]")
    rich.print("plain [bold]not markup[/bold]", markup=False)
    assert capsys.readouterr().err == out.getvalue()


def test_terminal_detection_follows_the_environment() -> None:
    assert Term(environ={"TTY_COMPATIBLE": "1"}).is_terminal
    assert not Term(environ={"TTY_COMPATIBLE": "0", "FORCE_COLOR": "1"}).is_terminal
    assert Term(environ={"FORCE_COLOR": "1"}).is_terminal
    assert not Term(environ={"FORCE_COLOR": ""}).is_terminal
    assert Term(environ={"COLUMNS": "123"}).width == 123
    assert Term(environ={"FORCE_COLOR": "1", "TERM": "dumb", "COLUMNS": "123"}).width == 80
