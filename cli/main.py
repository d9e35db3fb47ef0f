"""The `dstack` command. Each command imports what it needs when it runs, so start-up stays fast.

No `from __future__ import annotations` here: typer reads every command's signature on every call, and string
annotations would be compiled and evaluated each time (twice: inspect.signature and get_type_hints).
"""

import sys
from pathlib import Path
from typing import Annotated

import typer

from dstack.cli.errors import CliError

app = typer.Typer(
    name="dstack",
    help="Run ML workflows from .dstack/workflows.yaml on your GPU pool or locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
artifacts_app = typer.Typer(help="List, download and publish artifacts.", no_args_is_help=True)
local_app = typer.Typer(help="Manage the embedded local coordinator and agent.", no_args_is_help=True)
tags_app = typer.Typer(help="Name runs, so that workflows can depend on their artifacts.", no_args_is_help=True)
app.add_typer(tags_app, name="tags")
secrets_app = typer.Typer(help="Secrets every job gets as environment variables.", no_args_is_help=True)
app.add_typer(secrets_app, name="secrets")
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(local_app, name="local")
# Its own module (add, list, remove, rotate-token); `users set` (fair share and quotas) is below.
from dstack.cli.commands.users import users_app  # noqa: E402

app.add_typer(users_app, name="users")

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings={**PASS_THROUGH, "help_option_names": []})
def run(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(help="Name of a workflow in .dstack/workflows.yaml")] = "",
    detach: Annotated[bool, typer.Option("-d", "--detach", help="Submit and return at once")] = False,
    tag: Annotated[str, typer.Option("-t", "--tag", help="Tag the run when it finishes done")] = "",
    priority: Annotated[
        int, typer.Option("--priority", help="Orders your own waiting jobs: higher first (default 0)")
    ] = 0,
    reuse: Annotated[
        bool, typer.Option("--reuse", help="Step cache for every job: reuse a done run's artifacts of the same step")
    ] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Run every job, even those with `cache: true`")] = False,
) -> None:
    """Run a workflow and follow its logs until it ends (exit code 0 when done).

    `dstack run WORKFLOW --help` shows the workflow's help and its variables.

    `--NAME VALUE` (or `--NAME=VALUE`) overrides a variable; other arguments go to the workflow.
    A bash workflow also takes `-p/--ports N` (as in 2022): N ports picked when the job starts, as $PORT_0..."""
    if workflow in ("--help", "-h"):
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    from dstack.cli.commands.run import no_workflow_error, run_command

    if not workflow:
        raise no_workflow_error(Path.cwd())

    if reuse and no_cache:
        raise CliError("--reuse and --no-cache contradict each other: give one")
    cache = True if reuse else False if no_cache else None
    raise typer.Exit(run_command(workflow, _with_separator(list(ctx.args)), detach, tag, priority, cache))


def _with_separator(args: list[str]) -> list[str]:
    """Click drops the `--` that ends the options; put it back where it was, since `dstack run` gives it a
    meaning (what follows goes to the workflow as it is, never read as a variable)."""
    if "--" not in sys.argv:
        return args
    after = sys.argv[sys.argv.index("--") + 1 :]
    if not after or args[len(args) - len(after) :] != after:
        return args
    return [*args[: len(args) - len(after)], "--", *after]


@app.command()
def validate(
    workflow: Annotated[str, typer.Argument(help="Only this workflow (default: every workflow)")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for CI)")] = False,
) -> None:
    """Check workflow files as `dstack run` would, without submitting or contacting a coordinator.

    Prints each workflow as ok or with its file:line error, and any notes; exits 1 when any has an error."""
    from dstack.cli.commands.validate import validate_command

    raise typer.Exit(validate_command(workflow, as_json))


@app.command()
def ps(
    all_: Annotated[bool, typer.Option("-a", "--all", help="Show all runs, not only recent ones")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: every run listed, unless --limit is given")
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option(
            "-n", "--limit", min=0, help="Show the newest N runs (default 100, plus the latest finished); 0: every run"
        ),
    ] = None,
) -> None:
    """List runs: unfinished ones (newest first) and the latest finished; -a: every run."""
    from dstack.cli.commands.ps import ps_command

    ps_command(all_, as_json, limit)


@app.command()
def logs(
    run: Annotated[str, typer.Argument(help="Run name")],
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Follow until the run ends")] = False,
    attempt: Annotated[
        int | None, typer.Option("--attempt", min=1, help="Only this attempt's lines (jobs retried or preempted)")
    ] = None,
    node: Annotated[
        int | None, typer.Option("--node", min=0, help="Only this node's lines (a multi-node job; 0: the master)")
    ] = None,
) -> None:
    """Print the logs of a run (each attempt of a retried job under its own header; each node of a
    multi-node job with a `node K | ` prefix)."""
    from dstack.cli.commands.logs import logs_command

    logs_command(run, follow, attempt, node)


@app.command()
def show(
    run: Annotated[str, typer.Argument(help="Run name")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON")] = False,
) -> None:
    """Show a run's record: code, resolved workflow, environment, GPUs, timings, inputs and artifacts."""
    from dstack.cli.commands.record import show_command

    show_command(run, as_json)


@app.command()
def code(
    run: Annotated[str, typer.Argument(help="Run name")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Restore the exact tree the run's jobs saw into this folder")
    ] = None,
    diff: Annotated[bool, typer.Option("--diff", help="Print the run's uncommitted diff (git diff HEAD)")] = False,
) -> None:
    """Restore the code of a run (-o DIR), or print its uncommitted diff (--diff)."""
    from dstack.cli.commands.record import code_command

    code_command(run, output, diff)


@app.command()
def rerun(
    run: Annotated[str, typer.Argument(help="Run name")],
    same_inputs: Annotated[
        bool, typer.Option("--same-inputs", help="Take the inputs the run took, even if its tags have moved since")
    ] = False,
    pin: Annotated[
        bool, typer.Option("--pin", help="Pin the image to its recorded digest and pip to the recorded pip freeze")
    ] = False,
    detach: Annotated[bool, typer.Option("-d", "--detach", help="Submit and return")] = False,
    tag: Annotated[str, typer.Option("-t", "--tag", help="Tag the new run with this name when it finishes done")] = "",
) -> None:
    """Run a finished run again from its record: the same code, resolved workflows and job specs."""
    from dstack.cli.commands.rerun import rerun_command

    raise typer.Exit(rerun_command(run, same_inputs, pin, detach, tag))


@app.command()
def diff(
    run1: Annotated[str, typer.Argument(help="Run name")],
    run2: Annotated[str, typer.Argument(help="Run name")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the differences as JSON (dstack.run-diff/v1)")] = False,
    code: Annotated[bool, typer.Option("--code", help="Also a unified diff of the two code trees")] = False,
) -> None:
    """What differs between two runs' records: code, variables, inputs, packages, image, GPUs, timings."""
    from dstack.cli.commands.rerun import diff_command

    diff_command(run1, run2, as_json, code)


@app.command()
def stop(
    run: Annotated[str, typer.Argument(help="Run name")],
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for the run to end (0: do not wait)")] = 60.0,
    preempt: Annotated[
        bool,
        typer.Option("--preempt", help="Admin: preempt its interruptible jobs (saved, requeued as new attempts)"),
    ] = False,
) -> None:
    """Stop a run: its processes get SIGTERM, then SIGKILL after a grace period; prints how it ended."""
    from dstack.cli.commands.stop import preempt_command, stop_command

    raise typer.Exit(preempt_command(run) if preempt else stop_command(run, wait))


agents_app = typer.Typer(help="List the agents of the pool; remove or approve one (admin).")
app.add_typer(agents_app, name="agents")
join_tokens_app = typer.Typer(help="Tokens agents enrol with (admin).", no_args_is_help=True)
app.add_typer(join_tokens_app, name="join-tokens")


@agents_app.callback(invoke_without_command=True)
def agents(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """List the agents of the pool: every agent that registered (online, lost, never connected, pending
    approval, removed)."""
    if ctx.invoked_subcommand is not None:
        return
    from dstack.cli.commands.agents import agents_command

    agents_command(as_json)


@agents_app.command("remove")
def agents_remove(name: Annotated[str, typer.Argument(help="Agent name")]) -> None:
    """Remove an agent (admin): its credential is revoked, its connection dropped, its running jobs fail."""
    from dstack.cli.commands.agents import remove_command

    remove_command(name)


@agents_app.command("approve")
def agents_approve(name: Annotated[str, typer.Argument(help="Agent name")]) -> None:
    """Let an agent that waits for approval (`dstack server --approve-agents`) into the pool (admin)."""
    from dstack.cli.commands.agents import approve_command

    approve_command(name)


@join_tokens_app.command("create")
def join_tokens_create(
    ttl: Annotated[str, typer.Option("--ttl", help="Expires after this long: 90s, 30m, 24h, 7d (default: never)")] = "",
    uses: Annotated[int, typer.Option("--uses", help="Enrols at most this many agents (default: unlimited)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Create a join token; its value is printed this once (the coordinator keeps only its hash)."""
    from dstack.cli.commands.join_tokens import create_command

    create_command(ttl, uses, as_json)


@join_tokens_app.command("list")
def join_tokens_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """List join tokens: id, dates, uses and whether revoked; never their values."""
    from dstack.cli.commands.join_tokens import list_command

    list_command(as_json)


@join_tokens_app.command("revoke")
def join_tokens_revoke(token_id: Annotated[str, typer.Argument(metavar="ID", help="Join token id")]) -> None:
    """Revoke a join token: no agent can enrol with it any more (`default` is the server's own)."""
    from dstack.cli.commands.join_tokens import revoke_command

    revoke_command(token_id)


@artifacts_app.command("list")
def artifacts_list(
    run: Annotated[str, typer.Argument(help="Run name")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List the artifact files of a run."""
    from dstack.cli.commands.artifacts import list_command

    list_command(run, as_json)


@artifacts_app.command("download")
def artifacts_download(
    run: Annotated[str, typer.Argument(help="Run name")],
    path: Annotated[str, typer.Argument(help="Only this file or folder")] = "",
    output: Annotated[Path, typer.Option("-o", "--output", help="Destination folder")] = Path("."),
) -> None:
    """Download the artifacts of a run (all, or those at or under PATH), keeping their paths."""
    from dstack.cli.commands.artifacts import download_command

    download_command(run, output, path)


@artifacts_app.command("upload")
def artifacts_upload(
    folder: Annotated[Path, typer.Argument(help="Local folder to publish")],
    tag: Annotated[str, typer.Option("-t", "--tag", help="Tag to publish it under")],
    workflow: Annotated[
        str, typer.Option("-w", "--workflow", help="Workflow name it stands for (depends-on: WORKFLOW:TAG)")
    ] = "",
    prefix: Annotated[str, typer.Option("--prefix", help="Put the files under this path (e.g. data: data/...)")] = "",
) -> None:
    """Publish a local folder (e.g. a dataset) as a tagged artifact set that workflows can depend on.

    The folder's contents keep their paths relative to it: uploading `staging/` that holds `data/a.csv`
    publishes `data/a.csv`, which `depends-on: [WORKFLOW:TAG]` puts at `data/a.csv` in the job."""
    from dstack.cli.commands.artifacts import upload_command

    upload_command(folder, tag, workflow or folder.resolve().name, prefix)


@app.command()
def rm(runs: Annotated[list[str], typer.Argument(help="Run names")]) -> None:
    """Delete finished runs: their records, logs and artifacts."""
    from dstack.cli.session import connect

    client = connect()
    for name in runs:
        n = client.delete_run(name)
        print(f"deleted {name} ({n} stored object(s))")


@app.command("port-forward")
def port_forward(
    run: Annotated[str, typer.Argument(help="Run name")],
    ports: Annotated[str, typer.Argument(metavar="[LOCAL:]REMOTE", help="The job's port, and the local one")],
    job: Annotated[str, typer.Option("--job", help="The run's job (default: the one that declares the port)")] = "",
) -> None:
    """Forward a port of a running job to 127.0.0.1 through the coordinator (docs/tunnels.md)."""
    from dstack.cli.commands.tunnels import port_forward_command

    raise typer.Exit(port_forward_command(run, ports, job))


@app.command()
def attach(run: Annotated[str, typer.Argument(help="Run name")]) -> None:
    """Reopen the tunnels to a running run's ports, print their URLs and follow its logs."""
    from dstack.cli.commands.tunnels import attach_command

    raise typer.Exit(attach_command(run))


@app.command()
def init() -> None:
    """Create .dstack/workflows.yaml in the current folder with an example workflow."""
    from dstack.cli.commands.init import init_command

    init_command(Path.cwd())


@app.command()
def config(
    coordinator: Annotated[str, typer.Option("--coordinator", help="HOST:PORT of the coordinator")] = "",
    token: Annotated[str, typer.Option("--token", help="Your token")] = "",
    local: Annotated[bool, typer.Option("--local", help="Forget the coordinator: use local mode")] = False,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Check the address and token before saving them")
    ] = True,
    ca_file: Annotated[
        str, typer.Option("--ca-file", help="The coordinator's CA certificate (its STATE_DIR/tls/ca.pem): pin it")
    ] = "",
    ca_fingerprint: Annotated[
        str,
        typer.Option(
            "--ca-fingerprint", help="SHA256:... as `dstack server` prints it: fetch the CA with it once and pin it"
        ),
    ] = "",
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plaintext: only for a coordinator started with --insecure")
    ] = False,
) -> None:
    """Set the coordinator address and token, checked first (without options: show which coordinator and user
    the CLI uses). Over TCP the CLI speaks TLS: pin the coordinator's CA with --ca-file or --ca-fingerprint."""
    from dstack.cli.commands.init import TlsChoice, config_command

    config_command(coordinator, token, local, check, TlsChoice(ca_file, ca_fingerprint, insecure))


@app.command(context_settings={**PASS_THROUGH, "help_option_names": []})
def server(ctx: typer.Context) -> None:
    """Run a coordinator (`dstack server --help` for its options)."""
    from dstack.coordinator.main import main as coordinator_main

    coordinator_main(list(ctx.args))


@app.command(context_settings={**PASS_THROUGH, "help_option_names": []})
def agent(ctx: typer.Context) -> None:
    """Run an agent on this host (`dstack agent --help` for its options)."""
    from dstack.agent.main import main as agent_main

    agent_main(list(ctx.args))


@tags_app.command("add")
def tags_add(
    tag: Annotated[str, typer.Argument(help="Tag name")], run: Annotated[str, typer.Argument(help="Run name")]
) -> None:
    """Tag a run that finished done (in the run's repository)."""
    from dstack.cli.commands.tags import add_command

    add_command(tag, run)


@tags_app.command("list")
def tags_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    include_all: Annotated[bool, typer.Option("--all", "-a", help="Tags of every repository")] = False,
) -> None:
    """List the tags of the current repository (git remote, else folder)."""
    from dstack.cli.commands.tags import list_command

    list_command(as_json, include_all)


@tags_app.command("delete")
def tags_delete(tag: Annotated[str, typer.Argument(help="Tag name, or OWNER/REPO/TAG")]) -> None:
    """Delete a tag of the current repository (the run and its artifacts stay)."""
    from dstack.cli.commands.tags import delete_command

    delete_command(tag)


@secrets_app.command("add")
def secrets_add(
    name: Annotated[str, typer.Argument(help="Secret name (the job's environment variable)")],
    value: Annotated[str | None, typer.Argument(help="Value; omitted: asked for, hidden (or read from stdin)")] = None,
    personal: Annotated[
        bool, typer.Option("--personal", help="Yours only: your jobs get it instead of a team secret of that name")
    ] = False,
) -> None:
    """Add or replace a secret: a team secret (admins; every job gets it) or, with --personal, your own."""
    from dstack.cli.commands.secrets import add_command

    add_command(name, value, personal)


@secrets_app.command("list")
def secrets_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """List secrets: names and dates, never values."""
    from dstack.cli.commands.secrets import list_command

    list_command(as_json)


@secrets_app.command("delete")
def secrets_delete(
    name: Annotated[str, typer.Argument(help="Secret name")],
    personal: Annotated[bool, typer.Option("--personal", help="Your own, not the team's")] = False,
) -> None:
    """Delete a secret (a team secret: admins)."""
    from dstack.cli.session import connect

    connect().delete_secret(name, personal)
    print(f"deleted {'your personal secret' if personal else 'team secret'} {name}")


@app.command()
def whoami() -> None:
    """Show your user name, role and the coordinator the CLI talks to."""
    from dstack.cli.commands.users import whoami_command

    whoami_command()


@app.command()
def dashboard(
    url: Annotated[str | None, typer.Option("--url", help="The coordinator's HTTP URL (a team coordinator's)")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Also open it in a browser")] = False,
) -> None:
    """Print the web dashboard's URL (local mode: the embedded coordinator's); --open opens it."""
    from dstack.cli.commands.dashboard import dashboard_command

    dashboard_command(url, open_browser)


@users_app.command("set")
def users_set(
    name: Annotated[str, typer.Argument(help="User name")],
    share: Annotated[float | None, typer.Option("--share", help="Weight in fair share (default 1)")] = None,
    max_gpus: Annotated[int | None, typer.Option("--max-gpus", min=0, help="GPUs held at once (0: no limit)")] = None,
    max_running: Annotated[
        int | None, typer.Option("--max-running", min=0, help="Jobs on agents at once (0: no limit)")
    ] = None,
) -> None:
    """Set a user's fair share and quotas (admins only); what is not given is kept."""
    from dstack.cli.commands.users import set_command

    set_command(name, share, max_gpus, max_running)


@local_app.command("stop")
def local_stop() -> None:
    """Stop the local coordinator and agent (running local jobs are stopped)."""
    from dstack.cli.local import stop_all

    stopped = stop_all()
    print("stopped: " + ", ".join(stopped) if stopped else "nothing was running")


def main() -> None:
    # Standalone mode: typer prints usage errors itself (no traceback) and exits 2; our own errors
    # pass through it and are printed here.
    try:
        app()
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
