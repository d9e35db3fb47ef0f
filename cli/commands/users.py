"""`dstack users set`: a user's fair share and quotas (admins only)."""

from __future__ import annotations

from dstack.protos.v1 import client_pb2


def set_command(name: str, share: float | None, max_gpus: int | None, max_running: int | None) -> None:
    from dstack.cli.errors import CliError
    from dstack.cli.session import connect

    if share is None and max_gpus is None and max_running is None:
        raise CliError("nothing to set: give --share, --max-gpus or --max-running")
    req = client_pb2.SetUserLimitsRequest(name=name)
    if share is not None:
        req.share = share
    if max_gpus is not None:
        req.max_gpus = max_gpus
    if max_running is not None:
        req.max_running = max_running
    u = connect().set_user_limits(req)
    gpus = u.max_gpus or "no limit"
    running = u.max_running or "no limit"
    print(f"{u.name}: share {u.share:g}, max GPUs {gpus}, max running jobs {running}")
