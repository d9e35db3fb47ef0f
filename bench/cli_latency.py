"""The CLI's own latency on warm local services, against the floor of importing grpc and typer.

Runs each command REPEAT times (after a warm-up) in a fresh process, as a user would, and prints
medians and the ratio to the floor. The commands take turns (floor, ps, run, floor, ...), so that the load of
a shared machine, which changes from one second to the next, weighs on the floor as on the commands. The CPU
time of each command's own process is printed too: it hardly moves with the load, and shows what the CLI itself
costs (the services' work for `run` is not in it).
Then the same for `dstack ps` against a team coordinator over TCP: with TLS (its own CA, pinned with
DSTACK_CA_FILE) and plaintext (--insecure on both sides), taking turns, to show what TLS adds to a command.
Usage: python -m bench.cli_latency [REPEAT]

Bytecode is written (under a cache folder of the bench's own) even where PYTHONDONTWRITEBYTECODE is set: an
installed dstack has its modules compiled at install, and a checkout run with that variable would compile every
one of the CLI's modules on every call (~15 ms) while the floor's come compiled from site-packages.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = [sys.executable, "-c", "import grpc, typer"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmds: dict[str, list[str]], env: dict[str, str], cwd: Path, repeat: int) -> dict[str, tuple[float, float]]:
    """The median wall time and CPU time of each command, run in turn REPEAT times after a warm-up."""
    for cmd in cmds.values():
        subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, check=True)  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in cmds}
    cpu: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(repeat):
        for name, cmd in cmds.items():
            t0, c0 = time.perf_counter(), children_cpu()
            subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, check=True)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(children_cpu() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in cmds}


def main() -> None:
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    tmp = Path(tempfile.mkdtemp(prefix="dstack-cli-bench-"))
    project = tmp / "p"
    (project / ".dstack").mkdir(parents=True)
    (project / ".dstack" / "workflows.yaml").write_text(
        "workflows:\n  - name: hello\n    provider: bash\n    commands: [echo hello]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
    env["DSTACK_HOME"] = str(tmp / "home")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    dstack = [sys.executable, "-m", "dstack.cli"]
    try:
        subprocess.run([*dstack, "run", "hello"], env=env, cwd=project, capture_output=True, check=True)
        medians = timed({"floor": FLOOR, "ps": [*dstack, "ps"], "run": [*dstack, "run", "hello"]}, env, project, repeat)
        (floor, floor_cpu), (ps, ps_cpu), (run, run_cpu) = medians["floor"], medians["ps"], medians["run"]
        print(
            f"floor `python -c 'import grpc, typer'`: {floor * 1e3:.0f} ms (median of {repeat});"
            f" CPU {floor_cpu * 1e3:.0f} ms"
        )
        print(
            f"dstack ps:                              {ps * 1e3:.0f} ms = {ps / floor:.2f}x the floor (goal <= 2x);"
            f" CPU {ps_cpu * 1e3:.0f} ms = {ps_cpu / floor_cpu:.2f}x"
        )
        print(
            f"dstack run hello (end to end):          {run * 1e3:.0f} ms = {run / floor:.2f}x the floor (goal <= 4x);"
            f" CPU {run_cpu * 1e3:.0f} ms = {run_cpu / floor_cpu:.2f}x"
        )
    finally:
        subprocess.run([*dstack, "local", "stop"], env=env, cwd=project, capture_output=True)
    try:
        tls_ps(env, project, repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tls_ps(env: dict[str, str], cwd: Path, repeat: int) -> None:
    """`dstack ps` against a TCP coordinator with TLS and against one in plaintext, taking turns."""
    from bench._harness import Services

    tls, plain = Services(tls=True), Services(tls=False)
    try:
        tls.start_coordinator()
        plain.start_coordinator()
        dstack = [sys.executable, "-m", "dstack.cli", "ps"]
        # One env per command: `timed` takes one, so each command carries its own in a wrapper.
        cmds = {
            name: ["env", *(f"{k}={v}" for k, v in svc.cli_env().items()), *dstack]
            for name, svc in (("tls", tls), ("plain", plain))
        }
        medians = timed(cmds, env, cwd, repeat)
        (t, t_cpu), (p, p_cpu) = medians["tls"], medians["plain"]
        print(
            f"dstack ps over TCP, TLS:                {t * 1e3:.0f} ms (median of {repeat}); CPU {t_cpu * 1e3:.0f} ms"
        )
        print(f"dstack ps over TCP, plaintext:          {p * 1e3:.0f} ms; CPU {p_cpu * 1e3:.0f} ms")
        print(
            f"TLS adds:                               {(t - p) * 1e3:+.0f} ms wall, {(t_cpu - p_cpu) * 1e3:+.0f} ms CPU"
        )
    finally:
        tls.stop()
        plain.stop()


if __name__ == "__main__":
    main()
