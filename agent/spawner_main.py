"""The job user's spawner: the process that starts a root agent's host jobs (agent/spawner.py starts it).

Run as `python -I -S -c <this file's text> FD` by setpriv, already the job user (the same uid, gid and
no supplementary groups as the jobs, the same capability sets: none), so it holds no privilege a job
does not: it vforks and execs each job's shell as it is, with no setpriv of its own per job (about 1 ms
of CPU per job). It uses the standard library only and reads no file of the package (the job user may
not be able to read the agent's installation).

FD is its end of a socketpair with the agent (SOCK_SEQPACKET, close-on-exec): nothing else can reach it
(no path, no abstract name). It is not dumpable, so a job, the same user, can neither ptrace it nor open
its /proc files (fd, environ, mem); a job can kill it, as it can kill any job of the same user: the
agent then starts another.

Messages are JSON, one per packet. From the agent:
  {"op": "spawn", "id", "argv", "cwd", "env"} with three fds (stdin, stdout, stderr): the job's shell in a
      new session; the answer {"id", "pid"} carries a pidfd of it, or {"id", "error", "errno"}.
  {"op": "reap", "id", "pid"}: {"id", "status"} (as Popen.returncode) once that child has exited. A child
      is reaped only when asked, so its pid stays its own while the agent may still signal it.
The first message it sends is {"ready": pid}. It exits when the agent's end closes (the agent stopped or
died: only the agent holds that end), leaving its jobs running, as an agent that dies leaves its own.
"""

import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

Send = Callable[..., None]

PR_SET_DUMPABLE = 4


def main(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        sys.exit("the spawner cannot make itself not dumpable")
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    children: dict[int, subprocess.Popen[bytes]] = {}
    wanted: dict[int, int] = {}  # pid -> the reap request's id
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)

    def send(msg: dict[str, Any], fds: list[int] = []) -> None:  # noqa: B006 - never changed
        socket.send_fds(sock, [json.dumps(msg).encode()], fds)

    def reap_wanted() -> None:
        for pid in list(wanted):
            code = children[pid].poll()
            if code is not None:
                send({"id": wanted.pop(pid), "status": code})
                del children[pid]

    send({"ready": os.getpid()})
    while True:
        for key, _ in sel.select():
            if key.fileobj == wake_r:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
                reap_wanted()
                continue
            data, fds, _flags, _ = socket.recv_fds(sock, 1 << 20, 3)
            if not data:
                return  # the agent's end is closed: the agent stopped or died
            try:
                msg = json.loads(data)
                if msg["op"] == "spawn":
                    spawn(msg, fds, children, send)
                elif msg["op"] == "reap":
                    pid = int(msg["pid"])
                    if pid not in children:
                        send({"id": msg["id"], "status": None})
                    else:
                        wanted[pid] = msg["id"]
                        reap_wanted()
            finally:
                for f in fds:
                    os.close(f)


def spawn(msg: dict[str, Any], fds: list[int], children: dict[int, "subprocess.Popen[bytes]"], send: Send) -> None:
    if len(fds) != 3:
        send({"id": msg["id"], "error": "the spawner needs the job's stdin, stdout and stderr", "errno": 0})
        return
    try:
        popen = subprocess.Popen(  # vfork: this process has one thread and is already the job user
            msg["argv"],
            cwd=msg["cwd"],
            env=msg["env"],
            stdin=fds[0],
            stdout=fds[1],
            stderr=fds[2],
            start_new_session=True,
        )
    except OSError as e:
        send({"id": msg["id"], "error": str(e), "errno": e.errno or 0, "not_found": isinstance(e, FileNotFoundError)})
        return
    children[popen.pid] = popen
    pidfd = os.pidfd_open(popen.pid)
    try:
        send({"id": msg["id"], "pid": popen.pid}, [pidfd])
    finally:
        os.close(pidfd)


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the agent died while an answer was on its way: it is gone, so is this process (no traceback)
