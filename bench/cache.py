"""The step cache: the seed's download -> train chain (/work/shared/seed/workflows.md), `cache: true` on
download, run through `dstack run train` against a real coordinator and one host agent.

Each round makes a tree the cache has never seen (a `round.txt` of its own), then runs the chain three times:
  first            the tree is new: download and train both run (and download's key is recorded)
  second, cached   the same tree: download is reused ("download: reused from ..."), train runs
  second, uncached the same tree with `--no-cache`: both run again (the baseline, measured in the same run)
and prints the median wall time of each over the rounds, and cached/uncached.

download writes `--mib` MiB of pseudo-random data (generated, not fetched: no network here), then sleeps
`--fetch-s` seconds to stand for the fetch itself (0 by default: what is measured is then dstack's own
cost of a job, its code, its upload and its dependant's download); train reads it and writes a checksum.

Usage: python -m bench.cache [--rounds 3] [--mib 64] [--fetch-s 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench._harness import REPO, Services

WORKFLOWS = """
workflows:
  - name: download
    help: "Downloads the training data"
    provider: python
    file: "download.py"
    artifacts: ["data"]
    cache: true

  - name: train
    help: "Trains a model and saves the checkpoints"
    depends-on:
      - download
    provider: python
    file: "train.py"
    artifacts: ["model"]
"""
DOWNLOAD = """
import os, random, time
mib = int(os.environ.get("MIB", "64"))
time.sleep(float(os.environ.get("FETCH_S", "0")))
os.makedirs("data", exist_ok=True)
rng = random.Random(open("round.txt").read())
with open("data/train.bin", "wb") as f:
    for _ in range(mib):
        f.write(rng.randbytes(1 << 20))
print("downloaded", mib, "MiB")
"""
TRAIN = """
import hashlib, os
h = hashlib.sha256()
with open("data/train.bin", "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
os.makedirs("model", exist_ok=True)
open("model/checksum.txt", "w").write(h.hexdigest())
print("trained on", h.hexdigest()[:12])
"""


def project(root: Path, mib: int, fetch_s: float) -> Path:
    (root / ".dstack").mkdir(parents=True, exist_ok=True)
    (root / ".dstack" / "workflows.yaml").write_text(WORKFLOWS)
    (root / ".dstack" / "variables.yaml").write_text(
        textwrap.dedent(f"""
        variables:
          download:
            mib: {mib}
            fetch-s: {fetch_s}
        """)
    )
    (root / "download.py").write_text(DOWNLOAD)
    (root / "train.py").write_text(TRAIN)
    return root


def run_chain(env: dict[str, str], cwd: Path, *extra: str) -> tuple[float, str]:
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "dstack.cli", "run", "train", *extra], cwd=cwd, env=env, capture_output=True, text=True
    )
    took = time.monotonic() - started
    if r.returncode != 0:
        raise RuntimeError(f"dstack run train {' '.join(extra)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return took, r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=64, help="MiB download writes (default 64)")
    ap.add_argument("--fetch-s", type=float, default=0.0, help="seconds download sleeps for its fetch (default 0)")
    args = ap.parse_args()

    services = Services()
    try:
        services.start_coordinator()
        services.start_agent("a1", "--runtime", "host", "--job-user", "none")
        services.wait_agents(1)
        root = project(services.tmp / "project", args.mib, args.fetch_s)
        env = {**os.environ, **services.cli_env(), "DSTACK_HOME": str(services.tmp / "cli-home")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        times: dict[str, list[float]] = {"first": [], "cached": [], "uncached": []}
        for i in range(args.rounds):
            (root / "round.txt").write_text(f"round {i} {time.time_ns()}\n")  # a tree the cache has not seen
            took, err = run_chain(env, root)
            assert "reused from" not in err, err
            times["first"].append(took)
            took, err = run_chain(env, root)
            assert "download: reused from" in err, f"the second run did not reuse download:\n{err}"
            times["cached"].append(took)
            took, err = run_chain(env, root, "--no-cache")
            assert "reused from" not in err, err
            times["uncached"].append(took)
            print(
                f"round {i + 1}/{args.rounds}: first {times['first'][-1]:.2f} s, second cached"
                f" {times['cached'][-1]:.2f} s, second uncached {times['uncached'][-1]:.2f} s",
                flush=True,
            )
    finally:
        services.stop()

    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    print(f"download -> train, download {args.mib} MiB (+{args.fetch_s:g} s fetch), median of {args.rounds} rounds")
    print(f"{'run':<28}{'seconds':>10}")
    print(f"{'first (nothing cached)':<28}{med['first']:>10.2f}")
    print(f"{'second, cached':<28}{med['cached']:>10.2f}")
    print(f"{'second, uncached':<28}{med['uncached']:>10.2f}")
    print(f"cached / uncached: {med['cached'] / med['uncached']:.2f}")


if __name__ == "__main__":
    main()
