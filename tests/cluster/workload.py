"""The scenario's jobs, and what the checker compares: their own evidence against dstack's reports.

Each job is a bash script (host runtime, one simulated GPU). Every execution of it (an attempt on an
agent; two if an attempt ever runs twice) names itself `EXE = JOB_ID.ATTEMPT.PID.START_US` and:
- appends to its evidence file, on the machine's shared disk (dstack never sees it): `start` with the
  time, its host's network namespace, `CUDA_VISIBLE_DEVICES`, the run's name; a `tick` with the time
  after each log line; `end` when it finished. The evidence says where and when it truly ran;
- prints `chaos EXE I` for I = 1..LINES: the log lines `dstack logs` must show once each;
- saves `out/data.bin` (random) and `out/who.txt` (EXE) as artifacts, and writes their sha256 manifest
  beside its evidence: the downloaded artifacts must match it, and be those of the final attempt.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dstack.api import Client, Run
from dstack.protos.v1 import common_pb2

WORKFLOW = "chaos"

JOB_SCRIPT = """\
#!/usr/bin/env bash
set -eu
pause={pause}
if [ "${{1:-}}" = long ]; then pause={long_pause}; fi  # longer than a lease: a cut-off agent's job outlives it
exe="${{JOB_ID}}.${{DSTACK_ATTEMPT:-1}}.$$.${{EPOCHREALTIME/./}}"
ev="{evidence}/$exe"
ns=$(ip netns identify $$ 2>/dev/null || true)
echo "start $EPOCHREALTIME ${{ns:-?}} ${{CUDA_VISIBLE_DEVICES:-}} $RUN_NAME" >> "$ev"
for i in $(seq 1 {lines}); do
  echo "chaos $exe $i"
  echo "tick $EPOCHREALTIME" >> "$ev"
  sleep "$pause"
done
mkdir -p out
head -c {artifact_bytes} /dev/urandom > out/data.bin
echo "$exe" > out/who.txt
(cd out && sha256sum data.bin who.txt) > "$ev.manifest"
echo "end $EPOCHREALTIME" >> "$ev"
"""


@dataclass
class JobShape:
    lines: int = 20
    pause: float = 0.05
    artifact_bytes: int = 16384
    retry_limit: int = 6
    long_every: int = 5  # every Nth job pauses `long_pause` between lines instead (0: none)
    long_pause: float = 0.5


def write_project(root: Path, evidence: Path, shape: JobShape) -> Path:
    (root / ".dstack").mkdir(parents=True, exist_ok=True)
    evidence.mkdir(parents=True, exist_ok=True)
    (root / ".dstack" / "workflows.yaml").write_text(
        textwrap.dedent(
            f"""\
            workflows:
              - name: {WORKFLOW}
                provider: bash
                commands:
                  - bash job.sh ${{{{ run.args }}}}
                artifacts: [out]
                resources:
                  gpu: 1
                retry:
                  limit: {shape.retry_limit}
                  on: [agent-lost]
            """
        )
    )
    (root / "job.sh").write_text(
        JOB_SCRIPT.format(
            evidence=evidence,
            lines=shape.lines,
            pause=shape.pause,
            long_pause=shape.long_pause,
            artifact_bytes=shape.artifact_bytes,
        )
    )
    return root


def submit(client: Client, project: Path, jobs: int, shape: JobShape) -> list[str]:
    """`jobs` one-job runs of the workflow (every `long_every`th a long one); their names, in order."""
    args = [["long"] if shape.long_every and k % shape.long_every == 0 else [] for k in range(jobs)]
    runs = client.runs.submit_many(WORKFLOW, args, repo=project, workers=8)
    return [r.name for r in runs]


@dataclass
class Execution:
    """One execution of a job, as its evidence file tells."""

    exe: str
    attempt: int
    run: str
    host: str
    gpus: list[str]
    start: float
    last: float  # its last tick (or end)
    ticks: int
    ended: bool
    manifest: dict[str, str] = field(default_factory=dict)  # file -> sha256 (when it finished)


def read_evidence(evidence: Path) -> list[Execution]:
    out = []
    for path in sorted(evidence.iterdir()):
        if path.suffix == ".manifest":
            continue
        lines = path.read_text(errors="replace").splitlines()
        if not lines or not lines[0].startswith("start "):
            continue
        _, t0, host, *rest = lines[0].split(" ")
        gpus, run = (rest[0], rest[1]) if len(rest) >= 2 else ("", rest[0] if rest else "")
        times = [float(ln.split()[1]) for ln in lines if ln.startswith(("tick ", "end ")) and len(ln.split()) > 1]
        manifest_path = path.with_name(path.name + ".manifest")
        manifest = {}
        if manifest_path.exists():
            for ln in manifest_path.read_text().splitlines():
                digest, _, name = ln.partition("  ")
                manifest[name] = digest
        exe = path.name
        out.append(
            Execution(
                exe=exe,
                attempt=int(exe.split(".")[1]),
                run=run,
                host=host,
                gpus=[g for g in gpus.split(",") if g],
                start=float(t0),
                last=max([float(t0), *times]),
                ticks=sum(ln.startswith("tick ") for ln in lines),
                ended=any(ln.startswith("end ") for ln in lines),
                manifest=manifest,
            )
        )
    return out


@dataclass
class Reported:
    """What dstack says about one run: status, reasons, attempts, log lines, artifacts."""

    run: str
    status: str
    reason: str  # the job's termination reason
    attempt: int  # the job's last attempt
    agent: str
    attempts: list[tuple[int, str, str]]  # (attempt, agent, termination reason) of the earlier ones
    lines: list[str]
    artifacts: dict[str, str]  # path -> sha256, as listed
    downloaded: dict[str, bytes]  # path -> content, as downloaded (checked by the client's sha256)
    download_error: str = ""


def collect(client: Client, names: list[str], scratch: Path) -> tuple[list[Reported], set[str]]:
    """Every run's report, and the names of all runs the coordinator lists."""
    listed = {r.name: r for r in client.runs.list(all=True)}
    # Several at once (the SDK's client is shared between threads): a thousand runs' logs and downloads.
    with ThreadPoolExecutor(8, thread_name_prefix="chaos-collect") as pool:
        reports = list(pool.map(lambda n: _report(client, listed[n], scratch), [n for n in names if n in listed]))
    return reports, set(listed)


def _report(client: Client, run: Run, scratch: Path) -> Reported:
    job = run.info.jobs[0] if run.info.jobs else None
    lines = list(run.logs())
    artifacts = {a.path: a.sha256 for a in run.artifacts.list()} if run.status.value == "done" else {}
    downloaded: dict[str, bytes] = {}
    error = ""
    if artifacts:
        to = scratch / run.name
        try:
            for f in run.artifacts.download(to=to):
                downloaded[f.relative_to(to).as_posix()] = f.read_bytes()
        except Exception as e:  # a mismatch or a missing object: the checker counts it
            error = f"{type(e).__name__}: {e}"
    return Reported(
        run=run.name,
        status=run.status.value,
        reason=_reason(job.termination_reason) if job else "",
        attempt=job.attempt if job else 0,
        agent=job.agent_name if job else "",
        attempts=[(a.attempt, a.agent_name, _reason(a.termination_reason)) for a in job.attempts] if job else [],
        lines=lines,
        artifacts=artifacts,
        downloaded=downloaded,
        download_error=error,
    )


def _reason(value: int) -> str:
    """A termination reason as text: `agent_lost`, `done`, ..."""
    try:
        return common_pb2.TerminationReason.Name(value).removeprefix("TERMINATION_REASON_").lower()  # type: ignore[arg-type]
    except ValueError:
        return str(value)


def chaos_lines(lines: list[str]) -> Iterator[tuple[str, int]]:
    for ln in lines:
        parts = ln.split()
        if len(parts) == 3 and parts[0] == "chaos" and parts[2].isdigit():
            yield parts[1], int(parts[2])
