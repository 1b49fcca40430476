"""`hftlab run | groups | config`: argument parsing only; the work is in pipeline.py and groups/."""

from __future__ import annotations

import argparse
import sys

import yaml

from hftlab.config import ConfigError, load_config, to_dict


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hftlab", description="Harmful fine-tuning experiments.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in [("run", "base -> align -> fine-tune -> evaluate, tracked in MLflow"),
                       ("groups", "VAA stage 1: proxy harmful fine-tuning -> harmfulness matrix on Ray Data -> group file"),
                       ("config", "print the resolved config (YAML + overrides) and exit")]:
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("config", help="a YAML file under configs/")
        cmd.add_argument("overrides", nargs="*", help="dotted overrides, e.g. align.lr=1e-4 finetune.poison_ratio=0.2")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.command == "groups":
            from hftlab.groups.stage import run_groups

            run_groups(cfg)
            return 0
        from hftlab.pipeline import run

        run(cfg)
    except ConfigError as exc:
        print(f"hftlab: config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
