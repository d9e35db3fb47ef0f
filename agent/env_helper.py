"""Runs a Python job in a cached environment with its requirements installed.

    python3 env_helper.py --requirements requirements.txt -- train.py --epochs 3

The job runs this with its own interpreter (on the host, or inside its container, where the agent
mounts this file and the cache), so it is one self-contained file: standard library only, and it
must run on Python 3.8 (no syntax or library newer than that, whatever the project's linter says).

The agent says where the cache is (docs/lifecycle.md, "Python environments"):
  DSTACK_ENV_CACHE            the cache folder (the same path for every job: venvs are not relocatable)
  DSTACK_ENV_CACHE_MAX_BYTES  its size bound; 0 (or no DSTACK_ENV_CACHE): a fresh venv in the job's folder
  DSTACK_ENV_SCOPE            what else tells interpreters apart (the container image's id)

Cache layout: `<key>/` is a venv, `<key>/dstack-env.json` its completion marker (written last; its
mtime is the last use), `<key>.lock` the lock file that every job using `<key>` holds shared, for
as long as its script runs, and that a creator or an evictor holds exclusively.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import time

ENV_CACHE = "DSTACK_ENV_CACHE"
ENV_MAX_BYTES = "DSTACK_ENV_CACHE_MAX_BYTES"
ENV_SCOPE = "DSTACK_ENV_SCOPE"
# Where to write what the environment resolved to (agent/environment.py reads it): set by the agent.
ENV_REPORT = "DSTACK_ENV_REPORT"
REPORT_FILE = ".dstack-env-report.json"
MAX_FREEZE_CHARS = 256 * 1024
MARKER = "dstack-env.json"
LOCAL_VENV = ".dstack-venv"  # where a job's own venv goes when the cache is off
KEY_CHARS = 16  # of the sha256: short enough for the 127-byte shebang lines pip writes into bin/
EVICT_LOCK = ".evict.lock"
PARENT_PTH = "dstack-parent-env.pth"  # in a venv made by a venv's interpreter: that venv's packages


def say(text: str) -> None:
    # stdout, like pip: the two keep their order in the job's log.
    print("dstack: " + text, flush=True)


class HelperError(Exception):
    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ---- the key -------------------------------------------------------------------------------------


def _requirement_files(path: str, seen: list[str]) -> None:
    """The file and those it includes with -r/-c (pip resolves them relative to the including file)."""
    real = os.path.realpath(path)
    if real in seen:
        return
    seen.append(real)
    with open(real, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line in lines:
        words = line.split("#", 1)[0].split()
        if len(words) == 2 and words[0] in ("-r", "--requirement", "-c", "--constraint"):
            included = os.path.join(os.path.dirname(real), words[1])
            if os.path.isfile(included):
                _requirement_files(included, seen)
        elif words and words[0].startswith(("--requirement=", "--constraint=")):
            included = os.path.join(os.path.dirname(real), words[0].split("=", 1)[1])
            if os.path.isfile(included):
                _requirement_files(included, seen)


def requirements_digest(path: str) -> str:
    files: list[str] = []
    _requirement_files(path, files)
    h = hashlib.sha256()
    for i, name in enumerate(files):
        with open(name, "rb") as f:
            content = f.read()
        # Included files by their name as written relative to the first: moving the project keeps the key.
        label = "" if i == 0 else os.path.relpath(name, os.path.dirname(files[0]))
        h.update(f"{label}\0{len(content)}\0".encode())
        h.update(content)
    return h.hexdigest()


def _os_release() -> str:
    for name in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            with open(name, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except OSError:
            continue
    return ""


def constraints_digest() -> str:
    """sha256 of the constraints files PIP_CONSTRAINT names (space-separated, as pip reads it); "" for none."""
    names = os.environ.get("PIP_CONSTRAINT", "").split()
    h = hashlib.sha256()
    for name in names:
        try:
            with open(name, "rb") as f:
                content = f.read()
        except OSError:
            content = b""
        h.update(f"{len(content)}\0".encode())
        h.update(content)
    return h.hexdigest() if names else ""


def interpreter_identity() -> dict[str, str]:
    """What makes a venv built by this interpreter unusable by another: two images or hosts with
    different Pythons (or the same Python over different system libraries) never share one."""
    return {
        "version": sys.version,  # with the build's date and compiler
        "implementation": f"{sys.implementation.name} {sys.implementation.cache_tag}",
        "platform": f"{sysconfig.get_platform()} {platform.machine()} {' '.join(platform.libc_ver())}",
        "executable": os.path.realpath(sys.executable),
        "prefix": os.path.realpath(sys.prefix),  # a venv's interpreter has other site-packages to see
        "os": f"{platform.system()} {_os_release()}",
        "scope": os.environ.get(ENV_SCOPE, ""),
    }


def env_key(requirements: str) -> str:
    material: dict[str, object] = {
        "interpreter": interpreter_identity(),
        "requirements": requirements_digest(requirements),
    }
    if parent_site_dirs():  # environments that see their maker's venv (since dstack-parent-env.pth)
        material["parent_site_dirs"] = parent_site_dirs()
    constraints = constraints_digest()
    if constraints:  # `dstack rerun --pin` (pip reads PIP_CONSTRAINT as -c): another resolution, another venv
        material["constraints"] = constraints
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def count_requirements(path: str) -> int:
    """Requirement lines: not blank, not comments, not options such as --find-links (but -e PATH is one)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.split("#", 1)[0].strip() for line in f.read().splitlines()]
    return sum(1 for s in lines if s and (not s.startswith("-") or s.startswith(("-e ", "--editable"))))


# ---- creating and using an environment -----------------------------------------------------------


def tree_size(path: str) -> int:
    """Bytes on disk (as du counts them), without following links."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def remove_tree(path: str) -> None:
    """shutil.rmtree without shutil (absent from Debian's python3-minimal): files, then folders."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            full = os.path.join(root, name)
            if os.path.islink(full):
                os.unlink(full)
            else:
                os.rmdir(full)
    os.rmdir(path)


def _run(argv: list[str], what: str) -> None:
    code = subprocess.call(argv)  # its output goes straight into the job's log
    if code != 0:
        raise HelperError(f"{what} failed (exit code {code}): {shlex.join(argv)}", code if code > 0 else 1)


def parent_site_dirs() -> list[str]:
    """The site-packages of the venv this interpreter belongs to; none for a base interpreter."""
    if sys.prefix == sys.base_prefix:
        return []
    return list(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]))


def inherit_parent_packages(env_dir: str) -> None:
    """--system-site-packages shows a new venv the packages of the base interpreter only. Made by the python
    of another venv (a team's environment with jupyterlab and torch installed, first on PATH), it would miss
    what that venv has, and offline a job could not get it again: a .pth file adds that venv's site-packages
    after the new venv's own, as the interpreter that made it sees them (cli/providers/pyenv.py does the same
    for venvs made without the cache)."""
    dirs = parent_site_dirs()
    if not dirs:
        return
    own = os.path.join(env_dir, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    with open(os.path.join(own, PARENT_PTH), "w", encoding="utf-8") as f:
        f.writelines(f"import site; site.addsitedir({d!r})\n" for d in dirs)  # with the .pth files in them


def create_env(path: str, requirements: str) -> None:
    _run([sys.executable, "-m", "venv", "--system-site-packages", path], "creating the venv")
    inherit_parent_packages(path)
    python = os.path.join(path, "bin", "python")
    _run([python, "-m", "pip", "install", "--disable-pip-version-check", "-r", requirements], "pip install")


def read_marker(env_dir: str) -> dict[str, object] | None:
    try:
        with open(os.path.join(env_dir, MARKER), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(env_dir: str, data: dict[str, object]) -> None:
    tmp = os.path.join(env_dir, MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(env_dir, MARKER))


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def megabytes(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def acquire(cache: str, key: str, requirements: str) -> tuple[int, dict[str, object], bool]:
    """Returns an fd holding the entry's lock shared, its marker, and whether this call created the venv."""
    name = key[:KEY_CHARS]
    env_dir = os.path.join(cache, name)
    fd = os.open(os.path.join(cache, name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    made = False
    while True:
        fcntl.flock(fd, fcntl.LOCK_SH)
        marker = read_marker(env_dir)
        if marker is not None and marker.get("key") == key:
            return fd, marker, made
        # Missing, or left half-created by a creator that died: create it, alone. A conversion is not
        # atomic (flock drops the shared lock first), so whoever gets the exclusive lock looks again.
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another job that is creating environment {name}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        marker = read_marker(env_dir)
        if marker is not None and marker.get("key") == key:
            continue  # made by the job we waited for: use it (under a shared lock, at the loop's top)
        if os.path.lexists(env_dir):
            say(f"environment {name} was left half-created (its creator stopped); creating it again")
            remove_tree(env_dir)
        say(f"installing requirements ({count_requirements(requirements)} packages) into a new environment {name} ...")
        try:
            create_env(env_dir, requirements)
        except BaseException:
            remove_tree(env_dir)  # no half-made venv is left to fill the disk (a killed job's is: see above)
            raise
        write_marker(
            env_dir,
            {
                "key": key,
                "created": time.time(),
                "size": tree_size(env_dir),
                "python": sys.version.split()[0],
                "executable": os.path.realpath(sys.executable),
                "requirements_sha256": requirements_digest(requirements),
            },
        )
        made = True
        # and loop: take the shared lock, and check it is still there (an evictor may slip in between)


def touch(env_dir: str) -> None:
    """The marker's mtime is the entry's last use (eviction takes the least recently used first)."""
    try:
        os.utime(os.path.join(env_dir, MARKER))
    except OSError:
        pass


# ---- eviction ------------------------------------------------------------------------------------


def _entries(cache: str) -> list[tuple[float, int, str]]:
    """(last use, size, name) of every environment in the cache, complete or half-created."""
    out: list[tuple[float, int, str]] = []
    for name in os.listdir(cache):
        env_dir = os.path.join(cache, name)
        if len(name) != KEY_CHARS or not os.path.isdir(env_dir):
            continue
        marker = read_marker(env_dir)
        size = marker.get("size") if marker is not None else None
        try:
            used = os.stat(os.path.join(env_dir, MARKER) if marker is not None else env_dir).st_mtime
        except OSError:
            continue  # removed meanwhile
        out.append((used, size if isinstance(size, int) else tree_size(env_dir), name))
    return out


def evict(cache: str, max_bytes: int, keep: str) -> None:
    """Removes the least recently used environments until the cache fits its bound. An environment
    whose lock cannot be had at once (a job runs in it, or is creating it) is never touched."""
    entries = _entries(cache)
    total = sum(size for _, size, _ in entries)
    if total <= max_bytes:
        return
    guard = os.open(os.path.join(cache, EVICT_LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another job is evicting right now
        for used, size, name in sorted(entries):
            if total <= max_bytes:
                break
            if name == keep:
                continue
            fd = os.open(os.path.join(cache, name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use
                env_dir = os.path.join(cache, name)
                # The marker goes first: an eviction cut short leaves a half-created entry, rebuilt on use.
                if os.path.lexists(os.path.join(env_dir, MARKER)):
                    os.unlink(os.path.join(env_dir, MARKER))
                remove_tree(env_dir)
                total -= size
                say(f"evicted environment {name} ({megabytes(size)}, last used {when(used)})")
            finally:
                os.close(fd)  # the lock file stays: removing it would race with a job opening it
        if total > max_bytes:
            say(
                f"the environment cache holds {megabytes(total)}, over its bound of {megabytes(max_bytes)}:"
                " the rest is in use"
            )
    finally:
        os.close(guard)


# ---- running the script --------------------------------------------------------------------------


def write_report(env_dir: str, started: float) -> None:
    """`pip freeze` of the environment and its Python version, into the file the agent named (if any),
    for the run's record. Never fails the job: a report that cannot be made is left out."""
    target = os.environ.get(ENV_REPORT, "")
    if not target:
        return
    python = os.path.join(env_dir, "bin", "python")
    try:
        out = subprocess.run(
            [python, "-m", "pip", "freeze", "--disable-pip-version-check", "--all"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
        packages = out.stdout.decode("utf-8", errors="replace") if out.returncode == 0 else ""
        report = {
            "python_version": platform.python_version(),
            "os": platform.platform(),
            "packages": packages[:MAX_FREEZE_CHARS],
            "packages_truncated": len(packages) > MAX_FREEZE_CHARS,
            # The environment's setup (made or reused) ran inside the job: the agent counts it apart.
            "setup_ns": int((time.monotonic() - started) * 1e9),
        }
        with open(target, "w", encoding="utf-8") as f:
            json.dump(report, f)
    except (OSError, subprocess.SubprocessError) as e:
        say(f"could not record the environment's packages: {e}")


def exec_script(env_dir: str, lock_fd: int | None, script_argv: list[str]) -> None:
    """Replaces this process with the venv's python running the script (signals and the exit code
    reach the script as before). The shared lock's fd goes along, so the lock lives as long as the job."""
    if lock_fd is not None:
        os.set_inheritable(lock_fd, True)
    env = dict(os.environ)
    env["VIRTUAL_ENV"] = env_dir  # what bin/activate sets
    env["PATH"] = os.path.join(env_dir, "bin") + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONHOME", None)
    python = os.path.join(env_dir, "bin", "python")
    os.execve(python, [python, *script_argv], env)


def max_bytes_from_env() -> int:
    raw = os.environ.get(ENV_MAX_BYTES, "0").strip() or "0"
    try:
        return max(0, int(raw))
    except ValueError:
        raise HelperError(f"{ENV_MAX_BYTES} must be a number of bytes, got {raw!r}") from None


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        split = argv.index("--")
        own, script_argv = argv[:split], argv[split + 1 :]
    else:
        own, script_argv = argv, []
    p = argparse.ArgumentParser(prog="env_helper.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--requirements", required=True, help="the job's requirements file")
    p.add_argument("--key", action="store_true", help="print the environment's key and exit")
    args = p.parse_args(own)
    if not args.key and not script_argv:
        p.error("the script to run goes after --")
    return args, script_argv


def run(argv: list[str]) -> None:
    started = time.monotonic()
    args, script_argv = parse_args(argv)
    requirements = args.requirements
    if not os.path.isfile(requirements):
        raise HelperError(f"the requirements file {requirements!r} does not exist")
    if args.key:
        print(env_key(requirements))
        return
    try:
        import venv  # noqa: F401 - only to say clearly that it is missing
    except ImportError:
        raise HelperError(
            f"{sys.executable} has no venv module, needed for `requirements` (Debian: apt-get install python3-venv)"
        ) from None
    cache = os.environ.get(ENV_CACHE, "")
    max_bytes = max_bytes_from_env()
    if not cache or max_bytes == 0:
        env_dir = os.path.abspath(LOCAL_VENV)
        say(
            f"installing requirements ({count_requirements(requirements)} packages) into a new environment"
            f" {LOCAL_VENV} (the environment cache is off)"
        )
        remove_tree(env_dir)
        create_env(env_dir, requirements)
        say(f"environment {LOCAL_VENV} ready in {time.monotonic() - started:.2f} s")
        write_report(env_dir, started)
        exec_script(env_dir, None, script_argv)
        return
    os.makedirs(cache, exist_ok=True)
    key = env_key(requirements)
    name = key[:KEY_CHARS]
    lock_fd, marker, made = acquire(cache, key, requirements)
    env_dir = os.path.join(cache, name)
    touch(env_dir)
    evict(cache, max_bytes, keep=name)
    took = f"ready in {time.monotonic() - started:.2f} s"
    size = marker.get("size")
    if made:
        say(f"environment {name} {took} ({megabytes(size) if isinstance(size, int) else '?'})")
    else:
        created = marker.get("created")
        since = f"created {when(created)}" if isinstance(created, (int, float)) else "created earlier"
        say(f"reusing environment {name} ({since}); {took}")
    write_report(env_dir, started)
    exec_script(env_dir, lock_fd, script_argv)


def main() -> None:
    try:
        run(sys.argv[1:])
    except HelperError as e:
        say(str(e))
        sys.exit(e.code)
    except OSError as e:  # e.g. a cache folder this job may not write to
        say(f"the environment cache failed: {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
