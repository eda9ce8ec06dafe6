"""What every job shares on the Ray side: the one Ray session, the resource preflight, and
the job errors with their exit codes.

Exit codes of `pocl-ray` / `python -m jobs` (the CLI maps them in one place):
    0  done
    2  the request is wrong: a config or data error (`ConfigError`, `DataError`), or
       resources the cluster can never provide (`ResourceError`); nothing was started
    3  the job could not finish correctly (`JobError`): a table that does not fit the run,
       rows lost or duplicated, training failed after its restarts; the message says what
       to do, and finished outputs are kept
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pocl_ray.config import Config

log = logging.getLogger("pocl_ray.ray")


class JobError(RuntimeError):
    """A job cannot run or finish correctly; the message says why and what to do."""

    exit_code = 3


class Interrupted(JobError):
    """The user interrupted a job whose state is saved (Ctrl-C in a Tune search): rerun to
    continue, as the message says."""

    exit_code = 130  # the shell's code for a job ended by SIGINT


class ResourceError(JobError):
    """The job asks for CPUs / GPUs the cluster can never give (Ray would wait forever)."""

    exit_code = 2


# ---------------------------------------------------------------- the session


def local_ray_env() -> None:
    """Before `import ray`, for a Ray this process starts itself: the node address becomes
    127.0.0.1 and every peer is loopback (ray-notes.md; single node only, which it is), no
    usage stats, no Train V2 migration warnings. Joining a cluster (RAY_ADDRESS) keeps the
    cluster's own settings."""
    if os.environ.get("RAY_ADDRESS"):
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


EXPECTED_LINES = (
    "one 'core_worker.cc ... has constructor arguments in the object store and max_restarts > 0'"
    " line per restartable actor (our pools and Ray Train's own) is expected (ray#53727)"
)


def quiet_console() -> None:
    """What a successful job shows: our lines, Ray's progress (bars on a terminal), nothing
    alarming. Token authentication on a local Ray (a token in ~/.ray) is reported by us in
    one line instead of Ray's warning; transformers' per-file bars are off."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )


@contextmanager
def ray_session(*, cpus: float = 1.0) -> Iterator[None]:
    """The job's Ray: the one already initialised in this process (kept), the cluster in
    RAY_ADDRESS (`ray job submit` sets it), or a new local Ray bound to 127.0.0.1 with at
    least `cpus` + 1 logical CPUs (one spare, so Ray Data's own tasks never starve behind
    actors or Train workers; ray-notes.md). Whatever this call started, it shuts down.
    """
    local_ray_env()
    quiet_console()
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        yield
        return
    t0 = time.perf_counter()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        log.info("ray: connected to %s", os.environ["RAY_ADDRESS"])
    else:
        num_cpus = max(os.cpu_count() or 1, math.ceil(cpus) + 1)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
        )
        log.info(
            "ray: started a local instance (%d logical CPUs, dashboard on 127.0.0.1) in %.1f s",
            num_cpus,
            time.perf_counter() - t0,
        )
    log.info("ray: token authentication %s; %s", "on" if _token_auth() else "off", EXPECTED_LINES)
    DataContext.get_current().print_on_execution_start = False  # progress only, no plans
    try:
        yield
    finally:
        ray.shutdown()


def _token_auth() -> bool:
    """Ray 2.60's rule: on with RAY_AUTH_MODE=token, or when a token exists (RAY_AUTH_TOKEN,
    the file in RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), unless RAY_AUTH_MODE=disabled."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode:
        return mode == "token"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).exists()


# ---------------------------------------------------------------- the preflight


@dataclass(frozen=True, kw_only=True)
class Request:
    """What a pool of actors, a worker group or a set of trials asks the cluster for."""

    what: str
    """e.g. "scoring", "eval", "training"."""
    count: int
    cpus: float
    gpus: float
    keys: str
    """The config keys that set it, for the fix (e.g. "scoring.num_actors / cpus_per_actor")."""
    gpu_key: str
    """The config setting that asks for the GPU (e.g. "scoring.gpus_per_actor=1")."""
    cpu_free: str
    """How to ask for no GPU (e.g. "scoring.gpus_per_actor=0")."""
    accelerator: str | None = None
    """A GPU model (Ray's `accelerator_type:NAME` node resource), or None for any."""
    custom: Mapping[str, float] = field(default_factory=dict)
    """Custom resources per placed unit (`scoring.resources`, `scaling.resources_per_worker`)."""
    units: int = 0
    """Placed units (actors, workers) when not `count` (a trial places its workers)."""

    def unit(self) -> dict[str, float]:
        """One placed actor's or worker's resources, as Ray names them."""
        per = self.count * 1.0 / max(self.units or self.count, 1)
        need = {"CPU": self.cpus * per, "GPU": self.gpus * per, **self.custom}
        if self.accelerator:
            need[ACCELERATOR_PREFIX + self.accelerator] = ACCELERATOR_SLIVER
        return {k: v for k, v in need.items() if v > 0}


ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_SLIVER = 0.001
"""What Ray asks of a node's `accelerator_type:NAME` resource for one placed unit."""


def preflight(
    req: Request,
    cluster: Mapping[str, float],
    node_types: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Raise ResourceError when `req` can never be placed (Ray would queue it forever without
    an error, ray-notes.md); on an autoscaling cluster, say which node type the autoscaler is
    expected to add instead. Checked before any model is loaded or trained.

    cluster: `ray.cluster_resources()` (the nodes that are up now). node_types: the
    autoscaler's worker types ({name: {"resources": ..., "max_workers": N}}); None reads them
    from the cluster config (`autoscaler_node_types`).
    """
    short = _shortfall(req, cluster)
    if not short:
        return
    types = autoscaler_node_types() if node_types is None else node_types
    if types:
        fits = {n: t for n, t in types.items() if _units_per_node(req.unit(), t) > 0}
        room = sum(_units_per_node(req.unit(), t) * int(t.get("max_workers", 0))
                   for t in fits.values())  # fmt: skip
        if fits and room >= (req.units or req.count):
            names = ", ".join(f"{n} (max {t.get('max_workers', 0)})" for n, t in fits.items())
            print(
                f"{req.what}: {short[0]} now; the autoscaler is expected to add a node of "
                f"type {names} (from the cluster config); the job waits for it",
                flush=True,
            )
            return
        offered = "; ".join(f"{n}: {describe(t.get('resources', {}))}" for n, t in types.items())
        raise ResourceError(
            f"{req.what} needs {req.units or req.count} x ({describe(req.unit())}); no node type "
            f"of the cluster config can ever hold that ({offered}); add a worker type that "
            f"offers it (docs/cluster.md) or lower {req.keys}"
        )
    raise ResourceError(short[1])


def _shortfall(req: Request, cluster: Mapping[str, float]) -> tuple[str, str] | None:
    """None when the cluster holds `req` now; else (what is short, the error without an
    autoscaler)."""
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    if req.gpus > 0 and gpus == 0:
        return "the cluster has no GPU", (
            f"{req.gpu_key} but this Ray cluster has no GPU (resources: {describe(cluster)}); "
            f"set {req.cpu_free} to run on CPUs, or connect to a cluster with GPUs "
            "(RAY_ADDRESS=... or `ray job submit`)"
        )
    for kind, each, have in (("GPU", req.gpus, gpus), ("CPU", req.cpus, cpus)):
        if each * req.count > have:
            return f"the cluster has {have:g} {kind}s", (
                f"{req.what} needs {req.count} x {each:g} {kind} = {each * req.count:g} "
                f"{kind}s; the cluster has {have:g}; lower {req.keys}"
            )
    units = req.units or req.count
    for key, each in req.unit().items():
        if key in ("CPU", "GPU") or each * units <= cluster.get(key, 0.0) + 1e-9:
            continue
        have = sorted(
            k[len(ACCELERATOR_PREFIX) :] for k in cluster if k.startswith(ACCELERATOR_PREFIX)
        )
        if key.startswith(ACCELERATOR_PREFIX):
            return f"no {key[len(ACCELERATOR_PREFIX) :]} GPU is up", (
                f"{req.what} asks for {key[len(ACCELERATOR_PREFIX) :]} GPUs; this cluster has "
                f"{', '.join(have) or 'no GPU of a known type'}; change {req.what}'s "
                "accelerator_type or connect to a cluster that has them"
            )
        return f"the cluster has {cluster.get(key, 0.0):g} of resource {key}", (
            f"{req.what} needs {units} x {each:g} of the custom resource {key!r}; the cluster "
            f"has {cluster.get(key, 0.0):g}; start nodes with it (ray start --resources) or "
            f"lower {req.keys}"
        )
    return None


def _units_per_node(unit: Mapping[str, float], node_type: Mapping[str, Any]) -> int:
    """How many placed units one node of `node_type` holds (0 = none)."""
    offers = node_type.get("resources") or {}
    fits = [math.floor(offers.get(k, 0.0) / v + 1e-9) for k, v in unit.items() if v > 0]
    return min(fits) if fits else 1 << 16


def autoscaler_node_types() -> dict[str, dict[str, Any]]:
    """The autoscaler's worker types, from the cluster-launcher config the head keeps
    (~/ray_bootstrap_config.yaml) or the file in POCL_RAY_CLUSTER_CONFIG; {} when neither
    exists (a fixed cluster, or KubeRay: set POCL_RAY_CLUSTER_CONFIG to describe it)."""
    import yaml

    path = os.environ.get("POCL_RAY_CLUSTER_CONFIG") or str(
        Path.home() / "ray_bootstrap_config.yaml"
    )
    if not Path(path).is_file():
        return {}
    cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    head = cfg.get("head_node_type")
    return {
        name: {"resources": dict(t.get("resources") or {}), "max_workers": t.get("max_workers", 0)}
        for name, t in (cfg.get("available_node_types") or {}).items()
        if name != head and t.get("max_workers", 0)
    }


def pool_request(
    section: str,
    num_actors: int,
    cpus: float,
    gpus: float,
    accelerator: str | None = None,
    custom: Mapping[str, float] | None = None,
) -> Request:
    """A Ray Data actor pool of config section `section` (scoring, eval)."""
    return Request(
        what=section,
        count=num_actors,
        cpus=cpus,
        gpus=gpus,
        keys=f"{section}.num_actors or {section}.cpus_per_actor / gpus_per_actor",
        gpu_key=f"{section}.gpus_per_actor={gpus:g}",
        cpu_free=f"{section}.gpus_per_actor=0",
        accelerator=accelerator,
        custom=dict(custom or {}),
    )


def worker_request(scaling) -> Request:
    """A Ray Train worker group (`scaling`); local mode (num_workers 0) runs in this process
    and only its GPU counts."""
    per_gpu = scaling.resources_per_worker.get("GPU", 1.0 if scaling.use_gpu else 0.0)
    per_cpu = scaling.resources_per_worker.get("CPU", 1.0) if scaling.num_workers else 0.0
    custom = {k: v for k, v in scaling.resources_per_worker.items() if k not in ("CPU", "GPU")}
    return Request(
        what="training",
        count=max(scaling.num_workers, 1),
        cpus=per_cpu,
        gpus=per_gpu,
        keys="scaling.num_workers or scaling.resources_per_worker (e.g. {CPU: 0.5})",
        gpu_key="scaling.use_gpu=true",
        cpu_free="scaling.use_gpu=false",
        accelerator=getattr(scaling, "accelerator_type", None),
        custom=custom,
    )


def trial_request(scaling) -> Request:
    """One Tune trial: its worker group plus the trial's own actor (a token CPU)."""
    from pocl_ray.search import TRIAL_ACTOR_CPU

    workers = worker_request(scaling)
    return Request(
        what="one trial",
        count=1,
        cpus=TRIAL_ACTOR_CPU + workers.cpus * workers.count,
        gpus=workers.gpus * workers.count,
        keys=workers.keys,
        gpu_key=workers.gpu_key,
        cpu_free=workers.cpu_free,
        accelerator=workers.accelerator,
        custom=dict(workers.custom),
        units=workers.count,
    )


def trials_at_once(req: Request, cluster: Mapping[str, float]) -> int:
    """How many trials of `req` the cluster holds at the same time (after `preflight`)."""
    fits = [cluster.get("CPU", 0.0) / req.cpus if req.cpus else math.inf]
    if req.gpus:
        fits.append(cluster.get("GPU", 0.0) / req.gpus)
    most = min(fits)
    return max(1, math.floor(most + 1e-9)) if math.isfinite(most) else 1 << 16


def describe(resources: Mapping[str, float]) -> str:
    parts = [f"{k}={resources[k]:g}" for k in ("CPU", "GPU") if k in resources]
    if "memory" in resources:
        parts.append(f"memory={resources['memory'] / 2**30:.1f} GiB")
    parts += [f"{k}={v:g}" for k, v in sorted(resources.items())
              if not k.startswith(("CPU", "GPU", "memory", "object_store", "node:"))]  # fmt: skip
    return ", ".join(parts) or "none"


def cluster_resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()


def ray_version() -> str:
    import ray

    return ray.__version__


def scoring_budget(cfg: Config, scorer: str) -> int:
    """The ROUGE answers' new tokens (`evaluation.answer_budget`), with a notice if clamped
    (the scoring job's, and a rescore round's)."""
    from pocl_ray import evaluation  # torch: not at import time

    sig = cfg.scoring
    if "rouge" not in sig.signals:
        return sig.max_new_tokens
    remote = (cfg.teacher if sig.scorer == "teacher" else cfg.student).trust_remote_code
    try:
        budget, positions = evaluation.answer_budget(
            scorer,
            max_new_tokens=sig.max_new_tokens,
            max_prompt_length=cfg.data.max_prompt_length,
            trust_remote_code=remote,
        )
    except ValueError as e:
        raise JobError(f"scoring: the scorer {scorer}: {e}") from e
    if budget < sig.max_new_tokens:
        print(f"scores: scoring.max_new_tokens={sig.max_new_tokens} clamped to {budget}: the "
              f"scorer has {positions} positions and prompts may be data.max_prompt_length="
              f"{cfg.data.max_prompt_length} tokens", flush=True)  # fmt: skip
    return budget
