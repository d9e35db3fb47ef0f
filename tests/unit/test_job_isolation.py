"""What of the agent a Docker job sees: of the agent's home only the job's own folder and the shared
Python environment cache are mounted (never its credential, its code cache or other jobs), and the
job's secrets go to the engine's API, not into any command line."""

from __future__ import annotations

from pathlib import Path

from dstack.agent.config import AgentConfig
from dstack.agent.jobuser import JobUser
from dstack.agent.runtimes.base import RuntimeJob
from dstack.agent.runtimes.docker import DockerOptions, container_config

SECRET = "hf-token-5e2b9c1d7a"


def test_a_container_gets_no_part_of_the_agents_home_but_its_own_folder_and_the_env_cache() -> None:
    config = AgentConfig(coordinator="c:1", home=Path("/var/lib/dstack/agent"))
    job = RuntimeJob(
        job_id="j1",
        workdir=config.jobs_dir / "j1",
        working_dir=".",
        commands=["python train.py"],
        env={"HF_TOKEN": SECRET},
        provider="python",
    )
    cfg = container_config(job, DockerOptions(), "python:3.11-slim", str(config.home), config.env_cache)
    in_home = {src for src in cfg["volumes"] if Path(src).is_relative_to(config.home)}
    # The env cache is shared by the agent's Python jobs (containers run as root): see docs/architecture.md.
    assert in_home == {str(job.workdir), str(config.env_cache.folder)}
    assert all(SECRET not in part for part in cfg["entrypoint"])
    assert cfg["environment"]["HF_TOKEN"] == SECRET


def test_with_a_job_user_the_jobs_and_their_env_cache_live_outside_the_home() -> None:
    config = AgentConfig(
        coordinator="c:1", home=Path("/var/lib/dstack/agent"), job_user=JobUser("dstack-job", 999, 999)
    )
    assert config.jobs_dir == Path("/var/lib/dstack/agent-jobs")
    assert config.env_cache.folder == Path("/var/lib/dstack/agent-jobs/.envs")
    assert config.credentials_path == Path("/var/lib/dstack/agent/agent.json")
