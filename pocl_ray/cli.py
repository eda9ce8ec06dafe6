"""The `pocl-ray` command: one subcommand per job.

pocl-ray validate CONFIG [key=value ...]   check a config, list every problem
pocl-ray demo --plain [key=value ...]      the plain single-process pipeline on the demo
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
    return p


def _validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print:
        print(dump_yaml(cfg), end="")
    print(f"{args.config}: valid")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if not args.plain:
        print(
            "pocl-ray demo: the Ray pipeline is not built yet; run `pocl-ray demo --plain` "
            "for the single-process reference pipeline",
            file=sys.stderr,
        )
        return 2
    from pocl_ray.plain import run_plain  # heavy imports (torch, transformers) only here

    cfg = load_config(args.config, args.overrides)
    run_plain(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return {"validate": _validate, "demo": _demo}[args.command](args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
