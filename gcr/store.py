"""The run store: SQLite (WAL) plus PNGs, so every completed round survives a crash.

Layout of a runs directory (`--runs-dir`, env GCR_HOME, default ./gcr-runs):
    gcr.sqlite3                      runs and rounds (and batches), one transaction per round
    <run-id>/round-01.png            the round's chosen image (candidates: round-01-c2.png, ...)
    <run-id>/final.png               a copy of the best round's image
Image paths are stored relative to the runs directory (so it can be moved) and handed out absolute.
PNGs are written to a temporary name and renamed before the row that names them is committed:
a kill at any moment leaves either a complete round or none, never a row pointing at half a file.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from .errors import UsageError
from .records import Run, Round

DEFAULT_RUNS_DIR = "gcr-runs"
DB_NAME = "gcr.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, created TEXT NOT NULL, request TEXT NOT NULL, task TEXT NOT NULL,
    source_image TEXT, generator TEXT NOT NULL, critic TEXT NOT NULL, settings TEXT NOT NULL,
    versions TEXT NOT NULL, device TEXT NOT NULL, status TEXT NOT NULL, stop_reason TEXT,
    best_round INTEGER, final_image TEXT, error TEXT, batch_id TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(id), idx INTEGER NOT NULL, data TEXT NOT NULL,
    overall REAL, created TEXT NOT NULL, PRIMARY KEY (run_id, idx)
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, created TEXT NOT NULL, file TEXT NOT NULL, status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_jobs (
    batch_id TEXT NOT NULL REFERENCES batches(id), job_id TEXT NOT NULL, position INTEGER NOT NULL,
    run_id TEXT, fingerprint TEXT NOT NULL, error TEXT, PRIMARY KEY (batch_id, job_id)
);
"""


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
    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"Cannot create the runs directory {self.root} ({e.strerror}): "
                             "pass a writable --runs-dir.") from None
        self.db = sqlite3.connect(self.root / DB_NAME, timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed round survives power loss too
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- writing ---------------------------------------------------------------------------

    def create_run(self, run: Run) -> Run:
        run = run.with_(created=run.created or now())
        with self.db:
            self.db.execute(
                "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run.id, run.created, run.request, run.task, run.source_image, run.generator,
                 run.critic, json.dumps(run.settings), json.dumps(run.versions), run.device,
                 run.status, run.stop_reason, run.best_round, run.final_image, run.error,
                 run.batch_id))
        (self.root / run.id).mkdir(exist_ok=True)
        return run

    def record_round(self, run: Run, round_: Round, images: list, metadata: dict | None = None) -> Round:
        """Write the round's PNGs, then commit its row. Returns the round with image paths set."""
        candidates = []
        for i, (cand, image) in enumerate(zip(round_.candidates, images)):
            name = f"round-{round_.index:02d}" + (f"-c{i + 1}" if i else "") + ".png"
            rel = f"{run.id}/{name}"
            info = {"gcr:run": run.id, "gcr:request": run.request, "gcr:round": str(round_.index),
                    "gcr:prompt": round_.prompt, "gcr:seed": str(cand.seed),
                    "gcr:scores": json.dumps(cand.scores), "gcr:overall": str(cand.overall),
                    **(metadata or {})}
            _write_png(image, self.root / rel, info)
            candidates.append(replace(cand, image=rel))
        stored = replace(round_, candidates=tuple(candidates))
        with self.db:
            self.db.execute("INSERT INTO rounds VALUES (?,?,?,?,?)",
                            (run.id, stored.index, json.dumps(stored.to_dict()), stored.overall, now()))
        return self._absolute(stored)

    def finish_run(self, run_id: str, *, status: str, stop_reason: str | None,
                   best_round: int | None, error: str | None = None) -> Run:
        """Mark a run done; copy its best round's image to final.png."""
        final = None
        run = self.get_run(run_id)
        best = next((r for r in run.rounds if r.index == best_round), None)
        if best and best.image:
            final = f"{run_id}/final.png"
            tmp = self.root / f"{final}.tmp"
            shutil.copyfile(best.image, tmp)
            os.replace(tmp, self.root / final)
        with self.db:
            self.db.execute(
                "UPDATE runs SET status=?, stop_reason=?, best_round=?, final_image=?, error=? WHERE id=?",
                (status, stop_reason, best_round, final, error, run_id))
        return self.get_run(run_id)

    def update_run(self, run_id: str, **fields) -> None:
        allowed = {"status", "error", "settings", "device", "generator", "critic"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update {sorted(bad)}")
        values = [json.dumps(v) if k == "settings" else v for k, v in fields.items()]
        with self.db:
            self.db.execute(f"UPDATE runs SET {', '.join(f'{k}=?' for k in fields)} WHERE id=?",
                            (*values, run_id))

    # -- batches ---------------------------------------------------------------------------

    def create_batch(self, batch_id: str, file: str, jobs: list[tuple[str, str]]) -> None:
        """A batch and its jobs (id, fingerprint), before any job runs."""
        with self.db:
            self.db.execute("INSERT INTO batches VALUES (?,?,?,?)", (batch_id, now(), file, "running"))
            self.db.executemany("INSERT INTO batch_jobs VALUES (?,?,?,?,?,?)",
                                [(batch_id, jid, i, None, fp, None) for i, (jid, fp) in enumerate(jobs)])

    def set_batch_job(self, batch_id: str, job_id: str, *, run_id: str | None, fingerprint: str,
                      position: int, error: str | None = None) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO batch_jobs VALUES (?,?,?,?,?,?)",
                            (batch_id, job_id, position, run_id, fingerprint, error))

    def set_batch_status(self, batch_id: str, status: str) -> None:
        with self.db:
            self.db.execute("UPDATE batches SET status=? WHERE id=?", (status, batch_id))

    def latest_batch_for(self, file: str) -> dict | None:
        row = self.db.execute("SELECT * FROM batches WHERE file=? ORDER BY created DESC, id DESC LIMIT 1",
                              (file,)).fetchone()
        return dict(row) if row else None

    def get_batch(self, batch_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
        if row is None:
            return None
        jobs = self.db.execute("SELECT job_id, position, run_id, fingerprint, error FROM batch_jobs "
                               "WHERE batch_id=? ORDER BY position", (batch_id,)).fetchall()
        return {**dict(row), "jobs": [dict(j) for j in jobs]}

    def find_batch(self, ref: str) -> dict | None:
        """A batch by id or unique id prefix; None when no batch matches (it may be a run id)."""
        rows = self.db.execute("SELECT id FROM batches WHERE id = ? OR id LIKE ? ESCAPE '\\'",
                               (ref, _like_prefix(ref))).fetchall()
        ids = [r["id"] for r in rows]
        if ref in ids:
            return self.get_batch(ref)
        if len(ids) > 1:
            raise UsageError(f"'{ref}' matches {len(ids)} batches: give more of the id.")
        return self.get_batch(ids[0]) if ids else None

    # -- reading ---------------------------------------------------------------------------

    def resolve_id(self, ref: str) -> str:
        """A full run id, from the id or a unique prefix of it, or 'last'."""
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
        row = self.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        rounds = [self._absolute(Round.from_dict(json.loads(r["data"]))) for r in self.db.execute(
            "SELECT data FROM rounds WHERE run_id=? ORDER BY idx", (run_id,))]
        return Run(
            id=row["id"], request=row["request"], task=row["task"], generator=row["generator"],
            critic=row["critic"], created=row["created"], source_image=row["source_image"],
            settings=json.loads(row["settings"]), versions=json.loads(row["versions"]),
            device=row["device"], status=row["status"], stop_reason=row["stop_reason"],
            best_round=row["best_round"],
            final_image=str(self.root / row["final_image"]) if row["final_image"] else None,
            error=row["error"], batch_id=row["batch_id"], rounds=tuple(rounds))

    def list_runs(self, limit: int = 20) -> list[dict]:
        """Newest first, with each run's best overall score."""
        rows = self.db.execute(
            """SELECT r.id, r.request, r.status, r.created, r.task, r.generator, r.stop_reason,
                      r.best_round, (SELECT COUNT(*) FROM rounds WHERE run_id = r.id) AS n_rounds,
                      (SELECT overall FROM rounds WHERE run_id = r.id AND idx = r.best_round) AS best_overall
               FROM runs r ORDER BY r.created DESC, r.id DESC LIMIT ?""", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def _absolute(self, round_: Round) -> Round:
        return replace(round_, candidates=tuple(
            replace(c, image=str(self.root / c.image) if c.image else "") for c in round_.candidates))


def _like_prefix(ref: str) -> str:
    return ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _write_png(image, path: Path, info: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for k, v in info.items():
        meta.add_itxt(k, str(v))  # iTXt: UTF-8, so prompts in any language survive
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        image.save(f, format="PNG", pnginfo=meta)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
