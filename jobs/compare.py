"""A small side-by-side comparison: arms x one swept key x seeds, printed as Markdown tables of HS and FA.

    python jobs/compare.py --config configs/quickstart.yaml \\
        --arms align.method=sft align.method=vaa --key finetune.lr --values 4e-5 6e-5 --seeds 0 1 2
    python jobs/compare.py --arms finetune.method=sft finetune.method=safegrad,finetune.safegrad.mode=per_tensor \\
        --key finetune.poison_ratio --values 0 0.1 0.2 0.3 -- tracking.experiment=compare-safegrad

An arm is a comma-separated list of dotted overrides. Every cell is one pipeline run; stages whose keys match are
reused across cells (e.g. one aligned model per seed serves every fine-tuning arm). For many trials, resources
and MLflow parent runs, use `hftlab sweep`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from hftlab.config import load_config  # noqa: E402
from hftlab.report.paired_stats import paired_difference, power_line  # noqa: E402
from hftlab.run.pipeline import run  # noqa: E402


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f} ({' / '.join(f'{v:.0f}' for v in values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--arms", nargs="+", default=["align.method=sft", "align.method=vaa"])
    ap.add_argument("--key", default="finetune.lr")
    ap.add_argument("--values", nargs="+", default=["4e-5", "6e-5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    for arm in args.arms:  # every cell's config is checked before the first run starts
        for value in args.values:
            load_config(args.config, [*args.overrides, *arm.split(","), f"{args.key}={value}"])
    start, cells = time.time(), {}
    for arm in args.arms:
        for value in args.values:
            for seed in args.seeds:
                cfg = load_config(args.config, [*args.overrides, *arm.split(","), f"{args.key}={value}", f"seed={seed}"])
                summary = run(cfg, log=lambda *a: print(*a, file=sys.stderr))
                cells.setdefault((arm, value), []).append(summary)
    for metric, stage, label in (("hs", "finetuned", "HS after HFT"), ("fa", "finetuned", "FA after HFT"),
                                 ("hs", "aligned", "HS before HFT (aligned)")):
        print(f"\n{label}, by {args.key} (mean ± std over seeds {' / '.join(map(str, args.seeds))})\n")
        print("| arm | " + " | ".join(f"{args.key}={v}" for v in args.values) + " |")
        print("|---|" + "---|" * len(args.values))
        for arm in args.arms:
            row = [cell([s[stage][metric] for s in cells[(arm, v)]]) for v in args.values]
            print(f"| {arm} | " + " | ".join(row) + " |")
    for stage in ("finetuned", "aligned"):
        print(f"\nHS({stage}) of each arm minus {args.arms[0]}'s, paired over the same prompts and seeds (95% bootstrap)\n")
        print("| arm | " + " | ".join(f"{args.key}={v}" for v in args.values) + " |")
        print("|---|" + "---|" * len(args.values))
        for arm in args.arms[1:]:
            diffs = [paired_difference(cells[(args.arms[0], v)], cells[(arm, v)], stage) for v in args.values]
            print(f"| {arm} | " + " | ".join(f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for d, lo, hi in diffs) + " |")
        print("\n" + power_line(cells[(args.arms[0], args.values[0])], stage))
    print(f"\nwall time {time.time() - start:.0f} s for {len(args.arms) * len(args.values) * len(args.seeds)} runs")


if __name__ == "__main__":
    main()
