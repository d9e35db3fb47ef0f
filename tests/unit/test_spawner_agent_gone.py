"""The job user's spawner (agent/spawner_main.py) when its agent dies: it exits, quietly, also when the agent
died with an answer on its way (a SIGKILLed agent's log ended in the spawner's BrokenPipeError traceback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from dstack.agent.spawner import _SOURCE


def start() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    agent_end, spawner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _SOURCE.read_text(), str(spawner_end.fileno())],
        pass_fds=(spawner_end.fileno(),),
        stderr=subprocess.PIPE,
    )
    spawner_end.close()
    assert json.loads(agent_end.recv(1 << 16)) == {"ready": proc.pid}
    return agent_end, proc


def test_the_spawner_exits_when_its_agents_end_closes() -> None:
    agent_end, proc = start()
    agent_end.close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == b""


def test_the_spawner_exits_quietly_when_the_agent_dies_with_an_answer_on_its_way() -> None:
    agent_end, proc = start()
    r, w = os.pipe()
    try:
        msg = {"op": "spawn", "id": 1, "argv": ["true"], "cwd": "/", "env": {}}
        socket.send_fds(agent_end, [json.dumps(msg).encode()], [r, w, w])
    finally:
        os.close(r)
        os.close(w)
    agent_end.close()  # before the answer: the spawner's send meets a closed end (EPIPE)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert err == b""
