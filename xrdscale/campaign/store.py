"""The job store: one row per (dataset, stage) run of a campaign, in SQLite or PostgreSQL.

By default the store is a SQLite file in the workspace (``<workspace>/jobs.sqlite``, WAL
journal, so ``campaign status`` can read while a run writes); on a cluster a PostgreSQL URL
(``postgresql+psycopg://…``) is given in the spec's ``job_store`` or in
``XRDSCALE_JOB_STORE_URL``. Each row records the config hash, input hash, status,
attempts, start and end times, output URL and error text of one stage of one dataset in
one invocation of the runner. The schema is versioned in a ``meta`` table; a store
written by another schema version is refused with a clear error. Credentials never
enter the store: URLs are redacted before they are written.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from xrdscale.exceptions import ConfigError, StorageError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "skipped", "failed")

_meta = sa.MetaData()
meta_table = sa.Table(
    "xrdscale_meta", _meta,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)
invocations = sa.Table(
    "invocations", _meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("campaign", sa.String(256), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("host", sa.String(256)),
)
stage_runs = sa.Table(
    "stage_runs", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("invocation", sa.String(36), sa.ForeignKey("invocations.id"), nullable=False, index=True),
    sa.Column("campaign", sa.String(256), nullable=False),
    sa.Column("dataset", sa.String(256), nullable=False),
    sa.Column("stage", sa.String(64), nullable=False),
    sa.Column("config_hash", sa.String(64), nullable=False),
    sa.Column("input_hash", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    sa.Column("output_url", sa.Text),
    sa.Column("error", sa.Text),
    sa.UniqueConstraint("invocation", "dataset", "stage", name="uq_run"),
)


@dataclass(frozen=True)
class StageRun:
    """One row of the job store."""

    invocation: str
    dataset: str
    stage: str
    config_hash: str
    input_hash: str
    status: str
    attempts: int
    started_at: _dt.datetime | None
    ended_at: _dt.datetime | None
    output_url: str | None
    error: str | None


def default_url(workspace: str) -> str:
    """SQLAlchemy URL of the job store for ``workspace``.

    ``XRDSCALE_JOB_STORE_URL`` wins; else a SQLite file in a local workspace; a remote
    workspace (S3) needs an explicit database URL because SQLite cannot live on S3.
    """
    env = os.environ.get("XRDSCALE_JOB_STORE_URL")
    if env:
        return env
    if storage.is_remote(workspace):
        raise ConfigError(
            f"workspace {storage.redact(workspace)} is remote, and a SQLite job store cannot live there; "
            "set job_store in the spec (or XRDSCALE_JOB_STORE_URL) to a PostgreSQL URL, e.g. "
            "postgresql+psycopg://user@host/db (password from PGPASSWORD)"
        )
    return "sqlite:///" + os.path.join(os.path.abspath(workspace), "jobs.sqlite")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _clean(text: str | None, limit: int = 4000) -> str | None:
    """Redact credentials (URL passwords, known secret env values) and truncate."""
    if text is None:
        return None
    for key in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PGPASSWORD"):
        secret = os.environ.get(key)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    words = [storage.redact(w) if "://" in w else w for w in text.split(" ")]
    return " ".join(words)[:limit]


class JobStore:
    """Record and query stage runs.

    Parameters
    ----------
    url : str
        SQLAlchemy database URL (``sqlite:///path`` or ``postgresql+psycopg://…``).

    Raises
    ------
    StorageError
        The database cannot be reached.
    ConfigError
        The database holds a job store of another schema version.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        try:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[1] if "///" in url else ""
                if path and path != ":memory:":
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                self.engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            else:
                self.engine = sa.create_engine(url, pool_pre_ping=True)
            self._init_schema()
        except SQLAlchemyError as exc:
            raise StorageError(
                f"cannot open the job store {self.display_url}: {type(exc).__name__}: "
                f"{_clean(str(exc).splitlines()[0])}; check the URL, that the server runs and the credentials"
            ) from exc

    def _init_schema(self, attempts: int = 5) -> None:
        """Create the tables and check the schema version.

        Two processes opening a new store at once (a restarted driver beside a running one,
        several runners on one PostgreSQL) can both find the tables missing; the loser's
        CREATE or INSERT fails and is simply retried against the winner's tables.
        """
        for attempt in range(attempts):
            try:
                with self.engine.begin() as conn:
                    _meta.create_all(conn)
                    row = conn.execute(
                        sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")).first()
                    if row is None:
                        conn.execute(meta_table.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                    elif int(row[0]) != SCHEMA_VERSION:
                        raise ConfigError(
                            f"job store {self.display_url} has schema version {row[0]}, this xrdscale uses "
                            f"{SCHEMA_VERSION}; use a new workspace or job_store, or the xrdscale version that wrote it"
                        )
                return
            except (sa.exc.OperationalError, sa.exc.IntegrityError, sa.exc.ProgrammingError):
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    @property
    def display_url(self) -> str:
        """The URL with any password hidden."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()

    def _exec(self, stmt):
        with self._lock, self.engine.begin() as conn:
            return conn.execute(stmt)

    def start_invocation(self, campaign: str) -> str:
        """Record a new invocation of the runner; returns its id."""
        inv = str(uuid.uuid4())
        self._exec(invocations.insert().values(id=inv, campaign=campaign, started_at=_now(), status="running",
                                               host=os.uname().nodename))
        return inv

    def end_invocation(self, invocation: str, status: str) -> None:
        """Mark an invocation finished (``done`` or ``failed``)."""
        self._exec(invocations.update().where(invocations.c.id == invocation)
                   .values(ended_at=_now(), status=status))

    def begin(self, invocation: str, campaign: str, dataset: str, stage: str, *,
              config_hash: str, input_hash: str, output_url: str) -> None:
        """Insert (or reset) the row of one stage of one dataset in this invocation as pending."""
        with self._lock, self.engine.begin() as conn:
            conn.execute(stage_runs.delete().where(
                (stage_runs.c.invocation == invocation) & (stage_runs.c.dataset == dataset)
                & (stage_runs.c.stage == stage)))
            conn.execute(stage_runs.insert().values(
                invocation=invocation, campaign=campaign, dataset=dataset, stage=stage,
                config_hash=config_hash, input_hash=input_hash, status="pending", attempts=0,
                output_url=_clean(output_url)))

    def update(self, invocation: str, dataset: str, stage: str, *, status: str,
               error: str | None = None, attempt: bool = False) -> None:
        """Change the status of a row; ``attempt`` counts one more attempt and sets the start time."""
        if status not in STATUSES:
            raise ConfigError(f"unknown stage status {status!r}; expected one of {', '.join(STATUSES)}")
        values: dict = {"status": status}
        if attempt:
            values["attempts"] = stage_runs.c.attempts + 1
            values["started_at"] = _now()
        if status in ("done", "skipped", "failed"):
            values["ended_at"] = _now()
        if error is not None or status == "done":
            values["error"] = _clean(error)
        self._exec(stage_runs.update().where(
            (stage_runs.c.invocation == invocation) & (stage_runs.c.dataset == dataset)
            & (stage_runs.c.stage == stage)).values(**values))

    def runs(self, campaign: str, *, invocation: str | None = None) -> list[StageRun]:
        """Every row of ``campaign`` (of one invocation when given), oldest first."""
        stmt = sa.select(stage_runs).where(stage_runs.c.campaign == campaign)
        if invocation is not None:
            stmt = stmt.where(stage_runs.c.invocation == invocation)
        rows = self._exec(stmt.order_by(stage_runs.c.id)).mappings().all()
        return [StageRun(**{k: r[k] for k in StageRun.__dataclass_fields__}) for r in rows]

    def latest(self, campaign: str) -> dict[tuple[str, str], StageRun]:
        """The most recent row of each (dataset, stage) of ``campaign``."""
        out: dict[tuple[str, str], StageRun] = {}
        for r in self.runs(campaign):
            out[(r.dataset, r.stage)] = r
        return out

    def invocation_ids(self, campaign: str) -> list[str]:
        """Ids of the invocations of ``campaign``, oldest first."""
        stmt = (sa.select(invocations.c.id).where(invocations.c.campaign == campaign)
                .order_by(invocations.c.started_at, invocations.c.id))
        return [r[0] for r in self._exec(stmt).all()]


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
