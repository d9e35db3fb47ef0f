"""The environment cache's helper (agent/env_helper.py), run as the jobs run it: a real interpreter, real
venvs and pip (installing a wheel made here, with no network), real concurrent processes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstack.agent import env_helper
from dstack.agent.envcache import CONTAINER_CACHE, CONTAINER_HELPER, HELPER, EnvCache, parse_size
from dstack.agent.runtimes.base import RuntimeJob
from dstack.agent.runtimes.docker import DockerOptions, container_config
from tests.conftest import wait_for
from tests.tinywheel import build_wheel, offline_requirements

SCRIPT = "import sys, tinypkg\nprint('value', tinypkg.VALUE, 'prefix', sys.prefix, 'args', sys.argv[1:])\n"
# A job that runs until the test lets it end (by creating the file named as its argument).
HOLDER = (
    "import os, sys, time, tinypkg\nprint('holding', flush=True)\n"
    "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.02)\n"
)
GIB = 1 << 30


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A job folder: two scripts, a wheel, and requirements a.txt / b.txt / c.txt that install it."""
    p = tmp_path / "job"
    build_wheel(p / "wheels")
    (p / "script.py").write_text(SCRIPT)
    (p / "holder.py").write_text(HOLDER)
    for extra in ("a", "b", "c", "d"):  # different contents, so different environments
        (p / f"{extra}.txt").write_text(offline_requirements("wheels", "tinypkg") + f"# variant {extra}\n")
    return p


def helper_env(cache: Path, max_bytes: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSTACK_", "VIRTUAL_ENV", "PIP_"))}
    return env | {"DSTACK_ENV_CACHE": str(cache), "DSTACK_ENV_CACHE_MAX_BYTES": str(max_bytes)}


def helper_argv(requirements: str, *script: str, python: str = sys.executable) -> list[str]:
    return [python, str(HELPER), "--requirements", requirements, "--", *script]


def run_helper(
    project: Path, cache: Path, requirements: str, max_bytes: int = GIB, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        helper_argv(requirements, "script.py", "x", "y z", python=python),
        cwd=project,
        env=helper_env(cache, max_bytes),
        capture_output=True,
        text=True,
        # A hang guard, not a speed limit: a venv plus pip is seconds alone but took over 300 s on a
        # 2-core machine while a 5,000-agent load generator and the suite ran beside it.
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "value 42" in r.stdout and "args ['x', 'y z']" in r.stdout, r.stdout
    return r


def key(project: Path, requirements: str, python: str = sys.executable, scope: str = "") -> str:
    env = helper_env(project / "unused", GIB) | {"DSTACK_ENV_SCOPE": scope}
    out = subprocess.run(
        [python, str(HELPER), "--requirements", requirements, "--key"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip()


def envs(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.is_dir()} if cache.exists() else set()


def evicted(output: str) -> set[str]:
    return set(re.findall(r"^dstack: evicted environment (\w+)", output, re.M))


def name_of(project: Path, requirements: str) -> str:
    return key(project, requirements)[: env_helper.KEY_CHARS]


class Holder:
    """A job that runs in its environment (and so holds its lock) until released."""

    def __init__(self, project: Path, cache: Path, requirements: str, max_bytes: int) -> None:
        self.release_file = project / f"release-{requirements}"
        self.proc = subprocess.Popen(
            helper_argv(requirements, "holder.py", str(self.release_file)),
            cwd=project,
            env=helper_env(cache, max_bytes),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # returns once the job's script runs
            if line.startswith("holding"):
                break
        else:
            raise AssertionError(f"the holder ended first (code {self.proc.wait()})")

    def release(self) -> None:
        self.release_file.touch()
        assert self.proc.wait(60) == 0


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for h in started:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait()


def test_the_key_follows_the_requirements_content_and_the_interpreter(project: Path, tmp_path: Path) -> None:
    base = key(project, "a.txt")
    assert key(project, "a.txt") == base
    assert key(project, "b.txt") != base  # one comment apart
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "req.txt").write_bytes((project / "a.txt").read_bytes())
    assert key(moved, "req.txt") == base  # the content counts, not where the file is
    assert key(project, "a.txt", scope="sha256:image-2") != base  # another container image
    # Another interpreter: a venv's python sees other site-packages than its base.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "other")], check=True)
    assert key(project, "a.txt", python=str(tmp_path / "other" / "bin" / "python")) != base


def test_an_included_requirements_file_is_part_of_the_key(project: Path) -> None:
    (project / "inc.txt").write_text("tinypkg\n")
    (project / "top.txt").write_text("--no-index\n--find-links wheels\n-r inc.txt\n")
    before = key(project, "top.txt")
    (project / "inc.txt").write_text("tinypkg==1.0\n")
    assert key(project, "top.txt") != before


def test_two_concurrent_creators_make_it_once_and_both_use_it(project: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            helper_argv("a.txt", "script.py", "x", "y z"),
            cwd=project,
            env=helper_env(cache, GIB),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    name = name_of(project, "a.txt")
    (created,) = (o for o in outs if "installing requirements" in o)
    assert f"dstack: installing requirements (1 packages) into a new environment {name}" in created
    assert "Successfully installed tinypkg-1.0" in created  # pip's own output is in the job's log
    assert sum(f"dstack: reusing environment {name} (created " in o for o in outs) == 1, outs
    assert all(f"prefix {cache / name} " in o for o in outs), outs
    assert envs(cache) == {name}
    marker = json.loads((cache / name / env_helper.MARKER).read_text())
    assert marker["size"] > 0 and marker["key"].startswith(name)
    later = run_helper(project, cache, "a.txt")
    assert f"reusing environment {name}" in later.stdout and "pip" not in later.stdout.lower()


def test_a_half_created_environment_is_detected_and_rebuilt(project: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    name = name_of(project, "a.txt")
    creator = subprocess.Popen(
        helper_argv("a.txt", "script.py"),
        cwd=project,
        env=helper_env(cache, GIB),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Killed (with its venv and pip) once the venv has a python, long before pip is done.
    wait_for(lambda: (cache / name / "bin" / "python").exists(), timeout=120, interval=0.01, what="the venv")
    os.killpg(creator.pid, signal.SIGKILL)
    creator.wait()
    assert not (cache / name / env_helper.MARKER).exists()
    r = run_helper(project, cache, "a.txt")
    assert f"environment {name} was left half-created" in r.stdout
    assert "installing requirements" in r.stdout
    assert f"reusing environment {name}" in run_helper(project, cache, "a.txt").stdout


def test_eviction_takes_the_least_recently_used_and_never_one_in_use_or_being_created(
    project: Path, tmp_path: Path, holders: list[Holder]
) -> None:
    # Every job evicts down to its own bound, whether it made its environment or reused it (env_helper.run), so
    # three environments made once show all of it; the rest are reuses, which cost no venv and no pip.
    cache = tmp_path / "cache"
    for requirements in ("a.txt", "b.txt", "c.txt"):
        run_helper(project, cache, requirements)
    a, b, c = (name_of(project, f"{x}.txt") for x in "abc")
    size = json.loads((cache / a / env_helper.MARKER).read_text())["size"]
    assert envs(cache) == {a, b, c}
    # Reusing refreshes the last use: after a runs again, b is the least recently used, then c, then a.
    assert evicted(run_helper(project, cache, "a.txt").stdout) == set()
    # Room for two: c's job evicts one environment, the least recently used: b (a, if its reuse were not counted).
    room_for_two = size * 2 + size // 4
    r = run_helper(project, cache, "c.txt", max_bytes=room_for_two)
    assert f"reusing environment {c}" in r.stdout
    assert evicted(r.stdout) == {b}
    assert envs(cache) == {a, c}
    # c is in use (its job runs). e is being created: its creator's exclusive lock, held the way a creating job
    # holds it, over a half-made folder (no marker yet) that is older than every other entry.
    holders.append(Holder(project, cache, "c.txt", GIB))
    e = "e" * env_helper.KEY_CHARS  # the name of some environment (a prefix of its key)
    (cache / e).mkdir()
    os.utime(cache / e, (1, 1))
    with open(cache / f"{e}.lock", "w") as creating:
        fcntl.flock(creating, fcntl.LOCK_EX)
        # A bound below one environment: a's job would evict every other environment, and may evict none.
        r = run_helper(project, cache, "a.txt", max_bytes=1)
        assert evicted(r.stdout) == set()
        assert "the rest is in use" in r.stdout
        assert envs(cache) == {a, c, e}
    holders[0].release()


def test_a_bound_of_zero_makes_a_fresh_venv_in_the_job_folder(project: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for _ in range(2):
        r = run_helper(project, cache, "a.txt", max_bytes=0)
        assert "installing requirements (1 packages) into a new environment .dstack-venv" in r.stdout
        assert "reusing" not in r.stdout
        assert f"prefix {project / '.dstack-venv'} " in r.stdout
    assert envs(cache) == set()


def test_a_failing_install_fails_the_job_with_pips_code_and_leaves_nothing(project: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (project / "bad.txt").write_text(offline_requirements("wheels", "no-such-package"))
    r = subprocess.run(
        helper_argv("bad.txt", "script.py"), cwd=project, env=helper_env(cache, GIB), capture_output=True, text=True
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "dstack: pip install failed (exit code 1)" in r.stdout
    assert envs(cache) == set()


def test_the_script_gets_signals_and_its_exit_code(project: Path, tmp_path: Path) -> None:
    (project / "exits.py").write_text("import sys, tinypkg\nsys.exit(int(sys.argv[1]))\n")
    r = subprocess.run(
        helper_argv("a.txt", "exits.py", "7"), cwd=project, env=helper_env(tmp_path / "cache", GIB), text=True
    )
    assert r.returncode == 7
    h = Holder(project, tmp_path / "cache", "a.txt", GIB)
    h.proc.send_signal(signal.SIGTERM)  # the helper exec'd: the signal reaches the script itself
    assert h.proc.wait(30) == -signal.SIGTERM


PY38 = Path("/root/.pyenv/versions/3.8.18/bin/python3.8")


@pytest.mark.skipif(not PY38.exists(), reason="no Python 3.8 here")
def test_the_helper_runs_on_python_3_8(project: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = run_helper(project, cache, "a.txt", python=str(PY38))
    assert "installing requirements" in r.stdout
    assert "reusing environment" in run_helper(project, cache, "a.txt", python=str(PY38)).stdout
    assert key(project, "a.txt", python=str(PY38)) != key(project, "a.txt")


def test_the_packages_counted_are_the_requirement_lines(tmp_path: Path) -> None:
    req = tmp_path / "r.txt"
    req.write_text("# data tools\n--no-index\n-f wheels\nnumpy>=1.26  # arrays\n\n-e ./mylib\npandas\n-r more.txt\n")
    assert env_helper.count_requirements(str(req)) == 3


@pytest.mark.parametrize(
    ("text", "size"),
    [("20GiB", 20 << 30), ("500MB", 500_000_000), ("1.5G", 1_500_000_000), ("0", 0), ("123", 123), ("64kib", 65536)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "20iB", "5 PB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_containers_of_python_jobs_get_the_cache_at_a_fixed_path_and_the_helper_read_only() -> None:
    cache = EnvCache(Path("/agent/envs"), 5 << 30)
    python_job = RuntimeJob(job_id="j1", workdir=Path("/agent/jobs/j1"), working_dir=".", commands=["x"], env={})
    python_job.provider = "python"
    cfg = container_config(python_job, DockerOptions(), "py:3", "/agent", cache, "sha256:abc")
    assert cfg["volumes"] == {
        "/agent/jobs/j1": {"bind": "/workflow", "mode": "rw"},
        "/agent/envs": {"bind": CONTAINER_CACHE, "mode": "rw"},
        str(HELPER): {"bind": CONTAINER_HELPER, "mode": "ro"},
    }
    env = cfg["environment"]
    assert env["DSTACK_ENV_CACHE"] == CONTAINER_CACHE and env["DSTACK_ENV_HELPER"] == CONTAINER_HELPER
    assert env["DSTACK_ENV_CACHE_MAX_BYTES"] == str(5 << 30)
    assert env["DSTACK_ENV_SCOPE"] == "sha256:abc"  # the image's id: another image, another environment
    python_job.provider = "bash"  # other providers' containers see nothing of it
    other = container_config(python_job, DockerOptions(), "py:3", "/agent", cache, "sha256:abc")
    assert list(other["volumes"]) == ["/agent/jobs/j1"]
    assert not any(k.startswith("DSTACK_ENV") for k in other["environment"])


def test_host_jobs_of_the_python_provider_are_told_where_the_cache_is(tmp_path: Path) -> None:
    env = EnvCache(tmp_path / "envs", 7).host_env()
    assert env == {
        "DSTACK_ENV_HELPER": str(HELPER),
        "DSTACK_ENV_CACHE": str(tmp_path / "envs"),
        "DSTACK_ENV_CACHE_MAX_BYTES": "7",
    }
    assert HELPER.is_file()
