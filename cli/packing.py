"""Packs the working tree into a reproducible tarball, named by its sha256.

In a git repository: tracked files plus untracked files that are not ignored; outside git: every
file. Untracked files that look like credentials (`.env`, `.netrc`, private keys, ...) are left out:
the code is readable by the whole team and by the agent that runs the job, and a token left in the
working tree should not travel with it (`dstack secrets add` is the way; `git add` sends one on
purpose). The same tree always gives the same bytes (sorted entries, zeroed times and owners), so
unchanged code has the same hash and is not sent again.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from dstack.cli.errors import CliError
from dstack.protos.urls import public_repo_url
from dstack.protos.v1 import common_pb2

SKIP_DIRS = {".git", "__pycache__", ".venv", ".dstack-venv", "node_modules"}

# Base names (fnmatch) of files that usually hold credentials; examples and templates are code.
CREDENTIAL_NAMES = (
    ".env",
    ".env.*",
    "*.env",
    ".netrc",
    "_netrc",
    ".git-credentials",
    ".pgpass",
    ".pypirc",
    ".npmrc",
    ".dockercfg",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa",
    "id_dsa",
    "id_ecdsa",
    "id_ed25519",
    "kaggle.json",
    "credentials.json",
    "service-account*.json",
)
NOT_CREDENTIALS = ("*.example", "*.sample", "*.template", "*.dist")
CREDENTIAL_PATHS = (".aws/credentials", ".docker/config.json", ".kube/config", ".ssh/*")


@dataclass
class PackedCode:
    data: bytes
    ref: common_pb2.CodeRef
    names: list[str]  # the files packed, relative to the root
    left_out: list[str] = field(default_factory=list)  # output folders that held files not packed
    credentials_left_out: list[str] = field(default_factory=list)  # untracked files that look like credentials
    # `git diff HEAD --binary`: the uncommitted change to tracked files, kept apart for the run's record
    # (the untracked files packed are listed in ref.untracked); b"" outside git or with no change.
    diff: bytes = b""

    @property
    def files(self) -> int:
        return len(self.names)


def _git(root: Path, *args: str) -> str | None:
    return _git_all(root, list(args))[0]


def _git_all(root: Path, *commands: list[str]) -> list[str | None]:
    """The output of each git command (None where it failed), run at once: each is a few ms of start-up."""
    procs: list[subprocess.Popen[bytes] | None] = []
    for args in commands:
        try:
            procs.append(
                subprocess.Popen(["git", "-C", str(root), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            )
        except OSError:
            procs.append(None)
    outputs: list[str | None] = []
    for proc in procs:
        if proc is None:
            outputs.append(None)
            continue
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            outputs.append(None)
            continue
        outputs.append(out.decode("utf-8", errors="replace") if proc.returncode == 0 else None)
    return outputs


def git_diff(root: Path) -> bytes:
    """`git diff HEAD --binary` as bytes (a patch `git apply` takes back), or b"" (no git, no commit)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return b""
    return out.stdout if out.returncode == 0 else b""


def list_files(root: Path, exclude: tuple[Path, ...] = ()) -> tuple[list[str], set[str], common_pb2.CodeRef]:
    """The files to pack, relative to root, and which of them git tracks; outside git, folders in `exclude`
    are left out."""
    ref = common_pb2.CodeRef()
    tracked: set[str] = set()
    listed = _git(root, "ls-files", "-z", "-t", "--cached", "--others", "--exclude-standard")
    if listed is not None:
        # `-t`: "H name" for a tracked file, "? name" for an untracked one.
        entries = [e for e in listed.split("\0") if len(e) > 2]
        names = [e[2:] for e in entries]
        tracked = {e[2:] for e in entries if e[0] != "?"}
        head, url, status = _git_all(
            root,
            ["rev-parse", "HEAD", "--abbrev-ref", "HEAD"],
            ["config", "--get", "remote.origin.url"],
            ["status", "--porcelain"],
        )
        commit_branch = (head or "").split()  # both, or neither (no commit yet)
        ref.commit, ref.branch = commit_branch if len(commit_branch) == 2 else ["", ""]
        # A remote cloned with a token has it in its URL: it must not reach the run's record.
        ref.repo_url = public_repo_url(url or "")
        ref.dirty = bool((status or "").strip())
    else:
        names = []
        skip = {p.resolve() for p in exclude}
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and (Path(dirpath) / d).resolve() not in skip)
            rel = Path(dirpath).relative_to(root)
            names.extend((rel / f).as_posix() for f in files)
    # Deleted-but-tracked files are listed by git; keep only what exists.
    return sorted(n for n in set(names) if os.path.lexists(root / n)), tracked, ref


def _without_outputs(names: list[str], tracked: set[str], outputs: list[str]) -> tuple[list[str], list[str]]:
    """Leaves out files under the workflows' artifact folders (outputs a user downloaded into the project
    are not code), except those git tracks; returns the files kept and the folders that lost files."""
    prefixes = [o.rstrip("/") + "/" for o in outputs if o not in ("", ".")]
    kept, left_out = [], set()
    for n in names:
        hit = next((p for p in prefixes if n.startswith(p) or n == p[:-1]), None)
        if hit is None or n in tracked:
            kept.append(n)
        else:
            left_out.add(hit[:-1])
    return kept, sorted(left_out)


def _add_tree(tar: tarfile.TarFile, prefix: str, archive: bytes) -> list[str]:
    """Copies a tar archive's files and links into `tar` under `prefix/` (normalised like the code's own entries:
    no times, owners or other modes); returns the names added. The agent's unpacking refuses any entry that would
    land outside the job's folder, as it does for the code's."""
    added: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as src:
        for member in src.getmembers():
            if not (member.isfile() or member.issym()):
                continue  # folders are made as their files are unpacked; git archive has nothing else
            info = tarfile.TarInfo(f"{prefix}/{member.name}")
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if member.issym():
                info.type = tarfile.SYMTYPE
                info.linkname = member.linkname
                info.mode = 0o777
                tar.addfile(info)
            else:
                info.size = member.size
                info.mode = 0o755 if member.mode & 0o111 else 0o644
                tar.addfile(info, src.extractfile(member))
            added.append(info.name)
    return added


def looks_like_credentials(name: str) -> bool:
    """Whether a file (a path relative to the root) is one that usually holds a token or a key."""
    base = name.rsplit("/", 1)[-1]
    if any(fnmatch.fnmatchcase(base, p) for p in NOT_CREDENTIALS):
        return False
    if any(fnmatch.fnmatchcase(base, p) for p in CREDENTIAL_NAMES):
        return True
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*/" + p) for p in CREDENTIAL_PATHS)


def _without_credentials(names: list[str], tracked: set[str]) -> tuple[list[str], list[str]]:
    """Leaves out untracked files that look like credentials; returns the files kept and those left out."""
    kept: list[str] = []
    left_out: list[str] = []
    for n in names:
        (left_out if n not in tracked and looks_like_credentials(n) else kept).append(n)
    return kept, left_out


def select_files(
    root: Path, exclude: tuple[Path, ...] = (), outputs: list[str] | None = None
) -> tuple[list[str], list[str], list[str], common_pb2.CodeRef]:
    """What `pack` packs, without reading the files: (names, output folders left out, credentials left out, ref)."""
    names, tracked, ref = list_files(root, exclude)
    names, left_out = _without_outputs(names, tracked, outputs or [])
    names, credentials = _without_credentials(names, tracked)
    return names, left_out, credentials, ref


def pack(
    root: Path,
    exclude: tuple[Path, ...] = (),
    outputs: list[str] | None = None,
    extra_trees: dict[str, bytes] | None = None,
) -> PackedCode:
    return pack_listed(root, *list_files(root, exclude), outputs, extra_trees)


def pack_listed(
    root: Path,
    names: list[str],
    tracked: set[str],
    listed_ref: common_pb2.CodeRef,
    outputs: list[str] | None = None,
    extra_trees: dict[str, bytes] | None = None,
) -> PackedCode:
    """Packs files `list_files` listed (the SDK lists a tree first, to see whether it changed since it
    was last packed). `extra_trees`: PREFIX -> a tar archive (`git archive` of a custom provider's commit) packed
    under PREFIX/, so that the agent gets the provider's files with the code, whatever it can reach
    (cli/providers/custom.py)."""
    ref = common_pb2.CodeRef()
    ref.CopyFrom(listed_ref)
    names, left_out = _without_outputs(names, tracked, outputs or [])
    names, credentials = _without_credentials(names, tracked)
    for prefix in extra_trees or {}:
        clash = next((n for n in names if n == prefix or n.startswith(prefix + "/")), None)
        if clash is not None:
            raise CliError(f"{clash}: the project has a file where dstack puts a provider's files ({prefix}/)")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            shipped = [
                n for prefix, archive in sorted((extra_trees or {}).items()) for n in _add_tree(tar, prefix, archive)
            ]
            for name in names:
                path = root / name
                st = path.lstat()
                info = tarfile.TarInfo(name)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if stat.S_ISLNK(st.st_mode):
                    info.type = tarfile.SYMTYPE
                    info.linkname = os.readlink(path)
                    info.mode = 0o777
                    tar.addfile(info)
                elif stat.S_ISREG(st.st_mode):
                    info.size = st.st_size
                    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                    try:
                        with path.open("rb") as f:
                            tar.addfile(info, f)
                    except OSError as e:
                        raise CliError(f"cannot read {path}: {e.strerror}") from None
    data = buf.getvalue()
    ref.hash = hashlib.sha256(data).hexdigest()
    ref.size = len(data)
    diff = b""
    if ref.commit:  # in git with a commit: the change since it, and the untracked files sent with it
        ref.untracked.extend(n for n in names if n not in tracked)
        diff = git_diff(root) if ref.dirty else b""
        if diff:
            ref.diff_hash = hashlib.sha256(diff).hexdigest()
            ref.diff_size = len(diff)
    return PackedCode(
        data=data, ref=ref, names=names + shipped, left_out=left_out, credentials_left_out=credentials, diff=diff
    )
