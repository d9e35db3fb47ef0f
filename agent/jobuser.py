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

import grp
import logging
import os
import pwd
import re
import shlex
import shutil
import stat
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
    setpriv: str = "/usr/bin/setpriv"  # util-linux: becomes the user, then execs (no fork in the agent)
    bash: str = "/bin/bash"
    # What setpriv is given for --reuid and --regid: the user's and group's names where they name exactly
    # these ids (resolve() checks), else the numbers. setpriv looks its argument up as a name first
    # (getpwnam, getgrnam), even a number: with `passwd: files systemd` a number misses the files and
    # loads libnss_systemd, libcap and libm into every job's setpriv (0.25-0.3 ms of CPU per job), where a
    # name is found in /etc/passwd at once.
    uid_arg: str = ""
    gid_arg: str = ""

    @property
    def reuid(self) -> str:
        return self.uid_arg or str(self.uid)

    @property
    def regid(self) -> str:
        return self.gid_arg or str(self.gid)


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
    setpriv, bash = shutil.which("setpriv"), shutil.which("bash")
    if setpriv is None or bash is None:
        raise JobUserError(
            f"--job-user {name} needs setpriv (util-linux) and bash on PATH: install them, or use the docker runtime"
        )
    return JobUser(name, pw.pw_uid, pw.pw_gid, setpriv, bash, *setpriv_names(pw.pw_name, pw.pw_uid, pw.pw_gid))


def setpriv_names(user: str, uid: int, gid: int) -> tuple[str, str]:
    """The names setpriv may be given for the job user's ids: each only where looking it up as setpriv
    does gives back exactly that id (a name that is all digits, or a group with no name, keeps the number);
    "" for the number."""

    def user_id(name: str) -> int | None:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            return None

    def group_id(name: str) -> int | None:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            return None

    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = ""
    uid_arg = user if user and user_id(user) == uid else ""
    gid_arg = group if group and group_id(group) == gid else ""
    # A number setpriv is given is a name first: a user or group named like it would be whom the job runs as.
    if not uid_arg and user_id(str(uid)) not in (None, uid):
        raise JobUserError(f"the job user's uid {uid} is also another user's name: setpriv would take that user")
    if not gid_arg and group_id(str(gid)) not in (None, gid):
        raise JobUserError(f"the job user's gid {gid} is also another group's name: setpriv would take that group")
    return uid_arg, gid_arg


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
    # scandir's entry types, not a stat per entry (os.walk's): one lstat only for a regular file, for its
    # link count. A stack, not recursion: a code tree's depth is the job's to choose.
    stack = [os.fspath(folder)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_nlink > 1:
                    continue  # a hard link (the code unpacker makes none) may be a file outside the folder
                os.lchown(entry.path, user.uid, user.gid)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)


# The job user's shell reads the job's environment before anything else: setpriv execs `bash -c SCRIPT`
# with BASH_ENV=/dev/fd/0, so bash, already the job user, sources its stdin (a pipe) at start: `export`
# lines the agent writes once it has moved the shell into the job's cgroups (bash waits for the end of
# the pipe), and last a marker the script checks first, so that a job whose environment did not arrive
# whole (the agent died while writing) runs nothing. One bash, not an importing shell that execs
# another: a process less per job. The environment never goes through argv or a file, and no process
# runs as root with it: what reads it (LD_PRELOAD, BASH_ENV, ...) runs as the job user.
ENV_OK = "__dstack_env_ok"
_CHECK = (
    f'[ -n "${{{ENV_OK}-}}" ] || {{ echo "dstack: the agent did not hand the job its environment" >&2; exit 1; }};'
    f" unset {ENV_OK}; "  # on the script's first line: the job's own line numbers stay as they were
)
# The sourced text's first line: BASH_ENV=/dev/fd/0 is the agent's, never the job's children's.
_PRELUDE = "unset BASH_ENV\n"
# Its last: a BASH_ENV of the job's own is read as bash would have read it at start.
_EPILOGUE = f'{ENV_OK}=1\nif [ -n "${{BASH_ENV-}}" ]; then . "$BASH_ENV"; fi\n'
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What setpriv itself runs with (as root): nothing of the job's. No LANG: setpriv and the shell start in
# the C locale and load none, and the shell loads the job's own locale once, when the job's environment
# sets LANG (every job's does: agent/runner.py's base_env). A locale loaded at start by setpriv and again
# by bash cost 0.6 ms of CPU per job (bench/host_path.py, user+pids: children 3.2 -> 2.6 ms).
ROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def root_env(marker: dict[str, str]) -> dict[str, str]:
    """setpriv's environment, which the job's shell starts with: ROOT_ENV, where bash finds the job's
    environment, and `marker` (the agent's mark, agent/runtimes/base.py: AGENT_MARKER, not secret: a
    process left by a crashed agent is found by it in /proc/PID/environ)."""
    return {**ROOT_ENV, "BASH_ENV": "/dev/fd/0", **marker}


def command(user: JobUser, script: str) -> list[str]:
    """The argv of a job as its user: setpriv drops to the user and execs the job's shell."""
    return [
        user.setpriv,
        f"--reuid={user.reuid}",
        f"--regid={user.regid}",
        "--clear-groups",
        "--",
        *shell_command(user, script),
    ]


def shell_command(user: JobUser, script: str) -> list[str]:
    """The argv of a job's shell where the process starting it is the job user already (agent/spawner.py)."""
    return [user.bash, "-c", _CHECK + script]


def encode_env(env: dict[str, str]) -> bytes:
    """The job's environment as its shell sources it (names a shell cannot export are left out)."""
    lines = [f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if _NAME.fullmatch(k) and "\0" not in v]
    return (_PRELUDE + "".join(lines) + _EPILOGUE).encode()
