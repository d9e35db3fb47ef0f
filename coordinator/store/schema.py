"""SQLite schema with explicit, numbered migrations (tracked in PRAGMA user_version).

A migration is only ever appended; never edit one that has shipped. Each must be safe to run again
after a crash halfway through it.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils
from sqlite_utils.db import Table


def _v1(db: sqlite_utils.Database) -> None:
    def t(name: str) -> Table:
        return Table(db, name)

    t("users").create(
        {"name": str, "token_hash": str, "role": str, "created_at": int},
        pk="name",
        not_null={"token_hash"},
        if_not_exists=True,
    )
    t("users").create_index(["token_hash"], unique=True, if_not_exists=True)
    t("runs").create(
        {
            "id": str,
            "name": str,
            "owner": str,
            "workflow": str,
            "status": int,
            "termination_reason": int,
            "message": str,
            "submitted_at": int,
            "finished_at": int,
            "code_hash": str,
            "code": bytes,  # serialized dstack.v1.CodeRef
            "args": str,  # JSON list of the extra CLI arguments
            "queue": str,  # fair-share queue (team), reserved for the scheduling issue
            "priority": int,
        },
        pk="id",
        not_null={"name", "owner", "workflow", "status", "submitted_at"},
        if_not_exists=True,
    )
    t("runs").create_index(["name"], unique=True, if_not_exists=True)
    t("runs").create_index(["status"], if_not_exists=True)
    t("jobs").create(
        {
            "id": str,
            "run_id": str,
            "job_name": str,
            "spec": bytes,  # serialized dstack.v1.JobSpec
            "status": int,
            "termination_reason": int,
            "message": str,
            "agent_id": str,
            "gpu_indices": str,  # JSON list
            "exit_code": int,
            "submitted_at": int,
            "started_at": int,
            "finished_at": int,
            "stop_requested": int,
            "cpu": float,
            "memory": int,
            "gpu_count": int,
            "depends_on": str,  # JSON list of job_names in the same run
        },
        pk="id",
        not_null={"run_id", "job_name", "spec", "status", "submitted_at"},
        foreign_keys=[("run_id", "runs", "id")],
        if_not_exists=True,
    )
    t("jobs").create_index(["status"], if_not_exists=True)
    t("jobs").create_index(["run_id"], if_not_exists=True)
    t("jobs").create_index(["agent_id", "status"], if_not_exists=True)
    t("agents").create(
        {
            "id": str,
            "name": str,
            "token_hash": str,
            "status": str,
            "inventory": bytes,  # serialized dstack.v1.Inventory
            "registered_at": int,
            "last_heartbeat": int,
            "lease_expires_at": int,
        },
        pk="id",
        if_not_exists=True,
    )
    t("agents").create_index(["token_hash"], unique=True, if_not_exists=True)
    db.execute(
        "CREATE TABLE IF NOT EXISTS logs (job_id TEXT NOT NULL, seq INTEGER NOT NULL, stream INTEGER NOT NULL,"
        " time_ns INTEGER NOT NULL, text TEXT NOT NULL, PRIMARY KEY (job_id, seq)) WITHOUT ROWID"
    )
    t("artifacts").create(
        {"job_id": str, "path": str, "size": int, "sha256": str}, pk=("job_id", "path"), if_not_exists=True
    )
    t("code").create({"hash": str, "size": int, "created_at": int}, pk="hash", if_not_exists=True)
    # Next N for each adjective-animal prefix: O(1) run naming however many runs exist.
    t("run_name_counters").create({"prefix": str, "n": int}, pk="prefix", if_not_exists=True)
    t("tags").create({"name": str, "run_id": str, "created_at": int}, pk="name", if_not_exists=True)


def _v2(db: sqlite_utils.Database) -> None:
    """Dependencies and tags: the runs whose artifacts a job takes as inputs, and a tag to set on done."""
    for table, column in (("jobs", "inputs"), ("runs", "tag_on_done")):
        if column not in Table(db, table).columns_dict:
            Table(db, table).add_column(column, str)


def _v3(db: sqlite_utils.Database) -> None:
    """Secrets, encrypted (coordinator/secrets.py): the database never holds a value in the clear."""
    Table(db, "secrets").create(
        {"name": str, "ciphertext": bytes, "created_at": int, "updated_at": int}, pk="name", if_not_exists=True
    )


def _v4(db: sqlite_utils.Database) -> None:
    """Logs archived to the store (0: in the database, 1: archived, 2: deleted by retention), artifacts
    deleted by retention, and runs that are uploaded artifact sets rather than executed workflows."""
    for table, column, kind in (
        ("jobs", "logs_state", int),
        ("runs", "artifacts_deleted", int),
        ("runs", "kind", str),
    ):
        if column not in Table(db, table).columns_dict:
            Table(db, table).add_column(column, kind, not_null_default=0 if kind is int else "")
    Table(db, "jobs").create_index(["finished_at"], if_not_exists=True)


def _v5(db: sqlite_utils.Database) -> None:
    """Agent names are unique in the pool: at most one row per name that is not 'retired' (a retired
    row is kept only while jobs refer to it, without a token). Rows that duplicate a name are retired
    first, keeping per name the online one that was heard from last, else the newest."""
    db.execute(
        "UPDATE agents SET status = 'retired', token_hash = NULL WHERE status != 'retired' AND id NOT IN ("
        " SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY name ORDER BY status = 'online' DESC,"
        " last_heartbeat DESC, registered_at DESC, id) AS n FROM agents WHERE status != 'retired') WHERE n = 1)"
    )
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS agents_live_name ON agents (name) WHERE status != 'retired'")
    Table(db, "agents").create_index(["status"], if_not_exists=True)


def _v6(db: sqlite_utils.Database) -> None:
    """Enrolment: join tokens with an expiry, a use limit and a revocation (only their sha256 is kept;
    the server's own token is the row 'default'), and removed agents: a 'removed' row keeps its token's
    hash (so that the agent is told it was removed) but not its name, which a new agent may take."""
    Table(db, "join_tokens").create(
        {
            "id": str,
            "token_hash": str,
            "created_at": int,
            "expires_at": int,  # 0: never
            "max_uses": int,  # 0: unlimited
            "uses": int,
            "revoked_at": int,  # 0: not revoked
        },
        pk="id",
        not_null={"token_hash", "created_at", "expires_at", "max_uses", "uses", "revoked_at"},
        if_not_exists=True,
    )
    Table(db, "join_tokens").create_index(["token_hash"], unique=True, if_not_exists=True)
    db.execute("DROP INDEX IF EXISTS agents_live_name")
    db.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS agents_pool_name ON agents (name) WHERE status NOT IN ('retired', 'removed')"
    )


def _v7(db: sqlite_utils.Database) -> None:
    """Attempts (workflow `retry`, preemption): a job's current attempt number, why its agent was asked
    to stop it (0: by its user; else the termination reason the coordinator records: preempted or
    max_duration, with that message), the agent a requeued attempt should avoid, when its current
    attempt must end (max_duration, on the coordinator's clock; 0: never), and one row per attempt
    that ended without ending the job (its agent, times, status and reason)."""
    for column, kind in (
        ("attempt", int),
        ("stop_reason", int),
        ("stop_message", str),
        ("avoid_agent", str),
        ("deadline_at", int),
    ):
        if column not in Table(db, "jobs").columns_dict:
            default: int | str = 1 if column == "attempt" else 0 if kind is int else ""
            Table(db, "jobs").add_column(column, kind, not_null_default=default)
    Table(db, "job_attempts").create(
        {
            "job_id": str,
            "attempt": int,
            "agent_id": str,
            "status": int,
            "termination_reason": int,
            "message": str,
            "started_at": int,
            "finished_at": int,
        },
        pk=("job_id", "attempt"),
        if_not_exists=True,
    )


def _v8(db: sqlite_utils.Database) -> None:
    """A user's unfinished runs, found by index: the per-user limit on queued jobs counts them at every submission."""
    Table(db, "runs").create_index(["owner", "status"], if_not_exists=True)


def _fair_share(db: sqlite_utils.Database) -> None:
    """Fair share and quotas: per-user share and limits (0: none), each user's decayed usage of finished
    jobs (one accumulator, coordinator/fairshare.py), and which finished jobs it already counts (the
    partial index finds the ones it does not yet, however many jobs the database holds)."""
    users = Table(db, "users")
    for column, kind, default in (("share", float, 1.0), ("max_gpus", int, 0), ("max_running", int, 0)):
        if column not in users.columns_dict:
            users.add_column(column, kind, not_null_default=default)
    if "usage_charged" not in Table(db, "jobs").columns_dict:
        Table(db, "jobs").add_column("usage_charged", int, not_null_default=0)
    db.execute(
        "CREATE INDEX IF NOT EXISTS jobs_uncharged ON jobs (finished_at)"
        " WHERE usage_charged = 0 AND finished_at IS NOT NULL"
    )
    Table(db, "usage").create({"user": str, "value": float, "as_of": int}, pk="user", if_not_exists=True)
    # Attempts that ended in a requeue (retry, preemption) used GPUs too: counted the same way.
    if "job_attempts" in db.table_names() and "usage_charged" not in Table(db, "job_attempts").columns_dict:
        Table(db, "job_attempts").add_column("usage_charged", int, not_null_default=0)
    if "job_attempts" in db.table_names():
        db.execute(
            "CREATE INDEX IF NOT EXISTS attempts_uncharged ON job_attempts (finished_at) WHERE usage_charged = 0"
        )


def _repositories(db: sqlite_utils.Database) -> None:
    """Repositories as namespaces: each run belongs to a repository (runs stored before get the one their
    code's remote names, else `legacy`), and a tag name is unique within its repository (the tags table
    is rebuilt with the key (repository, name); its rows keep their runs)."""
    from dstack.coordinator.repositories import stored_repository
    from dstack.protos.v1 import common_pb2

    if "repository" not in Table(db, "runs").columns_dict:
        Table(db, "runs").add_column("repository", str, not_null_default="")
    for run_id, code in db.execute("SELECT id, code FROM runs WHERE repository = ''").fetchall():
        url = common_pb2.CodeRef.FromString(code).repo_url if code else ""
        db.execute("UPDATE runs SET repository = ? WHERE id = ?", [stored_repository(url), run_id])
    Table(db, "runs").create_index(["repository", "workflow", "status"], if_not_exists=True)
    tables = set(db.table_names())
    if "tags" in tables and "repository" not in Table(db, "tags").columns_dict:
        # Rebuilt under a new name, then swapped: a crash before the drop leaves the old table whole
        # (and this step runs again), one after it leaves only tags_by_repository, renamed below.
        db.execute(
            "CREATE TABLE IF NOT EXISTS tags_by_repository (repository TEXT NOT NULL, name TEXT NOT NULL,"
            " run_id TEXT NOT NULL, created_at INTEGER, PRIMARY KEY (repository, name))"
        )
        db.execute(
            "INSERT OR IGNORE INTO tags_by_repository (repository, name, run_id, created_at)"
            " SELECT r.repository, t.name, t.run_id, t.created_at FROM tags t JOIN runs r ON r.id = t.run_id"
        )
        db.execute("DROP TABLE tags")
        tables.discard("tags")
    if "tags" not in tables and "tags_by_repository" in set(db.table_names()):
        db.execute("ALTER TABLE tags_by_repository RENAME TO tags")
    Table(db, "tags").create_index(["run_id"], if_not_exists=True)


def _users_and_scoped_secrets(db: sqlite_utils.Database) -> None:
    """Users and roles, secrets by scope. Users: when each was last seen (roles stay in `role`: admin,
    member, viewer). Secrets: keyed by (owner, name), owner '' for a team secret, else the user whose
    personal secret it is. The old table's rows become team secrets. The copy, drop and rename run in
    one transaction (SQLite's DDL is transactional), so a crash leaves either table whole."""
    if "last_seen_at" not in Table(db, "users").columns_dict:
        Table(db, "users").add_column("last_seen_at", int)
    if "owner" in Table(db, "secrets").columns_dict:
        return
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE secrets_scoped (owner TEXT NOT NULL DEFAULT '', name TEXT NOT NULL, ciphertext BLOB,"
            " created_at INTEGER, updated_at INTEGER, PRIMARY KEY (owner, name))"
        )
        conn.execute(
            "INSERT INTO secrets_scoped (owner, name, ciphertext, created_at, updated_at)"
            " SELECT '', name, ciphertext, created_at, updated_at FROM secrets"
        )
        conn.execute("DROP TABLE secrets")
        conn.execute("ALTER TABLE secrets_scoped RENAME TO secrets")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _job_ports(db: sqlite_utils.Database) -> None:
    """The ports a job's current attempt got on its agent (`ports:` as a list or `ports: N`), as the
    agent reported them with RUNNING: a JSON list of [host_port, container_port]."""
    if "ports" not in Table(db, "jobs").columns_dict:
        Table(db, "jobs").add_column("ports", str, not_null_default="[]")


def _gangs(db: sqlite_utils.Database) -> None:
    """Multi-node gangs (docs/multinode.md): a member's gang name ('' for a job of its own) and rank,
    and the rendezvous its placement picked (rank 0's agent's ADDRESS:PORT), so a resent assignment
    carries the same one; the gang sweep finds the gangs of a run by the partial index."""
    jobs = Table(db, "jobs")
    for name, kind, default in (("gang", str, ""), ("node_rank", int, 0), ("master", str, "")):
        if name not in jobs.columns_dict:
            jobs.add_column(name, kind, not_null_default=default)
    db.execute("CREATE INDEX IF NOT EXISTS jobs_gang ON jobs (status, run_id) WHERE gang != ''")


def _run_records(db: sqlite_utils.Database) -> None:
    """Parts of runs' records (store/records.py): JSON per (run, job or '' for the run, part)."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS records (run_id TEXT NOT NULL, job_id TEXT NOT NULL, part TEXT NOT NULL,"
        " body TEXT NOT NULL, written_at INTEGER, PRIMARY KEY (run_id, job_id, part))"
    )


def _scale_indexes(db: sqlite_utils.Database) -> None:
    """For a pool of thousands (issue 16, bench/scale.py): an agent's enrolment finds a holder of its name
    by index (the partial agents_pool_name index does not serve `status IN (...)`: each enrolment read the
    whole table), and the runs listing walks runs newest first instead of sorting every active run."""
    db.execute("CREATE INDEX IF NOT EXISTS agents_name ON agents (name)")
    db.execute("CREATE INDEX IF NOT EXISTS runs_submitted ON runs (submitted_at, id)")


def _step_cache(db: sqlite_utils.Database) -> None:
    """The step cache (coordinator/cache.py): each job's key as far as submission knows it (`cache_base`:
    repository, code tree, spec, secrets) and its whole key (with its inputs' manifests) once known; a job
    that finished done is found by its key through the partial index."""
    jobs = Table(db, "jobs")
    for name in ("cache_base", "cache_key"):
        if name not in jobs.columns_dict:
            jobs.add_column(name, str, not_null_default="")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_cache_key ON jobs (cache_key) WHERE cache_key != ''")


def _log_chunks(db: sqlite_utils.Database) -> None:
    """Logs in chunks (coordinator/store/logs.py): one row per batch an agent sent, its lines serialized,
    instead of one row per line (SQLite's per-row insert and read bounded a job's log rate). The line rows
    of a database made before are packed into chunks of consecutive seqs of one attempt (up to 5,000
    lines) job by job, and the old table dropped, in one transaction: a crash leaves either layout whole."""
    from dstack.coordinator.store.logs import MIGRATION_CHUNK_LINES, chunk_row_of

    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS log_chunks (job_id TEXT NOT NULL, first_seq INTEGER NOT NULL,"
            " last_seq INTEGER NOT NULL, text_bytes INTEGER NOT NULL, marked INTEGER NOT NULL, body BLOB NOT NULL,"
            " PRIMARY KEY (job_id, first_seq))"
        )
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'logs'").fetchone():
            pending: list[tuple[str, int, int, int, str]] = []

            def flush() -> None:
                if pending:
                    conn.execute(
                        "INSERT OR IGNORE INTO log_chunks (job_id, first_seq, last_seq, text_bytes, marked, body)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        chunk_row_of(pending),
                    )
                    pending.clear()

            # A second cursor: the rows are read in order while chunks are written to the other table.
            for row in db.conn.cursor().execute(
                "SELECT job_id, seq, stream, time_ns, text FROM logs ORDER BY job_id, seq"
            ):
                if pending and (
                    row[0] != pending[-1][0]
                    or row[1] != pending[-1][1] + 1
                    or row[1] >> 32 != pending[-1][1] >> 32
                    or len(pending) >= MIGRATION_CHUNK_LINES
                ):
                    flush()
                pending.append(row)
            flush()
            conn.execute("DROP TABLE logs")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1,
    _v2,
    _v3,
    _v4,
    _v5,
    _v6,
    _v7,
    _v8,
    _fair_share,
    _repositories,
    _users_and_scoped_secrets,
    _job_ports,
    _gangs,
    _run_records,
    _scale_indexes,
    _step_cache,
    _log_chunks,
]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite_utils.Database) -> None:
    current = db.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"the database is at schema version {current}, newer than this coordinator ({SCHEMA_VERSION});"
            " upgrade dstack"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        # sqlite-utils commits each DDL statement itself, so a migration cannot be one transaction;
        # instead every step is idempotent (IF NOT EXISTS) and the version is bumped after the last.
        MIGRATIONS[version - 1](db)
        db.execute(f"PRAGMA user_version = {version:d}")
