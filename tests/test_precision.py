"""Precision choices per pool: int8 weight-only quantisation (torchao) on the real embedded model,
the weight memory workers report, and clear refusals where the host cannot run a choice."""

import subprocess
import sys

import pytest
import yaml
from openai import OpenAI

from tests.conftest import ROOT, wait_until


@pytest.fixture(scope="module")
def int8_server(embedded_model, tmp_path_factory):
    from tests.conftest import Server

    config = yaml.safe_load((ROOT / "config/fullpower.yaml").read_text())
    tmp = tmp_path_factory.mktemp("int8")
    config["data_dir"] = str(tmp / "data")
    config["pools"][0].update(model_path=str(embedded_model), dtype="int8")
    server = Server(config, tmp).start(timeout=300)
    yield server
    server.stop()


def test_int8_embedded_model_answers_and_reports_smaller_weights(int8_server, embedded_server):
    client = OpenAI(base_url=int8_server.url + "/v1", api_key="any", max_retries=0)
    r = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    int8 = wait_until(lambda: int8_server.pool()[0]["weight_bytes"], what="the int8 worker's weight figure")
    float32 = wait_until(lambda: embedded_server.pool()[0]["weight_bytes"], what="the float32 worker's weight figure")
    assert 0 < int8 < 0.6 * float32  # the decoder's linear layers at a byte per weight
    assert "int8" in int8_server.log() and "model weights" in int8_server.log()
    status = subprocess.run([sys.executable, "-m", "proxy", "status", "--admin", f"127.0.0.1:{int8_server.admin_port}",
                             "--admin-token-file", int8_server.config["admin_token_file"]],
                            capture_output=True, text=True, cwd=ROOT)
    assert "MiB" in status.stdout, status.stdout + status.stderr


HIDE_TORCHAO = ("import importlib.util, sys; real = importlib.util.find_spec; "
                "importlib.util.find_spec = lambda name, *a: None if name == 'torchao' else real(name, *a); "
                "from proxy.cli import main; sys.exit(main())")


def test_int8_without_torchao_is_refused_by_check_config(tmp_path):
    config = yaml.safe_load((ROOT / "config/fullpower.yaml").read_text())
    config["pools"][0]["dtype"] = "int8"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-c", HIDE_TORCHAO, "check-config", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pools[0].dtype: int8 needs the torchao package" in proc.stdout + proc.stderr
    config["pools"][0]["dtype"] = "float16"  # a float type needs nothing more
    path.write_text(yaml.safe_dump(config))
    assert subprocess.run([sys.executable, "-c", HIDE_TORCHAO, "check-config", str(path)],
                          capture_output=True, text=True, cwd=ROOT).returncode == 0


def test_int8_without_torchao_fails_at_worker_boot_with_a_clear_message(tiny_model, monkeypatch):
    from backend.engine import BootError, TransformersEngine
    from backend.protocol import WorkerSettings

    # importing it now fails, as on a host without it (transformers may have imported parts already)
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BootError, match="dtype int8 needs the torchao package"):
        TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=str(tiny_model),
                                          dtype="int8", max_batch_size=2))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8", "fp8"])
def test_every_precision_decodes_greedily_like_its_own_reference(tiny_model, dtype):
    """The engine (slot KV cache, batching) against HF generate on the same weights, per precision."""
    import torch

    from backend.engine import TransformersEngine
    from backend.protocol import Generate, SamplingParams, WorkerSettings
    from tests.test_engine import run

    engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=str(tiny_model),
                                               dtype=dtype, max_batch_size=2))
    prompt = "1 2 3 4 5 6 7"
    got = run(engine, [Generate(id=1, prompt=prompt, params=SamplingParams(max_tokens=8, temperature=0.0,
                                                                           ignore_eos=True))])[1][0]
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = engine.model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    assert got == ref[0, ids.shape[1]:].tolist()
