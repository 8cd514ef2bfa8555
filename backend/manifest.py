"""Model-directory manifests: the sha256 and size of every file (standard library only)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "fullpower-manifest.json"


class ManifestError(Exception):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    files = {str(p.relative_to(model_dir)): {"sha256": sha256_file(p), "size": p.stat().st_size}
             for p in model_files(model_dir)}
    target = model_dir / MANIFEST
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, target)
    return target


def has_manifest(model_dir: Path) -> bool:
    return (Path(model_dir) / MANIFEST).is_file()


def verify_manifest(model_dir: Path) -> None:
    """Raises ManifestError naming the first file that is missing, resized or altered."""
    model_dir = Path(model_dir)
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{model_dir / MANIFEST}: unreadable manifest ({exc})") from exc
    for name, want in sorted(files.items()):
        path = model_dir / name
        if not path.is_file():
            raise ManifestError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise ManifestError(f"{path}: size {size} does not match the manifest ({want['size']})")
        if sha256_file(path) != want["sha256"]:
            raise ManifestError(f"{path}: sha256 does not match the manifest (file altered or corrupt)")
