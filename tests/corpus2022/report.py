"""Load every file of the 2022 corpus the way `dstack run` does and print accepted/refused with the error.

Each file is put in a scratch project as `.dstack/workflows.yaml` (or `.dstack/workflows/NAME.yaml`, where it came
from), with the `.dstack/variables.yaml` / `.dstack/providers.yaml` its repository had at the same commit; then
every workflow of it goes through `build_request` (variables, parsing, provider validation, job specs), which is
what `dstack run WORKFLOW` does before it contacts the coordinator.

    .venv/bin/python tests/corpus2022/report.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The checkout this file is in, not whichever one the virtual environment was installed from.
sys.path.insert(0, str(HERE.parents[1]))


# The one provider repository the corpus names (20 files of ivan-bokov/dstack-test-providers name it, the
# repository they are in). Its whole history is kept as a git bundle (companions/README.md: source and commits), so
# `dstack validate` reads it offline: git's `url.<bundle copy>.insteadOf` in a scratch global git config.
PROVIDER_REPOS = {
    "https://github.com/ivan-bokov/dstack-test-providers": HERE
    / "companions"
    / "ivan-bokov_dstack-test-providers.bundle",
}


def check_file(entry: dict[str, Any]) -> dict[str, Any]:
    """The file in a scratch project, checked by `validate_project` (what `dstack validate` and `dstack run` run)."""
    from dstack.cli.commands.validate import validate_project

    with tempfile.TemporaryDirectory(prefix="corpus2022-") as tmp:
        root = Path(tmp) / "project"
        scratch_project(entry, root)
        with offline_provider_repos(entry, Path(tmp)):
            check = validate_project(root)
        result: dict[str, Any] = {
            "file": entry["file"],
            "workflows": {w.name: (str(w.errors[0]) if w.errors else None) for w in check.workflows},
            "file_errors": [str(e) for e in check.file_errors],
            "file_error": str(check.file_errors[0]) if check.file_errors else None,
            "notes": [n for w in check.workflows for n in w.notes] + check.notes,
        }
        return result


def scratch_project(entry: dict[str, Any], root: Path) -> None:
    """The file where its repository had it, with the companion files of the same commit, and an empty file for
    each script/requirements file the workflows name that existed at that commit (`refs`; a MISSING one is left
    out, as it was): `dstack run` checks that they are in the code it sends."""
    target = root / entry["path"]
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / entry["file"], target)
    for path, companion in entry["companions"].items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HERE / companion, root / path)
    for ref in entry["refs"]:
        _field, eq, path = ref.partition("=")
        if eq and "MISSING" not in path and not path.startswith("/") and ".." not in path.split("/"):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).touch()


@contextlib.contextmanager
def offline_provider_repos(entry: dict[str, Any], tmp: Path) -> Iterator[None]:
    """Provider repositories from the bundles, as they were when the file was written: the default branch at the
    file's own commit where the bundle has it (the file's repository is the provider's), else the bundle's HEAD.
    A fresh DSTACK_HOME (no provider cache from another file) and no other git config (no network redirect)."""
    import subprocess

    from dstack.cli.providers import custom

    lines = []
    for i, (url, bundle) in enumerate(PROVIDER_REPOS.items()):
        mirror = tmp / f"provider-{i}.git"
        git = ["git", "-c", "core.hooksPath=/dev/null"]
        subprocess.run([*git, "clone", "--quiet", "--bare", str(bundle), str(mirror)], check=True)
        commit = entry.get("commit", "")
        if (
            url.endswith("/" + entry.get("repo", ""))
            and subprocess.run(
                [*git, "-C", str(mirror), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True
            ).returncode
            == 0
        ):
            subprocess.run([*git, "-C", str(mirror), "update-ref", "refs/heads/main", commit], check=True)
            subprocess.run([*git, "-C", str(mirror), "symbolic-ref", "HEAD", "refs/heads/main"], check=True)
        lines += [f'[url "{mirror}"]', f"\tinsteadOf = {url}"]
    config = tmp / "gitconfig"
    config.write_text("\n".join(lines) + "\n")
    saved = {k: os.environ.get(k) for k in ("GIT_CONFIG_GLOBAL", "DSTACK_HOME")}
    os.environ["GIT_CONFIG_GLOBAL"] = str(config)
    os.environ["DSTACK_HOME"] = str(tmp / "home")
    custom._resolved.clear()  # this process's memo of fetched providers: another file's commit is not this one's
    try:
        yield
    finally:
        custom._resolved.clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


# Items of issue 13 built on other branches: a file that needs one is refused until that branch is merged.
PENDING = {"3": "ports: N", "4": "absolute artifact paths", "6": "2022 deps forms", "8": "early-2022 syntax"}


def why_refused(entry: dict[str, Any], errors: list[str]) -> str:
    """The reason of a refusal, from the 2022 forms the file uses: an item not built yet, or the file's own mistake."""
    found = {item for item, _ in forms(entry)}
    pending = sorted(found & set(PENDING))
    reasons = [f"needs item {i} ({PENDING[i]})" for i in pending]
    if "10" in found or any("is not available yet" in e for e in errors):
        reasons.append("item 10: provider not available yet (built in a separate issue)")
    if "broken" in found or not reasons:
        reasons.append("plainly broken (a mistake 2022 refused too)")
    return "; ".join(reasons)


def markdown(entries: list[dict[str, Any]], results: list[dict[str, Any]]) -> str:
    """REPORT.md: what `dstack validate` says of every corpus file, and why each refused one is refused."""
    from collections import Counter

    refused = [(e, r) for e, r in zip(entries, results, strict=True) if refusals(r)]
    reasons = {e["file"]: why_refused(e, refusals(r)) for e, r in refused}
    lines = [
        "# The 2022 corpus through `dstack validate`",
        "",
        "Generated by `python tests/corpus2022/report.py --markdown tests/corpus2022/REPORT.md` (no network, no",
        "coordinator). Each file is put in a scratch project where its repository had it, with the variables/providers",
        "files and (empty) script files of the same commit, and checked by `validate_project`, what `dstack validate`",
        "and `dstack run` run before they connect; the provider repository the corpus names comes from its real",
        "history (companions/README.md). tests/unit/test_corpus2022.py asserts every verdict below. The report",
        "written by hand before it (main at 05e2e27, then a section per merged item) is REPORT-history.md.",
        "",
        f"**{len(results)} files, {len(results) - len(refused)} accepted, {len(refused)} refused.**",
        "",
        "| reason | files |",
        "|---|---|",
    ]
    for reason, n in Counter(reasons.values()).most_common():
        lines.append(f"| {reason} | {n} |")
    lines += ["", "## Every refusal", "", "| file | reason | errors (workflow: file:line:column: message) |"]
    lines.append("|---|---|---|")
    for entry, result in refused:
        errors = "<br>".join(e.replace("|", "\\|") for e in refusals(result))
        lines.append(f"| {entry['file']} | {reasons[entry['file']]} | {errors} |")
    notes = [(e["file"], n) for e, r in zip(entries, results, strict=True) for n in r["notes"]]
    lines += ["", "## Notes on accepted files (deprecations and 2022 forms that mean nothing now)", ""]
    lines += [f"- {f}: {n}" for f, n in notes]
    accepted = [e["file"][:3] for e, r in zip(entries, results, strict=True) if not refusals(r)]
    lines += ["", "## Accepted", "", ", ".join(accepted), ""]
    return "\n".join(lines)


def refusals(result: dict[str, Any]) -> list[str]:
    """Every error of a checked file: those reading it, then each failing workflow's (`WORKFLOW: file:line: ...`)."""
    return [*result["file_errors"], *(f"{w}: {m}" for w, m in result["workflows"].items() if m)]


def _text(e: Exception, tmp: str) -> str:
    return str(e).replace(os.path.realpath(tmp) + "/", "").replace(tmp + "/", "")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="write the per-file results here")
    parser.add_argument("--markdown", help="write REPORT.md (counts, every refusal with its reason) here")
    parser.add_argument(
        "--table", action="store_true", help="print REFUSED for tests/unit/test_corpus2022.py (every refusal)"
    )
    args = parser.parse_args()
    entries = json.loads((HERE / "sources.json").read_text())
    if args.table:
        print("REFUSED: dict[str, list[str]] = {")
        for entry in entries:
            errors = refusals(check_file(entry))
            if errors:
                why = ", ".join(sorted({item for item, _ in forms(entry)})) or "-"
                print(f"    {entry['file'][:3]!r}: [  # {entry['file'][4:]}; 2022 forms by item of issue 13: {why}")
                for e in errors:
                    print(f"        {e!r},")
                print("    ],")
        print("}")
        return 0
    results = []
    for entry in entries:
        r = check_file(entry)
        results.append(r)
        errors = refusals(r)
        print(f"{'ACCEPTED' if not errors else 'REFUSED '} {r['file']}")
        for line in errors:
            print(f"    {line}")
        r["forms"] = forms(entry)
        for item, what in r["forms"]:
            print(f"    [{item}] {what}")
    accepted = sum(1 for r in results if not r["file_error"] and not any(r["workflows"].values()))
    print(f"\n{len(results)} files, {accepted} accepted, {len(results) - accepted} refused")
    if args.markdown:
        Path(args.markdown).write_text(markdown(entries, results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
