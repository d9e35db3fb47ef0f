"""The corpus files whose bash/python workflows need no network and no GPU run to `done`, unchanged, in local mode
(host runtime), with the real scripts of their repositories at the same commit (tests/corpus2022/companions/files,
copied byte for byte from the repository at the commit of sources.json).

Which workflows qualify, of those `dstack validate` accepts (tests/unit/test_corpus2022.py):
- dstackai/dstack-examples f8c6f11 (corpus 014-025, one project of twelve files, as at that commit): `print-args`
  (015), `hello-txt` and `hello-sh` (016), `cat-txt` (tag of a hello-txt run) and `cat-txt-2` (last hello-txt run)
  (018), `hello-env` (020), `hello` (021), `hello-py` and `python-version` (023), `local-hello` (024);
- dstackai/dstack 48cf9a5 (026): `hello`, a python provider `file:`.

Those that do not, and why:
- pip from PyPI (network): every mnist/catboost/gluemrpc workflow (004-013, 022, 071-073, 080-162), `hello-pandas`
  (023), the apps of 014 (`pip install fastapi uvicorn`, streamlit, gradio: they serve `$PORT_0`), 031-035
  (TRecover: apt, git clone and pip, then peers on the internet), `read_data` (039-045), and 144 (its provider's
  commands `pip3 install dstack`); their 2022 fields run in tests/integration/test_fields2022.py with offline
  wheels instead;
- a GPU: `gpu-v100`, `gpu-default`, `gpu-i` (024), 030, 037, 038, the `*-gpu` workflows, 001-003 and 159 (the
  early-2022 syntax in a TensorFlow GPU image), 027-029 (gpt-2: pip, a model download, then a GPU);
- a 64 GB host: `mem-64gb` (024); shared memory of 16 GB, a container setting: `shm-size` (024);
- conda or Hugging Face downloads (network): 017, 075-079 (`conda create` into an absolute artifact path) and 025
  (stable diffusion weights, and a GPU);
- an image pulled from a registry (network): 046 (`docker`, ubuntu), 047-063 and 068-070 (their providers'
  images, `python:3.9`, and `pip3 install` of torch);
- another repository's runs: `cat-txt-3` (018, `dstackai/dstack/hello-txt`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import LocalMode, search

pytestmark = pytest.mark.integration
CORPUS = Path(__file__).resolve().parents[1] / "corpus2022"
FILES = CORPUS / "companions" / "files"


def corpus_project(root: Path, commit_files: str, numbers: list[str], leave_out: tuple[str, ...] = ()) -> Path:
    entries = {e["file"][:3]: e for e in json.loads((CORPUS / "sources.json").read_text())}
    for number in numbers:
        entry = entries[number]
        target = root / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CORPUS / entry["file"], target)
        for path, companion in entry["companions"].items():
            if path in leave_out:
                continue
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(CORPUS / companion, root / path)
    shutil.copytree(FILES / commit_files, root, dirs_exist_ok=True)
    return root


def python_on_path(local: LocalMode, tmp_path: Path) -> None:
    """2022's bash provider ran in an image with `python` on PATH; this host may only have `python3`."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "python").symlink_to(sys.executable)
    local.extra_env["PATH"] = f"{shim}:{os.environ['PATH']}"


def _ok(r: object) -> str:
    out = f"{getattr(r, 'stdout', '')[-3000:]}\n{getattr(r, 'stderr', '')[-3000:]}"
    assert getattr(r, "returncode", 1) == 0, out
    return out


# hello-sh takes 101 s by design: .ci/run leaves it to `pytest -m long` and runs the other ten.
@pytest.mark.parametrize("with_hello_sh", [pytest.param(True, marks=pytest.mark.long), False])
def test_dstack_examples_december_2022_run_to_done(local: LocalMode, tmp_path: Path, with_hello_sh: bool) -> None:
    project = corpus_project(tmp_path / "p", "dstackai_dstack-examples_f8c6f11", [f"{n:03d}" for n in range(14, 26)])
    python_on_path(local, tmp_path)
    # The whole project as it was at that commit (twelve files, every 2022 form of the official examples).
    v = local.cli("validate", cwd=project)
    assert v.returncode == 0 and "0 with errors" not in v.stdout, v.stdout + v.stderr
    # hello-sh writes a file a second for 101 s (its point: artifacts saved while it runs): started first, detached.
    hello_sh = ""
    if with_hello_sh:
        sh = local.cli("run", "-d", "hello-sh", cwd=project, timeout=300)
        _ok(sh)
        hello_sh = sh.stdout.strip()
    out = _ok(local.cli("run", "hello", cwd=project, timeout=300))
    assert "Hello, world!" in out
    out = _ok(local.cli("run", "local-hello", cwd=project, timeout=300))
    assert "Hello, world!" in out and "resources.local" in out  # the note: where runs go is the coordinator's
    out = _ok(local.cli("run", "print-args", "a", "--b", "c", cwd=project, timeout=300))
    assert "['args/print-args.py', 'a', '--b', 'c']" in out
    out = _ok(local.cli("run", "hello-env", cwd=project, timeout=300))
    assert "DSTACK_ENV_1=VAL1" in out and "DSTACK_ENV_2=VAL2" in out and search(r"(?m)^DSTACK_ENV_3=$", out)
    out = _ok(local.cli("run", "hello-py", cwd=project, timeout=300))
    assert "Hello, world!" in out
    out = _ok(local.cli("run", "python-version", cwd=project, timeout=300))
    assert search(r"Python 3\.\d+", out)
    out = _ok(local.cli("run", "-t", "txt-file", "hello-txt", cwd=project, timeout=300))
    out = _ok(local.cli("run", "cat-txt", cwd=project, timeout=300))
    assert "Hello world" in out
    out = _ok(local.cli("run", "cat-txt-2", cwd=project, timeout=300))
    assert "Hello world" in out
    if not hello_sh:
        return
    logs = _ok(local.cli("logs", hello_sh, "-f", cwd=project, timeout=400))
    assert "Wrote output/100.txt" in logs
    ps = local.cli("ps", "-a", "--json", cwd=project)
    statuses = {r["workflow"]: r["status"] for r in json.loads(ps.stdout)}
    assert statuses["hello-sh"] == "done", statuses
    files = local.cli("artifacts", "list", hello_sh, "--json", cwd=project)
    _ok(files)
    paths = {a["path"] for a in json.loads(files.stdout)}
    assert "output/100.txt" in paths and "output/000.txt" in paths, sorted(paths)[:5]


def test_dstack_july_2022_python_file_runs_to_done(local: LocalMode, tmp_path: Path) -> None:
    # dstack's own .dstack/providers.yaml of that commit defined its built-in providers by their program in
    # dstack's tree (`pip3 install -r providers/python/requirements.txt`, ...), which the corpus does not hold.
    # It stays in the project: a bare built-in name means the built-in (docs/workflows-2022.md, "Custom
    # providers"), and the shadowed entry is named in a note.
    project = corpus_project(tmp_path / "p", "dstackai_dstack_48cf9a5", ["026"])
    assert (project / ".dstack" / "providers.yaml").is_file()
    r = local.cli("run", "hello", cwd=project, timeout=300)
    _ok(r)
    assert "the project's provider 'python' is shadowed by the built-in provider of that name" in r.stderr
    run = search(r"(\S+) submitted", r.stderr).group(1)
    files = local.cli("artifacts", "list", run, "--json", cwd=project)
    _ok(files)
    assert any(a["path"] == "output/hello.txt" for a in json.loads(files.stdout))
