"""Multi-node gangs (docs/multinode.md): placement in the pure planner (all or none, distinct agents,
GPU fit, nothing held across passes), the expansion of `resources.nodes`, the rendezvous a member
gets, the gang sweep on a real store, and the torchrun provider's command."""

from __future__ import annotations

import random
import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dstack.cli.errors import WorkflowError
from dstack.cli.workflows import load_workflows
from dstack.coordinator import gangs
from dstack.coordinator.convert import job_spec_from_proto
from dstack.coordinator.errors import InvalidRequest
from dstack.coordinator.model import JobStatus, JobUpdate, TerminationReason
from dstack.coordinator.planner import Policy, plan
from dstack.coordinator.scheduler import GIB, AgentState, Gpu, JobRequest
from dstack.coordinator.store import NewJob, Placement, Store
from dstack.protos.v1 import common_pb2


def agent(name: str, gpus: int = 0, busy: set[int] | None = None, cpu: float = 8) -> AgentState:
    return AgentState(
        agent_id=name,
        name=name,
        cpu_total=cpu,
        memory_total=64 * GIB,
        gpus=[Gpu(i, "NVIDIA H100", 80 * GIB) for i in range(gpus)],
        max_jobs=100,
        busy_gpus=set(busy or ()),
        address=f"10.0.0.{len(name)}",
    )


def gang(key: str, n: int, gpus: int = 0, owner: str = "u", at: int = 0, cpu: float = 0) -> list[JobRequest]:
    return [
        JobRequest(f"{key}-{k}", cpu=cpu, gpu_count=gpus, owner=owner, submitted_at=at, gang=key, nnodes=n, node_rank=k)
        for k in range(n)
    ]


POLICY = Policy(now_ns=10**12, fairshare=False, reserve_after_s=0.0)


def test_a_gang_is_placed_whole_on_distinct_agents() -> None:
    agents = [agent("a", gpus=8), agent("b", gpus=8), agent("c", gpus=8)]
    p = plan(gang("g", 3, gpus=4), agents, [], POLICY)
    assert sorted(j for j, _, _ in p.placements) == ["g-0", "g-1", "g-2"]
    assert len({a for _, a, _ in p.placements}) == 3  # one member per agent
    assert all(len(g) == 4 for _, _, g in p.placements)


def test_a_gang_that_does_not_fit_places_nothing_and_says_how_many_fit_now() -> None:
    agents = [agent("a", gpus=8), agent("b", gpus=8, busy={0, 1, 2, 3, 4}), agent("c", gpus=8)]
    p = plan(gang("g", 3, gpus=4), agents, [], POLICY)
    assert p.placements == []
    assert p.waiting["g-0"] == "waiting for 3 agents with 4 GPUs; 2 fit now"
    assert set(p.waiting) == {"g-0", "g-1", "g-2"}
    assert all(not a.busy_gpus or a.name == "b" for a in agents)  # nothing held on a or c


def test_one_agent_with_many_gpus_is_not_several_nodes() -> None:
    p = plan(gang("g", 2, gpus=1), [agent("big", gpus=8)], [], POLICY)
    assert p.placements == []
    assert "needs 2 agents with 1 GPU; 1 agent could ever run one" in p.impossible["g-0"]


def test_gpu_fit_counts_per_agent() -> None:
    agents = [agent("a", gpus=2), agent("b", gpus=1), agent("c", gpus=2)]
    p = plan(gang("g", 2, gpus=2), agents, [], POLICY)
    assert sorted(a for _, a, _ in p.placements) == ["a", "c"]


def test_two_gangs_competing_for_three_agents_hold_nothing_partially() -> None:
    """Each wants 2 of 3 agents: the first in order gets 2, the second waits holding none; once the
    first ends, the second gets 2. Never one agent each (which would deadlock both)."""
    agents = [agent("a"), agent("b"), agent("c")]
    first, second = gang("g1", 2, cpu=8, at=1), gang("g2", 2, cpu=8, at=2)
    p = plan([*first, *second], agents, [], POLICY)
    assert sorted(j for j, _, _ in p.placements) == ["g1-0", "g1-1"]
    assert p.waiting["g2-0"] == "waiting for 2 agents with 8 CPU; 1 fit now"
    assert not p.reservations  # no agent kept for g2 across passes
    # Next pass, g1 still running: g2 still holds nothing.
    used = {a for _, a, _ in p.placements}
    agents2 = [agent("a"), agent("b"), agent("c")]
    for a in agents2:
        if a.agent_id in used:
            a.hold(8, 0, [])
    p2 = plan(second, agents2, [], POLICY)
    assert p2.placements == [] and not p2.reservations
    # g1 ended: g2 starts whole.
    p3 = plan(second, [agent("a"), agent("b"), agent("c")], [], POLICY)
    assert len(p3.placements) == 2


def test_a_single_job_backfills_past_a_waiting_gang_but_a_gang_never_takes_part() -> None:
    agents = [agent("a"), agent("b")]
    p = plan([*gang("g", 3, cpu=8, at=1), JobRequest("solo", cpu=8, owner="u", submitted_at=2)], agents, [], POLICY)
    assert [j for j, _, _ in p.placements] == ["solo"]
    assert "g-0" in p.impossible  # 3 nodes, 2 agents: never


def test_a_gang_with_a_member_missing_from_the_queue_waits_whole() -> None:
    p = plan(gang("g", 3)[:2], [agent("a"), agent("b"), agent("c")], [], POLICY)
    assert p.placements == []
    assert "waiting for 1 of the gang's 3 nodes" in p.waiting["g-0"]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    n_agents=st.integers(1, 6),
    gpus=st.integers(0, 2),
)
def test_every_gang_is_all_or_none_on_distinct_agents(sizes: list[int], n_agents: int, gpus: int) -> None:
    agents = [agent(f"a{i}", gpus=2) for i in range(n_agents)]
    queue = [r for i, n in enumerate(sizes) for r in gang(f"g{i}", n, gpus=gpus, at=i)]
    p = plan(queue, agents, [], POLICY)
    placed: dict[str, list[str]] = {}
    for job, agent_id, _ in p.placements:
        placed.setdefault(job.rsplit("-", 1)[0], []).append(agent_id)
    for i, n in enumerate(sizes):
        got = placed.get(f"g{i}", [])
        assert len(got) in (0, n)
        assert len(set(got)) == len(got)
    for a in agents:
        assert len(a.busy_gpus) <= 2


def test_expand_makes_members_with_ranks_and_rewrites_dependencies() -> None:
    train = common_pb2.JobSpec(
        job_name="train",
        workflow="train",
        resources=common_pb2.Resources(nodes=3),
        artifacts=[common_pb2.ArtifactSpec(path="model")],
    )
    after = common_pb2.JobSpec(job_name="eval", workflow="eval", depends_on=["train"])
    out = gangs.expand([job_spec_from_proto(train), job_spec_from_proto(after)])
    assert [j.job_name for j in out] == ["train-node0", "train-node1", "train-node2", "eval"]
    assert [(j.gang, j.node_rank, j.nnodes) for j in out[:3]] == [("train", k, 3) for k in range(3)]
    assert out[3].depends_on == ("train-node0", "train-node1", "train-node2")
    specs = [common_pb2.JobSpec.FromString(j.encoded) for j in out]
    assert [len(s.artifacts) for s in specs[:3]] == [1, 0, 0]  # saved on the master node
    assert specs[1].gang == "train" and specs[1].node_rank == 1 and specs[1].nnodes == 3


def test_expand_refuses_more_nodes_than_the_limit() -> None:
    big = common_pb2.JobSpec(job_name="t", resources=common_pb2.Resources(nodes=gangs.MAX_NODES + 1))
    with pytest.raises(InvalidRequest, match="at most 64"):
        gangs.expand([job_spec_from_proto(big)])


def test_member_env_follows_torchruns_names() -> None:
    env = gangs.member_env("10.213.0.2:29517", 1, 3)
    assert env["MASTER_ADDR"] == "10.213.0.2" and env["MASTER_PORT"] == "29517"
    assert env["NODE_RANK"] == "1" and env["NNODES"] == env["WORLD_SIZE"] == "3"


def test_pick_port_avoids_ports_in_use_and_fails_when_the_range_is_full() -> None:
    used = set(range(gangs.PORT_FIRST, gangs.PORT_LAST))
    assert gangs.pick_port(used, random.Random(1)) == gangs.PORT_LAST
    with pytest.raises(RuntimeError, match="no free MASTER_PORT"):
        gangs.pick_port(used | {gangs.PORT_LAST})


# ---- the gang sweep on a real store ----------------------------------------------------------------


def _store_with_gang(tmp_path: Path, n: int = 3, retry: bool = False) -> tuple[Store, list[str], list[str]]:
    """A store with a running gang of `n` members on agents a0.. ; -> (store, job ids, agent ids)."""
    s = Store(tmp_path / "state.db")
    spec = common_pb2.JobSpec(job_name="g", workflow="g", resources=common_pb2.Resources(nodes=n))
    if retry:
        spec.retry.CopyFrom(common_pb2.RetryPolicy(limit=2, on=["agent-lost", "error"]))
    members = gangs.expand([job_spec_from_proto(spec)])
    created = s.create_run(
        "u",
        "g",
        b"",
        "",
        [],
        [NewJob(m.job_name, m.encoded, 0, 0, 0, [], gang=m.gang, node_rank=m.node_rank) for m in members],
    )
    agents = [s.register_agent(f"a{k}", f"token{k}", common_pb2.Inventory().SerializeToString()) for k in range(n)]
    s.apply_schedule([Placement(j, agents[k], [], "10.0.0.1:29500") for k, j in enumerate(created.job_ids)], [], [])
    for k, j in enumerate(created.job_ids):
        s.apply_job_updates(agents[k], [JobUpdate(j, int(JobStatus.RUNNING))])
    return s, created.job_ids, agents


def _statuses(s: Store, ids: list[str]) -> list[tuple[JobStatus, int]]:
    rows = {r[0]: (JobStatus(r[1]), r[2]) for r in s.conn.execute("SELECT id, status, attempt FROM jobs").fetchall()}
    return [rows[j] for j in ids]


def test_one_member_failing_fails_the_others_naming_the_node(tmp_path: Path) -> None:
    s, ids, ag = _store_with_gang(tmp_path)
    res = s.apply_job_updates(
        ag[1], [JobUpdate(ids[1], int(JobStatus.FAILED), TerminationReason.EXIT_CODE, "exit code 3", 3)]
    )
    assert res.gangs  # the engine runs the sweep after a member's report (only then: engine.on_message)
    settled = s.settle_gangs()
    assert sorted(settled.stops) == sorted([(ids[0], ag[0]), (ids[2], ag[2])])
    assert _statuses(s, ids) == [(JobStatus.FAILED, 1)] * 3
    msg = s.conn.execute("SELECT message, termination_reason FROM jobs WHERE id = ?", [ids[0]]).fetchone()
    assert msg[0] == "node 1 on a1 failed: exit code 3"
    assert msg[1] == TerminationReason.GANG_FAILED
    assert not s.settle_gangs().stops  # settled once


def test_a_member_done_waits_for_the_others(tmp_path: Path) -> None:
    s, ids, ag = _store_with_gang(tmp_path, n=2)
    s.apply_job_updates(ag[0], [JobUpdate(ids[0], int(JobStatus.DONE), TerminationReason.DONE)])
    assert not s.settle_gangs().stops
    assert _statuses(s, ids) == [(JobStatus.DONE, 1), (JobStatus.RUNNING, 1)]


def test_a_retried_member_requeues_the_whole_gang_to_its_attempt(tmp_path: Path) -> None:
    s, ids, ag = _store_with_gang(tmp_path, retry=True)
    s.apply_job_updates(
        ag[2], [JobUpdate(ids[2], int(JobStatus.FAILED), TerminationReason.EXIT_CODE, "exit code 1", 1)]
    )
    settled = s.settle_gangs()
    assert sorted(settled.stops) == sorted([(ids[0], ag[0]), (ids[1], ag[1])])  # attempt 1's wire ids
    assert _statuses(s, ids) == [(JobStatus.PENDING, 2)] * 3
    assert {r[0] for r in s.conn.execute("SELECT job_id FROM job_attempts").fetchall()} == set(ids)
    # A late report of an aborted attempt changes nothing.
    s.apply_job_updates(ag[0], [JobUpdate(ids[0], int(JobStatus.FAILED), TerminationReason.EXIT_CODE, "x", 1)])
    assert _statuses(s, ids)[0] == (JobStatus.PENDING, 2)


def test_a_retry_after_a_member_finished_fails_the_gang_instead(tmp_path: Path) -> None:
    s, ids, ag = _store_with_gang(tmp_path, n=2, retry=True)
    s.apply_job_updates(ag[0], [JobUpdate(ids[0], int(JobStatus.DONE), TerminationReason.DONE)])
    s.apply_job_updates(ag[1], [JobUpdate(ids[1], int(JobStatus.FAILED), TerminationReason.EXIT_CODE, "boom", 1)])
    s.settle_gangs()
    assert _statuses(s, ids) == [(JobStatus.DONE, 1), (JobStatus.FAILED, 2)]
    msg = s.conn.execute("SELECT message FROM jobs WHERE id = ?", [ids[1]]).fetchone()[0]
    assert msg == "node 0 already ended (done); the gang cannot run again as a whole"


# ---- workflows and the torchrun provider -------------------------------------------------------------


def _project(tmp_path: Path, body: str) -> Path:
    (tmp_path / ".dstack").mkdir(exist_ok=True)
    (tmp_path / ".dstack" / "workflows.yaml").write_text("workflows:\n" + body)
    (tmp_path / "train.py").write_text("")
    return tmp_path


def test_resources_nodes_is_parsed_for_bash(tmp_path: Path) -> None:
    wf = load_workflows(
        _project(tmp_path, "  - name: t\n    provider: bash\n    commands: [x]\n    resources:\n      nodes: 3\n")
    )
    assert wf["t"].resources.nodes == 3


@pytest.mark.parametrize("nodes", ["0", "65", "two"])
def test_bad_nodes_is_a_workflow_error_at_its_line(tmp_path: Path, nodes: str) -> None:
    body = f"  - name: t\n    provider: bash\n    commands: [x]\n    resources:\n      nodes: {nodes}\n"
    with pytest.raises(WorkflowError, match=":6:14:") as e:
        load_workflows(_project(tmp_path, body))
    assert "'nodes' must be a whole number from 1 to 64" in str(e.value)


def _torchrun_commands(tmp_path: Path, body: str) -> list[common_pb2.JobSpec]:
    from dstack.cli.providers import load_provider

    wf = load_workflows(_project(tmp_path, body))["t"]
    return load_provider("torchrun").job_specs(wf)


def test_torchrun_takes_2022s_top_level_nodes_and_builds_its_command(tmp_path: Path) -> None:
    [spec] = _torchrun_commands(
        tmp_path, "  - name: t\n    provider: torchrun\n    file: train.py\n    args: [--lr, '0.1']\n    nodes: 2\n"
    )
    assert spec.resources.nodes == 2
    assert (
        spec.commands[-1]
        == 'exec torchrun $DSTACK_TORCHRUN_ARGS --nproc_per_node "$DSTACK_NPROC_PER_NODE" train.py --lr 0.1'
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {
                "MASTER_ADDR": "10.1.2.3",
                "MASTER_PORT": "29511",
                "NNODES": "3",
                "NODE_RANK": "2",
                "CUDA_VISIBLE_DEVICES": "0,1",
            },
            "--nnodes 3 --node_rank 2 --master_addr 10.1.2.3 --master_port 29511 --nproc_per_node 2 train.py",
        ),
        ({"CUDA_VISIBLE_DEVICES": ""}, "--standalone --nnodes 1 --nproc_per_node 1 train.py"),
        ({"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c"}, "--standalone --nnodes 1 --nproc_per_node 3 train.py"),
    ],
)
def test_torchrun_command_as_bash_runs_it(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    """The commands run by `bash -e` as the agent runs them, with a `torchrun` stand-in that prints its
    arguments (torch is not installed here)."""
    [spec] = _torchrun_commands(tmp_path, "  - name: t\n    provider: torchrun\n    file: train.py\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/bin/sh\necho "$@"\n')
    (bin_dir / "torchrun").chmod(0o755)
    script = "\n".join(spec.commands)
    r = subprocess.run(
        ["bash", "-e", "-c", script],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected, shlex.join(spec.commands)


def test_torchrun_with_both_nodes_fields_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match=r"'nodes' and 'resources\.nodes' both give the nodes"):
        _torchrun_commands(
            tmp_path,
            "  - name: t\n    provider: torchrun\n    file: train.py\n    nodes: 2\n    resources:\n      nodes: 2\n",
        )


def test_the_master_port_is_checked_on_rank_0_only_and_a_taken_one_is_said() -> None:
    import socket

    from dstack.agent.address import check_port_free, master_port

    assert master_port("g", 0, {"MASTER_PORT": "29511"}) == 29511
    assert master_port("g", 1, {"MASTER_PORT": "29511"}) is None
    assert master_port("", 0, {"MASTER_PORT": "29511"}) is None  # a job of its own that sets MASTER_PORT itself
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"MASTER_PORT {port} is taken on this host"):
            check_port_free(port)
    check_port_free(port)  # free again once let go


def test_a_client_cannot_make_its_own_gang_fields() -> None:
    """A hand-made spec claiming to be node 0 of a 1000-node gang is a lone job: only the coordinator
    builds gangs (else its run would wait forever for members that do not exist, or a crafted rank
    would take a rendezvous that is not its own)."""
    forged = common_pb2.JobSpec(job_name="x", gang="train", node_rank=0, nnodes=1000)
    [out] = gangs.expand([job_spec_from_proto(forged)])
    assert (out.gang, out.node_rank, out.nnodes) == ("", 0, 1)
    proto = common_pb2.JobSpec.FromString(out.encoded)
    assert not proto.gang and proto.nnodes == 0


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("10.213.0.2", True),
        ("fe80::1", True),
        ("gpu-box-3.example.com", True),
        ("1.2.3.4:99", False),
        ("a b", False),
        ("$(reboot)", False),
        ("", False),
        ("-x", False),
    ],
)
def test_only_an_ip_or_a_host_name_is_advertised(text: str, ok: bool) -> None:
    from dstack.protos.addresses import valid_address

    assert valid_address(text) == ok


def test_the_agent_refuses_a_bad_advertise_address() -> None:
    from dstack.agent.main import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--coordinator", "127.0.0.1:1", "--advertise-address", "1.2.3.4:99", "--home", "/tmp/x"])
    config = parse_args(["--coordinator", "127.0.0.1:1", "--advertise-address", "10.0.0.7", "--home", "/tmp/x"])
    assert config.advertise_address == "10.0.0.7"


def test_a_report_of_a_job_of_its_own_says_no_gang_is_touched(tmp_path: Path) -> None:
    # The engine skips the gang sweep (a query and a DB trip) after the end of a job in no gang: most jobs.
    s = Store(tmp_path / "state.db")
    spec = common_pb2.JobSpec(job_name="solo", workflow="w")
    created = s.create_run("u", "w", b"", "", [], [NewJob("solo", spec.SerializeToString(), 0, 0, 0, [])])
    agent = s.register_agent("a0", "token0", common_pb2.Inventory().SerializeToString())
    s.apply_schedule([Placement(created.job_ids[0], agent, [])], [], [])
    res = s.apply_job_updates(agent, [JobUpdate(created.job_ids[0], int(JobStatus.DONE), TerminationReason.DONE)])
    assert res.changed_runs and not res.gangs
