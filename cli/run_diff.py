"""`dstack diff RUN1 RUN2`: what differs between two runs' records (docs/reproducibility.md).

`diff_records` turns two records (coordinator/app/records.py) into one JSON document, `dstack.run-diff/v1`,
that holds only what differs; each difference is a pair [value in RUN1, value in RUN2]. Its shape (documented
in docs/reproducibility.md, kept stable: new keys may be added, none renamed):

    {"version": "dstack.run-diff/v1", "runs": [RUN1, RUN2],
     "run": {FIELD: [a, b]},                        # workflow, owner, repository, status, args
     "code": {FIELD: [a, b], "untracked": {"added": [...], "removed": [...]},
              "files": {"added": [...], "removed": [...], "changed": [...]}, "unified_diff": "..."},
     "workflows": {WORKFLOW: {"variables": {NAME: [a, b]}, "run_args": [a, b],
                              "workflow": {PATH: [a, b]}}},   # PATH: commands[0], resources.gpu, ...
     "jobs": [{"workflow": W, "index": K, "job": [name in RUN1, name in RUN2], "only_in": RUN,
               "inputs": [{"job": J, "manifest_hash": [a, b], "source": [RUN/JOB, RUN/JOB]}],
               "packages": {"added": {NAME: VERSION}, "removed": {NAME: VERSION}, "changed": {NAME: [a, b]}},
               "environment": {FIELD: [a, b]},   # runtime, image, image_id, image_digests, python, os, gpus...
               "agent": [a, b], "exit_code": [a, b], "status": [a, b], "timings_s": {PHASE: [a, b]}}]}

A section, a job or a field that is equal is left out. `identical` is true when the code, workflows, specs, inputs,
packages and environment are the same and every job ended the same way (owner, agent and timings aside).
Jobs are matched by workflow name, and by position among a workflow's jobs (multi-node members).
"""

from __future__ import annotations

import re
from typing import Any

DIFF_VERSION = "dstack.run-diff/v1"
ENV_FIELDS = ("runtime", "image", "image_id", "image_digests", "python_version", "os", "agent_version")
GPU_FIELDS = ("driver_version", "cuda_version")
_FREEZE_LINE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==|===|\s@\s)\s*(.+?)\s*$")


def _pairs(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...] | list[str]) -> dict[str, list[Any]]:
    return {k: [a.get(k), b.get(k)] for k in keys if a.get(k) != b.get(k)}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A workflow as PATH -> scalar (`commands[0]`, `resources.gpu.count`): a change is named where it is."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out |= flatten(v, f"{prefix}[{i}]")
        if not value:
            out[prefix] = []
    else:
        out[prefix] = value
    return out


def packages(freeze: str) -> dict[str, str]:
    """`pip freeze` text -> canonical name -> version (or the URL of a direct reference)."""
    out: dict[str, str] = {}
    for line in freeze.splitlines():
        found = _FREEZE_LINE.match(line)
        if found:
            out[re.sub(r"[-_.]+", "-", found.group(1)).lower()] = found.group(2)
    return out


def package_changes(a: str, b: str) -> dict[str, Any]:
    pa, pb = packages(a), packages(b)
    out: dict[str, Any] = {
        "added": {n: pb[n] for n in sorted(pb.keys() - pa.keys())},
        "removed": {n: pa[n] for n in sorted(pa.keys() - pb.keys())},
        "changed": {n: [pa[n], pb[n]] for n in sorted(pa.keys() & pb.keys()) if pa[n] != pb[n]},
    }
    return {k: v for k, v in out.items() if v}


def _gpus(env: dict[str, Any]) -> list[str]:
    out = []
    for g in env.get("gpus") or []:
        name = str(g.get("name") or "")  # a simulated GPU's name may say so already
        out.append(name + (" (simulated)" if g.get("simulated") and "simulated" not in name else ""))
    return out


def environment_changes(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    ea, eb = a or {}, b or {}
    out: dict[str, Any] = _pairs(ea, eb, ENV_FIELDS)
    if _gpus(ea) != _gpus(eb):
        out["gpus"] = [_gpus(ea), _gpus(eb)]
    out |= _pairs(ea, eb, GPU_FIELDS)
    return out


def _input_key(i: dict[str, Any], run_name: str) -> str:
    """An input as the job sees it: the job it came from, its run named only when it is another run."""
    return str(i.get("job")) if i.get("run") == run_name else f"{i.get('run')}/{i.get('job')}"


def input_changes(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str]) -> list[dict[str, Any]]:
    """Inputs by the job they came from: a different manifest (or source run) for the same job is a change."""
    ia = {str(i.get("job")): i for i in a.get("inputs") or []}
    ib = {str(i.get("job")): i for i in b.get("inputs") or []}
    out = []
    for job in sorted(ia.keys() | ib.keys()):
        x, y = ia.get(job) or {}, ib.get(job) or {}
        same_source = bool(x) == bool(y) and (not x or _input_key(x, names[0]) == _input_key(y, names[1]))
        if x.get("manifest_hash") == y.get("manifest_hash") and same_source:
            continue
        out.append(
            {
                "job": job,
                "manifest_hash": [x.get("manifest_hash"), y.get("manifest_hash")],
                "source": [_input_key(x, names[0]) if x else None, _input_key(y, names[1]) if y else None],
            }
        )
    return out


def _match_jobs(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[tuple[str, int, Any, Any]]:
    def keyed(jobs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
        seen: dict[str, int] = {}
        out = {}
        for j in jobs:
            workflow = str((j.get("spec") or {}).get("workflow") or j.get("job_name"))
            k = seen.get(workflow, 0)
            seen[workflow] = k + 1
            out[(workflow, k)] = j
        return out

    ka, kb = keyed(a), keyed(b)
    order = list(ka) + [k for k in kb if k not in ka]
    return [(w, k, ka.get((w, k)), kb.get((w, k))) for w, k in order]


def job_changes(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    inputs = input_changes(a, b, names)
    if inputs:
        out["inputs"] = inputs
    ea, eb = a.get("environment") or {}, b.get("environment") or {}
    pkgs = package_changes(str(ea.get("packages") or ""), str(eb.get("packages") or ""))
    if pkgs:
        out["packages"] = pkgs
    env = environment_changes(ea, eb)
    if env:
        out["environment"] = env
    if a.get("agent") != b.get("agent"):
        out["agent"] = [a.get("agent"), b.get("agent")]
    out |= _pairs(a, b, ["exit_code", "status"])
    fa, fb = flatten(a.get("spec") or {}), flatten(b.get("spec") or {})
    spec = {p: [fa.get(p), fb.get(p)] for p in sorted(fa.keys() | fb.keys()) if fa.get(p) != fb.get(p)}
    if spec:
        out["spec"] = spec
    ta, tb = a.get("timings_s") or {}, b.get("timings_s") or {}
    timings = {p: [ta.get(p), tb.get(p)] for p in sorted(ta.keys() | tb.keys()) if ta.get(p) != tb.get(p)}
    if timings:
        out["timings_s"] = timings
    return out


def code_changes(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = _pairs(a, b, ["hash", "repo_url", "commit", "branch", "dirty", "diff_hash"])
    ua, ub = set(a.get("untracked") or []), set(b.get("untracked") or [])
    if ua != ub:
        out["untracked"] = {"added": sorted(ub - ua), "removed": sorted(ua - ub)}
    return out


def workflow_changes(a: Any, b: Any) -> dict[str, Any]:
    ra = a if isinstance(a, dict) else {}
    rb = b if isinstance(b, dict) else {}
    out: dict[str, Any] = {}
    for name in sorted(ra.keys() | rb.keys()):
        x, y = ra.get(name) or {}, rb.get(name) or {}
        changes: dict[str, Any] = {}
        va, vb = x.get("variables") or {}, y.get("variables") or {}
        variables = {k: [va.get(k), vb.get(k)] for k in sorted(va.keys() | vb.keys()) if va.get(k) != vb.get(k)}
        if variables:
            changes["variables"] = variables
        if x.get("run_args") != y.get("run_args"):
            changes["run_args"] = [x.get("run_args"), y.get("run_args")]
        fa, fb = flatten(x.get("workflow") or {}), flatten(y.get("workflow") or {})
        workflow = {p: [fa.get(p), fb.get(p)] for p in sorted(fa.keys() | fb.keys()) if fa.get(p) != fb.get(p)}
        if workflow:
            changes["workflow"] = workflow
        if changes:
            out[name] = changes
    return out


def diff_records(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    ra, rb = a.get("run") or {}, b.get("run") or {}
    names = (str(ra.get("name")), str(rb.get("name")))
    out: dict[str, Any] = {"version": DIFF_VERSION, "runs": list(names)}
    run = _pairs(ra, rb, ["workflow", "owner", "repository", "status", "args"])
    if run:
        out["run"] = run
    code = code_changes(a.get("code") or {}, b.get("code") or {})
    if code:
        out["code"] = code
    workflows = workflow_changes(a.get("resolved_workflow"), b.get("resolved_workflow"))
    if workflows:
        out["workflows"] = workflows
    jobs = []
    for workflow, index, x, y in _match_jobs(a.get("jobs") or [], b.get("jobs") or []):
        entry: dict[str, Any] = {"workflow": workflow, "index": index}
        if x is None or y is None:
            entry["only_in"] = names[1] if x is None else names[0]
            entry["job"] = [x.get("job_name") if x else None, y.get("job_name") if y else None]
            jobs.append(entry)
            continue
        changes = job_changes(x, y, names)
        if changes:
            entry["job"] = [x.get("job_name"), y.get("job_name")]
            jobs.append(entry | changes)
    if jobs:
        out["jobs"] = jobs
    # The same code, workflows, specs, inputs, packages and environment, every job ending the same way:
    # who submitted it, on which agent and how long it took aside.
    out["identical"] = (
        set(run) <= {"owner"}
        and "code" not in out
        and "workflows" not in out
        and all(set(j) <= {"workflow", "index", "job", "timings_s", "agent"} for j in jobs)
    )
    return out


def reproduction_gaps(diff: dict[str, Any]) -> list[str]:
    """What a rerun did not reproduce: the differences a person must know of, one line each (no timings)."""
    lines = []
    for job in diff.get("jobs") or []:
        name = (job.get("job") or [None, None])[1] or job.get("workflow")
        if job.get("only_in"):
            lines.append(f"job {name}: only in run {job['only_in']}")
            continue
        pkgs = job.get("packages") or {}
        for n, (old, new) in (pkgs.get("changed") or {}).items():
            lines.append(f"job {name}: package {n} resolved to {new}, not the recorded {old}")
        for n, v in (pkgs.get("added") or {}).items():
            lines.append(f"job {name}: package {n}=={v} was not in the recorded environment")
        for n, v in (pkgs.get("removed") or {}).items():
            lines.append(f"job {name}: package {n}=={v} of the recorded environment is missing")
        env = job.get("environment") or {}
        for field in ("image_id", "image_digests", "gpus", "driver_version", "cuda_version", "python_version", "os"):
            if field in env:
                old, new = env[field]
                lines.append(f"job {name}: {field.replace('_', ' ')} {_text(new)}, not the recorded {_text(old)}")
        for i in job.get("inputs") or []:
            old, new = i["manifest_hash"]
            lines.append(
                f"job {name}: input from {i['job']} has manifest {str(new)[:16]}, not the recorded {str(old)[:16]}"
            )
    return lines


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value) if value not in (None, "") else "none"
