"""Load every file of the 2022 corpus the way `dstack run` does and print accepted/refused with the error.

Each file is put in a scratch project as `.dstack/workflows.yaml` (or `.dstack/workflows/NAME.yaml`, where it came
from), with the `.dstack/variables.yaml` / `.dstack/providers.yaml` its repository had at the same commit; then
every workflow of it goes through `build_request` (variables, parsing, provider validation, job specs), which is
what `dstack run WORKFLOW` does before it contacts the coordinator.

    .venv/bin/python tests/corpus2022/report.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The checkout this file is in, not whichever one the virtual environment was installed from.
sys.path.insert(0, str(HERE.parents[1]))


def check_file(entry: dict[str, Any]) -> dict[str, Any]:
    from dstack.cli.commands.run import build_request
    from dstack.cli.errors import CliError
    from dstack.cli.workflows import load_workflow_nodes

    with tempfile.TemporaryDirectory(prefix="corpus2022-") as tmp:
        root = Path(tmp)
        target = root / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HERE / entry["file"], target)
        for path, companion in entry["companions"].items():
            shutil.copyfile(HERE / companion, root / path)
        result: dict[str, Any] = {"file": entry["file"], "workflows": {}, "file_error": None}
        try:
            names = list(load_workflow_nodes(root))
        except CliError as e:
            result["file_error"] = _text(e, tmp)
            return result
        except Exception as e:  # a crash of the loader is a finding too
            result["file_error"] = f"CRASH {type(e).__name__}: {_text(e, tmp)}"
            return result
        for name in names:
            try:
                build_request(root, name, [])
                result["workflows"][name] = None
            except CliError as e:
                result["workflows"][name] = _text(e, tmp)
            except Exception as e:
                result["workflows"][name] = f"CRASH {type(e).__name__}: {_text(e, tmp)}"
        return result


# The 2022 forms each workflow uses, by item of issue 13 (or "other" / "broken"), found from the file itself:
# the loader stops at a workflow's first error, so this shows everything a file needs, not only the first.
DEV_PROVIDERS = {"code", "lab", "notebook", "torchrun"}
BUILTIN = {"bash", "python", "docker", "curl"}


def forms(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(item, what, line) for every 2022 form of the file that main does not take as written."""
    import yaml

    from dstack.cli.errors import CliError
    from dstack.cli.yamlsrc import Node, load

    custom: set[str] = set()
    for path, companion in entry["companions"].items():
        if path.endswith("providers.yaml"):
            data = yaml.safe_load((HERE / companion).read_text()) or {}
            custom |= {str(p.get("name")) for p in data.get("providers") or [] if isinstance(p, dict)}
    try:
        doc = load(HERE / entry["file"])
    except CliError as e:
        return [("broken", f"invalid YAML: {e}".replace(str(HERE) + "/", ""))]
    out: list[tuple[str, str]] = []

    def add(item: str, what: str, node: Any, key: str) -> None:
        loc = node.at(key) if key in node else node.location
        out.append((item, f"line {loc.line if loc else '?'}: {what}"))

    for w in (doc or {}).get("workflows") or []:
        if not isinstance(w, Node):
            continue
        prov = w.get("provider")
        if prov is None:
            if "template" in w:
                add("8", "`template:` form (no provider)", w, "template")
            elif "image" in w or "commands" in w:
                add("8", "early-2022 `image`/`commands` without `provider`", w, "name")
            else:
                add("broken", "no provider", w, "name")
        elif isinstance(prov, Node):
            add("9", f"provider mapping {dict(prov)}", w, "provider")
        elif isinstance(prov, list):
            add("broken", f"provider is a list {prov!r}", w, "provider")
        elif isinstance(prov, str) and prov not in BUILTIN:
            base = prov.split("@")[0]
            if prov in custom:
                add("9", f"provider {prov!r} from this repository's .dstack/providers.yaml", w, "provider")
            elif base in DEV_PROVIDERS:
                add("10" if "@" not in prov else "other", f"provider {prov!r}", w, "provider")
            else:
                add("broken", f"provider {prov!r} (no such provider in 2022 either)", w, "provider")
        if prov == "python":
            for key in ("python_script", "script"):
                if key in w:
                    add("1", f"python `{key}`", w, key)
        if prov == "bash":
            for key in ("python", "requirements"):
                if key in w:
                    add("2", f"bash `{key}`", w, key)
        if isinstance(w.get("ports"), int):
            add("3", f"ports: {w['ports']}", w, "ports")
        for a in w.get("artifacts") or []:
            path = a.get("path") if isinstance(a, dict) else a
            if isinstance(path, str) and path.startswith("/"):
                add("4", f"absolute artifact {path}", w, "artifacts")
        for var in w.get("env") or []:
            if isinstance(var, str) and "=" not in var:
                add("5", f"env bare name {var}", w, "env")
        for d in w.get("deps") or []:
            if isinstance(d, str):
                add("6", f"deps string item {d!r}", w, "deps")
            elif isinstance(d, dict) and "mount" in d:
                add("other", f"deps item with mount {dict(d)}", w, "deps")
        if prov == "curl" and {"script", "requirements"} & set(w):
            add("broken", "curl provider given python fields (script, requirements)", w, "provider")
        names = {x.get("name") for x in (doc or {}).get("workflows") or [] if isinstance(x, dict)}
        dep_list = w.get("depends-on")
        for d in dep_list if isinstance(dep_list, list) else []:
            if isinstance(d, str) and ":" not in d and "/" not in d and d not in names:
                add("broken", f"depends-on names {d!r}, not a workflow of the file", w, "depends-on")
        dep_on = w.get("depends-on")
        if isinstance(dep_on, dict):
            add("6", f"depends-on mapping with keys {sorted(dep_on)}", w, "depends-on")
        elif isinstance(dep_on, list) and any(not isinstance(d, str) for d in dep_on):
            add(
                "broken",
                f"depends-on item is a mapping {dep_on!r} (WORKFLOW: TAG, a space after the colon)",
                w,
                "depends-on",
            )
        res = w.get("resources")
        if isinstance(res, dict):
            for key in res:
                if key == "nodes":
                    add("other", "resources.nodes", res, key)
                elif key == "local":
                    add("other", "resources.local", res, key)
                elif key not in ("gpu", "cpu", "memory", "shm_size", "interruptible"):
                    add("broken", f"unknown resources field {key!r}", res, key)
        for key in w:
            if key in ("nodes", "args", "before_run", "setup", "image_name"):
                if key == "nodes":
                    add("other", "top-level nodes (torchrun)", w, key)
                elif key == "image_name":
                    add("broken", "image_name (not a 2022 field)", w, key)
            elif key in ("artifiacts", "gpu"):
                add("broken", f"typo/misplaced field {key!r}", w, key)
    return out


def _text(e: Exception, tmp: str) -> str:
    return str(e).replace(os.path.realpath(tmp) + "/", "").replace(tmp + "/", "")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="write the per-file results here")
    args = parser.parse_args()
    entries = json.loads((HERE / "sources.json").read_text())
    results = []
    for entry in entries:
        r = check_file(entry)
        results.append(r)
        errors = [r["file_error"]] if r["file_error"] else [f"{w}: {m}" for w, m in r["workflows"].items() if m]
        print(f"{'ACCEPTED' if not errors else 'REFUSED '} {r['file']}")
        for line in errors:
            print(f"    {line}")
        r["forms"] = forms(entry)
        for item, what in r["forms"]:
            print(f"    [{item}] {what}")
    accepted = sum(1 for r in results if not r["file_error"] and not any(r["workflows"].values()))
    print(f"\n{len(results)} files, {accepted} accepted, {len(results) - accepted} refused")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
