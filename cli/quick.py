"""The `dstack` entry point: the quick read-only commands (`ps`, `logs`, `show`, `agents`) without typer.

Importing typer (with its click) and building the app's ~50 commands costs a `dstack ps` about as much CPU as
everything else it does apart from importing grpc (bench/cli_latency.py). These commands are the ones run
over and over, in loops and by scripts, so their plain forms are parsed here, from a table, and run at once.

The table is never the authority: a command line it does not understand exactly, down to its last argument,
goes to the typer app in cli/main.py, which then parses it, helps (`--help`) or refuses it with its usual
message. So only command lines that both parsers read the same way are taken here;
tests/unit/test_cli_quick.py checks that against the typer app over generated command lines.

What the table leaves to typer, whatever the command: `--help` and any option it does not list, a short
option glued to another (`-af`), a repeated option, `--`, a value that is not plain ASCII digits or is below
the option's minimum, a missing or extra argument, and shell completion.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

Parsed = dict[str, Any]


# NamedTuples, here and in the classes every quick command builds (home.Endpoint, tls.Transport,
# errors.Location): a frozen dataclass costs ~0.7 ms of CPU to create, and importing dataclasses ~2 ms.
class Flag(NamedTuple):
    """A boolean option: present means True."""

    dest: str


class Count(NamedTuple):
    """An integer option with a lower bound (typer's `min=`); absent means None."""

    dest: str
    minimum: int


class Spec(NamedTuple):
    options: dict[str, Flag | Count]  # every spelling (`-n`, `--limit`) -> what it sets
    arguments: tuple[str, ...]  # required positional arguments, in order
    run: Callable[[Parsed], None]


def _ps(p: Parsed) -> None:
    from dstack.cli.commands.ps import ps_command

    ps_command(p["all_"], p["as_json"], p["limit"])


def _logs(p: Parsed) -> None:
    from dstack.cli.commands.logs import logs_command

    logs_command(p["run"], p["follow"], p["attempt"], p["node"])


def _show(p: Parsed) -> None:
    from dstack.cli.commands.record import show_command

    show_command(p["run"], p["as_json"])


def _agents(p: Parsed) -> None:
    from dstack.cli.commands.agents import agents_command

    agents_command(p["as_json"])


# The same names, arguments, bounds and defaults as the typer commands of the same name in cli/main.py.
COMMANDS: dict[str, Spec] = {
    "ps": Spec(
        {
            "-a": Flag("all_"),
            "--all": Flag("all_"),
            "--json": Flag("as_json"),
            "-n": Count("limit", 0),
            "--limit": Count("limit", 0),
        },
        (),
        _ps,
    ),
    "logs": Spec(
        {
            "-f": Flag("follow"),
            "--follow": Flag("follow"),
            "--attempt": Count("attempt", 1),
            "--node": Count("node", 0),
        },
        ("run",),
        _logs,
    ),
    "show": Spec({"--json": Flag("as_json")}, ("run",), _show),
    # `dstack agents` alone lists; its subcommands (remove, approve) are typer's: a word is an extra argument.
    "agents": Spec({"--json": Flag("as_json")}, (), _agents),
}


def _count(value: str, minimum: int) -> int | None:
    if not (value.isascii() and value.isdigit()):
        return None  # signs, spaces, underscores, other digits: click's int() reads some of them; typer decides
    n = int(value)
    return n if n >= minimum else None


def parse(spec: Spec, args: Sequence[str]) -> Parsed | None:
    """What the command's function is called with, or None when typer is to read this command line."""
    parsed: Parsed = {o.dest: False if isinstance(o, Flag) else None for o in spec.options.values()}
    seen: set[str] = set()
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        name, glued = arg, None
        if arg.startswith("--") and "=" in arg:
            name, glued = arg.split("=", 1)
        elif not arg.startswith("--") and len(arg) > 2:
            name, glued = arg[:2], arg[2:]
        option = spec.options.get(name)
        if option is None or option.dest in seen:
            return None
        seen.add(option.dest)
        if isinstance(option, Flag):
            if glued is not None:
                return None
            parsed[option.dest] = True
            continue
        if glued is None:
            if i == len(args):
                return None
            glued = args[i]
            i += 1
        value = _count(glued, option.minimum)
        if value is None:
            return None
        parsed[option.dest] = value
    if len(positional) != len(spec.arguments) or any(not p for p in positional):
        return None
    parsed.update(zip(spec.arguments, positional, strict=True))
    return parsed


def quick_command(argv: Sequence[str]) -> Callable[[], None] | None:
    """The call that runs `argv` (the arguments after `dstack`) without typer, or None."""
    if not argv or any(k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ):
        return None  # no command (typer prints the help), or a shell asking typer to complete a word
    spec = COMMANDS.get(argv[0])
    if spec is None:
        return None
    parsed = parse(spec, argv[1:])
    if parsed is None:
        return None
    run = spec.run
    return lambda: run(parsed)


def main() -> None:
    command = quick_command(sys.argv[1:])
    if command is None:
        from dstack.cli.main import main as typer_main

        typer_main()
        return
    # How the typer app ends the same commands (typer.core._main, cli/main.py's main): exit 0, our errors as
    # one line, Ctrl-C as 130, and a reader that went away (`dstack ps | head`) as 1 without a traceback.
    from dstack.cli.deferred import defer
    from dstack.cli.errors import CliError

    defer()  # before grpc is imported: its asyncio parts, which a blocking call never reads
    try:
        command()
        sys.stdout.flush()
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # Python flushes stdout again at exit, into the same closed pipe: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(0)
