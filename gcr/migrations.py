"""Schema versions of the run store, so a store kept for months opens in every later gcr.

`PRAGMA user_version` counts the migrations applied. Each migration is a small numbered function,
applied in order and once, inside the same transaction that raises the version: a store written
by any earlier gcr (version 0 is the schema of the first releases, whose tables m001 creates with
IF NOT EXISTS) is brought up to date when opened, two processes opening it at once migrate it once,
and a store written by a newer gcr (a version above ours) is refused instead of misread.
Never edit a released migration: add the next one.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

from .errors import UsageError

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []


def migration(fn):
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    """Runs, their rounds, and batches of jobs: the schema every store had before versions."""
    db.execute("""CREATE TABLE IF NOT EXISTS runs (
        id TEXT PRIMARY KEY, created TEXT NOT NULL, request TEXT NOT NULL, task TEXT NOT NULL,
        source_image TEXT, generator TEXT NOT NULL, critic TEXT NOT NULL, settings TEXT NOT NULL,
        versions TEXT NOT NULL, device TEXT NOT NULL, status TEXT NOT NULL, stop_reason TEXT,
        best_round INTEGER, final_image TEXT, error TEXT, batch_id TEXT)""")
    db.execute("""CREATE TABLE IF NOT EXISTS rounds (
        run_id TEXT NOT NULL REFERENCES runs(id), idx INTEGER NOT NULL, data TEXT NOT NULL,
        overall REAL, created TEXT NOT NULL, PRIMARY KEY (run_id, idx))""")
    db.execute("CREATE INDEX IF NOT EXISTS runs_created ON runs(created)")
    db.execute("""CREATE TABLE IF NOT EXISTS batches (
        id TEXT PRIMARY KEY, created TEXT NOT NULL, file TEXT NOT NULL, status TEXT NOT NULL)""")
    db.execute("""CREATE TABLE IF NOT EXISTS batch_jobs (
        batch_id TEXT NOT NULL REFERENCES batches(id), job_id TEXT NOT NULL, position INTEGER NOT NULL,
        run_id TEXT, fingerprint TEXT NOT NULL, error TEXT, PRIMARY KEY (batch_id, job_id))""")


@migration
def m002_owners(db: sqlite3.Connection) -> None:
    """Who owns each run and batch (gcr.owner), in a table of its own so that the runs table, and
    every gcr that writes it, stay as they were."""
    db.execute("""CREATE TABLE owners (
        kind TEXT NOT NULL, id TEXT NOT NULL, lock TEXT NOT NULL, host TEXT NOT NULL,
        pid INTEGER NOT NULL, process TEXT NOT NULL, since TEXT NOT NULL, PRIMARY KEY (kind, id))""")
    db.execute("CREATE INDEX owners_lock ON owners(lock)")
    db.execute("CREATE INDEX batches_file ON batches(file, created)")


@migration
def m003_scores(db: sqlite3.Connection) -> None:
    """`gcr score`: a score job (one manifest or one set of images, owned like a batch, resumable by
    its key) and one row per scored image, written as each batch of critiques completes."""
    db.execute("""CREATE TABLE score_jobs (
        id TEXT PRIMARY KEY, created TEXT NOT NULL, key TEXT NOT NULL, source TEXT NOT NULL,
        status TEXT NOT NULL, settings TEXT NOT NULL, items INTEGER NOT NULL, error TEXT)""")
    db.execute("CREATE INDEX score_jobs_key ON score_jobs(key, created)")
    db.execute("""CREATE TABLE scores (
        job_id TEXT NOT NULL REFERENCES score_jobs(id), position INTEGER NOT NULL, data TEXT NOT NULL,
        overall REAL, error TEXT, created TEXT NOT NULL, PRIMARY KEY (job_id, position))""")


SCHEMA_VERSION = len(MIGRATIONS)


def version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def check_not_newer(found: int, path: Path) -> None:
    if found > SCHEMA_VERSION:
        raise UsageError(f"The run store {path} was written by a newer gcr (schema version {found}; this "
                         f"gcr reads up to {SCHEMA_VERSION}): upgrade gcr (pip install -U gcr), or pass "
                         "another --runs-dir.")


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Bring the store at `path` to SCHEMA_VERSION; returns the version it had. The connection must
    be in autocommit mode (isolation_level=None)."""
    found = version(db)
    check_not_newer(found, path)
    if found == SCHEMA_VERSION:
        return found
    db.execute("BEGIN IMMEDIATE")  # one migrator at a time; the others see the result
    try:
        found = version(db)
        check_not_newer(found, path)
        for step in MIGRATIONS[found:]:
            step(db)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found
