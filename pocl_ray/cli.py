"""The `pocl-ray` command: one subcommand per job.

pocl-ray validate CONFIG [key=value ...]   check a config, list every problem
pocl-ray demo --plain [key=value ...]      the plain single-process pipeline on the demo
pocl-ray evaluate CONFIG [key=value ...]   evaluate models on eval sets (docs/evaluate.md)
pocl-ray distill CONFIG [key=value ...]    curriculum distillation on Ray Train (docs/distill.md)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pocl_ray.config import ConfigError, dump_yaml, load_config
from pocl_ray.data import DataError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocl-ray", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="validate a config (exit 0 when valid)")
    v.add_argument("config", help="YAML config file")
    v.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    v.add_argument("--print", action="store_true", help="print the resolved config")

    d = sub.add_parser("demo", help="run the embedded default (configs/demo.yaml)")
    d.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    d.add_argument(
        "--plain", action="store_true", help="single process, no Ray (the reference loop)"
    )
    d.add_argument("--config", default=str(DEMO_CONFIG), help="config file (default: demo)")

    pl = sub.add_parser(
        "pipeline", help="sft teacher -> score -> distill POCL + KD -> evaluate -> report"
    )
    pl.add_argument("config", help="YAML config file")
    pl.add_argument("overrides", nargs="*", help="dotted.key=value overrides")

    r = sub.add_parser("report", help="rebuild RUN_DIR/report/ (figures + index.html)")
    r.add_argument("run_dir", help="a run's output directory")

    s = sub.add_parser("score", help="score training data difficulty on Ray Data (docs/scoring.md)")
    s.add_argument("config", help="YAML config file")
    s.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    s.add_argument("--force", action="store_true", help="rescore even if a matching table exists")

    e = sub.add_parser(
        "evaluate", help="evaluate models on eval sets with Ray Data (docs/evaluate.md)"
    )
    e.add_argument("config", help="YAML config file")
    e.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    e.add_argument(
        "--force", action="store_true", help="re-evaluate even if matching results exist"
    )

    t = sub.add_parser(
        "distill", help="distil the student with the curriculum on Ray Train (docs/distill.md)"
    )
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides")

    f = sub.add_parser("sft", help="supervised fine-tuning (CE only) on Ray Train")
    f.add_argument("config", help="YAML config file")
    f.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    f.add_argument(
        "--target", choices=["teacher", "student"], default="teacher",
        help="teacher -> RUN/teacher/ (the demo teacher); student -> RUN/student_sft/ (baseline)",
    )  # fmt: skip
    return p


def _report(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    if (run / "pocl" / "metrics.jsonl").exists():  # written by `pocl-ray pipeline` / `demo`
        from jobs.pipeline import build_report

        index = build_report(load_config(run / "config.yaml", [f"run.output_dir={run}"]))
    else:  # written by `pocl-ray demo --plain`
        from pocl_ray.plain import report_plain

        index = report_plain(run)
    print(f"report: {index}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print:  # stdout stays pure YAML: `validate --print > resolved.yaml` reloads
        print(dump_yaml(cfg), end="")
    print(f"{args.config}: valid", file=sys.stderr if args.print else sys.stdout)
    return 0


def _demo(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.plain:
        from pocl_ray.plain import run_plain  # heavy imports (torch, transformers) only here

        run_plain(cfg)
        return 0
    return _run_pipeline(cfg)


def _pipeline(args: argparse.Namespace) -> int:
    return _run_pipeline(load_config(args.config, args.overrides))


def _run_pipeline(cfg) -> int:
    from jobs.pipeline import main

    return _run_job(lambda: main(cfg))


def _score(args: argparse.Namespace) -> int:
    from jobs.score import main

    cfg = load_config(args.config, args.overrides)
    return _run_job(lambda: main(cfg, force=args.force))


def _evaluate(args: argparse.Namespace) -> int:
    from jobs.evaluate import main

    cfg = load_config(args.config, args.overrides)
    return _run_job(lambda: main(cfg, force=args.force))


def _distill(args: argparse.Namespace) -> int:
    from jobs.distill import main

    cfg = load_config(args.config, args.overrides)
    return _run_job(lambda: main(cfg))


def _sft(args: argparse.Namespace) -> int:
    from jobs.sft import main

    cfg = load_config(args.config, args.overrides)
    return _run_job(lambda: main(cfg, target=args.target))


def _run_job(job) -> int:
    """Run a Ray job: exit 2 for resources the cluster cannot give (checked before any work),
    3 for a job that cannot finish correctly; the message says why and what to do."""
    # heavy imports (torch) only here; the jobs import ray themselves, after choosing an address
    from jobs import distill, evaluate, score

    try:
        job()
    except (score.ResourceRequestError, distill.ResourceRequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (score.ScoreJobError, distill.DistillJobError, evaluate.EvalJobError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score's per-call INFO line
    try:
        jobs = {
            "validate": _validate,
            "demo": _demo,
            "report": _report,
            "score": _score,
            "evaluate": _evaluate,
            "distill": _distill,
            "sft": _sft,
            "pipeline": _pipeline,
        }
        return jobs[args.command](args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
