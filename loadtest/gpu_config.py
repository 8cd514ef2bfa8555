"""The GPU scripts' shared setup: build the 135M-shape model with random weights (once) and
write a `fullpower serve` config with one worker per GPU for it.

python -m loadtest.gpu_config --gpus N --out /tmp/gpuN.yaml [--shape smollm2-135m] [--tokenizer .gpu/tokenizer]
    [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODEL_DIRS = {"smollm2-135m": (Path("/tmp/m135"), "m135"), "llama-3.2-1b": (Path("/tmp/m1b"), "m1b"),
              "llama-3.1-8b": (Path("/tmp/m8b"), "m8b")}


def built_model(shape: str, tokenizer: Path) -> Path:
    """The shape's random-weight model where these scripts keep it, built on first use."""
    model_dir = MODEL_DIRS[shape][0]
    if not (model_dir / "config.json").is_file():
        from loadtest.bench_gpu import build_model

        build_model(shape, tokenizer, model_dir)
    return model_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.gpu_config")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, default=Path(".gpu/tokenizer"))
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(MODEL_DIRS))
    p.add_argument("--prefill-wait-ms", type=float, default=0.0, help="the pool's prefill_wait_ms")
    p.add_argument("--overlap-prefill", type=int, choices=(0, 1), default=1, help="the pool's overlap_prefill")
    p.add_argument("--dtype", default="auto", help="the pool's dtype")
    p.add_argument("--stream-interval", type=int, default=1, help="the pool's stream_interval")
    args = p.parse_args(argv)
    model_dir, model_name = built_model(args.shape, args.tokenizer), MODEL_DIRS[args.shape][1]
    n = args.gpus
    args.out.write_text(json.dumps({
        "listen": "127.0.0.1:18080", "admin_listen": "127.0.0.1:19091", "data_dir": "/tmp/fpdata",
        "log_level": "warning",
        "pools": [{"name": "main", "model": model_name, "model_path": str(model_dir),
                   "devices": [f"cuda:{i}" for i in range(n)], "replicas": {"hot": n}, "max_batch_size": 256,
                   "max_inflight_per_worker": 512, "max_context": 512, "verify_manifest": False, "dtype": args.dtype,
                   "prefill_wait_ms": args.prefill_wait_ms, "overlap_prefill": bool(args.overlap_prefill),
                   "stream_interval": args.stream_interval}],
        "tiers": [{"name": "standard", "pool": "main", "max_concurrent": 512 * n, "max_queue": 1024 * n}],
        "routing": {"slow_start_s": 0},
        "auth": {"allow_anonymous": True, "anonymous_tier": "standard"}, "cache": {"enabled": False}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
