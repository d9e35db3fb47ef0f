"""`dstack show RUN`: a run's record (docs/reproducibility.md) for people, with rich.

Every value is shown as text, never as rich markup: the record holds what users and agents wrote."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _when(ns: int | None) -> str:
    if not ns:
        return "-"
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pairs(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(Text(key), Text(value))
    return table


def _code_rows(code: dict[str, Any]) -> list[tuple[str, str]]:
    untracked = code.get("untracked") or []
    rows = [
        ("repository", code.get("repo_url") or "-"),
        ("commit", f"{code.get('commit') or '-'} ({code.get('branch') or 'no branch'})"),
        ("tree", f"{code.get('hash') or '-'} ({int(code.get('size') or 0) / 1024:.0f} KiB packed)"),
        (
            "uncommitted",
            f"diff {code['diff_hash'][:16]}, {code.get('diff_size', 0)} bytes" if code.get("diff_hash") else "none",
        ),
        ("untracked", f"{len(untracked)} file(s)" + (f": {', '.join(untracked[:5])}" if untracked else "")),
    ]
    return rows


def _env_rows(env: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not env:
        return [("environment", "not reported (the job did not end on an agent that reports it)")]
    rows = [("runtime", env.get("runtime") or "-")]
    if env.get("image") or env.get("image_id"):
        rows.append(("image", f"{env.get('image', '')} {env.get('image_id', '')}".strip()))
        rows += [("digest", d) for d in env.get("image_digests") or []]
    rows += [("os", env.get("os") or "-"), ("python", env.get("python_version") or "-")]
    gpus = env.get("gpus") or []
    for g in gpus:
        sim = " (simulated)" if g.get("simulated") else ""
        rows.append((f"gpu {g.get('index')}", f"{g.get('name')} {g.get('uuid') or ''}{sim}".strip()))
    if gpus and (env.get("driver_version") or env.get("cuda_version")):
        rows.append(("driver", f"{env.get('driver_version') or '-'}, CUDA {env.get('cuda_version') or '-'}"))
    packages = [p for p in (env.get("packages") or "").splitlines() if p.strip()]
    if packages:
        shown = ", ".join(packages)  # all of them: what the job resolved is the point of the record
        more = " (truncated)" if env.get("packages_truncated") else ""
        rows.append(("packages", f"{len(packages)}{more}: {shown}"))
    rows.append(("agent version", env.get("agent_version") or "-"))
    return rows


def _cache_rows(cache: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The step cache's view of the job (docs/reproducibility.md): the key, and the run it reused."""
    if not cache:
        return []
    if cache.get("hit"):
        said = f"hit: reused {cache.get('source_run')}/{cache.get('source_job')} (nothing ran)"
    else:
        said = "miss: it ran" if cache.get("asked") else "not asked (`cache: true` or --reuse): it ran"
    image = f"{cache.get('image') or '-'}" + ("" if cache.get("image_by_digest") else " (by reference, not digest)")
    return [("cache", said), ("cache key", str(cache.get("key") or "-")), ("cache image", image)]


def render_record(record: dict[str, Any], console: Console | None = None) -> None:
    out = console or Console(highlight=False)
    run = record.get("run") or {}
    out.print(Text(f"run {run.get('name')}", style="bold"), Text(f"  ({record.get('version')})", style="dim"))
    out.print(
        _pairs(
            "",
            [
                ("workflow", run.get("workflow") or "-"),
                ("owner", run.get("owner") or "-"),
                ("repository", run.get("repository") or "-"),
                ("status", run.get("status") or "-"),
                ("submitted", _when(run.get("submitted_at_ns"))),
                ("finished", _when(run.get("finished_at_ns"))),
                ("args", " ".join(run.get("args") or []) or "-"),
                ("tags", ", ".join(run.get("tags") or []) or "-"),
            ],
        )
    )
    out.print(_pairs("code", _code_rows(record.get("code") or {})))
    for job in record.get("jobs") or []:
        out.print()
        out.print(Text(f"job {job.get('job_name')}", style="bold"), Text(f"  {job.get('status')}"))
        spec = job.get("spec") or {}
        timings = job.get("timings_s") or {}
        order = ("queued", "pulling", "code", "inputs", "setup", "environment", "running", "uploading", "total")
        rows = [
            ("provider", spec.get("provider") or "-"),
            ("commands", " && ".join(spec.get("commands") or []) or "-"),
            ("agent", f"{job.get('agent') or '-'} (GPUs {job.get('gpu_indices') or []})"),
            ("exit code", "-" if job.get("exit_code") is None else str(job.get("exit_code"))),
            ("timings", ", ".join(f"{k} {timings[k]:.2f}s" for k in order if k in timings) or "-"),
        ]
        if "spec" in job and job["spec"] is None:  # the coordinator could not read it: its message says why
            rows.insert(0, ("spec", str(job.get("message") or "could not be read")))
        rows += [
            (
                "input",
                f"{i.get('run')}/{i.get('job')} manifest {str(i.get('manifest_hash'))[:16]} ({i.get('files')} files)",
            )
            for i in job.get("inputs") or []
        ]
        artifacts = job.get("artifacts") or {}
        files = artifacts.get("files") or []
        rows.append(
            (
                "artifacts",
                f"manifest {artifacts.get('manifest_hash', '')[:16]} ({len(files)} files)" if files else "none",
            )
        )
        cache = job.get("cache") or {}
        if cache.get("hit") and not job.get("environment"):  # nothing ran: the source's record has it
            env_rows = [("environment", f"none: nothing ran (see `dstack show {cache.get('source_run')}`)")]
        else:
            env_rows = _env_rows(job.get("environment"))
        out.print(_pairs("", rows + _cache_rows(job.get("cache")) + env_rows))
