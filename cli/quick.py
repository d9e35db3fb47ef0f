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

import atexit
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn

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

    defer()  # before grpc is imported: the modules it imports and a blocking call never reads
    try:
        command()
        sys.stdout.flush()
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        end_now(e.exit_code)
    except KeyboardInterrupt:
        end_now(130)
    except BrokenPipeError:
        # Nothing more can reach the reader: what is still buffered for it goes to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        end_now(1)
    end_now(0)


def end_now(code: int) -> NoReturn:
    """Exits with `code` once the atexit handlers have run and the output is flushed, without the rest of the
    interpreter's teardown: freeing every module's objects and shutting grpc's core down cost a `dstack ps`
    ~15-20 ms of CPU (bench/ps_deep_queue.py), a fifth of all it does, for nothing that outlives the process.
    The quick commands hold nothing else to clean up (their temporary folders are closed by `with`)."""
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = code or 1
    try:
        sys.stderr.flush()
    except OSError:
        pass  # the error stream is gone too: nothing to tell anyone
    os._exit(code)
