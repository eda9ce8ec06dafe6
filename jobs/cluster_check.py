"""`pocl-ray check-cluster FILE`: a Ray cluster-launcher YAML (cluster.yaml) or a KubeRay
manifest (k8s/*.yaml) checked offline, before `ray up` or `kubectl apply` spends money.

cluster.yaml: Ray's own schema validation (`prepare_config` + `validate_config`, a private
Ray API: Ray is pinned), then the project's rules. KubeRay: the project's rules on the
RayCluster (no Kubernetes API is reachable offline). Every problem names its place in the
file and the fix; nothing is reported fixed that was not.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import yaml

PINNED = re.compile(r"^[A-Za-z0-9_.\-\[\],]+==[A-Za-z0-9_.+\-]+$")
IMAGE_TAG = re.compile(r"^[\w./\-]+:\d+\.\d+\.\d+[\w.\-]*$")
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|p3|p3dn|p4d|p4de|p5|p5e)\.")
SECRET_KEYS = re.compile(r"(secret|password|access_key|aws_session_token)", re.IGNORECASE)


def check(path: str | Path) -> list[str]:
    """Every problem of a cluster.yaml or a KubeRay manifest; empty when it passes."""
    path = Path(path)
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    if not docs:
        return [f"{path}: empty file"]
    if any(d.get("kind") == "RayCluster" for d in docs):
        return kuberay_problems(docs, path)
    return launcher_problems(docs[0], path)


# ---------------------------------------------------------------- cluster launcher (ray up)


def ray_schema_problems(cfg: dict[str, Any]) -> list[str]:
    """Ray's own offline validation of a cluster-launcher config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    # its INFO line ("setting max workers for head node type to 0") and the docker module's
    # warning about single-file mounts (the auth token is one on purpose) are noise here
    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)
    logging.getLogger("ray.autoscaler._private.docker").setLevel(logging.ERROR)
    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except Exception as e:  # jsonschema.ValidationError, ValueError: report, don't crash
        first = str(e).strip().splitlines()[0]
        return [f"Ray's schema validation: {first}"]
    return []


def launcher_problems(cfg: dict[str, Any], path: Path) -> list[str]:
    out = [f"{path}: {p}" for p in ray_schema_problems(cfg)]
    out += [f"{path}: {p}" for p in _pins(cfg, path)]
    out += [f"{path}: {p}" for p in _node_types(cfg)]
    out += [f"{path}: {p}" for p in _dashboard(cfg.get("head_start_ray_commands") or [])]
    out += [f"{path}: {p}" for p in _secrets(cfg, "")]
    if not cfg.get("idle_timeout_minutes"):
        out.append(
            f"{path}: idle_timeout_minutes: not set; set it (e.g. 10) so GPU nodes "
            "scale back to zero"
        )
    return out


def _pins(cfg: dict[str, Any], path: Path) -> list[str]:
    out = []
    image = (cfg.get("docker") or {}).get("image")
    if image and not IMAGE_TAG.match(image):
        out.append(
            f"docker.image: {image!r} is not pinned to a version tag; use e.g. "
            "rayproject/ray:2.60.0-py311-gpu"
        )
    for key in (
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "initialization_commands",
    ):
        for i, command in enumerate(cfg.get(key) or []):
            out += [f"{key}[{i}]: {p}" for p in _pip_pins(str(command), cfg, path)]
    return out


def _pip_pins(command: str, cfg: dict[str, Any], path: Path) -> list[str]:
    """Problems of the `pip install` in one setup command: every package pinned with ==, a
    requirements file mounted from the repository and pinned line by line."""
    out = []
    for part in command.split("&&"):
        words = part.split()
        if "pip" not in words or "install" not in words:
            continue
        args = words[words.index("install") + 1 :]
        i = 0
        while i < len(args):
            a = args[i]
            if a in ("-r", "--requirement") and i + 1 < len(args):
                out += _requirements_file(args[i + 1], cfg, path)
                i += 2
                continue
            if not a.startswith("-") and not PINNED.match(a.strip("'\"")):
                out.append(f"{a!r} is not pinned; write NAME==VERSION")
            i += 1
    return out


def _requirements_file(remote: str, cfg: dict[str, Any], path: Path) -> list[str]:
    """The local file behind a remote requirements path: mounted itself, or inside a mounted
    folder."""
    for target, local in (cfg.get("file_mounts") or {}).items():
        target = str(target).rstrip("/")
        if remote == target or remote.startswith(target + "/"):
            file = (path.parent / str(local) / remote[len(target) :].lstrip("/")).resolve()
            if not file.is_file():
                return [f"requirements file {remote!r}: {file} (file_mounts) does not exist"]
            return requirement_pin_problems(file)
    return [
        f"requirements file {remote!r} is not in file_mounts, so it cannot be checked; "
        "mount it from the repository"
    ]


def requirement_pin_problems(file: Path) -> list[str]:
    out = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        req = line.split("#")[0].strip()
        if req and not PINNED.match(req):
            out.append(f"{file.name} line {n}: {req!r} is not pinned; write NAME==VERSION")
    return out


def _node_types(cfg: dict[str, Any]) -> list[str]:
    out = []
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    for name, spec in types.items():
        where = f"available_node_types.{name}"
        res = spec.get("resources") or {}
        kind = str((spec.get("node_config") or {}).get("InstanceType", ""))
        if name == head:
            if res.get("CPU", None) != 0:
                out.append(
                    f"{where}.resources: set CPU: 0 so no actor, training worker or "
                    "trial is placed on the head"
                )
            if res.get("GPU"):
                out.append(f"{where}: the head declares GPUs; keep GPUs on worker types")
            continue
        lo, hi = spec.get("min_workers", 0), spec.get("max_workers")
        if hi is not None and hi < lo:
            out.append(f"{where}: max_workers {hi} < min_workers {lo}")
        if GPU_INSTANCE.match(kind) and not res.get("GPU"):
            out.append(
                f"{where}.resources: {kind} has GPUs but declares none; the "
                "autoscaler would never start it for a GPU request: add GPU: N"
            )
        if res.get("GPU") and not any(k.startswith("accelerator_type:") for k in res):
            out.append(
                f"{where}.resources: declares GPUs without an accelerator_type:NAME "
                "resource; jobs that ask for an accelerator type would not scale it up"
            )
    return out


def _dashboard(commands: list[str]) -> list[str]:
    text = " ".join(str(c) for c in commands)
    if not text:
        return [
            "head_start_ray_commands: not set; Ray's default binds the dashboard (and the "
            "job server) to 0.0.0.0: set them with --dashboard-host=127.0.0.1"
        ]
    host = re.search(r"--dashboard-host[= ](\S+)", text)
    if host is None or host.group(1) not in ("127.0.0.1", "localhost"):
        found = "unset (Ray's default 0.0.0.0)" if host is None else host.group(1)
        return [
            f"head_start_ray_commands: the dashboard host is {found}; use "
            "--dashboard-host=127.0.0.1 and reach it with `ray dashboard cluster.yaml`"
        ]
    if "RAY_AUTH_MODE=token" not in text:
        return [
            "head_start_ray_commands: start Ray with RAY_AUTH_MODE=token (token "
            "authentication; docs/cluster.md)"
        ]
    return []


def _secrets(node: Any, where: str) -> list[str]:
    """Keys that look like credentials, with a literal value: credentials come from the
    environment or the cloud's instance roles, never from the file."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{where}.{k}" if where else str(k)
            if SECRET_KEYS.search(str(k)) and isinstance(v, (str, int)) and str(v):
                out.append(
                    f"{here}: looks like a credential; remove it and use the "
                    "environment or an instance role"
                )
            else:
                out += _secrets(v, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _secrets(v, f"{where}[{i}]")
    return out


# ---------------------------------------------------------------- KubeRay


def kuberay_problems(docs: list[dict[str, Any]], path: Path) -> list[str]:
    out = []
    cluster = next(d for d in docs if d.get("kind") == "RayCluster")
    spec = cluster.get("spec") or {}
    version = str(spec.get("rayVersion", ""))
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        out.append(f'spec.rayVersion: {version!r}; pin it (e.g. "2.60.0")')
    if not spec.get("enableInTreeAutoscaling"):
        out.append("spec.enableInTreeAutoscaling: set true so GPU groups scale from zero")
    head = spec.get("headGroupSpec") or {}
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        out.append(
            f"spec.headGroupSpec.serviceType: {head.get('serviceType')}; use ClusterIP "
            "and `kubectl port-forward` (never expose the job server)"
        )
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        out.append('spec.headGroupSpec.rayStartParams.num-cpus: set "0" (no training on the head)')
    groups = [("spec.headGroupSpec", head)]
    groups += [
        (f"spec.workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])
    ]
    for where, group in groups:
        out += _group_problems(where, group, version)
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        if hi < lo:
            out.append(f"spec.workerGroupSpecs[{i}]: maxReplicas {hi} < minReplicas {lo}")
    out += _configmap_problems(docs, path)
    out += _secrets(docs, "")
    if any(d.get("kind") == "Ingress" for d in docs):
        out.append("an Ingress exposes the cluster; remove it and use kubectl port-forward")
    return [f"{path}: {p}" for p in out]


def _group_problems(where: str, group: dict[str, Any], version: str) -> list[str]:
    out = []
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
    for j, c in enumerate(containers):
        here = f"{where}.template.spec.containers[{j}]"
        image = str(c.get("image", ""))
        if not IMAGE_TAG.match(image):
            out.append(f"{here}.image: {image!r} is not pinned to a version tag")
        elif version and f":{version}" not in image:
            out.append(f"{here}.image: {image!r} does not match rayVersion {version}")
        limits = (c.get("resources") or {}).get("limits") or {}
        gpus = int(limits.get("nvidia.com/gpu", 0) or 0)
        start = str((group.get("rayStartParams") or {}).get("resources", ""))
        if gpus and "accelerator_type:" not in start:
            out.append(
                f"{where}.rayStartParams.resources: a GPU group without an "
                "accelerator_type:NAME resource"
            )
        env = {e.get("name"): e for e in c.get("env") or []}
        if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
            out.append(f"{here}.env: set RAY_AUTH_MODE=token (token authentication)")
        if "valueFrom" not in (env.get("RAY_AUTH_TOKEN") or {}):
            out.append(f"{here}.env: RAY_AUTH_TOKEN must come from a Secret (valueFrom)")
    return out


def _configmap_problems(docs: list[dict[str, Any]], path: Path) -> list[str]:
    """The manifest's requirements ConfigMap: pinned, and equal to cluster/requirements.txt."""
    maps = [d for d in docs if d.get("kind") == "ConfigMap"]
    out = []
    for m in maps:
        text = (m.get("data") or {}).get("requirements.txt")
        if text is None:
            continue
        lines = [ln.split("#")[0].strip() for ln in text.splitlines()]
        for n, req in enumerate(lines, 1):
            if req and not PINNED.match(req):
                out.append(
                    f"ConfigMap {m['metadata']['name']} requirements.txt line {n}: "
                    f"{req!r} is not pinned"
                )
        shared = path.parent.parent / "cluster" / "requirements.txt"
        if shared.exists():
            want = [ln.split("#")[0].strip() for ln in shared.read_text().splitlines()]
            if [x for x in lines if x] != [x for x in want if x]:
                out.append(
                    f"ConfigMap {m['metadata']['name']}: requirements differ from "
                    "cluster/requirements.txt; keep the two in step"
                )
    return out


def main(path: str) -> int:
    problems = check(path)
    for p in problems:
        print(p)
    print(
        f"check-cluster: {len(problems)} problem(s) in {path}"
        if problems
        else f"check-cluster: {path} passes (Ray's schema where it applies, and ours)"
    )
    return 2 if problems else 0
