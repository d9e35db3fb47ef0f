"""Variables: .dstack/variables.yaml, `--name value` overrides, and `${{ name }}` in workflow files.

    variables:
      global:            # every workflow
        seed: 1
      train:             # the `train` workflow only (wins over global)
        batch-size: 64

Each variable reaches the job as an environment variable: upper-cased, with every character outside
[A-Z0-9] mapped to `_` (`batch-size` -> `BATCH_SIZE`). `${{ batch-size }}` is replaced in any string of
the workflow. `${{ run.args }}` is the run's extra CLI arguments; `${{ run.name }}` is left for the
coordinator, which alone knows the run's name.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dstack.cli import fields
from dstack.cli.errors import Location, WorkflowError
from dstack.cli.yamlsrc import Node, Seq, load

_REF = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
COORDINATOR_REFS = {"run.name"}  # replaced by the coordinator when it names the run
# Set by the agent or dstack itself: a variable of the same (mapped) name would break the job.
RESERVED_ENV = {
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "TZ",
    "PYTHONUNBUFFERED",
    "RUN_NAME",
    "JOB_ID",
    "WORKFLOW",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "DSTACK_AGENT_HOME",
}


def env_name(variable: str) -> str:
    """`batch-size` -> `BATCH_SIZE`."""
    return "".join(c if "A" <= c <= "Z" or "0" <= c <= "9" else "_" for c in variable.upper())


@dataclass
class Variables:
    values: dict[str, str] = field(default_factory=dict)  # name -> value (after overrides)
    defaults: dict[str, str] = field(default_factory=dict)  # name -> value from variables.yaml
    locations: dict[str, Location] = field(default_factory=dict)
    own: list[str] = field(default_factory=list)  # defined in the workflow's own section (not `global`)

    def env(self) -> dict[str, str]:
        return {env_name(k): v for k, v in self.values.items()}


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def load_variables(root: Path, workflow: str) -> Variables:
    path = root / ".dstack" / "variables.yaml"
    out = Variables()
    if not path.exists():
        return out
    data = load(path)
    if data is None:
        return out
    if not isinstance(data, Node) or not isinstance(data.get("variables"), (Node, type(None))):
        raise WorkflowError("expected a top-level 'variables:' mapping", getattr(data, "location", None))
    fields.check_unknown(data, {"variables"}, "variables.yaml")
    sections = data.get("variables") or Node()
    for section in ("global", workflow):
        vars_ = sections.get(section)
        if vars_ is None:
            continue
        if not isinstance(vars_, Node):
            raise WorkflowError(f"'{section}' must be a mapping of name: value", sections.at(section))
        for name, value in vars_.items():
            if not _NAME.fullmatch(name):
                raise WorkflowError(f"invalid variable name {name!r}", vars_.key_locations[name])
            if isinstance(value, (dict, list)):
                raise WorkflowError(f"variable {name!r} must be a single value", vars_.at(name))
            # As written (`lr: 1.0` stays "1.0", not "1.0" re-printed from a float).
            out.defaults[name] = vars_.raw_values.get(name, _scalar_text(value))
            out.locations[name] = vars_.at(name)
            if section == workflow and name not in out.own:
                out.own.append(name)
    by_env: dict[str, str] = {}
    for name in out.defaults:
        env = env_name(name)
        if env in RESERVED_ENV:
            raise WorkflowError(
                f"variable {name!r} would set the job's {env}, which the job needs; rename it", out.locations[name]
            )
        if env in by_env and by_env[env] != name:
            raise WorkflowError(
                f"variables {by_env[env]!r} and {name!r} both become the environment variable {env}",
                out.locations[name],
            )
        by_env[env] = name
    out.values = dict(out.defaults)
    return out


def split_overrides(args: list[str], known: set[str]) -> tuple[dict[str, str], list[str]]:
    """`--batch-size 128` and `--batch-size=128` for known variables; every other argument is passed on,
    and so is everything after `--`."""
    overrides: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i + 1 :])
            break
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            if name in known:
                if not eq:
                    if i + 1 >= len(args):
                        raise WorkflowError(f"--{name} needs a value (e.g. --{name} VALUE)")
                    value = args[i + 1]
                    i += 1
                overrides[name] = value
                i += 1
                continue
        rest.append(arg)
        i += 1
    return overrides, rest


def check_run_args(args: list[str], rest: list[str], known: set[str], workflow: str, takes_args: bool) -> None:
    """What is not a variable goes to the workflow, if it takes arguments; an option that looks like a
    mistyped variable, or any argument to a workflow that takes none, is an error before anything starts."""
    explicit = args[args.index("--") + 1 :] if "--" in args else []
    options = rest[: len(rest) - len(explicit)]  # before `--`: these could have been meant as variables
    if not takes_args and rest:
        hint = _variable_hint(options[0], known) if options and options[0].startswith("--") else ""
        variables = f"its variables: {', '.join(f'--{k}' for k in sorted(known))}" if known else "it has no variables"
        raise WorkflowError(
            f"workflow {workflow!r} takes no arguments, and {rest[0]!r} is not one of its variables ({variables}){hint}"
        )
    for arg in options:
        if arg.startswith("--") and len(arg) > 2 and (hint := _variable_hint(arg, known)):
            raise WorkflowError(
                f"{arg.partition('=')[0]!r} is not a variable of workflow {workflow!r}{hint};"
                " to pass it to the workflow as it is, put it after `--`"
            )


def _variable_hint(option: str, known: set[str]) -> str:
    import difflib

    name = option[2:].partition("=")[0]
    by_key = {k.replace("_", "-").lower(): k for k in known}
    close = difflib.get_close_matches(name.replace("_", "-").lower(), list(by_key), n=1, cutoff=0.75)
    return f"; did you mean --{by_key[close[0]]}?" if close else ""


def substitute(node: Node, lookup: Callable[[str], str | None]) -> None:
    """Replaces `${{ name }}` in every string of the workflow, in place; an unknown name is an error
    at the string's location."""

    def expand(text: str, loc: Location) -> str:
        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in COORDINATOR_REFS:
                return m.group(0)
            value = lookup(name)
            if value is None:
                raise WorkflowError(f"${{{{ {name} }}}} is not defined (define it in .dstack/variables.yaml)", loc)
            return value

        return _REF.sub(one, text)

    def expand_scalar(text: str, loc: Location) -> tuple[Any, str]:
        """The new value and its text as written; `gpu: ${{ gpus }}` is the number 2, not "2"."""
        expanded = expand(text, loc)
        if _REF.fullmatch(text.strip()) and expanded != text:
            return _typed(expanded), expanded
        return expanded, expanded

    def walk(value: Any, loc: Location) -> None:
        if isinstance(value, Node):
            for k in list(value):
                v = value[k]
                if isinstance(v, str) and "${{" in v:
                    value[k], value.raw_values[k] = expand_scalar(v, value.at(k))
                else:
                    walk(v, value.at(k))
        elif isinstance(value, Seq):
            for i, v in enumerate(value):
                if isinstance(v, str) and "${{" in v:
                    value[i], value.item_raw[i] = expand_scalar(v, value.item_locations[i])
                else:
                    walk(v, value.item_locations[i])

    walk(node, node.location)


def _typed(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float)) else text


def run_args_text(args: list[str]) -> str:
    return shlex.join(args)
