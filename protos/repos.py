"""Repositories: the namespace a run's workflow names and tags live in (shared by the CLI and coordinator).

A run belongs to the repository its code came from, identified by its git remote, normalised so that
every way of writing one remote gives one name:

    git@github.com:Org/Repo.git, https://user:token@github.com/org/repo, ssh://git@github.com:22/org/repo/
        -> github.com/org/repo

- the host is lower-cased, a port and any user or password are dropped (credentials never reach a name);
- the path loses its leading and trailing '/', a trailing `.git` and repeated slashes;
- on hosts whose paths are case-insensitive (github.com, gitlab.com, bitbucket.org) the path is
  lower-cased too, so two clones whose remotes differ in case share a namespace;
- a remote that is a path on this machine (`/srv/git/app.git`, `file:///srv/git/app.git`) gives
  `file/srv/git/app`; a relative one (`../app.git`) names nothing portable and counts as no remote.

Without a remote, the CLI sends `local/<folder>` and the coordinator makes it `local/<user>/<folder>`
with the authenticated user's name (see `qualify_local` in coordinator/repositories.py): two people's
folders named `app` never collide, and nobody can write into another user's local namespace. One user's
two folders of the same name do share one; a git remote (`git remote add origin URL`) separates them.

References to another repository's runs (`deps: [{workflow: OWNER/REPO/WORKFLOW}]`, `{tag: OWNER/REPO/TAG}`,
`depends-on: [OWNER/REPO/WORKFLOW:TAG]`) are split here (`split_ref`) and resolved by the coordinator.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

LOCAL = "local"  # the first component of a repository named after a folder
LEGACY = "legacy"  # runs (and their tags) from before repositories, whose code named no remote
MAX_LENGTH = 300

_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?P<rest>.*)", re.S)
_SCP = re.compile(r"(?:[^/]*@)?(?P<host>\[[^\]/]*\]|[^/:\[\]@]+):(?P<path>.*)", re.S)
_CASE_INSENSITIVE_HOSTS = {"github.com", "gitlab.com", "bitbucket.org"}
BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")  # control characters


def _host(hostport: str) -> str:
    host = hostport.rpartition("@")[2]  # the host part follows the last '@': a password may hold one
    if host.startswith("["):  # [IPv6]:port
        return host[: host.find("]") + 1].lower()
    return host.partition(":")[0].lower()


def _clean_path(path: str) -> str:
    parts = [p for p in posixpath.normpath("/" + path).split("/") if p]  # no '.', '..' or empty parts
    if parts and parts[-1].endswith(".git"):
        parts[-1] = parts[-1][: -len(".git")]
    return "/".join(p for p in parts if p)


def repository_from_remote(url: str) -> str | None:
    """The repository a git remote URL names (see the module's rules), or None when it names none."""
    url = url.strip()
    if not url:
        return None
    m = _URL.fullmatch(url)
    if m is not None:
        if m["scheme"].lower() == "file":
            return _local_path(m["path"])
        host, path = _host(m["authority"]), m["path"]
    elif "://" in url:
        return None
    elif url.startswith("/"):
        return _local_path(url)
    else:
        s = _SCP.fullmatch(url) if not url.startswith((".", "~")) else None
        if s is None or len(s["host"]) <= 1:  # "C:\\repo" is a Windows path, not host "C"
            return None
        host, path = s["host"].lower(), s["path"]
    path = _clean_path(path)
    if not host or not path:
        return None
    if host in _CASE_INSENSITIVE_HOSTS:
        path = path.lower()
    return _checked(f"{host}/{path}")


def _local_path(path: str) -> str | None:
    path = _clean_path(posixpath.normpath(path))
    return _checked(f"file/{path}") if path else None


def _checked(name: str) -> str | None:
    return name if len(name) <= MAX_LENGTH and not BAD_CHARS.search(name) else None


def reads_legacy(repository: str) -> bool:
    """Whether a name this repository lacks is looked up in `legacy` too. Only folders without a remote:
    their runs from before repositories went there (runs whose code named a remote got that remote's
    repository), and a repository with a remote never takes artifacts from outside it unasked."""
    return repository.startswith(f"{LOCAL}/")


def folder_repository(folder_name: str) -> str:
    """What the CLI sends for a project without a remote; the coordinator adds the user."""
    return f"{LOCAL}/{folder_name}"


@dataclass(frozen=True)
class Ref:
    """A workflow or tag reference: `NAME` (the run's own repository) or `QUALIFIER/NAME`, where the
    qualifier is `OWNER/REPO` (matched against the last two path components of every repository) or a
    whole repository name (`github.com/org/repo`, `legacy`)."""

    repository: str  # "" for the run's own repository
    name: str

    def __str__(self) -> str:
        return f"{self.repository}/{self.name}" if self.repository else self.name


class BadRef(ValueError):
    pass


def split_ref(text: str) -> Ref:
    qualifier, slash, name = text.rpartition("/")
    if not slash:
        return Ref("", text)
    if not name or not qualifier or any(not p for p in qualifier.split("/")):
        raise BadRef(f"invalid reference {text!r}: expected NAME or OWNER/REPO/NAME")
    return Ref(qualifier, name)
