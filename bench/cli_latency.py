"""The CLI's own latency on warm local services, against the floor of importing grpc and typer.

Runs each command REPEAT times (after a warm-up) in a fresh process, as a user would, and prints
medians and the ratio to the floor. Usage: python -m bench.cli_latency [REPEAT]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = [sys.executable, "-c", "import grpc, typer"]


def timed(cmd: list[str], env: dict[str, str], cwd: Path, repeat: int) -> float:
    subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, check=True)  # warm-up
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, check=True)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


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
    dstack = [sys.executable, "-m", "dstack.cli"]
    try:
        subprocess.run([*dstack, "run", "hello"], env=env, cwd=project, capture_output=True, check=True)
        floor = timed(FLOOR, env, project, repeat)
        ps = timed([*dstack, "ps"], env, project, repeat)
        run = timed([*dstack, "run", "hello"], env, project, repeat)
        print(f"floor `python -c 'import grpc, typer'`: {floor * 1e3:.0f} ms (median of {repeat})")
        print(f"dstack ps:                              {ps * 1e3:.0f} ms = {ps / floor:.2f}x the floor (goal <= 2x)")
        print(f"dstack run hello (end to end):          {run * 1e3:.0f} ms = {run / floor:.2f}x the floor (goal <= 4x)")
    finally:
        subprocess.run([*dstack, "local", "stop"], env=env, cwd=project, capture_output=True)


if __name__ == "__main__":
    main()
