"""A model whose files do not match its manifest is refused: by `fullpower model verify`, and by a
worker (which the proxy reports as failed at boot rather than crash-looping)."""

import shutil
import subprocess
import time

from tests.conftest import FULLPOWER, ROOT


def tamper(src, dst):
    shutil.copytree(src, dst)
    data = bytearray((dst / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    (dst / "model.safetensors").write_bytes(bytes(data))


def test_verify_command(tiny_model, tmp_path):
    ok = subprocess.run(FULLPOWER + ["model", "verify", str(tiny_model)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "matches its manifest" in ok.stdout
    tamper(tiny_model, tmp_path / "bad")
    bad = subprocess.run(FULLPOWER + ["model", "verify", str(tmp_path / "bad")], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 1 and "model.safetensors" in bad.stderr and "Traceback" not in bad.stderr


def test_worker_refuses_tampered_model(tiny_model, tmp_path, start_server):
    tamper(tiny_model, tmp_path / "bad")
    config = {
        "pools": [{"name": "main", "model": "tiny", "model_path": str(tmp_path / "bad"), "devices": ["cpu"]}],
        "tiers": [{"name": "standard", "pool": "main"}],
        "auth": {"allow_anonymous": True, "anonymous_tier": "standard"},
        "workers": {"restart_backoff_initial_s": 0.5},
    }
    server = start_server(config, wait_ready=False)
    deadline = time.monotonic() + 60
    worker = None
    while time.monotonic() < deadline:
        try:
            worker = server.pool()[0]
        except OSError:
            pass
        if worker and worker["boot_failures"] >= 1:
            break
        time.sleep(0.2)
    assert worker and worker["boot_failures"] >= 1, server.log()
    assert "model.safetensors" in worker["last_error"] and "manifest" in worker["last_error"]
    assert worker["state"] in ("backing_off", "starting")
    assert "refusing to load the model" in server.log()
