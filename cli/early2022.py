"""The early-2022 workflow syntax (tests/corpus2022/MEANINGS.md §8), read as today's `docker` provider.

Until April 2022 a workflow had no provider: `image` and `commands` (plus `artifacts`, `resources`,
`depends-on`), and dstack ran the commands in that image with the repository checked out in the working
directory: what `provider: docker` does today. For a few weeks of February 2022 the same fields sat one level
down, under `template:`. Both are read here into today's shape, with a deprecation note naming the line:

    - name: train                       - name: train
      template:                           provider: docker
        image: python:3.9          ->      image: python:3.9
        commands: [python train.py]        commands: [python train.py]

The commands of such a workflow may use the early system variables, replaced before submitting
(`expand_commands`): `$NAME` for a variable of .dstack/variables.yaml (its value, as text), `$run_name`,
`$job_id`, and `$variables_as_args` (`--NAME VALUE` for each variable of the workflow's own section).
"""

from __future__ import annotations

import re
import shlex
import sys

from dstack.cli.errors import Location, WorkflowError
from dstack.cli.yamlsrc import Node, Seq

PROVIDER = "docker"  # runs `commands` in `image`, with the code in the working directory, as 2022 did
SYSTEM = ("run_name", "job_id", "variables_as_args")


class EarlyNode(Node):
    """A workflow written in the early-2022 syntax, already in today's shape."""

    template: bool  # its fields were under `template:`
    mapped: bool  # it had no provider and runs as `provider: docker`
    written_at: Location  # the `template:` key, or the workflow itself


def normalize(node: Node) -> Node:
    """`node` as today's syntax reads it: for a workflow without a provider, the `template:` fields hoisted and
    the provider made `docker`."""
    if "provider" in node:
        # A provider's own fields as written: 2022's custom providers of February read theirs under `template`
        # (cli/providers/custom.py passes them on as they are); a built-in provider refuses the unknown field.
        return node
    template = "template" in node
    if template:
        node = _hoisted(node)
    mapped = "provider" not in node and ("image" in node or "commands" in node)
    if mapped and "image" not in node:
        raise WorkflowError(
            "missing required field 'provider' (a workflow with 'commands' and no provider is the early-2022"
            " form, which needs 'image' too; today write `provider: bash`)",
            node.location,
        )
    if not template and not mapped:
        return node
    out = node if isinstance(node, EarlyNode) else _copy(node)
    out.template, out.mapped = template, mapped
    if not template:
        out.written_at = node.location
    if mapped:
        out["provider"] = PROVIDER
        out.key_locations["provider"] = out.value_locations["provider"] = node.at("image")
    return out


def note(node: Node) -> None:
    """The deprecation note for a workflow read by `normalize`, on stderr (not an error)."""
    if not isinstance(node, EarlyNode):
        return
    if not node.mapped:  # `template:` holding a provider of its own
        print(
            f"note: {node.written_at}: workflow {node.get('name')!r} nests its fields under 'template:' (February"
            " 2022), which is deprecated: write them directly in the workflow",
            file=sys.stderr,
        )
        return
    what = "'template:' with image and commands and no provider" if node.template else "image and commands"
    print(
        f"note: {node.written_at}: workflow {node.get('name')!r} uses the early-2022 syntax ({what}), which is"
        f" deprecated: it runs as `provider: {PROVIDER}` (the commands in the image, the code in the working"
        f" directory); write `provider: {PROVIDER}`{' and the fields without template:' if node.template else ''}",
        file=sys.stderr,
    )


def _copy(node: Node) -> EarlyNode:
    out = EarlyNode(node)
    out.location = node.location
    out.key_locations = dict(node.key_locations)
    out.value_locations = dict(node.value_locations)
    out.raw_values = dict(node.raw_values)
    out.template = out.mapped = False
    out.written_at = node.location
    return out


def _hoisted(node: Node) -> EarlyNode:
    """`template:`'s fields moved up into the workflow; a field in both places is an error at the inner one."""
    inner = node["template"]
    if not isinstance(inner, Node):
        raise WorkflowError(
            "'template' must be a mapping of the workflow's fields (image, commands, artifacts, resources...)",
            node.at("template"),
        )
    out = _copy(node)
    out.written_at = node.key_locations["template"]
    del out["template"]
    out.key_locations.pop("template", None)
    out.value_locations.pop("template", None)
    out.raw_values.pop("template", None)
    for key, value in inner.items():
        if key in out:
            raise WorkflowError(
                f"{key!r} is both under 'template' and beside it (line {node.key_locations[key].line}): keep one",
                inner.key_locations[key],
            )
        out[key] = value
        out.key_locations[key] = inner.key_locations[key]
        out.value_locations[key] = inner.value_locations[key]
        if key in inner.raw_values:
            out.raw_values[key] = inner.raw_values[key]
    return out


def expand_commands(node: Node, values: dict[str, str], own: list[str]) -> None:
    """In the commands of an early-2022 workflow (`normalize` gave it a provider), in place:

    - `$NAME` / `${NAME}` of a variable: its value, as text (2022 replaced it before running; the job also has it
      as the environment variable in upper case, as then);
    - `$run_name`: the run's name (the coordinator fills it in: `${{ run.name }}`);
    - `$job_id`: the job's id (`$JOB_ID`, which every job has);
    - `$variables_as_args`: `--NAME VALUE` for each variable of the workflow's own section of variables.yaml
      (not the global ones: the GPT-2 example passes `--model_name $model` itself and its train.py would refuse a
      `--model`), each value one shell word.

    A `$` preceded by a backslash is left alone, as the shell would."""
    if not isinstance(node, EarlyNode) or not node.mapped:
        return
    commands = node.get("commands")
    if not isinstance(commands, Seq):
        return
    as_args = " ".join(f"--{name} {shlex.quote(values[name])}" for name in own if name in values)
    replacements = {
        **values,
        "run_name": "${{ run.name }}",
        "job_id": "${JOB_ID}",
        "variables_as_args": as_args,
    }
    names = sorted(replacements, key=len, reverse=True)  # `$batch-size` before `$batch`
    pattern = re.compile(
        r"(?<!\\)\$(?:\{(" + "|".join(map(re.escape, names)) + r")\}|(" + "|".join(map(re.escape, names)) + r")"
        r"(?![A-Za-z0-9_]))"
    )

    def one(m: re.Match[str]) -> str:
        return replacements[m.group(1) or m.group(2)]

    for i, command in enumerate(commands):
        if isinstance(command, str) and "$" in command:
            commands[i] = pattern.sub(one, command)
