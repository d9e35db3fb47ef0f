from __future__ import annotations

from dstack.coordinator.scheduler import GIB, AgentState, Gpu, JobRequest, schedule


def agent(
    name: str, gpus: int = 0, gpu_name: str = "NVIDIA A100-SXM4-80GB", cpu: float = 64, mem_gib: int = 512
) -> AgentState:
    return AgentState(
        agent_id=name,
        name=name,
        cpu_total=cpu,
        memory_total=mem_gib * GIB,
        gpus=[Gpu(i, gpu_name, 80 * GIB) for i in range(gpus)],
        max_jobs=100,
    )


def test_eight_one_gpu_jobs_get_eight_different_gpus() -> None:
    a = agent("h1", gpus=8)
    d = schedule([JobRequest(f"j{i}", gpu_count=1) for i in range(8)], [a])
    assert len(d.placements) == 8
    assert sorted(g for _, _, gpus in d.placements for g in gpus) == list(range(8))


def test_four_gpu_job_waits_while_three_are_free() -> None:
    a = agent("h1", gpus=8)
    a.busy_gpus = {0, 1, 2, 3, 4}
    d = schedule([JobRequest("big", gpu_count=4)], [a])
    assert not d.placements
    assert "4 GPUs free on no agent" in d.waiting["big"]
    assert "h1 (5/8 GPUs)" in d.waiting["big"]
    a.busy_gpus = {0, 1, 2, 3}
    d = schedule([JobRequest("big", gpu_count=4)], [a])
    assert d.placements == [("big", "h1", [4, 5, 6, 7])]


def test_gpu_name_matches_case_insensitively_and_never_lands_elsewhere() -> None:
    a100, h100 = agent("a", gpus=8), agent("h", gpus=8, gpu_name="NVIDIA H100 80GB HBM3")
    d = schedule([JobRequest("j", gpu_count=1, gpu_name="h100")], [a100, h100])
    assert d.placements[0][1] == "h"
    d = schedule([JobRequest("j", gpu_count=1, gpu_name="H100")], [agent("a", gpus=8)])
    assert not d.placements
    assert "needs 1 x H100" in d.impossible["j"]
    assert "NVIDIA A100-SXM4-80GB" in d.impossible["j"]


def test_gpu_memory_is_a_minimum_per_gpu() -> None:
    d = schedule([JobRequest("j", gpu_count=1, gpu_memory=100 * GIB)], [agent("a", gpus=1)])
    assert "j" in d.impossible


def test_impossible_request_says_what_the_largest_agent_has() -> None:
    d = schedule([JobRequest("j", gpu_count=1)], [agent("cpu-only")])
    assert d.impossible["j"] == "needs 1 GPU; the largest agent has 0 GPUs"
    d = schedule([JobRequest("j", cpu=128)], [agent("x", cpu=16)])
    assert d.impossible["j"] == "needs 128 CPU; the largest agent has 16 CPU"


def test_best_fit_keeps_a_whole_host_free_for_a_big_job() -> None:
    h1, h2 = agent("h1", gpus=8), agent("h2", gpus=8)
    h1.busy_gpus = {0}
    jobs = [JobRequest("small", gpu_count=1), JobRequest("big", gpu_count=8)]
    d = schedule(jobs, [h1, h2])
    placed = {j: a for j, a, _ in d.placements}
    assert placed == {"small": "h1", "big": "h2"}


def test_cpu_jobs_prefer_hosts_without_free_gpus() -> None:
    gpu_host, cpu_host = agent("gpu", gpus=8), agent("cpu")
    d = schedule([JobRequest("c", cpu=1)], [gpu_host, cpu_host])
    assert d.placements[0][1] == "cpu"


def test_no_agents_means_waiting() -> None:
    d = schedule([JobRequest("j")], [])
    assert d.waiting == {"j": "waiting: no agent is online"}


def test_job_slots_limit_concurrency() -> None:
    a = agent("a")
    a.max_jobs = 2
    d = schedule([JobRequest(f"j{i}") for i in range(3)], [a])
    assert len(d.placements) == 2 and "j2" in d.waiting


def test_reason_grammar_for_one_gpu() -> None:
    d = schedule([JobRequest("j", gpu_count=2)], [agent("h", gpus=1)])
    assert d.impossible["j"] == "needs 2 GPUs; the largest agent has 1 GPU"


def test_container_jobs_go_only_to_docker_agents() -> None:
    host, box = agent("host"), agent("box")
    box.containers = True
    d = schedule([JobRequest("c", needs_container=True), JobRequest("any")], [host, box])
    placed = dict((j, a) for j, a, _ in d.placements)
    assert placed["c"] == "box"
    d = schedule([JobRequest("c", needs_container=True)], [agent("host")])
    assert d.impossible["c"] == "needs an agent with the docker runtime; every agent runs host processes"
