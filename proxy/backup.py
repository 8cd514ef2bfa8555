"""`fullpower backup` and `fullpower restore`: a consistent snapshot of what the appliance cannot
rebuild, taken while it serves, and a restore that checks everything before it changes anything.

A backup directory holds:
- `jobs.sqlite3`: the job store, copied with SQLite's online backup API (a consistent snapshot
  while the server writes), with its job counts by state; or, with `jobs.store: postgresql`,
  `jobs.pgdump`: pg_dump's logical export of fullpower's tables (custom format), taken in an
  exported snapshot whose job counts are recorded from the same snapshot;
- `config/<name>`: the config file, and `secrets/admin.token` (owner-only) when it exists;
- `models/<pool>/`: each transformers pool's model manifest (`fullpower-manifest.json`), and the
  model files themselves with `--with-models`;
- `BACKUP.json`: the SHA-256 and size of every file above, the job counts, and where each part
  came from.

Restore verifies every checksum first (a missing, extra or altered file is named and nothing is
changed), then writes the job store (integrity-checked, its counts compared with the backup's),
the admin token and, when the backup has them, the model files (checked against their manifests)
into the target data directory. The answer cache is not backed up: it refills itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

from backend.manifest import MANIFEST as MODEL_MANIFEST
from backend.manifest import ManifestError, sha256_file, verify_manifest
from proxy.config import Config
from proxy.jobs.pg_schema import redacted

BACKUP_MANIFEST = "BACKUP.json"
FORMAT = 1
PG_TABLES = ("jobs", "callback_attempts", "fullpower_schema")  # fullpower's tables in a PostgreSQL job store


class BackupError(Exception):
    """A backup or restore that cannot go on; the message names the file at fault. `changed`:
    whether a restore had already changed something (only a copied model that fails its check)."""

    def __init__(self, message: str, changed: bool = False) -> None:
        super().__init__(message)
        self.changed = changed


def job_counts(db_path: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())


def backup(cfg: Config, config_path: Path, dest: Path, with_models: bool = False) -> dict:
    """Write a backup of the running (or stopped) appliance described by `cfg` into `dest`."""
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest}: not empty; back up into a new directory")
    dest.mkdir(parents=True, exist_ok=True)
    sources: dict[str, str] = {}
    counts: dict[str, int] = {}
    db = cfg.jobs_db()
    if cfg.jobs.enabled and cfg.jobs.store == "postgresql":
        counts = _pg_dump(cfg.jobs.dsn, dest / "jobs.pgdump")
        sources["jobs.pgdump"] = redacted(cfg.jobs.dsn)
    elif db.is_file():
        target = dest / "jobs.sqlite3"
        with sqlite3.connect(str(db)) as src, sqlite3.connect(str(target)) as dst:
            src.backup(dst)  # consistent while the server writes (SQLite's online backup)
        counts = job_counts(target)
        sources["jobs.sqlite3"] = str(db)
    (dest / "config").mkdir()
    shutil.copy2(config_path, dest / "config" / config_path.name)
    sources[f"config/{config_path.name}"] = str(config_path)
    token = cfg.admin_token_path()
    if token.is_file():
        (dest / "secrets").mkdir(mode=0o700)
        shutil.copy2(token, dest / "secrets" / "admin.token")
        os.chmod(dest / "secrets" / "admin.token", 0o600)
        sources["secrets/admin.token"] = str(token)
    for pool in cfg.pools:
        if pool.engine != "transformers":
            continue
        model_dir = cfg.model_dir(pool)
        out = dest / "models" / pool.name
        if with_models:
            shutil.copytree(model_dir, out)
        elif (model_dir / MODEL_MANIFEST).is_file():
            out.mkdir(parents=True)
            shutil.copy2(model_dir / MODEL_MANIFEST, out / MODEL_MANIFEST)
        else:
            continue
        sources[f"models/{pool.name}/"] = str(model_dir)
    files = {}
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        files[str(path.relative_to(dest))] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "with_models": with_models, "jobs": counts, "sources": sources, "files": files}
    (dest / BACKUP_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify(src: Path) -> dict:
    """The backup's manifest, once every file it lists is present, unaltered, and alone."""
    try:
        manifest = json.loads((src / BACKUP_MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{src / BACKUP_MANIFEST}: unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{src / BACKUP_MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT}")
    present = {str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()} - {BACKUP_MANIFEST}
    for name in sorted(set(manifest["files"]) - present):
        raise BackupError(f"{src / name}: listed in the backup but missing")
    for name in sorted(present - set(manifest["files"])):
        raise BackupError(f"{src / name}: not part of the backup (added after it was taken)")
    for name, expected in sorted(manifest["files"].items()):
        path = src / name
        if path.stat().st_size != expected["size"] or sha256_file(path) != expected["sha256"]:
            raise BackupError(f"{path}: checksum mismatch (altered or corrupted since the backup)")
    return manifest


def restore(src: Path, cfg: Config) -> list[str]:
    """Restore a verified backup into `cfg`'s data directory; returns what was done, line by line.
    Everything is checked before anything is changed. The server must be stopped (the job store
    is replaced)."""
    manifest = verify(src)
    done = [f"verified {len(manifest['files'])} files against {BACKUP_MANIFEST}"]
    counts = None
    if "jobs.sqlite3" in manifest["files"]:
        with sqlite3.connect(f"file:{src / 'jobs.sqlite3'}?mode=ro", uri=True) as conn:
            result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if result != "ok":
            raise BackupError(f"{src / 'jobs.sqlite3'}: integrity check failed ({result})")
        counts = job_counts(src / "jobs.sqlite3")
        if counts != manifest["jobs"]:
            raise BackupError(f"{src / 'jobs.sqlite3'}: job counts {counts} differ from the backup's {manifest['jobs']}")
    models = [(pool.name, cfg.model_dir(pool), src / "models" / pool.name) for pool in cfg.pools
              if pool.engine == "transformers" and (src / "models" / pool.name).is_dir()]
    pg_dump = "jobs.pgdump" in manifest["files"]
    if pg_dump != (cfg.jobs.store == "postgresql") and (pg_dump or counts is not None):
        kinds = {True: "PostgreSQL", False: "SQLite"}
        raise BackupError(f"{src}: the backup's job store is {kinds[pg_dump]} but this config stores jobs in "
                          f"{kinds[cfg.jobs.store == 'postgresql']} (jobs.store)")
    if not manifest.get("with_models"):
        for name, model_dir, backed in models:  # the models stay where they are: they must match
            problem = _check_model(model_dir, backed / MODEL_MANIFEST)
            if problem:
                raise BackupError(problem)
            done.append(f"model of pool {name}: every file matches the manifest in the backup")
    # checked: now change things
    if counts is not None:
        target = cfg.jobs_db()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(target.name + ".restoring")
        shutil.copy2(src / "jobs.sqlite3", staging)
        for suffix in ("-wal", "-shm"):  # the old store's write-ahead log must not replay over the new one
            Path(str(target) + suffix).unlink(missing_ok=True)
        os.replace(staging, target)
        done.append(f"job store restored to {target}: integrity ok, jobs by state {counts}")
    if pg_dump:
        restored = _pg_restore(cfg.jobs.dsn, src / "jobs.pgdump")
        if restored != manifest["jobs"]:
            raise BackupError(f"{redacted(cfg.jobs.dsn)}: job counts {restored} after the restore differ from the "
                              f"backup's {manifest['jobs']}", changed=True)
        done.append(f"job store restored into {redacted(cfg.jobs.dsn)}: jobs by state {restored} as in the backup")
    if "secrets/admin.token" in manifest["files"]:
        token = cfg.admin_token_path()
        token.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "secrets" / "admin.token", token)
        os.chmod(token, 0o600)
        done.append(f"admin token restored to {token}")
    if manifest.get("with_models"):
        for name, model_dir, backed in models:  # files verified with the backup's checksums above
            staging = model_dir.with_name(model_dir.name + ".restoring")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(backed, staging)
            shutil.rmtree(model_dir, ignore_errors=True)
            os.replace(staging, model_dir)
            problem = _check_model(model_dir, backed / MODEL_MANIFEST)
            if problem:
                raise BackupError(problem, changed=True)
            done.append(f"model of pool {name} restored to {model_dir}; every file matches its manifest")
    return done


async def _pg_counts(conn) -> dict[str, int]:
    return {r["status"]: r["n"] for r in await conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")}


def _pg_dump(dsn: str, target: Path) -> dict[str, int]:
    """pg_dump of fullpower's tables inside one exported snapshot, and the job counts read in
    that same snapshot (so the manifest's counts are the dump's, however busy the fleet is)."""
    import asyncpg

    async def run() -> dict[str, int]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
                counts = await _pg_counts(conn)
                proc = await asyncio.create_subprocess_exec(
                    "pg_dump", "--format=custom", "--no-owner", "--no-privileges", f"--snapshot={snapshot}",
                    *(f"--table={t}" for t in PG_TABLES), "--file", str(target), dsn,
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
                _, err = await proc.communicate()
                if proc.returncode:
                    raise BackupError(f"pg_dump of {redacted(dsn)} failed: {err.decode(errors='replace').strip()}")
            return counts
        finally:
            await conn.close()

    try:
        return asyncio.run(run())
    except (OSError, asyncpg.PostgresError) as exc:
        raise BackupError(f"{redacted(dsn)}: {exc}") from None


def _pg_restore(dsn: str, dump: Path) -> dict[str, int]:
    """Replace fullpower's tables with the dump's in one transaction; the job counts after it."""
    import asyncpg

    out = subprocess.run(["pg_restore", "--clean", "--if-exists", "--no-owner", "--no-privileges",
                          "--single-transaction", "--dbname", dsn, str(dump)], capture_output=True, text=True)
    if out.returncode:
        raise BackupError(f"pg_restore into {redacted(dsn)} failed (nothing changed: one transaction): "
                          f"{out.stderr.strip()}")

    async def count() -> dict[str, int]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return await _pg_counts(conn)
        finally:
            await conn.close()

    return asyncio.run(count())


def _check_model(model_dir: Path, backed_manifest: Path) -> str | None:
    """A model directory against the manifest saved in the backup (None when it matches)."""
    own = model_dir / MODEL_MANIFEST
    if not own.is_file() or sha256_file(own) != sha256_file(backed_manifest):
        return f"{own}: missing or not the manifest the backup recorded"
    try:
        verify_manifest(model_dir)
    except ManifestError as exc:
        return str(exc)
    return None
