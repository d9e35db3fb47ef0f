"""Repositories on the coordinator's side: the name a run is stored under, and resolving `OWNER/REPO`
qualifiers of cross-repository references (protos/repos.py has the naming rules both sides share)."""

from __future__ import annotations

from collections.abc import Iterable

from dstack.coordinator.errors import InvalidRequest, NotFound
from dstack.protos.repos import BAD_CHARS, LEGACY, LOCAL, MAX_LENGTH, repository_from_remote


def run_repository(sent: str, repo_url: str, user: str) -> str:
    """The repository a new run (or uploaded artifact set) belongs to.

    `sent` is what the client worked out (a normalised remote, or `local/<folder>`, which gets the
    user's name: a client cannot name another user's local namespace). A client that sends none (one
    from before repositories) gets the repository of its code's remote, else `legacy`, as the runs
    stored before repositories did."""
    if not sent:
        return repository_from_remote(repo_url) or LEGACY
    if len(sent) > MAX_LENGTH or BAD_CHARS.search(sent):
        raise InvalidRequest(f"invalid repository {sent[:80]!r}: at most {MAX_LENGTH} printable characters")
    parts = sent.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidRequest(f"invalid repository {sent!r}: expected HOST/PATH or local/FOLDER")
    if parts[0] == LOCAL:
        if len(parts) != 2:
            raise InvalidRequest(
                f"invalid repository {sent!r}: a local repository is local/FOLDER (the coordinator adds the user)"
            )
        return f"{LOCAL}/{user}/{parts[1]}"
    if len(parts) < 2:
        raise InvalidRequest(f"invalid repository {sent!r}: expected HOST/PATH or local/FOLDER")
    return sent


def stored_repository(repo_url: str) -> str:
    """The repository of a run stored before repositories existed (the migration's rule)."""
    return repository_from_remote(repo_url) or LEGACY


def resolve_qualifier(qualifier: str, known: Iterable[str]) -> str:
    """The one known repository a reference's qualifier names: a whole repository name, else `OWNER/REPO`
    matched (ignoring case) against the last two path components of each. Ambiguity is an error that
    lists the candidates, since picking one would silently take another team's artifacts."""
    repositories = sorted(set(known))
    if qualifier in repositories:
        return qualifier
    parts = qualifier.lower().split("/")
    candidates = [r for r in repositories if [p.lower() for p in r.split("/")[-2:]] == parts] if len(parts) == 2 else []
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise NotFound(f"no repository {qualifier!r} has runs on this coordinator (see `dstack tags list --all`)")
    raise InvalidRequest(
        f"{qualifier!r} matches several repositories: {', '.join(candidates)}; write the whole repository"
        f" instead, e.g. {candidates[0]}/NAME"
    )


def local_repository_user(repository: str) -> tuple[str, str] | None:
    """(user, folder) of a stored local repository (`local/USER/FOLDER`); None for any other."""
    parts = repository.split("/")
    return (parts[1], parts[2]) if parts[0] == LOCAL and len(parts) == 3 else None
