"""The quick entry point (cli/quick.py): `ps`, `logs`, `show` and `agents` parsed without typer, and only
where the typer app would read the command line the same way.

The attack on such a shortcut is a command line the two parsers read differently: an option the table
misreads, a value click would refuse or convert another way, an argument too many. The property test
throws generated command lines at both and requires that whatever the table takes, typer takes too, and
calls the command with the very same values.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st

import dstack.cli.commands.agents
import dstack.cli.commands.logs
import dstack.cli.commands.ps
import dstack.cli.commands.record
from dstack.cli import quick
from dstack.cli.main import app
from tests.conftest import REPO
from tests.unit.test_cli_imports import FAKE_COORDINATOR, run_cli

# Each quick command's function, by the module it is looked up in at call time, with its parameters in order.
TARGETS = {
    "ps": (dstack.cli.commands.ps, "ps_command", ("all_", "as_json", "limit")),
    "logs": (dstack.cli.commands.logs, "logs_command", ("run", "follow", "attempt", "node")),
    "show": (dstack.cli.commands.record, "show_command", ("run", "as_json")),
    "agents": (dstack.cli.commands.agents, "agents_command", ("as_json",)),
}

# Words a user (or a fuzzer) puts after the command: every spelling the table knows, glued forms, values
# click reads differently from plain digits, and words that belong to typer (help, subcommands, `--`).
WORDS = [
    *("-a", "--all", "--json", "-n", "--limit", "-f", "--follow", "--attempt", "--node"),
    *("-n5", "-n0", "-n-1", "--limit=3", "--limit=", "--json=1", "-af", "-aj", "-fa", "-n=2", "--attempt=0"),
    *("0", "1", "7", "05", "-1", "+3", " 4", "1_0", "\u0663", "x", "", "-"),
    *("run-1", "other", "remove", "approve", "--help", "-h", "--", "--all=", "--lim", "-A"),
]


def via_typer(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[str, dict[str, Any]] | None:
    """The command the typer app calls for `argv`, with its arguments by name; None if it refuses or helps."""
    calls: list[tuple[str, dict[str, Any]]] = []
    for name, (module, attr, params) in TARGETS.items():

        def record(*args: Any, _name: str = name, _params: tuple[str, ...] = params) -> None:
            calls.append((_name, dict(zip(_params, args, strict=True))))

        monkeypatch.setattr(module, attr, record)
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="dstack", standalone_mode=False)
    except (typer.Exit, SystemExit, Exception):  # click's usage errors, help's exit
        return None
    assert len(calls) <= 1
    return calls[0] if calls else None


def via_quick(argv: list[str]) -> tuple[str, dict[str, Any]] | None:
    spec = quick.COMMANDS.get(argv[0])
    parsed = quick.parse(spec, argv[1:]) if spec is not None else None
    return (argv[0], parsed) if parsed is not None else None


@settings(max_examples=400, deadline=None)
@given(
    command=st.sampled_from(sorted(quick.COMMANDS)),
    words=st.lists(st.sampled_from(WORDS), max_size=5),
)
def test_what_the_table_takes_typer_reads_the_same_way(command: str, words: list[str]) -> None:
    argv = [command, *words]
    quick_reading = via_quick(argv)
    if quick_reading is None:
        return  # typer's to read: nothing to compare
    with pytest.MonkeyPatch.context() as mp:
        assert via_typer(mp, argv) == quick_reading, argv


@pytest.mark.parametrize(
    "argv",
    [
        ["ps"],
        ["ps", "-a"],
        ["ps", "--all", "--json"],
        ["ps", "-n", "5"],
        ["ps", "-n5", "--json"],
        ["ps", "--limit=0", "-a"],
        ["logs", "run-1"],
        ["logs", "-f", "run-1", "--attempt", "2", "--node=0"],
        ["show", "run-1"],
        ["show", "--json", "run-1"],
        ["agents"],
        ["agents", "--json"],
    ],
)
def test_the_common_forms_are_taken_quickly_and_as_typer_reads_them(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert quick.quick_command(argv) is not None
    assert via_quick(argv) == via_typer(monkeypatch, argv)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--help"],
        ["ps", "--help"],
        ["ps", "-n", "-1"],  # below the minimum: typer says so
        ["ps", "-n", "+3"],  # click's int() would take it: typer decides
        ["ps", "-a", "-a"],
        ["ps", "-aj"],
        ["ps", "extra"],
        ["logs"],
        ["logs", "a", "b"],
        ["logs", "run-1", "--attempt", "0"],
        ["logs", "--", "-f"],
        ["show", ""],
        ["agents", "remove", "gpu-1"],
        ["run", "hello"],
        ["stop", "run-1"],
    ],
)
def test_what_the_table_does_not_know_goes_to_typer(argv: list[str]) -> None:
    assert quick.quick_command(argv) is None


def test_a_shell_asking_for_completions_goes_to_typer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_DSTACK_COMPLETE", "complete_bash")
    assert quick.quick_command(["ps"]) is None


def test_ps_and_logs_through_the_entry_point_import_neither_typer_nor_click(tmp_path: Path) -> None:
    r, modules = run_cli(tmp_path, tmp_path, ["ps"], entry="dstack.cli.quick")
    assert "silly-frog-1" in r.stdout and "done" in r.stdout
    assert not {m for m in modules if m.split(".")[0] in ("typer", "click", "yaml", "rich")}
    r, modules = run_cli(tmp_path, tmp_path, ["logs", "silly-frog-1"], entry="dstack.cli.quick")
    assert r.stdout == "hello\n"
    assert "typer" not in modules


def test_what_it_does_not_take_typer_still_runs(tmp_path: Path) -> None:
    r, modules = run_cli(tmp_path, tmp_path, ["ps", "--help"], entry="dstack.cli.quick")
    assert "--limit" in r.stdout and "typer" in modules


def test_the_console_script_and_python_m_use_the_quick_entry_point() -> None:
    assert 'dstack = "dstack.cli.quick:main"' in (Path(REPO) / "pyproject.toml").read_text()
    assert "from dstack.cli.quick import main" in (Path(REPO) / "cli" / "__main__.py").read_text()


def test_an_error_is_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    """Nothing listens at the address: the CLI's own message, no traceback, as through typer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
    env |= {"DSTACK_HOME": str(tmp_path), "DSTACK_COORDINATOR": f"unix://{tmp_path}/none.sock", "DSTACK_TOKEN": "t"}
    r = subprocess.run(
        [sys.executable, "-m", "dstack.cli", "ps"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert r.returncode == 1 and r.stderr.startswith("error: cannot reach the coordinator"), r.stderr
    assert "Traceback" not in r.stderr


def test_a_reader_that_went_away_ends_ps_with_1_and_no_traceback(tmp_path: Path) -> None:
    """`dstack ps | head -0`: the pipe is closed before the table is written."""
    read, write = os.pipe()
    os.close(read)
    script = "\n".join(
        [
            "import sys",
            f"ADDRESS = {'unix://' + str(tmp_path / 'c.sock')!r}",
            FAKE_COORDINATOR,
            "sys.argv = ['dstack', 'ps']",
            "from dstack.cli.quick import main",
            "main()",
        ]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
    env |= {"DSTACK_HOME": str(tmp_path), "DSTACK_COORDINATOR": f"unix://{tmp_path}/c.sock", "DSTACK_TOKEN": "t"}
    try:
        r = subprocess.run(
            [sys.executable, "-c", script], env=env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
