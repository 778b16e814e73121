"""cluster.yaml validates offline with Ray's own launcher checks and holds what the README promises."""

import re

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO


@pytest.fixture(scope="module")
def raw() -> str:
    return (REPO / "cluster.yaml").read_text()


@pytest.fixture(scope="module")
def config(raw, monkeypatch_module) -> dict:
    monkeypatch_module.setenv("AWS_EC2_METADATA_DISABLED", "true")
    prepared = prepare_config(yaml.safe_load(raw))
    validate_config(prepared)  # raises on unknown keys, bad node types, worker sums
    return prepared


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_node_types(config):
    types = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu, cpu = types["gpu_worker"], types["cpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert re.match(r"(g|p)\d", gpu["node_config"]["InstanceType"])
    assert cpu["min_workers"] == 0 and re.match(r"[cm]\d", cpu["node_config"]["InstanceType"])
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())


def test_setup_installs_the_project_with_gpu_extra_and_no_runtime_env(config, raw):
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "happysad[gpu]" in setup
    assert "runtime_env" not in config and not re.search(r"^\s*runtime_env:", raw, re.M)


def test_dashboard_only_on_loopback_and_no_keys(config, raw):
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id", raw, re.I)
