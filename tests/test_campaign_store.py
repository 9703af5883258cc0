"""The job store on SQLite (WAL, schema version) and on a real PostgreSQL server."""

from __future__ import annotations

import os
import sqlite3
import uuid

import pytest
import sqlalchemy as sa

from xrdscale.campaign.store import SCHEMA_VERSION, JobStore, default_url
from xrdscale.exceptions import ConfigError, StorageError

PG_URL = os.environ.get("XRDSCALE_TEST_POSTGRES_URL")


def _exercise(store: JobStore) -> None:
    campaign = f"store-{uuid.uuid4().hex[:8]}"
    inv = store.start_invocation(campaign)
    store.begin(inv, campaign, "d0", "integrate", config_hash="c" * 64, input_hash="i" * 64,
                output_url="s3://user:hunter22@bucket/ws/d0/integrate.zarr")
    store.update(inv, "d0", "integrate", status="running", attempt=True)
    store.update(inv, "d0", "integrate", status="running", error="boom", attempt=True)
    store.update(inv, "d0", "integrate", status="done")
    store.begin(inv, campaign, "d1", "integrate", config_hash="c" * 64, input_hash="j" * 64, output_url="/x")
    store.update(inv, "d1", "integrate", status="failed", attempt=True,
                 error=f"failed with secret {os.environ['AWS_SECRET_ACCESS_KEY']} at s3://k:pw@b/x")
    store.end_invocation(inv, "failed")
    rows = store.runs(campaign)
    assert [(r.dataset, r.status, r.attempts) for r in rows] == [("d0", "done", 2), ("d1", "failed", 1)]
    assert rows[0].error is None and rows[0].started_at <= rows[0].ended_at
    assert rows[0].output_url == "s3://***@bucket/ws/d0/integrate.zarr"
    assert "sekret-value" not in rows[1].error and "pw@" not in rows[1].error
    inv2 = store.start_invocation(campaign)
    store.begin(inv2, campaign, "d1", "integrate", config_hash="c" * 64, input_hash="j" * 64, output_url="/x")
    store.update(inv2, "d1", "integrate", status="done", attempt=True)
    assert store.latest(campaign)[("d1", "integrate")].status == "done"
    assert store.invocation_ids(campaign) == [inv, inv2]
    assert len(store.runs(campaign, invocation=inv)) == 2


def test_sqlite_store_roundtrip_wal_and_redaction(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekret-value")
    monkeypatch.delenv("XRDSCALE_JOB_STORE_URL", raising=False)
    url = default_url(str(tmp_path / "ws"))
    assert url.endswith("ws/jobs.sqlite")
    store = JobStore(url)
    _exercise(store)
    store.close()
    db = str(tmp_path / "ws" / "jobs.sqlite")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        dump = "\n".join(conn.iterdump())
    assert "sekret-value" not in dump and "hunter22" not in dump


def test_schema_version_mismatch_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/jobs.sqlite"
    JobStore(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE xrdscale_meta SET value = :v WHERE key = 'schema_version'"),
                     {"v": str(SCHEMA_VERSION + 1)})
    engine.dispose()
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}"):
        JobStore(url)


def test_remote_workspace_needs_a_database_url(monkeypatch):
    monkeypatch.delenv("XRDSCALE_JOB_STORE_URL", raising=False)
    with pytest.raises(ConfigError, match="PostgreSQL URL"):
        default_url("s3://bucket/ws")
    monkeypatch.setenv("XRDSCALE_JOB_STORE_URL", "postgresql+psycopg://u@h/db")
    assert default_url("s3://bucket/ws") == "postgresql+psycopg://u@h/db"


def test_unreachable_database_is_a_clear_error_without_password():
    with pytest.raises(StorageError) as err:
        JobStore("postgresql+psycopg://user:topsecret@127.0.0.1:1/db?connect_timeout=2")
    assert "cannot open the job store" in str(err.value)
    assert "topsecret" not in str(err.value)


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="XRDSCALE_TEST_POSTGRES_URL is not set (.ci/run sets it)")
def test_postgres_store_roundtrip(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekret-value")
    store = JobStore(PG_URL)
    assert "postgres:***@" in store.display_url or "***" in store.display_url
    _exercise(store)
    store.close()
