"""Jobs place themselves by config (GPU model, custom resources), and the preflight says what
a cluster can never hold, or which node type the autoscaler is expected to add (docs/cluster.md)."""

from pathlib import Path

import pytest

from jobs import runtime
from pocl_ray.config import ConfigError, load_config
from pocl_ray.scores import hashed_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, list(overrides))
    return str(e.value)


def test_an_accelerator_type_needs_a_gpu_and_a_model_name():
    assert "scoring.accelerator_type: A10G asks for a GPU model but no GPU" in problems(
        "scoring.accelerator_type=A10G"
    )
    assert "set scaling.use_gpu: true" in problems("scaling.accelerator_type=A100")
    assert "eval.accelerator_type: got 'A 10'" in problems(
        "eval.accelerator_type=A 10", "eval.gpus_per_actor=1"
    )
    assert "scoring.resources.GPU: use scoring.cpus_per_actor / gpus_per_actor" in problems(
        "scoring.resources={GPU: 1}"
    )
    cfg = load_config(
        DEMO,
        [
            "scoring.accelerator_type=A10G",
            "scoring.gpus_per_actor=1",
            "scaling.accelerator_type=A100",
            "scaling.use_gpu=true",
        ],
    )
    assert cfg.scoring.accelerator_type == "A10G" and cfg.scaling.accelerator_type == "A100"


def test_placement_keys_do_not_change_the_scores_table_hash():
    """Where actors run cannot change the scores: old tables stay reusable."""
    base = hashed_config(load_config(DEMO))
    moved = hashed_config(
        load_config(
            DEMO,
            [
                "scoring.accelerator_type=A10G",
                "scoring.gpus_per_actor=1",
                "scoring.resources={big: 1}",
            ],
        )
    )
    assert base == moved and "accelerator_type" not in base["scoring"]


def pool(n=1, gpus=1.0, accelerator="A10G", custom=None):
    return runtime.pool_request("scoring", n, 4.0, gpus, accelerator, custom)


def test_without_an_autoscaler_a_missing_gpu_model_is_an_error():
    live = {"CPU": 8.0, "GPU": 2.0, "accelerator_type:T4": 2.0}
    with pytest.raises(runtime.ResourceError, match="asks for A10G GPUs; this cluster has T4"):
        runtime.preflight(pool(), live, {})
    runtime.preflight(pool(accelerator="T4"), live, {})


def test_a_custom_resource_the_cluster_lacks_is_named():
    with pytest.raises(runtime.ResourceError, match="2 x 1 of the custom resource 'scorer'"):
        runtime.preflight(pool(2, 0.0, None, {"scorer": 1}), {"CPU": 16.0, "scorer": 1.0}, {})
    runtime.preflight(pool(2, 0.0, None, {"scorer": 1}), {"CPU": 16.0, "scorer": 2.0}, {})


@pytest.fixture
def shipped_types(monkeypatch):
    """The worker types of the shipped cluster.yaml, as a head reads them."""
    monkeypatch.setenv("POCL_RAY_CLUSTER_CONFIG", str(ROOT / "cluster.yaml"))
    types = runtime.autoscaler_node_types()
    assert set(types) == {"gpu_a10g_1x", "gpu_a10g_4x", "gpu_a100_8x"}  # not the head
    return types


def test_on_a_cpu_only_head_the_autoscaler_is_expected_to_add_a_gpu_node(shipped_types, capsys):
    head_only = {"CPU": 0.0, "memory": 2**34}
    runtime.preflight(pool(2), head_only)  # reads the types from POCL_RAY_CLUSTER_CONFIG
    out = capsys.readouterr().out
    assert "the cluster has no GPU now" in out
    assert "expected to add a node of type gpu_a10g_1x (max 4), gpu_a10g_4x (max 2)" in out


def test_a_request_no_node_type_can_hold_fails_before_any_work(shipped_types):
    with pytest.raises(runtime.ResourceError, match="no node type of the cluster config"):
        runtime.preflight(pool(accelerator="H100"), {"CPU": 0.0}, shipped_types)
    # 12 one-GPU A10G workers fit (4 one-GPU nodes + 2 four-GPU nodes at their max); 13 do not
    scaling = load_config(
        DEMO, ["scaling.num_workers=12", "scaling.use_gpu=true", "scaling.accelerator_type=A10G"]
    ).scaling
    runtime.preflight(runtime.worker_request(scaling), {"CPU": 0.0}, shipped_types)
    scaling = load_config(
        DEMO, ["scaling.num_workers=13", "scaling.use_gpu=true", "scaling.accelerator_type=A10G"]
    ).scaling
    with pytest.raises(runtime.ResourceError, match=r"training needs 13 x \(CPU=1, GPU=1"):
        runtime.preflight(runtime.worker_request(scaling), {"CPU": 0.0}, shipped_types)


def test_a_trial_is_placed_as_its_workers(shipped_types, capsys):
    scaling = load_config(
        DEMO, ["scaling.num_workers=4", "scaling.use_gpu=true", "scaling.accelerator_type=A10G"]
    ).scaling
    runtime.preflight(runtime.trial_request(scaling), {"CPU": 0.0}, shipped_types)
    assert "gpu_a10g_4x" in capsys.readouterr().out


def test_no_cluster_config_means_no_autoscaler(monkeypatch, tmp_path):
    monkeypatch.setenv("POCL_RAY_CLUSTER_CONFIG", str(tmp_path / "missing.yaml"))
    assert runtime.autoscaler_node_types() == {}
