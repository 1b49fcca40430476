"""`hftlab run | groups | config | judge | sweep | report | plan | tracking`: argument parsing only.

The work is in run/pipeline.py, groups/, judges/ (train and eval), sweep/runner.py (Ray Tune) and report/tables.py
(tables from MLflow).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from hftlab.config import ConfigError, load_config, to_dict
from hftlab.faults import DiskFullError, NonFiniteError

# exit codes, one meaning each (scripts and schedulers branch on them)
CONFIG_ERROR = 2
"""A config value, override or input file is wrong (the message names the field and the value); nothing ran."""
NUMERICAL_FAULT = 3
"""A loss or gradient went NaN or inf: the stage, step and method are named; the last checkpoint is kept."""
DISK_FULL = 4
"""A write failed on a full disk: the directory is named; nothing half-written is left behind."""
PLAN_DOES_NOT_FIT = 5
"""`hftlab plan --address`: the cluster lacks what one trial needs (one line says what)."""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hftlab", description="Harmful fine-tuning experiments.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in [("run", "base -> align -> fine-tune -> evaluate, tracked in MLflow"),
                       ("groups", "VAA stage 1: proxy harmful fine-tuning -> harmfulness matrix on Ray Data -> group file"),
                       ("config", "print the resolved config (YAML + overrides) and exit")]:
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("config", help="a YAML file under configs/")
        cmd.add_argument("overrides", nargs="*", help="dotted overrides, e.g. align.lr=1e-4 finetune.poison_ratio=0.2")
    text = "the harmfulness judge: `train` the CPU judge (eval.judge.train), `eval` judges against human labels"
    cmd = sub.add_parser("judge", help=text, description=text)
    cmd.add_argument("action", choices=["train", "eval"],
                     help="train: the trained judge into the cache (reused if there); eval: eval.judge.kind and "
                          "eval.judge.compare against labeled rows (eval.judge.eval_source)")
    cmd.add_argument("config", help="a YAML file under configs/")
    cmd.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.judge.kind=trained eval.judge.compare=[refusal]")
    text = "a Ray Tune sweep of the pipeline over dotted keys; one MLflow parent run, a child run per trial"
    cmd = sub.add_parser("sweep", help=text, description=text)
    cmd.add_argument("sweep", help="a sweep YAML under configs/sweeps/")
    cmd.add_argument("overrides", nargs="*",
                     help="dotted overrides for every trial (finetune.n=200); sweep.<field>=... sets the sweep file's own fields")
    cmd.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    cmd.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")
    cmd.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    text = "paper-style tables (Markdown, CSV) and plots (PNG) of an experiment's runs, from MLflow"
    cmd = sub.add_parser("report", help=text, description=text)
    cmd.add_argument("experiment", help="MLflow experiment name (a sweep's experiment is its name)")
    cmd.add_argument("--out", default=None, help="output directory (default: outputs/reports/EXPERIMENT)")
    cmd.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    cmd.add_argument("--parent", default=None, help="a sweep's parent run id (default: the experiment's latest sweep)")
    text = ("every trial's stages, the ones trials share, sizes, resources and estimated GPU-hours, before anything "
            "runs (no model loaded, no hub reached)")
    cmd = sub.add_parser("plan", help=text, description=text)
    cmd.add_argument("config", help="a config YAML or a sweep YAML")
    cmd.add_argument("overrides", nargs="*", help="dotted overrides, as for run / sweep")
    cmd.add_argument("--accelerator", default="h100", help="the GPU the estimate is for: h100, h200, a100")
    cmd.add_argument("--address", default=None, help="a Ray cluster to check the plan against (fails if it lacks it)")
    cmd.add_argument("--json", action="store_true", help="the plan as JSON instead of the table")
    text = "MLflow: `sync` sends what runs logged while the tracking server was unreachable (their outboxes)"
    cmd = sub.add_parser("tracking", help=text, description=text)
    cmd.add_argument("action", choices=["sync"])
    cmd.add_argument("--output-dir", default="outputs", help="the runs' output_dir (default: outputs)")
    return ap


def sweep(args: argparse.Namespace) -> int:
    from hftlab.sweep import runner as sweeps
    from hftlab.sweep.spec import load_sweep

    loaded = load_sweep(args.sweep, args.overrides)  # every trial config checked before Ray starts
    spec = loaded[0]
    sweeps.connect(args.address, args.num_cpus)
    result = sweeps.run_sweep(args.sweep, args.overrides, resume=args.resume, loaded=loaded)
    if result["interrupted"]:
        return 130
    if spec.report and result["best"] is not None:
        from hftlab.report.tables import write_report

        write_report(result["tracking_uri"], result["experiment"], Path("outputs/reports") / result["experiment"],
                     parent=result["parent_run_id"])
    print(f"MLflow runs table with HS/FA: {ui_link(result['tracking_uri'], result['ui'])}")
    return 1 if result["errors"] else 0


def report(args: argparse.Namespace) -> int:
    from hftlab.report.tables import write_report
    from hftlab.tracking.client import default_uri

    uri = args.tracking_uri or default_uri()
    try:
        write_report(uri, args.experiment, args.out or Path("outputs/reports") / args.experiment, parent=args.parent)
    except ValueError as exc:
        print(f"hftlab: {exc}", file=sys.stderr)
        return 2
    return 0


def judge(action: str, cfg) -> int:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if action == "train":
        from hftlab.judges.trained import ensure_trained_judge
        from hftlab.run.inputs import check_judges

        check_judges(cfg)
        print(f"trained judge: {ensure_trained_judge(cfg)}")
        return 0
    from hftlab.run.judge_eval import run_eval

    run_eval(cfg)
    return 0


def ui_link(uri: str, fragment: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{fragment}"
    return f"http://127.0.0.1:5000/{fragment}   (after: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000)"


def plan_command(args: argparse.Namespace) -> int:
    import json

    from hftlab.plan.estimate import check_cluster, format_plan, gpus_per_trial, make_plan, trials

    plan = make_plan(args.config, args.overrides, args.accelerator)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan, args.config))
    if args.address is None:
        return 0
    import ray

    cfg = trials(args.config, args.overrides)[0][0][1]
    res = plan["resources"]
    need_gpu = res["gpu"] if res["gpu"] is not None else gpus_per_trial(cfg)
    ray.init(address=args.address, log_to_driver=False)
    try:
        lacking = check_cluster(plan, ray.cluster_resources(), need_gpu, res["cpu"] or 1.0)
    finally:
        ray.shutdown()
    if lacking:
        print(f"hftlab: plan does not fit {args.address}: {lacking}", file=sys.stderr)
        return PLAN_DOES_NOT_FIT
    print(f"fits {args.address}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "sweep":
            return sweep(args)
        if args.command == "report":
            return report(args)
        if args.command == "plan":
            return plan_command(args)
        if args.command == "tracking":
            from hftlab.tracking.logger import sync

            return 1 if sync(args.output_dir) else 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.command == "judge":
            return judge(args.action, cfg)
        if args.command == "groups":
            from hftlab.groups.stage import run_groups

            run_groups(cfg)
            return 0
        from hftlab.run.pipeline import run

        run(cfg)
    except ConfigError as exc:
        print(f"hftlab: config error: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    except NonFiniteError as exc:  # a NaN or inf loss or gradient: the stage, step and method, no traceback
        print(f"hftlab: numerical fault: {exc}", file=sys.stderr)
        return NUMERICAL_FAULT
    except DiskFullError as exc:  # a write failed on a full disk: the directory, nothing half-written left behind
        print(f"hftlab: disk full: {exc}", file=sys.stderr)
        return DISK_FULL
    return 0


if __name__ == "__main__":
    sys.exit(main())
