"""Python job environments: the seed's download -> train workflows with `requirements.txt` (numpy), run
twice through `dstack run` in local mode (a fresh DSTACK_HOME each time this bench starts).

Prints each run's wall time and the time its jobs spent on their environment (the helper's
"ready in N s" line: from its start to the script's exec), and second/first. Baseline in the same run:
the same two runs with the cache off (`DSTACK_ENV_CACHE_SIZE=0`: a fresh venv per job, as before
the cache). Needs PyPI the first time (pip's own cache makes later installs faster: the cached
runs go first, so the baseline gets the warmer pip cache).

Usage: python -m bench.env_cache
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKFLOWS = """
workflows:
  - name: download
    help: "Downloads the training data"
    provider: python
    file: download.py
    requirements: requirements.txt
    artifacts: ["data"]

  - name: train
    help: "Trains a model and saves the checkpoints"
    depends-on: [download]
    provider: python
    file: train.py
    requirements: requirements.txt
    artifacts: ["model"]
"""
DOWNLOAD = """
import os
import numpy as np

rng = np.random.default_rng(0)
x = rng.uniform(0, 1, size=(10_000, 8))
y = x @ np.arange(1, 9) + 0.5 + rng.normal(0, 0.01, size=10_000)
os.makedirs("data", exist_ok=True)
np.savez("data/train.npz", x=x, y=y)
print("saved data/train.npz", x.shape)
"""
TRAIN = """
import os
import numpy as np

d = np.load("data/train.npz")
x = np.hstack([d["x"], np.ones((len(d["x"]), 1))])
w, *_ = np.linalg.lstsq(x, d["y"], rcond=None)
os.makedirs("model", exist_ok=True)
np.save("model/weights.npy", w)
print("weights", np.round(w, 2))
"""
READY = re.compile(r"^(?:(\S+) \| )?dstack: (?:reusing environment .*|environment .*)ready in ([\d.]+) s", re.M)


def write_project(root: Path) -> Path:
    (root / ".dstack").mkdir(parents=True)
    (root / ".dstack" / "workflows.yaml").write_text(WORKFLOWS.lstrip())
    (root / "download.py").write_text(textwrap.dedent(DOWNLOAD).lstrip())
    (root / "train.py").write_text(textwrap.dedent(TRAIN).lstrip())
    (root / "requirements.txt").write_text("numpy\n")
    return root


def run_twice(tmp: Path, label: str, extra_env: dict[str, str]) -> list[tuple[float, float]]:
    home = tmp / f"home-{label}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
    env |= {"DSTACK_HOME": str(home), "DSTACK_RUNTIME": "host", **extra_env}
    project = write_project(tmp / f"project-{label}")
    results = []
    try:
        for i in (1, 2):
            t0 = time.monotonic()
            r = subprocess.run(
                [sys.executable, "-m", "dstack.cli", "run", "train"],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
            )
            wall = time.monotonic() - t0
            if r.returncode != 0:
                raise SystemExit(f"{label} run {i} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            ready = {job: float(s) for job, s in READY.findall(r.stdout)}
            env_s = sum(ready.values())
            for line in r.stdout.splitlines():
                if "dstack: installing" in line or "dstack: reusing" in line:
                    print(f"  {label} run {i}: {line.strip()}")
            jobs = ", ".join(f"{job} {s:.2f} s" for job, s in ready.items())
            print(f"{label} run {i}: wall {wall:.2f} s; environment {env_s:.2f} s ({jobs})")
            results.append((wall, env_s))
    finally:
        subprocess.run([sys.executable, "-m", "dstack.cli", "local", "stop"], env=env, capture_output=True, cwd=tmp)
    return results


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dstack-bench-envs-"))
    os.chdir(REPO)  # `python -m dstack.cli` from this checkout
    cached = run_twice(tmp, "cache", {})
    baseline = run_twice(tmp, "no-cache", {"DSTACK_ENV_CACHE_SIZE": "0"})
    for label, ((w1, e1), (w2, e2)) in (("cache", cached), ("no-cache", baseline)):
        print(
            f"{label}: second/first wall {w2:.2f}/{w1:.2f} s = {w2 / w1:.2f};"
            f" environment {e2:.2f}/{e1:.2f} s = {e2 / e1 if e1 else float('nan'):.3f}"
        )
    print(
        f"target: the second cached run spends under 1 s on its environment: {'met' if cached[1][1] < 1 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
