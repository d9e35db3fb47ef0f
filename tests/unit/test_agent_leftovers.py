"""What an agent's start removes of a killed predecessor's files (agent/connection.py `run`): its jobs'
folders (agent/runner.py `set_aside_job_folders`) and its unfinished code downloads (agent/code.py
`CodeCache.remove_partial`); and what it keeps: the job user's environment cache and the finished code."""

from __future__ import annotations

from pathlib import Path

from dstack.agent.code import CodeCache
from dstack.agent.jobuser import ENVS
from dstack.agent.runner import SET_ASIDE_PREFIX, _remove_all, set_aside_job_folders
from dstack.storage.transfer import Transfer


def test_a_predecessors_job_folders_are_set_aside_whole_and_the_environment_cache_stays(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    (jobs / ENVS / "env-1").mkdir(parents=True)
    (jobs / "job-a" / "sub").mkdir(parents=True)
    (jobs / "job-a" / "sub" / "big.bin").write_bytes(b"x" * 1000)
    (jobs / "job-b.mounts").mkdir()
    (jobs / "job-a" / "escape").symlink_to(tmp_path / "outside")  # a job's link out: never followed
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("not the job's")
    (jobs / (SET_ASIDE_PREFIX + "old")).mkdir()  # an earlier start's, not removed yet (killed too)
    aside = set_aside_job_folders(jobs)
    assert sorted(p.name for p in jobs.iterdir() if p.name not in {a.name for a in aside}) == [ENVS]
    assert len(aside) == 2 and all(a.parent == jobs and a.name.startswith(SET_ASIDE_PREFIX) for a in aside)
    new = next(a for a in aside if a.name != SET_ASIDE_PREFIX + "old")
    assert sorted(p.name for p in new.iterdir()) == ["job-a", "job-b.mounts"]
    _remove_all(aside)  # what the Janitor runs
    assert [p.name for p in jobs.iterdir()] == [ENVS] and (jobs / ENVS / "env-1").is_dir()
    assert (tmp_path / "outside" / "keep").read_text() == "not the job's"
    # A resent job reuses its folder's name at once: nothing of the old one is in it.
    assert not (jobs / "job-a").exists()
    assert set_aside_job_folders(jobs) == [] and set_aside_job_folders(tmp_path / "none") == []


def test_unfinished_code_downloads_go_and_the_cached_code_stays(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    kept = ["0a1b.tar.gz", "ffee.tar.gz"]
    partial = [".part-k2j3h4", ".0a1c.tar.gz.1f2e3d4c.part"]
    for name in kept + partial:
        (code / name).write_bytes(b"data")
    cache = CodeCache(code, None, list, Transfer())  # type: ignore[arg-type]
    assert cache.remove_partial() == 2
    assert sorted(p.name for p in code.iterdir()) == kept
    assert CodeCache(tmp_path / "missing", None, list, Transfer()).remove_partial() == 0  # type: ignore[arg-type]
