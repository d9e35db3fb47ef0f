"""The unprivileged user host-runtime jobs run as, when the agent runs as root (`--job-user`).

A job that ran as the agent's user could read the agent's credential (HOME/agent.json), the code
cache of other runs, and write into what the agent trusts. As root the agent runs each host job
as the job user (default `dstack-job`, which deploy/install.sh creates), in a folder outside the
agent's home (which stays 0700 root):

    <home>-jobs/            0711 root: the job user may pass through, not list
    <home>-jobs/<job id>/   0700 the job user: the job's code, artifacts and HOME (.dstack-home)
    <home>-jobs/.envs/      0700 the job user: its Python environments (agent/envcache.py), apart
                            from the agent's own HOME/envs, which no job can write

As any other user the agent cannot switch users: it says so at start (jobs can read its credential).
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dstack.agent")

DEFAULT = "dstack-job"
NONE = "none"  # jobs run as the agent's own user (local mode: the user's own jobs on their own box)
JOB_HOME = ".dstack-home"  # the job's HOME, inside its folder (removed with it)
ENVS = ".envs"


class JobUserError(Exception):
    """The job user cannot be used: the message says how to fix it."""


@dataclass(frozen=True)
class JobUser:
    name: str
    uid: int
    gid: int


def not_root_warning(agent_user: str) -> str:
    return (
        f"the agent runs as {agent_user}, not root, so host-runtime jobs run as {agent_user} too and can read"
        " the agent's credential (HOME/agent.json) and everything else it can: run the agent as root with"
        f" --job-user (default {DEFAULT}), or use the docker runtime"
    )


def resolve(name: str, runtime: str, euid: int | None = None) -> JobUser | None:
    """The user host jobs run as; None when they run as the agent's own user."""
    if runtime != "host" or name == NONE:
        return None
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        log.warning("%s", not_root_warning(_user_name(euid)))
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise JobUserError(
            f"the job user {name!r} does not exist: create it with"
            f" `useradd --system --no-create-home --shell /usr/sbin/nologin {name}` (deploy/install.sh does),"
            f" or name another unprivileged user with --job-user"
        ) from None
    if pw.pw_uid == 0:
        raise JobUserError(f"--job-user {name}: jobs must not run as root; name an unprivileged user")
    return JobUser(name, pw.pw_uid, pw.pw_gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def jobs_root(home: Path) -> Path:
    """Where the job user's folders go: next to the agent's home, never in it."""
    return home.with_name(home.name + "-jobs")


def prepare_root(root: Path, user: JobUser) -> None:
    """Makes the jobs root (0711 root) and the job user's environment cache (0700, its own), and
    checks that the job user can reach the root: a parent it cannot pass through fails the agent's
    start, not every job."""
    root.mkdir(parents=True, exist_ok=True)
    os.chown(root, 0, 0)
    os.chmod(root, 0o711)
    envs = root / ENVS
    envs.mkdir(exist_ok=True)
    os.lchown(envs, user.uid, user.gid)
    os.chmod(envs, 0o700)
    for parent in root.parents:
        st = parent.stat()
        can_pass = st.st_mode & stat.S_IXOTH or (st.st_uid == user.uid and st.st_mode & stat.S_IXUSR)
        if not can_pass and not (st.st_gid == user.gid and st.st_mode & stat.S_IXGRP):
            raise JobUserError(
                f"the job user {user.name} cannot reach {root}: {parent} is mode {stat.S_IMODE(st.st_mode):04o};"
                f" `chmod o+x {parent}`, or give the agent a --home whose parent others may pass through"
            )


def give(folder: Path, user: JobUser) -> None:
    """Hands a job's folder (made by the agent: code, inputs, artifact folders) to the job user,
    never following a symlink, and makes its HOME in it."""
    (folder / JOB_HOME).mkdir(exist_ok=True)
    os.lchown(folder, user.uid, user.gid)
    os.chmod(folder, 0o700)
    for top, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            os.lchown(os.path.join(top, name), user.uid, user.gid)


def drop_privileges(user: JobUser, cgroup_procs: Sequence[Path]) -> Callable[[], None]:
    """What the job's process runs between fork and exec, as root still: it joins the job's cgroups
    (root-owned files the job user cannot write), then becomes the job user for good. Only system
    calls: no lock another thread of the agent could hold at fork time is taken here, and the job's
    environment (LD_PRELOAD, BASH_ENV, ...) applies only at exec, once unprivileged."""
    procs = [os.fsencode(p) for p in cgroup_procs]

    def run() -> None:
        pid = str(os.getpid()).encode()
        for path in procs:
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError:
                continue
            try:
                os.write(fd, pid)
            except OSError:
                pass
            finally:
                os.close(fd)
        os.setgroups([])
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)

    return run
