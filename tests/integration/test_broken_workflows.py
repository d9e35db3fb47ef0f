"""The corpus of broken workflow files (tests/corpus/*.yaml), run through the real CLI.

Each file starts with `# expect: LINE MESSAGE` and `# run: WORKFLOW`. The CLI must exit 2, name the
file and line, say MESSAGE, print no traceback, and start nothing (the coordinator address given is
unreachable: an error found before connecting is the only way to pass)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
CASES = sorted(CORPUS.glob("*.yaml"))


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_broken_workflow(case: Path, tmp_path: Path) -> None:
    header = case.read_text().splitlines()[:2]
    line, message = header[0].removeprefix("# expect: ").split(" ", 1)
    target = header[1].removeprefix("# run: ")
    (tmp_path / ".dstack").mkdir()
    shutil.copy(case, tmp_path / ".dstack" / "workflows.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
    env.update(DSTACK_HOME=str(tmp_path / "home"), DSTACK_COORDINATOR="127.0.0.1:1", DSTACK_TOKEN="x")
    r = subprocess.run(
        [sys.executable, "-m", "dstack.cli", "run", target],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert f"workflows.yaml:{line}:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
