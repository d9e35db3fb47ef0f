"""agent/jobuser.py: which user host jobs run as, and how their environment reaches them."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from dstack.agent import jobuser
from dstack.agent.jobuser import JobUser, JobUserError
from dstack.agent.main import parse_args
from dstack.agent.runtimes.host import _hand_over_env, _write_rest


def test_only_a_root_host_agent_switches_users(caplog: pytest.LogCaptureFixture) -> None:
    assert jobuser.resolve("dstack-job", "docker", euid=0) is None  # containers are the boundary there
    assert jobuser.resolve(jobuser.NONE, "host", euid=0) is None
    with caplog.at_level(logging.WARNING, logger="dstack.agent"):
        assert jobuser.resolve("dstack-job", "host", euid=12345) is None
    assert "can read the agent's credential" in caplog.text and "--job-user" in caplog.text


def test_a_missing_job_user_says_how_to_create_it() -> None:
    with pytest.raises(JobUserError, match=r"useradd --system .* no-such-user-x"):
        jobuser.resolve("no-such-user-x", "host", euid=0)


def test_root_is_no_job_user() -> None:
    with pytest.raises(JobUserError, match="must not run as root"):
        jobuser.resolve("root", "host", euid=0)


def test_the_jobs_folder_is_next_to_the_home_never_in_it() -> None:
    assert jobuser.jobs_root(Path("/var/lib/dstack/agent")) == Path("/var/lib/dstack/agent-jobs")


def test_the_environment_goes_through_stdin_not_argv() -> None:
    user = JobUser("dstack-job", 999, 999, "/usr/bin/setpriv", "/bin/bash")
    argv = jobuser.command(user, "echo $TOKEN")
    assert argv[:5] == ["/usr/bin/setpriv", "--reuid=999", "--regid=999", "--clear-groups", "--"]  # no names: numbers
    assert argv[5:7] == ["/bin/bash", "-c"] and len(argv) == 8  # one shell: no importer that execs another
    env = {"TOKEN": "s3cret value\nwith a newline", "BAD NAME": "x", "A": "1"}
    data = jobuser.encode_env(env)
    assert not any("s3cret" in a for a in argv)
    assert b"s3cret" in data and b"BAD NAME" not in data
    # setpriv (root) gets the path where bash reads the environment and the agent's mark, nothing of the job's.
    root = jobuser.root_env({"DSTACK_AGENT_HOME": "/agent"})
    assert root["BASH_ENV"] == "/dev/fd/0" and root["DSTACK_AGENT_HOME"] == "/agent"
    assert not any("s3cret" in v for v in root.values())
    assert "LANG" not in root  # no locale for setpriv to load as root: the job's LANG comes with its environment


def test_the_jobs_shell_gets_the_jobs_own_locale() -> None:
    # setpriv and bash start in the C locale (ROOT_ENV has no LANG); the job's LANG, sourced with the rest of
    # its environment, is what its commands see, and bash itself switches to it (a UTF-8 character is one).
    script = 'printf "%s|%s\\n" "$LANG" "${#CHAR}"'
    env = {"LANG": "C.UTF-8", "CHAR": "\u00e9", "PATH": os.environ["PATH"]}
    r = _as_job_shell(script, jobuser.encode_env(env))
    assert r.returncode == 0 and r.stdout == b"C.UTF-8|1\n", (r.stdout, r.stderr)


def _as_job_shell(script: str, payload: bytes) -> subprocess.CompletedProcess[bytes]:
    """The shell part of `command` (after setpriv, which needs root) as the current user."""
    argv = jobuser.command(JobUser("u", 0, 0, "", "/bin/bash"), script)[5:]
    root = jobuser.root_env({"DSTACK_AGENT_HOME": "/agent"}) | {"PATH": os.environ["PATH"]}
    return subprocess.run(argv, input=payload, capture_output=True, env=root)


def test_the_shell_exports_what_it_reads_then_runs_the_script() -> None:
    script = 'printf "%s|" "$TOKEN" "$A" "${BASH_ENV-unset}" "${__dstack_env_ok-unset}"; echo "${LD_PRELOAD:-none}"'
    env = {"TOKEN": "two\nlines 'quoted' $HOME `x`", "A": "1", "PATH": os.environ["PATH"]}
    r = _as_job_shell(script, jobuser.encode_env(env))
    assert r.returncode == 0, r.stderr
    # Values arrive verbatim (no expansion); BASH_ENV=/dev/fd/0 and the marker do not reach the job.
    assert r.stdout == b"two\nlines 'quoted' $HOME `x`|1|unset|unset|none\n"
    # Its children do not read their stdin as a BASH_ENV either, and carry the agent's mark.
    r = _as_job_shell('bash -c "echo child:$DSTACK_AGENT_HOME"', jobuser.encode_env(env))
    assert r.returncode == 0 and r.stdout == b"child:/agent\n", r.stderr


def test_a_job_whose_environment_did_not_arrive_whole_runs_nothing() -> None:
    # The agent died while writing: the marker (last) is missing, or a value is cut in its quotes.
    payload = jobuser.encode_env({"A": "1", "B": "a long value"})
    for cut in (payload[: payload.index(b"__dstack")], payload[: payload.index(b"a long") + 3], b""):
        r = _as_job_shell("echo ran", cut)
        assert r.returncode == 1 and r.stdout == b"", cut
        assert b"did not hand the job its environment" in r.stderr


def test_a_bash_env_of_the_jobs_own_is_read_as_bash_reads_it(tmp_path: Path) -> None:
    rc = tmp_path / "rc.sh"
    rc.write_text("FROM_RC=yes\n")
    r = _as_job_shell('echo "$FROM_RC $BASH_ENV"', jobuser.encode_env({"BASH_ENV": str(rc)}))
    assert r.returncode == 0 and r.stdout == f"yes {rc}\n".encode(), r.stderr


def test_an_error_in_the_script_names_the_scripts_own_line() -> None:
    r = _as_job_shell("set -e\ntrue\nno-such-command-xyz\n", jobuser.encode_env({}))
    assert r.returncode == 127 and b"line 3: no-such-command-xyz" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_handing_a_folder_over_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("root's")
    job = tmp_path / "job"
    (job / "code").mkdir(parents=True)
    (job / "code" / "train.py").write_text("print()")
    (job / "link").symlink_to(outside)
    os.link(outside, job / "hard")
    user = JobUser("u", 4242, 4243)
    jobuser.give(job, user)
    assert (job.stat().st_uid, (job / "code" / "train.py").stat().st_uid) == (4242, 4242)
    assert (job / jobuser.JOB_HOME).stat().st_uid == 4242
    assert (job / "link").lstat().st_uid == 4242
    assert outside.stat().st_uid == 0  # neither through the symlink nor through the hard link


def test_the_default_job_user_is_dstack_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSTACK_JOB_USER", raising=False)
    assert parse_args(["--coordinator", "c:1"]).job_user_name == "dstack-job"
    monkeypatch.setenv("DSTACK_JOB_USER", "trainer")
    assert parse_args(["--coordinator", "c:1"]).job_user_name == "trainer"
    assert parse_args(["--coordinator", "c:1", "--job-user", "none"]).job_user_name == "none"


@pytest.mark.parametrize("size", [100, 1 << 20])
def test_the_environment_is_handed_over_whole_however_big(size: int) -> None:
    # Small: written at once on the event loop's thread (the pipe takes it). Bigger than the pipe: the
    # rest is written as the shell reads, and the shell still gets every byte before the end marker.
    env = {"BIG": "x" * size, "A": "1"}
    payload = jobuser.encode_env(env)
    r, w = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(_read_all(r)))
    rest = _hand_over_env(w, None, os.getpid(), payload)
    if size > 1000:
        assert rest, "a payload bigger than the pipe comes back in part"
    reader.start()
    if rest:
        _write_rest(w, rest)
    reader.join(10)
    assert bytes(got) == payload


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def test_setpriv_is_given_the_names_of_the_job_users_ids_where_they_name_exactly_those() -> None:
    # A number makes setpriv miss /etc/passwd (it looks a name up first) and load NSS modules per job.
    pw = pwd.getpwuid(os.getuid())
    group = grp.getgrgid(pw.pw_gid).gr_name
    assert jobuser.setpriv_names(pw.pw_name, pw.pw_uid, pw.pw_gid) == (pw.pw_name, group)
    user = JobUser("dstack-job", 999, 995, "/usr/bin/setpriv", "/bin/bash", "dstack-job", "jobs")
    assert jobuser.command(user, "true")[1:3] == ["--reuid=dstack-job", "--regid=jobs"]


def test_a_name_naming_other_ids_is_never_given_to_setpriv(monkeypatch: pytest.MonkeyPatch) -> None:
    users = {"u": 1001, "1001": 1001}
    groups_by_id = {1002: "g", 1003: ""}
    groups = {"g": 1005}  # the group's name now names another group id: the number is given

    def getpwnam(name: str) -> SimpleNamespace:
        if name not in users:
            raise KeyError(name)
        return SimpleNamespace(pw_uid=users[name])

    def getgrgid(gid: int) -> SimpleNamespace:
        if not groups_by_id.get(gid):
            raise KeyError(gid)
        return SimpleNamespace(gr_name=groups_by_id[gid])

    def getgrnam(name: str) -> SimpleNamespace:
        if name not in groups:
            raise KeyError(name)
        return SimpleNamespace(gr_gid=groups[name])

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(grp, "getgrgid", getgrgid)
    monkeypatch.setattr(grp, "getgrnam", getgrnam)
    assert jobuser.setpriv_names("u", 1001, 1002) == ("u", "")  # g names 1005, not 1002: the number
    assert jobuser.setpriv_names("x", 1001, 1003) == ("", "")  # no such user name, a group with no name
    # A number that is another user's or group's name would make setpriv take that one: refused.
    users["1001"] = 4242
    with pytest.raises(JobUserError, match="uid 1001 is also another user's name"):
        jobuser.setpriv_names("x", 1001, 1003)
    users["1001"] = 1001
    groups["1003"] = 7
    with pytest.raises(JobUserError, match="gid 1003 is also another group's name"):
        jobuser.setpriv_names("x", 1001, 1003)
