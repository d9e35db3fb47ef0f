"""`dstack agent`'s options: each one is described, and the defaults that come from the environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dstack.agent.main import build_parser, parse_args
from tests.conftest import REPO


def agent_help(env: dict[str, str]) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "dstack.agent", "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def clean_env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DSTACK_")} | {"COLUMNS": "100", **extra}


def test_every_option_of_the_help_has_a_description() -> None:
    text = agent_help(clean_env())
    options = text.split("options:", 1)[1]
    # An option's entry: its line, then its description on the same line or on the indented lines after it.
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    described = {}
    for entry in entries:
        head, _, rest = entry.strip().partition("\n")
        flag = head.split()[0].rstrip(",")
        words = re.split(r"\s{2,}", head.strip(), maxsplit=1)
        described[flag] = (words[1] if len(words) > 1 else "") + rest.strip()
    expected = {a.option_strings[-1] for a in build_parser()._actions if a.option_strings}
    assert {f.split(",")[0] for f in described} >= {e for e in expected if not e.startswith("--help")}
    missing = sorted(flag for flag, text in described.items() if len(text) < 10)
    assert not missing, f"options without a description: {missing}\n{text}"


def test_the_help_leaks_no_secret_from_the_environment() -> None:
    assert "s3cret-join" not in agent_help(clean_env(DSTACK_JOIN_TOKEN="s3cret-join"))


def test_the_default_home_is_under_dstack_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DSTACK_AGENT_HOME", raising=False)
    monkeypatch.setenv("DSTACK_HOME", str(tmp_path / "dh"))
    assert parse_args(["--coordinator", "x:1"]).home == (tmp_path / "dh" / "agent").resolve()
    help_text = agent_help(clean_env(DSTACK_HOME=str(tmp_path / "dh")))
    assert f"default:{tmp_path / 'dh' / 'agent'}," in "".join(help_text.split())  # wrapped anywhere
    monkeypatch.setenv("DSTACK_AGENT_HOME", str(tmp_path / "own"))  # the agent's own variable wins
    assert parse_args(["--coordinator", "x:1"]).home == (tmp_path / "own").resolve()
    monkeypatch.delenv("DSTACK_AGENT_HOME")
    monkeypatch.delenv("DSTACK_HOME")
    assert parse_args(["--coordinator", "x:1"]).home == (Path.home() / ".dstack" / "agent").resolve()


def test_the_environment_cache_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DSTACK_ENV_CACHE_SIZE", raising=False)
    config = parse_args(["--coordinator", "x:1", "--home", str(tmp_path)])
    assert config.env_cache_max_bytes == 20 << 30
    assert config.env_cache.folder == tmp_path.resolve() / "envs"
    assert parse_args(["--coordinator", "x:1", "--env-cache-size", "0"]).env_cache_max_bytes == 0
    monkeypatch.setenv("DSTACK_ENV_CACHE_SIZE", "500MB")  # the embedded local agent takes it this way
    assert parse_args(["--coordinator", "x:1"]).env_cache_max_bytes == 500_000_000
    with pytest.raises(SystemExit):
        parse_args(["--coordinator", "x:1", "--env-cache-size", "lots"])


def test_the_join_token_comes_from_a_file_or_the_environment_without_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DSTACK_JOIN_TOKEN_FILE", raising=False)
    monkeypatch.setenv("DSTACK_JOIN_TOKEN", "from-env")
    assert parse_args(["--coordinator", "c:1"]).join_token == "from-env"
    token_file = tmp_path / "join-token"
    token_file.write_text("from-file\n")
    token_file.chmod(0o600)
    assert parse_args(["--coordinator", "c:1", "--join-token-file", str(token_file)]).join_token == "from-file"
    monkeypatch.setenv("DSTACK_JOIN_TOKEN_FILE", str(token_file))
    assert parse_args(["--coordinator", "c:1"]).join_token == "from-file"
    assert capsys.readouterr().err == ""


def test_a_join_token_in_argv_still_works_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DSTACK_JOIN_TOKEN", "from-env")
    assert parse_args(["--coordinator", "c:1", "--join-token", "from-argv"]).join_token == "from-argv"
    err = capsys.readouterr().err
    assert "other users of this host see it (ps, /proc/PID/cmdline)" in err
    assert "--join-token-file PATH" in err and "from-argv" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file or directory: give the file that holds the join token"), ("\n", "is empty")],
)
def test_a_join_token_file_that_gives_no_token_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "join-token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--coordinator", "c:1", "--join-token-file", str(path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_join_token_and_join_token_file_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--coordinator", "c:1", "--join-token", "t", "--join-token-file", "f"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_join_token_file_others_may_read_is_used_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "join-token"
    path.write_text("t\n")
    path.chmod(0o644)
    assert parse_args(["--coordinator", "c:1", "--join-token-file", str(path)]).join_token == "t"
    assert f"{path} is readable by other users of this host: `chmod 600 {path}`" in capsys.readouterr().err


def test_tls_options_and_their_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSTACK_CA_FILE", raising=False)
    monkeypatch.delenv("DSTACK_CA_FINGERPRINT", raising=False)
    plain = parse_args(["--coordinator", "c:1"])
    assert (plain.ca_file, plain.ca_fingerprint, plain.insecure) == (None, "", False)  # TLS, the system's roots
    monkeypatch.setenv("DSTACK_CA_FINGERPRINT", "SHA256:" + "ab" * 32)
    assert parse_args(["--coordinator", "c:1"]).ca_fingerprint == "SHA256:" + "ab" * 32
    # An option given wins over the environment.
    from_file = parse_args(["--coordinator", "c:1", "--ca-file", str(tmp_path / "ca.pem")])
    assert (from_file.ca_file, from_file.ca_fingerprint) == (tmp_path / "ca.pem", "")
    insecure = parse_args(["--coordinator", "c:1", "--insecure"])
    assert insecure.insecure and insecure.ca_fingerprint == ""
    with pytest.raises(SystemExit):
        parse_args(["--coordinator", "c:1", "--insecure", "--ca-file", "x"])
    monkeypatch.setenv("DSTACK_CA_FILE", "x")
    with pytest.raises(SystemExit):
        parse_args(["--coordinator", "c:1"])  # both in the environment: which one?


def test_pids_limit_defaults_to_4096_or_32_per_core_and_0_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSTACK_PIDS_LIMIT", raising=False)
    assert parse_args(["--coordinator", "x:1"]).pids_limit == max(4096, 32 * (os.cpu_count() or 1))
    assert parse_args(["--coordinator", "x:1", "--pids-limit", "0"]).pids_limit == 0
    monkeypatch.setenv("DSTACK_PIDS_LIMIT", "512")
    assert build_parser().parse_args(["--coordinator", "x:1"]).pids_limit == 512
    with pytest.raises(SystemExit):
        parse_args(["--coordinator", "x:1", "--pids-limit", "-1"])


def test_outbox_bounds_come_from_the_options_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_args(["--coordinator", "x:1", "--outbox-memory", "8MiB", "--max-job-outbox-bytes", "100MB"])
    assert config.outbox.memory_bytes == 8 << 20
    assert config.outbox.job_memory_bytes == 2 << 20  # a quarter: one job cannot take all the memory
    assert config.outbox.job_bytes == 100_000_000
    assert config.outbox.total_bytes == 4 << 30
    monkeypatch.setenv("DSTACK_MAX_OUTBOX_BYTES", "2GiB")
    assert parse_args(["--coordinator", "x:1"]).outbox.total_bytes == 2 << 30


@pytest.mark.parametrize("value", ["0", "lots"])
def test_an_outbox_bound_that_is_not_a_size_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--coordinator", "x:1", "--max-job-outbox-bytes", value])
    assert "--max-job-outbox-bytes" in capsys.readouterr().err
