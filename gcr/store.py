"""The run store: SQLite (WAL) plus PNGs, so every completed round survives a crash.

Layout of a runs directory (`--runs-dir`, env GCR_HOME, default ./gcr-runs):
    gcr.sqlite3                      runs and rounds (and batches), one transaction per round
    <run-id>/round-01.png            the round's chosen image (candidates: round-01-c2.png, ...)
    <run-id>/final.png               a copy of the best round's image
    locks/run-<id>.lock              held by the process that owns a run or batch (gcr.owner)
Image paths are stored relative to the runs directory (so it can be moved) and handed out absolute.
PNGs are written to a temporary name and renamed before the row that names them is committed:
a kill at any moment leaves either a complete round or none, never a row pointing at half a file.

The schema is versioned (gcr.migrations): older stores are migrated when opened, newer ones refused.
A run or batch is `running` only while a live process owns it: a row left `running` by a process
that died reads as `interrupted` (and is recorded so as soon as a writer can take its lock). Every
fault of the disk underneath (full, I/O error, file-size limit, read-only) is raised as one
gcr.errors.StorageError sentence (gcr.storefaults), never as a raw sqlite3 or OS error.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import sqlite3
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from . import migrations
from .errors import StorageError, UsageError
from .owner import Locks, Owner, lock_name, me
from .records import COMPLETED, INTERRUPTED, RUNNING, Run, Round
from .storefaults import explain, ignore_file_size_signal, storage_error

DEFAULT_RUNS_DIR = "gcr-runs"
DB_NAME = "gcr.sqlite3"
BUSY_TIMEOUT_S = 30


def default_runs_dir() -> Path:
    return Path(os.environ.get("GCR_HOME") or DEFAULT_RUNS_DIR)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def slug(text: str, limit: int = 32) -> str:
    """A file-name-safe fragment of user text: lowercase ASCII letters, digits and dashes only."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "run"


def new_run_id(request: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{slug(request, 24)}-{secrets.token_hex(2)}"


class RunStore:
    """The runs of one runs directory. `write=False` (the commands that only read) falls back to
    reading a store that cannot be written, e.g. on a read-only disk."""

    def __init__(self, root: str | Path, *, write: bool = True):
        self.root = Path(root)
        self.path = self.root / DB_NAME
        self.locks = Locks(self.root / "locks")
        self.writable = True
        ignore_file_size_signal()  # a write past `ulimit -f` must fail with EFBIG, not kill us
        try:
            self._open_for_writing()
        except StorageError as e:
            if write or not e.usage or not self.path.is_file():
                raise
            self._open_read_only(e)

    def _open_for_writing(self) -> None:
        action = f"use the runs directory {self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):  # a read-only mount refuses root too
                raise OSError(errno.EROFS if _read_only_fs(self.root) else errno.EACCES,
                              os.strerror(errno.EROFS if _read_only_fs(self.root) else errno.EACCES))
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            cause, fix, _ = explain(e, self.root)
            raise StorageError(action, cause, fix, usage=True) from None
        try:
            self.db.row_factory = sqlite3.Row
            migrations.check_not_newer(migrations.version(self.db), self.path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed round survives power loss too
            migrations.migrate(self.db, self.path)
            self.locks.dir.mkdir(exist_ok=True)
        except UsageError:
            self.db.close()
            raise
        except (OSError, sqlite3.Error) as e:
            self.db.close()
            cause, fix, _ = explain(e, self.root)
            raise StorageError(action, cause, fix, usage=True) from None
        self.version = migrations.SCHEMA_VERSION

    def _open_read_only(self, why: StorageError) -> None:
        """Read a store this process cannot write (nothing is migrated or settled then)."""
        uri = self.path.resolve().as_uri()
        for query in ("?mode=ro", "?immutable=1"):  # immutable: a closed WAL store on a read-only disk
            try:
                db = sqlite3.connect(uri + query, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
                db.row_factory = sqlite3.Row
                self.version = migrations.version(db)
                db.execute("SELECT 1 FROM runs LIMIT 1").fetchall()
            except sqlite3.Error:
                continue
            migrations.check_not_newer(self.version, self.path)
            self.db, self.writable = db, False
            return
        raise why

    def close(self) -> None:
        self.locks.release_all()
        self.db.close()

    @contextmanager
    def _faults(self, action: str, files=()):
        """Any OSError or sqlite3 error inside becomes one StorageError sentence naming the cause."""
        try:
            yield
        except (OSError, sqlite3.Error) as e:
            raise storage_error(e, action, self.root, files) from None

    @contextmanager
    def _txn(self):
        """One write transaction (the connection autocommits otherwise)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            try:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    # -- ownership (gcr.owner) -------------------------------------------------------------

    def claim(self, kind: str, ids: Sequence[str], lock: str) -> set:
        """Make this process the owner of runs (kind "run") or a batch, holding `lock`, and mark
        them running; refuse with one sentence naming the live process that owns any of them.
        Returns the runs that turned out completed (another process finished them meanwhile): they
        are left as they are. Read a run again after claiming it: only then is it stable."""
        fresh = not self.locks.holds(lock)
        with self._faults(f"take the lock {self.locks.path(lock)}"):
            if not self.locks.acquire(lock):
                raise _busy(kind, ids[0], self._owner_by_lock(lock))
        try:
            with self._faults(f"record this process as the owner of {kind} {', '.join(ids)}"), self._txn():
                for ident in ids:
                    current = self._owner(kind, ident)
                    if current and current.lock != lock and self.locks.alive(current, current.lock):
                        raise _busy(kind, ident, current)
                done = set()
                if kind == "run":
                    marks = ",".join("?" * len(ids))
                    done = {r[0] for r in self.db.execute(
                        f"SELECT id FROM runs WHERE id IN ({marks}) AND status=?", (*ids, COMPLETED))}
                    ids = [i for i in ids if i not in done]
                    self.db.executemany("UPDATE runs SET status=?, error=NULL, stop_reason=NULL WHERE id=?",
                                        [(RUNNING, i) for i in ids])
                else:
                    self.db.executemany(f"UPDATE {_TABLES[kind]} SET status=? WHERE id=?",
                                        [(RUNNING, i) for i in ids])
                self._set_owner(kind, ids, lock)
        except BaseException:
            if fresh:
                self.locks.release(lock)
            raise
        return done

    def release(self, lock: str) -> None:
        """Give up a lock this process holds (closing it: nothing to write, nothing to fail)."""
        self.locks.release(lock)

    def _set_owner(self, kind: str, ids: Sequence[str], lock: str) -> None:
        o = me(lock, now())
        self.db.executemany("INSERT OR REPLACE INTO owners VALUES (?,?,?,?,?,?,?)",
                            [(kind, i, o.lock, o.host, o.pid, o.process, o.since) for i in ids])

    def _owner(self, kind: str, ident: str) -> Owner | None:
        if self.version < 2:  # a store read without migrating: no owners recorded
            return None
        row = self.db.execute("SELECT * FROM owners WHERE kind=? AND id=?", (kind, ident)).fetchone()
        return _owner_of(row)

    def _owner_by_lock(self, lock: str) -> Owner | None:
        with self._faults("read the owner of a lock"):
            row = self.db.execute("SELECT * FROM owners WHERE lock=? ORDER BY since DESC LIMIT 1",
                                  (lock,)).fetchone()
        return _owner_of(row)

    def _settled(self, kind: str, ident: str, status: str) -> tuple[str, str | None, Owner | None]:
        """(status, why it was interrupted, owner) as they really are: a `running` row whose owner
        is gone is interrupted, and is recorded so when this process can take the owner's lock."""
        owner = self._owner(kind, ident)
        if status != RUNNING:
            return status, None, owner
        lock = owner.lock if owner else lock_name(kind, ident)
        if self.locks.alive(owner, lock):
            return RUNNING, None, owner
        why = (f"{owner.describe() if owner else 'the process running it'} ended before it finished "
               f"(killed, crashed or lost)")
        self._record_interrupted(kind, ident, lock, why)
        return INTERRUPTED, why, None

    def _record_interrupted(self, kind: str, ident: str, lock: str, why: str) -> None:
        if not self.writable:
            return
        try:
            if not self.locks.acquire(lock, wait=0):
                return  # someone just took it over
        except OSError:
            return
        try:
            with self._txn():
                if kind == "run":
                    self.db.execute("UPDATE runs SET status=?, error=COALESCE(error, ?) WHERE id=? AND status=?",
                                    (INTERRUPTED, why, ident, RUNNING))
                else:
                    self.db.execute(f"UPDATE {_TABLES[kind]} SET status=? WHERE id=? AND status=?",
                                    (INTERRUPTED, ident, RUNNING))
        except (OSError, sqlite3.Error):
            pass  # a store that cannot be written still reads right: the status is derived anyway
        finally:
            self.locks.release(lock)

    # -- writing ---------------------------------------------------------------------------

    def create_run(self, run: Run) -> Run:
        """Record a new run, owned by this process (through its batch's lock for a batch job)."""
        run = run.with_(created=run.created or now(), status=RUNNING)
        lock = lock_name("batch", run.batch_id) if run.batch_id else lock_name("run", run.id)
        fresh = not self.locks.holds(lock)
        with self._faults(f"start run {run.id} in {self.root}"):
            (self.root / run.id).mkdir(exist_ok=True)
            if not self.locks.acquire(lock):
                raise _busy("batch", run.batch_id or run.id, self._owner_by_lock(lock))
        try:
            with self._faults(f"start run {run.id} in {self.root}"), self._txn():
                self.db.execute(
                    "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (run.id, run.created, run.request, run.task, run.source_image, run.generator,
                     run.critic, json.dumps(run.settings), json.dumps(run.versions), run.device,
                     run.status, run.stop_reason, run.best_round, run.final_image, run.error,
                     run.batch_id))
                self._set_owner("run", [run.id], lock)
        except BaseException:
            if fresh:
                self.locks.release(lock)
            raise
        return run

    def record_round(self, run: Run, round_: Round, images: list, metadata: dict | None = None) -> Round:
        """Write the round's PNGs, then commit its row. Returns the round with image paths set.

        A round stored earlier with an error (a failed generation or critique) is replaced: that is
        how a resumed run redoes it. A complete round is never overwritten."""
        candidates, files = [], []
        action = f"store round {round_.index} of run {run.id} in {self.root}"
        with self._faults(action, files):
            for i, (cand, image) in enumerate(zip(round_.candidates, images)):
                name = f"round-{round_.index:02d}" + (f"-c{i + 1}" if i else "") + ".png"
                rel = f"{run.id}/{name}"
                info = {"gcr:run": run.id, "gcr:request": run.request, "gcr:round": str(round_.index),
                        "gcr:prompt": round_.prompt, "gcr:seed": str(cand.seed),
                        "gcr:scores": json.dumps(cand.scores), "gcr:overall": str(cand.overall),
                        **(metadata or {})}
                files.append(self.root / f"{rel}.tmp")
                _write_png(image, self.root / rel, info)
                candidates.append(replace(cand, image=rel))
            stored = replace(round_, candidates=tuple(candidates))
            with self._txn():
                written = self.db.execute(
                    "INSERT INTO rounds VALUES (?,?,?,?,?) ON CONFLICT(run_id, idx) DO UPDATE SET "
                    "data=excluded.data, overall=excluded.overall, created=excluded.created "
                    "WHERE json_extract(rounds.data, '$.error') IS NOT NULL",
                    (run.id, stored.index, json.dumps(stored.to_dict()), stored.overall, now())).rowcount
        if written == 0:
            raise StorageError(action, f"round {round_.index} is already stored complete (was the run "
                               "advanced by two processes?)", "see it with `gcr show " + run.id + "`")
        return self._absolute(stored)

    def finish_run(self, run_id: str, *, status: str, stop_reason: str | None,
                   best_round: int | None, error: str | None = None) -> Run:
        """Mark a run done; copy its best round's image to final.png; give up its ownership."""
        with self._faults(f"record the end of run {run_id} in {self.root}"):
            final = None
            run = self.get_run(run_id)
            best = next((r for r in run.rounds if r.index == best_round), None)
            if best and best.image:
                final = f"{run_id}/final.png"
                tmp = self.root / f"{final}.tmp"
                shutil.copyfile(best.image, tmp)
                os.replace(tmp, self.root / final)
            with self._txn():
                self.db.execute(
                    "UPDATE runs SET status=?, stop_reason=?, best_round=?, final_image=?, error=? WHERE id=?",
                    (status, stop_reason, best_round, final, error, run_id))
        self.locks.release(lock_name("run", run_id))
        return self.get_run(run_id)

    def update_run(self, run_id: str, **fields) -> None:
        allowed = {"status", "error", "settings", "device", "generator", "critic"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update {sorted(bad)}")
        values = [json.dumps(v) if k == "settings" else v for k, v in fields.items()]
        with self._faults(f"update run {run_id} in {self.root}"), self._txn():
            self.db.execute(f"UPDATE runs SET {', '.join(f'{k}=?' for k in fields)} WHERE id=?",
                            (*values, run_id))

    # -- batches ---------------------------------------------------------------------------

    def create_batch(self, batch_id: str, file: str, jobs: list[tuple[str, str]]) -> None:
        """A batch and its jobs (id, fingerprint), before any job runs; owned by this process."""
        lock = lock_name("batch", batch_id)
        with self._faults(f"start batch {batch_id} in {self.root}"):
            if not self.locks.acquire(lock):
                raise _busy("batch", batch_id, self._owner_by_lock(lock))
        try:
            with self._faults(f"start batch {batch_id} in {self.root}"), self._txn():
                self.db.execute("INSERT INTO batches VALUES (?,?,?,?)", (batch_id, now(), file, RUNNING))
                self.db.executemany("INSERT INTO batch_jobs VALUES (?,?,?,?,?,?)",
                                    [(batch_id, jid, i, None, fp, None) for i, (jid, fp) in enumerate(jobs)])
                self._set_owner("batch", [batch_id], lock)
        except BaseException:
            self.locks.release(lock)
            raise

    def set_batch_job(self, batch_id: str, job_id: str, *, run_id: str | None, fingerprint: str,
                      position: int, error: str | None = None) -> None:
        with self._faults(f"record job {job_id} of batch {batch_id} in {self.root}"), self._txn():
            self.db.execute("INSERT OR REPLACE INTO batch_jobs VALUES (?,?,?,?,?,?)",
                            (batch_id, job_id, position, run_id, fingerprint, error))

    def set_batch_status(self, batch_id: str, status: str) -> None:
        with self._faults(f"record the status of batch {batch_id} in {self.root}"), self._txn():
            self.db.execute("UPDATE batches SET status=? WHERE id=?", (status, batch_id))

    def latest_batch_for(self, file: str) -> dict | None:
        with self._faults(f"read the run store in {self.root}"):
            row = self.db.execute("SELECT * FROM batches WHERE file=? ORDER BY created DESC, id DESC LIMIT 1",
                                  (file,)).fetchone()
        return dict(row) if row else None

    def get_batch(self, batch_id: str) -> dict | None:
        with self._faults(f"read the run store in {self.root}"):
            row = self.db.execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
            if row is None:
                return None
            jobs = self.db.execute("SELECT job_id, position, run_id, fingerprint, error FROM batch_jobs "
                                   "WHERE batch_id=? ORDER BY position", (batch_id,)).fetchall()
            status, _, owner = self._settled("batch", batch_id, row["status"])
        return {**dict(row), "status": status, "owner": _owner_dict(owner) if status == RUNNING else None,
                "jobs": [dict(j) for j in jobs]}

    def find_batch(self, ref: str) -> dict | None:
        """A batch by id or unique id prefix; None when no batch matches (it may be a run id)."""
        with self._faults(f"read the run store in {self.root}"):
            rows = self.db.execute("SELECT id FROM batches WHERE id = ? OR id LIKE ? ESCAPE '\\'",
                                   (ref, _like_prefix(ref))).fetchall()
        ids = [r["id"] for r in rows]
        if ref in ids:
            return self.get_batch(ref)
        if len(ids) > 1:
            raise UsageError(f"'{ref}' matches {len(ids)} batches: give more of the id.")
        return self.get_batch(ids[0]) if ids else None

    # -- score jobs (gcr.scoring) -----------------------------------------------------------

    def create_score_job(self, job_id: str, key: str, source: str, settings: dict, items: int) -> None:
        """A score job of `items` images, owned by this process from here on (lock score-<id>)."""
        lock = lock_name("score", job_id)
        with self._faults(f"start score job {job_id} in {self.root}"):
            if not self.locks.acquire(lock):
                raise _busy("score", job_id, self._owner_by_lock(lock))
        try:
            with self._faults(f"start score job {job_id} in {self.root}"), self._txn():
                self.db.execute("INSERT INTO score_jobs VALUES (?,?,?,?,?,?,?,?)",
                                (job_id, now(), key, source, RUNNING, json.dumps(settings), items, None))
                self._set_owner("score", [job_id], lock)
        except BaseException:
            self.locks.release(lock)
            raise

    def latest_score_job(self, key: str) -> dict | None:
        """The newest score job of these images and options (its key), or None."""
        with self._faults(f"read the run store in {self.root}"):
            row = self.db.execute("SELECT id FROM score_jobs WHERE key=? ORDER BY created DESC, id DESC LIMIT 1",
                                  (key,)).fetchone()
        return self.get_score_job(row["id"]) if row else None

    def get_score_job(self, job_id: str) -> dict | None:
        """A score job's record: id, created, key, source, status (settled: a dead owner's job reads
        interrupted), settings, items (how many images), error, owner, and `scored` (how many stored)."""
        with self._faults(f"read the run store in {self.root}"):
            row = self.db.execute("SELECT * FROM score_jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            scored = self.db.execute("SELECT COUNT(*) FROM scores WHERE job_id=? AND error IS NULL",
                                     (job_id,)).fetchone()[0]
            status, _, owner = self._settled("score", job_id, row["status"])
        return {**dict(row), "settings": json.loads(row["settings"]), "status": status, "scored": scored,
                "owner": _owner_dict(owner) if status == RUNNING else None}

    def find_score_job(self, ref: str) -> dict | None:
        """A score job by id or unique id prefix; None when none matches."""
        with self._faults(f"read the run store in {self.root}"):
            rows = self.db.execute("SELECT id FROM score_jobs WHERE id = ? OR id LIKE ? ESCAPE '\\'",
                                   (ref, _like_prefix(ref))).fetchall()
        ids = [r["id"] for r in rows]
        if ref in ids:
            return self.get_score_job(ref)
        if len(ids) > 1:
            raise UsageError(f"'{ref}' matches {len(ids)} score jobs: give more of the id.")
        return self.get_score_job(ids[0]) if ids else None

    def record_scores(self, job_id: str, results: Sequence[dict]) -> None:
        """Commit scored images (records of gcr.scoring, each with its `position`) in one transaction.
        A row stored with an error is replaced (that is how a resumed job scores it again); a scored
        one never is."""
        with self._faults(f"store the scores of job {job_id} in {self.root}"), self._txn():
            self.db.executemany(
                "INSERT INTO scores VALUES (?,?,?,?,?,?) ON CONFLICT(job_id, position) DO UPDATE SET "
                "data=excluded.data, overall=excluded.overall, error=excluded.error, created=excluded.created "
                "WHERE scores.error IS NOT NULL",
                [(job_id, r["position"], json.dumps(r), r.get("overall"), r.get("error"), now()) for r in results])

    def update_score(self, job_id: str, position: int, **fields) -> None:
        """Add fields to one stored result (where curation put the image)."""
        with self._faults(f"update the scores of job {job_id} in {self.root}"), self._txn():
            row = self.db.execute("SELECT data FROM scores WHERE job_id=? AND position=?",
                                  (job_id, position)).fetchone()
            if row is not None:
                self.db.execute("UPDATE scores SET data=? WHERE job_id=? AND position=?",
                                (json.dumps({**json.loads(row["data"]), **fields}), job_id, position))

    def scores(self, job_id: str) -> list[dict]:
        """Every stored result of a score job, by position."""
        with self._faults(f"read the scores of job {job_id} from {self.root}"):
            return [json.loads(r["data"]) for r in self.db.execute(
                "SELECT data FROM scores WHERE job_id=? ORDER BY position", (job_id,))]

    def finish_score_job(self, job_id: str, status: str, error: str | None = None) -> None:
        """Record how a score job ended and give up its ownership."""
        try:
            with self._faults(f"record the end of score job {job_id} in {self.root}"), self._txn():
                self.db.execute("UPDATE score_jobs SET status=?, error=? WHERE id=?", (status, error, job_id))
        finally:
            self.locks.release(lock_name("score", job_id))

    # -- reading ---------------------------------------------------------------------------

    def resolve_id(self, ref: str) -> str:
        """A full run id, from the id or a unique prefix of it, or 'last'."""
        with self._faults(f"read the run store in {self.root}"):
            if ref == "last":
                row = self.db.execute("SELECT id FROM runs ORDER BY created DESC LIMIT 1").fetchone()
                if row is None:
                    raise UsageError(f"There are no runs in {self.root}: start one with `gcr refine`.")
                return row["id"]
            rows = self.db.execute("SELECT id FROM runs WHERE id = ? OR id LIKE ? ESCAPE '\\'",
                                   (ref, _like_prefix(ref))).fetchall()
        ids = [r["id"] for r in rows]
        if ref in ids:
            return ref
        if not ids:
            raise UsageError(f"No run '{ref}' in {self.root}: list runs with `gcr runs` "
                             "(or pass the right --runs-dir).")
        if len(ids) > 1:
            raise UsageError(f"'{ref}' matches {len(ids)} runs ({', '.join(ids[:3])}, ...): "
                             "give more of the id.")
        return ids[0]

    def get_run(self, ref: str) -> Run:
        run_id = self.resolve_id(ref)
        with self._faults(f"read run {run_id} from {self.root}"):
            row = self.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
            rounds = [self._absolute(Round.from_dict(json.loads(r["data"]))) for r in self.db.execute(
                "SELECT data FROM rounds WHERE run_id=? ORDER BY idx", (run_id,))]
            status, why, owner = self._settled("run", run_id, row["status"])
        return Run(
            id=row["id"], request=row["request"], task=row["task"], generator=row["generator"],
            critic=row["critic"], created=row["created"], source_image=row["source_image"],
            settings=json.loads(row["settings"]), versions=json.loads(row["versions"]),
            device=row["device"], status=status, stop_reason=row["stop_reason"],
            best_round=row["best_round"],
            final_image=str(self.root / row["final_image"]) if row["final_image"] else None,
            error=row["error"] or why, batch_id=row["batch_id"], rounds=tuple(rounds),
            owner=_owner_dict(owner) if status == RUNNING else None)

    def list_runs(self, limit: int = 20) -> list[dict]:
        """Newest first, with each run's best overall score."""
        with self._faults(f"read the run store in {self.root}"):
            rows = [dict(r) for r in self.db.execute(
                """SELECT r.id, r.request, r.status, r.created, r.task, r.generator, r.stop_reason,
                          r.best_round, (SELECT COUNT(*) FROM rounds WHERE run_id = r.id) AS n_rounds,
                          (SELECT overall FROM rounds WHERE run_id = r.id AND idx = r.best_round) AS best_overall
                   FROM runs r ORDER BY r.created DESC, r.id DESC LIMIT ?""", (limit,)).fetchall()]
            for row in rows:
                row["status"] = self._settled("run", row["id"], row["status"])[0]
        return rows

    def _absolute(self, round_: Round) -> Round:
        return replace(round_, candidates=tuple(
            replace(c, image=str(self.root / c.image) if c.image else "") for c in round_.candidates))


# Owned work other than runs, by kind: the table holding its status (gcr.owner).
_TABLES = {"batch": "batches", "score": "score_jobs"}


def _owner_of(row) -> Owner | None:
    if row is None:
        return None
    return Owner(host=row["host"], pid=row["pid"], process=row["process"], lock=row["lock"], since=row["since"])


def _owner_dict(owner: Owner | None) -> dict | None:
    return {"host": owner.host, "pid": owner.pid, "since": owner.since} if owner else None


def _busy(kind: str, ident: str, owner: Owner | None) -> UsageError:
    """The refusal when a live process already owns the work."""
    who = owner.describe() if owner else "another gcr process"
    since = f" since {owner.since[:19].replace('T', ' ')} UTC" if owner else ""
    via = f" (as part of batch {owner.lock[len('batch-'):]})" if owner and kind == "run" and \
        owner.lock.startswith("batch-") else ""
    what = {"run": "Run", "batch": "Batch", "score": "Score job"}.get(kind, kind)
    return UsageError(f"{what} {ident} is being advanced by {who}{via}{since}: wait for it to finish, or "
                      "stop that process and try again.")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _like_prefix(ref: str) -> str:
    return ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _write_png(image, path: Path, info: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for k, v in info.items():
        meta.add_itxt(k, str(v))  # iTXt: UTF-8, so prompts in any language survive
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)  # a half-written image must not take the space it lacked
        except OSError:
            pass
        raise
