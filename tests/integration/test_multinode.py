"""Multi-node gangs across agents that each have their own network namespace and address
(tests/netns.py): the coordinator on the host's address of the bed, one agent per namespace.

- a 3-node python job whose members meet at MASTER_ADDR:MASTER_PORT and all-reduce a value over TCP
  in plain Python; `dstack logs` shows each node's lines with its prefix, `--node K` one node's;
- two 2-node gangs competing for three agents both finish (the second waits holding nothing);
- a member's agent killed with SIGKILL fails the whole gang (the others aborted, the reason names
  the node), and with `retry` the gang reruns as a whole on the agents left.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Cluster, JobJSON, free_port, wait_for, write_project
from tests.netns import Namespace, NetnsBed, available

# Rank 0 listens at addr:port, the other `size - 1` connect and send their value; rank 0 sums and sends
# the total back (what torch.distributed's all_reduce does, over plain TCP). Both job scripts below use it.
TCP_ALL_REDUCE = """\
if rank == 0:
    server = socket.create_server((addr, port))
    peers = [server.accept()[0] for _ in range(size - 1)]
    total = value + sum(int(p.makefile().readline()) for p in peers)
    for p in peers:
        p.sendall(f"{total}\\n".encode())
else:
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    conn.sendall(f"{value}\\n".encode())
    total = int(conn.makefile().readline())
"""

# Each member: meet at MASTER_ADDR:MASTER_PORT (rank 0 listens, the others connect and send their
# value), rank 0 sums and sends the total back, every member prints it. Then, if asked, the member
# records its pid and waits for the test's release file (or, from attempt 2 on, goes on at once).
ALLREDUCE = (
    """\
import os, socket, sys, time

rank, n = int(os.environ["NODE_RANK"]), int(os.environ["NNODES"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
value = 10 ** rank
print(f"rank {rank} of {n} (world {os.environ['WORLD_SIZE']}), master {addr}:{port}", flush=True)
size = n
"""
    + TCP_ALL_REDUCE
    + """\
print(f"node {rank}: total {total}", flush=True)
hold = os.environ.get("HOLD_DIR")
if hold and int(os.environ["DSTACK_ATTEMPT"]) == 1:
    with open(os.path.join(hold, f"{os.environ['RUN_NAME']}-{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    while not os.path.exists(os.path.join(hold, "release")):
        time.sleep(0.2)
print(f"node {rank}: bye", flush=True)
"""
)


# torch is not part of the project's setup (and a GPU machine is not lent to this task): a stand-in
# `torchrun` that starts --nproc_per_node copies of the script with torchrun's variables (RANK,
# LOCAL_RANK, WORLD_SIZE = nodes x processes, MASTER_ADDR/PORT from its options), as torchrun does.
TORCHRUN_STAND_IN = """\
#!/usr/bin/env python3
import argparse, os, subprocess, sys

p = argparse.ArgumentParser()
p.add_argument("--nnodes", type=int, default=1)
p.add_argument("--node_rank", type=int, default=0)
p.add_argument("--nproc_per_node", type=int, default=1)
p.add_argument("--master_addr", default="127.0.0.1")
p.add_argument("--master_port", type=int, default=29500)
p.add_argument("--standalone", action="store_true")
p.add_argument("script")
p.add_argument("args", nargs=argparse.REMAINDER)
a = p.parse_args()
print("torchrun " + " ".join(sys.argv[1:]), flush=True)
procs = []
for local in range(a.nproc_per_node):
    env = dict(os.environ, RANK=str(a.node_rank * a.nproc_per_node + local), LOCAL_RANK=str(local),
               WORLD_SIZE=str(a.nnodes * a.nproc_per_node), MASTER_ADDR=a.master_addr, MASTER_PORT=str(a.master_port))
    procs.append(subprocess.Popen([sys.executable, a.script, *a.args], env=env))
sys.exit(max(proc.wait() for proc in procs))
"""

# What torch.distributed's all_reduce would do, over plain TCP: global rank 0 sums every rank's value.
TRAIN = (
    """\
import os, socket, sys, time

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
value = int(sys.argv[sys.argv.index("--base") + 1]) + rank
size = world
"""
    + TCP_ALL_REDUCE
    + """\
# One write per line: the node's processes share its output pipe.
os.write(1, f"rank {rank}/{world} local {os.environ['LOCAL_RANK']}: all_reduce {total}\\n".encode())
"""
)


@dataclass
class Bed:
    cluster: Cluster
    namespaces: list[Namespace]
    hold: Path  # members write their pids here and wait for `release`

    def project(self, nodes: int, retry: str = "") -> Path:
        wf = (
            "workflows:\n"
            "  - name: allreduce\n"
            "    provider: python\n"
            "    file: allreduce.py\n"
            f"    environment:\n      HOLD_DIR: {self.hold}\n"
            f"    resources:\n      nodes: {nodes}\n"
            f"{retry}"
        )
        folder = self.cluster.tmp / f"project-{nodes}{'-retry' if retry else ''}"
        return write_project(folder, wf, {"allreduce.py": ALLREDUCE})

    def jobs(self, run: str) -> list[JobJSON]:
        return sorted(self.cluster.run_info(run)["jobs"], key=lambda j: j["name"])

    def release(self) -> None:
        (self.hold / "release").write_text("")

    def kill_leftovers(self) -> None:
        """Members on a SIGKILLed agent outlive it (nobody stops them): the pids they wrote, and only
        while that pid is still one of this test's members (its environment names this hold folder),
        never a process that got the number since."""
        mark = f"HOLD_DIR={self.hold}".encode()
        for pid_file in self.hold.glob("*.pid"):
            try:
                pid = int(pid_file.read_text())
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if mark not in f.read().split(b"\0"):
                        continue
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    why = available()
    if why is not None:
        pytest.skip(why)
    net = NetnsBed().start()
    cluster = Cluster(tmp_path, free_port(), host=net.host_address)
    hold = tmp_path / "hold"
    hold.mkdir()
    b = Bed(cluster, [], hold)
    try:
        b.namespaces = [net.add() for _ in range(3)]
        cluster.start_coordinator()
        for k, ns in enumerate(b.namespaces):
            # One job at a time per agent: a gang member takes its agent whole, so gangs compete.
            # Two simulated GPUs each: CUDA_VISIBLE_DEVICES, and so torchrun's processes per node.
            cluster.start_agent(f"node-agent-{k}", "--max-jobs", "1", "--simulate-gpus", "2xA100", prefix=ns.prefix())
        yield b
    finally:
        b.release()
        cluster.stop_all()
        b.kill_leftovers()
        net.close()


def test_torchrun_runs_one_process_per_gpu_on_each_node_and_they_all_reduce(bed: Bed) -> None:
    c = bed.cluster
    wf = (
        "workflows:\n"
        "  - name: ddp\n"
        "    provider: torchrun\n"
        "    file: train.py\n"
        "    args: [--base, '100']\n"
        "    before_run:\n"
        "      - chmod +x bin/torchrun\n"
        '      - export PATH="$PWD/bin:$PATH"\n'
        "    nodes: 2\n"
        "    resources:\n"
        "      gpu: 2\n"
    )
    project = write_project(c.tmp / "ddp", wf, {"train.py": TRAIN, "bin/torchrun": TORCHRUN_STAND_IN})
    run = c.cli("run", "-d", "ddp", cwd=project).stdout.strip()
    info = c.wait_status(run, {"done", "failed"}, timeout=120)
    lines = _member_lines(c, run)
    assert info["status"] == "done", lines
    jobs = {j["name"]: j for j in bed.jobs(run)}
    assert sorted(jobs) == ["ddp-node0", "ddp-node1"] and all(len(j["gpus"]) == 2 for j in jobs.values())
    # The command the provider built, on each node: its rank, the master, 2 processes (its 2 GPUs).
    master = f"{next(a['address'] for a in c.agents_json() if a['name'] == jobs['ddp-node0']['agent'])}"
    for k in range(2):
        cmd = next(ln for ln in lines if ln.startswith(f"node {k} | torchrun "))
        assert f"--nnodes 2 --node_rank {k} --master_addr {master} --master_port " in cmd, cmd
        assert cmd.endswith("--nproc_per_node 2 train.py --base 100"), cmd
    # 4 processes (2 nodes x 2 GPUs) summed 100 + 101 + 102 + 103.
    reduced = [ln for ln in lines if "all_reduce 406" in ln]
    assert len(reduced) == 4 and {ln.split(" | ")[1].split(" local")[0] for ln in reduced} == {
        "rank 0/4",
        "rank 1/4",
        "rank 2/4",
        "rank 3/4",
    }, lines


def _member_lines(cluster: Cluster, run: str, *args: str) -> list[str]:
    r = cluster.cli("logs", run, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_a_3_node_job_all_reduces_over_tcp_at_master_addr(bed: Bed) -> None:
    c = bed.cluster
    agents = {a["name"]: a for a in c.agents_json()}
    addresses = {ns.address for ns in bed.namespaces}
    # Each agent detected its own namespace's address (its route to the coordinator).
    assert {a["address"] for a in agents.values()} == addresses
    bed.release()  # no holding here
    run = c.cli("run", "-d", "allreduce", cwd=bed.project(3)).stdout.strip()
    c.wait_status(run, {"done", "failed"}, timeout=120)
    jobs = bed.jobs(run)
    assert [j["status"] for j in jobs] == ["done"] * 3, jobs
    assert len({j["agent"] for j in jobs}) == 3  # three distinct agents
    lines = _member_lines(c, run)
    for k in range(3):
        assert f"node {k} | node {k}: total 111" in lines, lines
    master = next(ln for ln in lines if ln.startswith("node 1 | rank 1 of 3"))
    assert "(world 3)" in master
    rank0_agent = next(j["agent"] or "" for j in jobs if j["name"] == "allreduce-node0")
    assert f"master {agents[rank0_agent]['address']}:" in master  # MASTER_ADDR: rank 0's agent
    # One node's lines, without a prefix.
    only = _member_lines(c, run, "--node", "2")
    assert "node 2: total 111" in only
    assert not any("|" in ln or "node 0" in ln or "node 1" in ln for ln in only), only
    r = c.cli("logs", run, "--node", "7")
    assert r.returncode != 0 and "has no node 7" in r.stderr


def test_two_2_node_gangs_competing_for_three_agents_both_finish(bed: Bed) -> None:
    c = bed.cluster
    project = bed.project(2)
    first = c.cli("run", "-d", "allreduce", cwd=project).stdout.strip()
    second = c.cli("run", "-d", "allreduce", cwd=project).stdout.strip()

    def waiting_run() -> str | None:
        """The run that waits while the other runs whole (None until so)."""
        runs = {r: bed.jobs(r) for r in (first, second)}
        running = [r for r, jobs in runs.items() if all(j["status"] == "running" for j in jobs)]
        waiting = [r for r, jobs in runs.items() if all(j["status"] in ("submitted", "pending") for j in jobs)]
        return waiting[0] if len(running) == 1 and len(waiting) == 1 else None

    behind = wait_for(waiting_run, timeout=120, interval=0.3, what="one gang running, the other waiting")
    # The waiting gang holds no agent and says why, as a unit: 2 agents needed, 1 free now.
    jobs = wait_for(
        lambda: _all(bed.jobs(behind), lambda x: "waiting for 2 agents" in (x["message"] or "")),
        timeout=30,
        what="the waiting gang's reason",
    )
    assert all(not j["agent"] for j in jobs)
    assert all("1 fit now" in (j["message"] or "") for j in jobs), jobs
    bed.release()
    for run in (first, second):
        info = c.wait_status(run, {"done", "failed"}, timeout=180)
        assert info["status"] == "done", info


def _kill_agent_of_node(bed: Bed, run: str, rank: int) -> str:
    jobs = wait_for(
        lambda: _all(bed.jobs(run), lambda x: x["status"] == "running"),
        timeout=120,
        interval=0.3,
        what="every member running",
    )
    agent = next(x["agent"] or "" for x in jobs if x["name"] == f"allreduce-node{rank}")
    # Members hold once they rendezvoused (each wrote its pid): the gang really runs on all nodes.
    wait_for(lambda: len(list(bed.hold.glob(f"{run}-*.pid"))) == len(jobs), timeout=60, what="members holding")
    proc = next(p for p in bed.cluster.agents if p.log.name == f"{agent}.log")
    proc.kill9()
    return agent


def test_a_member_s_agent_killed_fails_the_whole_gang_naming_the_node(bed: Bed) -> None:
    c = bed.cluster
    run = c.cli("run", "-d", "allreduce", cwd=bed.project(3)).stdout.strip()
    lost = _kill_agent_of_node(bed, run, 1)
    info = c.wait_status(run, {"done", "failed", "stopped"}, timeout=120)
    assert info["status"] == "failed", info
    jobs = {j["name"]: j for j in bed.jobs(run)}
    assert jobs["allreduce-node1"]["termination_reason"] == "agent lost"
    for k in (0, 2):
        j = jobs[f"allreduce-node{k}"]
        assert j["status"] == "failed" and j["termination_reason"] == "gang failed", j
        assert (j["message"] or "").startswith(f"node 1 on {lost} failed:"), j
    # The others were aborted on their agents: their processes are gone.
    for k in (0, 2):
        pid = int((bed.hold / f"{run}-{k}.pid").read_text())
        wait_for(functools.partial(_gone, pid), timeout=30, what=f"node {k}'s process to be gone")


def test_with_retry_a_lost_member_reruns_the_gang_as_a_whole(bed: Bed) -> None:
    c = bed.cluster
    project = bed.project(2, retry="    retry:\n      limit: 1\n      on: [agent-lost]\n")
    run = c.cli("run", "-d", "allreduce", cwd=project).stdout.strip()
    lost = _kill_agent_of_node(bed, run, 0)
    info = c.wait_status(run, {"done", "failed", "stopped"}, timeout=180)
    assert info["status"] == "done", json.dumps(info, indent=1)
    jobs = bed.jobs(run)
    assert [j["attempt"] for j in jobs] == [2, 2]
    assert all(j["agent"] != lost for j in jobs)  # the second attempt ran on the agents left
    assert len({j["agent"] for j in jobs}) == 2
    lines = _member_lines(c, run, "--attempt", "2")
    assert "node 0 | node 0: total 11" in lines and "node 1 | node 1: total 11" in lines, lines


def _all(jobs: list[JobJSON], check: Callable[[JobJSON], bool]) -> list[JobJSON] | None:
    return jobs if jobs and all(check(j) for j in jobs) else None


def _gone(pid: int) -> bool:
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_a_forged_gang_spec_over_grpc_runs_as_a_lone_job_without_a_rendezvous(cluster: Cluster) -> None:
    """A client that sends gang fields of its own (node 0 of a 1000-node gang, nodes 0) gets a lone job:
    it is placed and runs (it does not wait forever for 999 members), and gets no MASTER_* variables."""
    from dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2

    cluster.start_coordinator()
    cluster.start_agent()
    stub = client_pb2_grpc.ClientServiceStub(cluster.channel())
    meta = [("authorization", f"Bearer {cluster.admin_token}")]
    job = common_pb2.JobSpec(
        job_name="forged",
        workflow="forged",
        provider="bash",
        commands=['echo "master=${MASTER_ADDR:-none} rank=${NODE_RANK:-none}"'],
        gang="train",
        node_rank=0,
        nnodes=1000,
    )
    resp = stub.SubmitRun(client_pb2.SubmitRunRequest(workflow="forged", jobs=[job]), metadata=meta)
    run = cluster.wait_status(resp.run.name, {"done", "failed"}, timeout=90)
    assert run["status"] == "done", run
    assert "master=none rank=none" in cluster.cli("logs", resp.run.name).stdout
    got = stub.GetRun(client_pb2.GetRunRequest(name=resp.run.name), metadata=meta)
    assert not got.run.jobs[0].spec.gang and got.run.jobs[0].spec.nnodes == 0
