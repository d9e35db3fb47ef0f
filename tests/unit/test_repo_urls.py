"""Git remote URLs lose their credentials before a run records them (protos/urls.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstack.cli.packing import pack
from dstack.coordinator.convert import code_from_bytes, code_from_proto
from dstack.protos.urls import public_repo_url
from dstack.protos.v1 import common_pb2
from tests.unit.test_packing import git_repo

GH = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"
GL = "glpat-AbCdEf0123456789xYz_"

CASES = [
    # GitHub: a personal token as the user, as the password, the Actions form, a fine-grained token.
    (f"https://{GH}@github.com/org/repo.git", "https://github.com/org/repo.git"),
    (f"https://octocat:{GH}@github.com/org/repo.git", "https://github.com/org/repo.git"),
    (f"https://x-access-token:{GH}@github.com/org/repo", "https://github.com/org/repo"),
    ("https://github_pat_11ABC_xyz@github.com/org/repo.git", "https://github.com/org/repo.git"),
    # GitLab, Bitbucket, Azure DevOps (whose user part is the organisation: it goes too).
    (f"https://oauth2:{GL}@gitlab.com/group/sub/repo.git", "https://gitlab.com/group/sub/repo.git"),
    (f"https://gitlab-ci-token:{GL}@gitlab.example.com:8443/g/r.git", "https://gitlab.example.com:8443/g/r.git"),
    ("https://x-token-auth:ATCTT3xFfGN0@bitbucket.org/team/repo.git", "https://bitbucket.org/team/repo.git"),
    ("https://alice:app-pass@bitbucket.org/team/repo.git", "https://bitbucket.org/team/repo.git"),
    ("https://org@dev.azure.com/org/proj/_git/repo", "https://dev.azure.com/org/proj/_git/repo"),
    # Ports, IPv6 hosts, an unescaped '@' in the password, a token in the query.
    ("http://tok@10.0.0.5:3000/r.git", "http://10.0.0.5:3000/r.git"),
    ("https://u:t0k@[2001:db8::1]:8443/r.git", "https://[2001:db8::1]:8443/r.git"),
    ("https://u:p@ss@git.example.com/r.git", "https://git.example.com/r.git"),
    ("https://git.example.com/r.git?private_token=abc#frag", "https://git.example.com/r.git"),
    ("HTTPS://U:T@Host.Example/r", "HTTPS://Host.Example/r"),
    # ssh: the user names the account (the key authenticates) and stays; a password goes.
    ("ssh://git@github.com/org/repo.git", "ssh://git@github.com/org/repo.git"),
    ("ssh://git:hunter2@[::1]:2222/repo.git", "ssh://git@[::1]:2222/repo.git"),
    ("git+ssh://deploy:pw@host:22/r.git", "git+ssh://deploy@host:22/r.git"),
    ("ssh://host/r.git", "ssh://host/r.git"),
    # scp-style.
    ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
    ("org-123@bitbucket.org:team/repo.git", "org-123@bitbucket.org:team/repo.git"),
    ("user:pw@host:repo.git", "user@host:repo.git"),
    ("u:p@ss@host:r", "u@host:r"),
    ("host.example:repo.git", "host.example:repo.git"),
    ("git@[::1]:repo.git", "git@[::1]:repo.git"),
    # No credentials possible: unchanged.
    ("git://git.kernel.org/pub/scm/git/git.git", "git://git.kernel.org/pub/scm/git/git.git"),
    ("file:///srv/git/repo.git", "file:///srv/git/repo.git"),
    ("/srv/git/repo.git", "/srv/git/repo.git"),
    ("../sibling", "../sibling"),
    ("C:\\src\\repo", "C:\\src\\repo"),
    ("", ""),
    ("  https://t@h/r  \n", "https://h/r"),
]


@pytest.mark.parametrize(("url", "public"), CASES)
def test_credentials_leave_the_url(url: str, public: str) -> None:
    assert public_repo_url(url) == public
    assert public_repo_url(public) == public  # idempotent


def test_the_cli_records_the_remote_without_its_token(tmp_path: Path) -> None:
    git = git_repo(tmp_path)
    (tmp_path / "a.py").write_text("x")
    git("add", ".")
    git("commit", "-qm", "init")
    git("remote", "add", "origin", f"https://x-access-token:{GH}@github.com/org/repo.git")
    assert pack(tmp_path).ref.repo_url == "https://github.com/org/repo.git"


def test_the_coordinator_strips_what_an_old_client_sends() -> None:
    sent = common_pb2.CodeRef(hash="h", repo_url=f"https://oauth2:{GL}@gitlab.com/g/r.git", commit="c" * 40)
    assert code_from_proto(sent).repo_url == "https://gitlab.com/g/r.git"
    # A row stored before the coordinator stripped them reads back without the token too.
    assert code_from_bytes(sent.SerializeToString()).repo_url == "https://gitlab.com/g/r.git"
