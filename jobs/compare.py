"""A small comparison until sweeps land: alignment methods x seeds x fine-tuning strengths, as Markdown.

    python jobs/compare.py --config configs/quickstart.yaml --methods sft vaa --seeds 0 1 2 --lrs 4e-5 6e-5

Every cell is one `hftlab run` (stages are reused across cells where their keys match); prints a
table of HS after harmful fine-tuning (mean, std and the per-seed values) and FA, one row per method.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from hftlab.config import load_config  # noqa: E402
from hftlab.pipeline import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--methods", nargs="+", default=["sft", "vaa"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--lrs", nargs="+", type=float, default=[4e-5, 6e-5])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cells: dict[tuple[str, float], list[dict]] = {}
    for method in args.methods:
        for lr in args.lrs:
            for seed in args.seeds:
                cfg = load_config(args.config, [*args.overrides, f"align.method={method}", f"seed={seed}", f"finetune.lr={lr}"])
                summary = run(cfg, log=lambda *a: print(*a, file=sys.stderr))
                cells.setdefault((method, lr), []).append(summary)
    head = "| align | " + " | ".join(f"HS after HFT, lr {lr:g}" for lr in args.lrs) + " | aligned HS | FA after HFT |"
    print(head + "\n|" + "---|" * (len(args.lrs) + 3))
    for method in args.methods:
        row = [method]
        for lr in args.lrs:
            hs = [s["finetuned"]["hs"] for s in cells[(method, lr)]]
            row.append(f"{statistics.mean(hs):.1f} +- {statistics.pstdev(hs):.1f} ({' / '.join(f'{h:.0f}' for h in hs)})")
        every = [s for lr in args.lrs for s in cells[(method, lr)]]
        row.append(f"{statistics.mean(s['aligned']['hs'] for s in every):.1f}")
        row.append(f"{statistics.mean(s['finetuned']['fa'] for s in every):.1f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
