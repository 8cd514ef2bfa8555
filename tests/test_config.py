"""`fullpower check-config`: exit 0 for valid files, exit 2 with `field.path: reason` lines otherwise."""

import copy
import subprocess

import pytest
import yaml

from tests.conftest import FULLPOWER, ROOT

BASE = yaml.safe_load((ROOT / "config/examples/bench-fake.yaml").read_text())


def check(tmp_path, config) -> subprocess.CompletedProcess:
    path = tmp_path / "c.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return subprocess.run(FULLPOWER + ["check-config", str(path)], capture_output=True, text=True, cwd=ROOT)


def mutate(fn):
    config = copy.deepcopy(BASE)
    fn(config)
    return config


def _set(path, value):
    def fn(config):
        target = config
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return fn


BAD = {
    "replicas below one": (_set(["pools", 0, "replicas", "hot"], 0), "pools[0].replicas.hot:"),
    "unknown key": (_set(["pools", 0, "replicaz"], 1), "pools[0]: Object contains unknown field `replicaz`"),
    "unknown top-level key": (_set(["bogus"], 1), "bogus: unknown field"),
    "wrong type": (_set(["pools", 0, "max_batch_size"], "lots"), "pools[0].max_batch_size: Expected `int`"),
    "negative timeout": (_set(["timeouts"], {"idle_s": -1}), "timeouts.idle_s:"),
    "negative queue timeout": (_set(["tiers", 1, "queue_timeout_s"], -5), "tiers[1].queue_timeout_s:"),
    "more replicas than devices": (_set(["pools", 0, "replicas"], {"hot": 2, "cold": 1}), "pools[0].replicas: 3 replicas"),
    "tier names a missing pool": (_set(["tiers", 2, "pool"], "nope"), "tiers[2].pool: no pool named 'nope'"),
    "key names a missing tier": (_set(["auth", "keys", 0, "tier"], "gold"), "auth.keys[0].tier: no tier named 'gold'"),
    "unreadable model path": (lambda c: c["pools"][0].update(engine="transformers", model_path="/nonexistent/model"),
                              "pools[0].model_path: '/nonexistent/model' is not a readable directory"),
    "bad listen address": (_set(["listen"], "localhost"), "listen: expected HOST:PORT"),
    "bad device": (_set(["pools", 0, "devices"], ["gpu0", "cpu"]), "pools[0].devices[0]: expected 'cpu' or 'cuda:N'"),
    "unknown engine": (_set(["pools", 0, "engine"], "vllm"), "pools[0].engine: Invalid enum value 'vllm'"),
    "duplicate pool": (lambda c: c["pools"].append(copy.deepcopy(c["pools"][0])), "pools[1].name: duplicate name"),
    "anonymous tier missing": (_set(["auth", "allow_anonymous"], True), "auth.anonymous_tier: no tier named ''"),
    "missing pools": (lambda c: c.pop("pools"), "pools: required field is missing"),
    "postgresql store without a dsn": (_set(["jobs"], {"store": "postgresql"}), "jobs.dsn: store postgresql needs"),
    "dsn of another kind": (_set(["jobs"], {"store": "postgresql", "dsn": "mysql://x/y"}), "jobs.dsn: store postgresql"),
    "dsn with the sqlite store": (_set(["jobs"], {"dsn": "postgresql://x/y"}), "jobs.dsn: only used with store: "
                                                                               "postgresql"),
    "unknown job store": (_set(["jobs"], {"store": "mongodb"}), "jobs.store: Invalid enum value 'mongodb'"),
    "lease too short": (_set(["jobs"], {"store": "postgresql", "dsn": "postgresql://x/y", "lease_s": 1}),
                        "jobs.lease_s:"),
    "redis url of another kind": (_set(["shared"], {"redis_url": "http://cache:6379"}), "shared.redis_url: expected"),
    "bad advertise address": (_set(["shared"], {"redis_url": "redis://r:6379/0", "advertise": "nohostport"}),
                              "shared.advertise: expected HOST:PORT"),
    "stream interval of zero": (_set(["pools", 0, "stream_interval"], 0), "pools[0].stream_interval: Expected `int` >= 1"),
    "stream interval past its bound": (_set(["pools", 0, "stream_interval"], 65), "pools[0].stream_interval: Expected `int` <= 64"),
    "burst below one": (lambda c: c["auth"]["keys"][0].update(requests_per_second=5, requests_burst=0),
                        "auth.keys[0].requests_burst:"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_names_the_field(tmp_path, case):
    fn, expected = BAD[case]
    result = check(tmp_path, mutate(fn))
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_several_problems_one_line_each(tmp_path):
    def fn(config):
        config["pools"][0]["replicas"]["hot"] = 0
        config["tiers"][0]["weight"] = "heavy"
        config["listen"] = 5
    result = check(tmp_path, mutate(fn))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any("pools[0].replicas.hot" in l for l in lines)
    assert any("tiers[0].weight" in l for l in lines)
    assert any("listen: Expected `str`" in l for l in lines)


def test_not_yaml_and_missing_file(tmp_path):
    result = check(tmp_path, "pools: [unclosed")
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(FULLPOWER + ["check-config", str(tmp_path / "absent.yaml")], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and "cannot read" in result.stderr


@pytest.mark.parametrize("name", ["fullpower.yaml", "examples/bench-fake.yaml", "examples/single-gpu.yaml",
                                  "examples/annotated.yaml"])
def test_shipped_configs_are_valid(name):
    result = subprocess.run(FULLPOWER + ["check-config", str(ROOT / "config" / name)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_eight_gpu_example_is_valid_once_its_model_exists(tmp_path):
    config = yaml.safe_load((ROOT / "config/examples/eight-gpu.yaml").read_text())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    config["pools"][0]["model_path"] = str(tmp_path / "model")
    result = check(tmp_path, config)
    assert result.returncode == 0, result.stderr
