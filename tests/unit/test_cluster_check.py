"""cluster.yaml and the KubeRay manifest pass Ray's offline schema validation and our rules;
broken copies fail with a message naming the place and the fix (`pocl-ray check-cluster`)."""

from pathlib import Path

import pytest
import yaml

from jobs import cluster_check
from jobs.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, docs, name="cluster.yaml") -> Path:
    """A copy beside a copy of cluster/ (the requirements the YAML mounts)."""
    (tmp_path / "cluster").mkdir(exist_ok=True)
    req = (ROOT / "cluster" / "requirements.txt").read_text()
    (tmp_path / "cluster" / "requirements.txt").write_text(req)
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs if isinstance(docs, list) else [docs]))
    return path


def launcher() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def kuberay() -> list:
    return list(yaml.safe_load_all((ROOT / "k8s" / "raycluster.yaml").read_text()))


def test_the_shipped_files_pass(capsys):
    assert cluster_check.check(ROOT / "cluster.yaml") == []
    assert cluster_check.check(ROOT / "k8s" / "raycluster.yaml") == []
    assert main(["check-cluster", str(ROOT / "cluster.yaml")]) == 0
    assert "passes" in capsys.readouterr().out


def test_the_launcher_config_keeps_gpus_off_the_head_and_scales_them_to_zero():
    cfg = launcher()
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0
    gpu_types = [t for n, t in types.items() if t["resources"].get("GPU")]
    assert len(gpu_types) >= 2 and all(t["min_workers"] == 0 for t in gpu_types)
    assert cfg["idle_timeout_minutes"] > 0


def test_a_broken_launcher_config_lists_every_problem(tmp_path, capsys):
    cfg = launcher()
    types = cfg["available_node_types"]
    types["head"]["resources"] = {}  # training could land on the head
    types["gpu_a10g_1x"]["resources"] = {"CPU": 4}  # a g5 that declares no GPU
    types["gpu_a10g_4x"]["min_workers"], types["gpu_a10g_4x"]["max_workers"] = 3, 1
    cfg["setup_commands"] = ["pip install transformers torch==2.13.0"]
    cfg["head_start_ray_commands"] = ["ray start --head --dashboard-host=0.0.0.0"]
    cfg["provider"]["aws_secret_access_key"] = "abc"
    cfg["docker"]["image"] = "rayproject/ray:latest-gpu"
    cfg["idle_timeout"] = 10  # a misspelt key: Ray's own schema catches it
    problems = cluster_check.check(write(tmp_path, cfg))
    text = "\n".join(problems)
    assert "Ray's schema validation" in text and "idle_timeout" in text
    assert "gpu_a10g_4x: max_workers 1 < min_workers 3" in text
    assert "available_node_types.head.resources: set CPU: 0" in text
    assert "gpu_a10g_1x.resources: g5.xlarge has GPUs but declares none" in text
    assert "'transformers' is not pinned" in text and "torch==2.13.0" not in text
    assert "dashboard host is 0.0.0.0" in text
    assert "provider.aws_secret_access_key: looks like a credential" in text
    assert "docker.image: 'rayproject/ray:latest-gpu' is not pinned" in text
    assert main(["check-cluster", str(tmp_path / "cluster.yaml")]) == 2
    assert f"{len(problems)} problem(s)" in capsys.readouterr().out


def test_an_unpinned_requirements_file_is_named_by_line(tmp_path):
    path = write(tmp_path, launcher())
    req = tmp_path / "cluster" / "requirements.txt"
    req.write_text(req.read_text() + "accelerate>=1.0\n")
    n = len(req.read_text().splitlines())
    problems = cluster_check.check(path)
    assert problems == [f"{path}: setup_commands[0]: requirements.txt line {n}: "
                        "'accelerate>=1.0' is not pinned; write NAME==VERSION"]  # fmt: skip


def test_no_dashboard_setting_means_rays_public_default(tmp_path):
    cfg = launcher()
    del cfg["head_start_ray_commands"]
    problems = cluster_check.check(write(tmp_path, cfg))
    assert any("binds the dashboard" in p for p in problems)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda d: d[0]["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
         "serviceType: LoadBalancer"),
        (lambda d: d[0]["spec"].update(rayVersion="latest"), "rayVersion: 'latest'"),
        (lambda d: d[0]["spec"].update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
        (lambda d: d[0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
         .update(image="rayproject/ray:2.59.0-py311-gpu"), "does not match rayVersion 2.60.0"),
        (lambda d: d[0]["spec"]["workerGroupSpecs"][1]["rayStartParams"].pop("resources"),
         "a GPU group without an accelerator_type"),
        (lambda d: d[1]["data"].update({"requirements.txt": "torch\n"}), "'torch' is not pinned"),
        (lambda d: d[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
         .__setitem__(1, {"name": "RAY_AUTH_TOKEN", "value": "abc"}), "from a Secret"),
    ],
)  # fmt: skip
def test_a_broken_kuberay_manifest_is_caught(tmp_path, breakage, expected):
    (tmp_path / "k8s").mkdir()
    docs = kuberay()
    breakage(docs)
    problems = cluster_check.check(write(tmp_path, docs, name="k8s/raycluster.yaml"))
    assert any(expected in p for p in problems), problems


def test_the_kuberay_requirements_match_the_launchers():
    docs = kuberay()
    text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["requirements.txt"]
    want = (ROOT / "cluster" / "requirements.txt").read_text()
    assert [x for x in text.split("\n") if x] == [
        x for x in want.split("\n") if x and not x.startswith("#")
    ]
