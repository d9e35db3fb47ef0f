"""cli/deferred.py: modules grpc imports and a quick command never reads, run only if something reads them.

The attacks on such a shortcut: code that does use a deferred module afterwards (an asyncio loop, a grpc.aio
call, a submodule imported before its package) must work as if nothing had been deferred; threads reading it
at once must see one complete module, run once; a module whose code fails must fail as an import does. And
the point of it: a real `dstack ps` leaves them unread, and imports nothing beyond grpc and the protos but its
own few modules (the set is pinned here, so that a new import on that path is a decision, not an accident).
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstack.cli.deferred import UNUSED_BY_BLOCKING_GRPC
from tests.conftest import REPO
from tests.unit.test_cli_imports import FAKE_COORDINATOR


def installed_env(**extra: str) -> dict[str, str]:
    """The environment of an interpreter run with -S that finds dstack and its dependencies as a user's
    non-editable install does: on the path, without the dev environment's editable-install finder, which its
    site hook loads (with pathlib and more) before any of our code runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *site.getsitepackages()])
    return env | extra


def python(code: str) -> str:
    """Runs `code` in a fresh interpreter (a deferral only acts on modules not imported yet); its stdout."""
    r = subprocess.run(
        [sys.executable, "-S", "-c", textwrap.dedent(code)],
        env=installed_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_code_that_uses_the_deferred_modules_works_as_without(tmp_path: Path) -> None:
    """After `import grpc` with everything deferred: an asyncio loop and a grpc.aio call to a real server run,
    the module object a holder got at import time is the real module, and a submodule imports."""
    address = f"unix://{tmp_path}/c.sock"
    out = python(
        f"""
        import json, sys, types
        from dstack.cli.deferred import DeferredModule, defer
        deferred = defer()
        import grpc
        import asyncio
        held = asyncio
        before = {{n: type(sys.modules[n]) is DeferredModule for n in deferred}}
        ADDRESS = {address!r}
        {textwrap.indent(FAKE_COORDINATOR, "        ").strip()}

        async def listing():
            async with grpc.aio.insecure_channel(ADDRESS) as channel:
                resp = await client_pb2_grpc.ClientServiceStub(channel).ListRuns(client_pb2.ListRunsRequest())
                return [r.name for r in resp.runs]

        names = asyncio.run(listing())
        import asyncio.subprocess
        from grpc.aio import AioRpcError
        print(json.dumps({{
            "deferred": deferred,
            "before": before,
            "names": names,
            "same": held is sys.modules["asyncio"] and type(held) is types.ModuleType,
            "aio": grpc.aio is sys.modules["grpc.aio"] and AioRpcError is grpc.aio.AioRpcError,
            "sub": held.subprocess is sys.modules["asyncio.subprocess"],
        }}))
        """
    )
    result = json.loads(out)
    assert result["deferred"] == list(UNUSED_BY_BLOCKING_GRPC)
    # Importing grpc, the protos and the server's modules read none of them.
    assert result["before"]["asyncio"] and result["before"]["grpc.aio"]
    assert result["names"] == ["silly-frog-1"]
    assert result["same"] and result["aio"] and result["sub"]


def test_a_submodule_imported_first_runs_its_package_first() -> None:
    out = python(
        """
        import sys
        from dstack.cli.deferred import defer
        defer(("asyncio",))
        import asyncio.subprocess
        import asyncio
        print(asyncio.run(asyncio.sleep(0, "ran")), asyncio.subprocess is sys.modules["asyncio.subprocess"])
        """
    )
    assert out.split() == ["ran", "True"]


def test_threads_that_read_a_deferred_module_at_once_get_it_whole_and_run_it_once(tmp_path: Path) -> None:
    (tmp_path / "slowmod.py").write_text(
        "import time\nwith open(__file__ + '.runs', 'a') as f:\n    f.write('x')\n"
        "time.sleep(0.3)  # the other threads arrive while it runs\nVALUE = 42\n"
    )
    out = python(
        f"""
        import sys, threading
        sys.path.insert(0, {str(tmp_path)!r})
        from dstack.cli.deferred import defer
        assert defer(("slowmod",)) == ["slowmod"]
        import slowmod
        barrier, seen = threading.Barrier(8), []

        def read():
            barrier.wait()
            try:
                seen.append(slowmod.VALUE)
            except AttributeError as e:
                seen.append(repr(e))

        threads = [threading.Thread(target=read) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(seen)
        """
    )
    assert out.strip() == str([42] * 8)
    assert (tmp_path / "slowmod.py.runs").read_text() == "x"


def test_a_module_whose_code_fails_fails_as_an_import_does(tmp_path: Path) -> None:
    (tmp_path / "brokenmod.py").write_text("VALUE = 1\nraise RuntimeError('broken at import')\n")
    out = python(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from dstack.cli.deferred import defer
        defer(("brokenmod",))
        import brokenmod
        for _ in range(2):
            try:
                brokenmod.VALUE
            except RuntimeError as e:
                print("read:", e, "brokenmod" in sys.modules)
        try:
            import brokenmod as again
        except RuntimeError as e:
            print("import again:", e)
        """
    )
    # Each read fails with the module's own error and leaves no module under the name, as a failed import
    # does; the stand-in runs the code again on the next read, as a second `import` would.
    assert out.splitlines() == [
        "read: broken at import False",
        "read: broken at import False",
        "import again: broken at import",
    ]


def test_a_module_imported_already_is_left_alone() -> None:
    out = python(
        """
        import json, sys
        import socket
        from dstack.cli.deferred import defer
        print(json.dumps([defer(("socket", "grpc.aio", "no_such_module_here")), type(sys.modules["socket"]).__name__]))
        """
    )
    # socket: imported; grpc.aio: its package is not, but that is fine to defer; an unknown name: skipped.
    assert json.loads(out) == [["grpc.aio"], "module"]


# --- what a real `dstack ps` imports -----------------------------------------------------------------------

# Beyond what `import grpc` and the protos import: the CLI's own modules on the path of `ps`, json (the config
# file and `--json`), and grpc's blocking channel. A module added here is a cost every `dstack ps` pays.
PS_ALLOWED_BEYOND_GRPC = {
    "dstack.cli",
    "dstack.cli.quick",
    "dstack.cli.deferred",
    "dstack.cli.errors",
    "dstack.cli.home",
    "dstack.cli.session",
    "dstack.cli.client",
    "dstack.cli.render",
    "dstack.cli.term",
    "dstack.cli.commands",
    "dstack.cli.commands.ps",
    "dstack.tls",
    "json",
    "json.decoder",
    "json.encoder",
    "json.scanner",
    "_json",
    "grpc._channel",
    "grpc._simple_stubs",
    "grpc.experimental",
}
# Never on the quick path: typer's stack, rich, yaml, and what the CLI's own modules once imported for nothing.
PS_NEVER = ("typer", "click", "rich", "yaml", "pathlib", "dataclasses", "hashlib", "ssl", "importlib.metadata")

REPORT = """
import atexit, json, sys
from dstack.cli.deferred import DeferredModule
def _report():
    with open({out!r}, "w") as f:
        json.dump({{"modules": sorted(sys.modules),
                    "unread": sorted(n for n, m in sys.modules.items() if type(m) is DeferredModule)}}, f)
atexit.register(_report)
sys.argv = ["dstack", *{argv!r}]
from {entry} import main
main()
"""


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fake coordinator (tests/unit/test_cli_imports.py) in a process of its own, on a Unix socket."""
    sock = tmp_path_factory.mktemp("coordinator") / "c.sock"
    address = f"unix://{sock}"
    script = f"ADDRESS = {address!r}\n{FAKE_COORDINATOR}\nserver.wait_for_termination()\n"
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the fake coordinator did not start"
            time.sleep(0.05)
        yield address
    finally:
        proc.kill()
        proc.wait()


def cli(
    address: str, home: Path, argv: list[str], entry: str = "dstack.cli.quick"
) -> tuple[int, str, str, dict[str, list[str]]]:
    """The CLI in a fresh interpreter: exit status, stdout, stderr, and the modules it had loaded at exit."""
    out = home / "report.json"
    out.unlink(missing_ok=True)
    env = installed_env(DSTACK_HOME=str(home), DSTACK_COORDINATOR=address, DSTACK_TOKEN="t", COLUMNS="120")
    code = REPORT.format(out=str(out), argv=argv, entry=entry)
    r = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, cwd=home, capture_output=True, text=True, timeout=60
    )
    return r.returncode, r.stdout, r.stderr, json.loads(out.read_text())


def test_ps_imports_grpc_the_protos_and_its_own_modules_only(coordinator: str, tmp_path: Path) -> None:
    floor = set(
        json.loads(
            python(
                "import json, sys, grpc\nfrom dstack.protos.v1 import client_pb2, client_pb2_grpc, common_pb2\n"
                "print(json.dumps(sorted(sys.modules)))"
            )
        )
    )
    rc, stdout, stderr, report = cli(coordinator, tmp_path, ["ps"])
    assert rc == 0 and "silly-frog-1" in stdout, stderr
    modules = set(report["modules"])
    assert sorted(modules - floor - PS_ALLOWED_BEYOND_GRPC) == []
    assert [m for m in modules if any(m == n or m.startswith(n + ".") for n in PS_NEVER)] == []
    assert report["unread"] == sorted(UNUSED_BY_BLOCKING_GRPC)
    # protobuf's pure-Python messages (~12 ms of CPU with what they import) and traceback: loaded, never read.
    assert {"google.protobuf.internal.python_message", "traceback"} <= set(report["unread"])


@pytest.mark.parametrize(
    "argv",
    [
        ["ps"],
        ["ps", "--json"],
        ["ps", "-a", "-n", "1"],
        ["logs", "silly-frog-1"],
        ["agents"],  # the fake coordinator does not implement it: the same error both ways
    ],
)
def test_the_quick_path_prints_what_the_typer_path_prints(coordinator: str, tmp_path: Path, argv: list[str]) -> None:
    quick = cli(coordinator, tmp_path, argv)
    typer_app = cli(coordinator, tmp_path, argv, entry="dstack.cli.main")
    assert quick[:3] == typer_app[:3]
    assert "Traceback" not in quick[2]
    assert "typer" not in quick[3]["modules"] and "typer" in typer_app[3]["modules"]
    if argv == ["agents"]:
        assert quick[0] == 1 and quick[2].startswith("error: the coordinator failed: UNIMPLEMENTED"), quick[2]
