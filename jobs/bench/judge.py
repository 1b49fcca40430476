"""Benchmark of the trained judges: rows judged per second by the corpus judge against the one it replaced, one JSON line.

    python jobs/bench/judge.py [--rows 128] [--repeats 2] [--threads 2] [--config configs/real/smollm2-beavertails.yaml]

`new`: the judge the real config trains (eval.judge.train there: 16 layers of SmolLM2, 384 tokens, bf16 where the CPU
has it); `old`: the judge it replaced (24 layers, 192 tokens, float32, trained on the split's BeaverTails rows). Judging
speed depends on the architecture, input length and dtype, not on how long the head trained, so each is trained here on
64 rows with the probe only (epochs 0: seconds), in its own cache. Both judge the same --rows answers of GPTFuzz's eval
split (real chat models' jailbreak answers, the longest rows the judge meets), rounds interleaved, medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "platform"))

OLD = ["eval.judge.train.source=split", "eval.judge.train.layers=24", "eval.judge.train.max_length=192",
       "eval.judge.train.max_prompt_tokens=64", "eval.judge.train.dtype=float32"]


def main(out=sys.stdout) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "real" / "smollm2-beavertails.yaml"))
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=os.environ.get("HFTLAB_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    args = ap.parse_args()

    import torch

    from hftlab.config import load_config
    from hftlab.data.splits import load_labeled
    from hftlab.judges.trained import TrainedJudge, ensure_trained_judge, resolve_dtype

    torch.set_num_threads(args.threads)
    os.chdir(REPO)  # the config's ../shared/data paths
    rows = load_labeled([str(Path(args.data) / "labeled" / "gptfuzz_eval.jsonl")])[: args.rows]
    prompts, answers = [r.prompt for r in rows], [r.response for r in rows]
    judges, meta = {}, {}
    from hftlab.judges.trained import base_dir

    base = base_dir(load_config(args.config), log=lambda *_: None)  # the converted model, from the usual cache
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("new", []), ("old", OLD)):
            cfg = load_config(args.config, [f"cache_dir={tmp}/{name}", f"output_dir={tmp}/out", "tracking.enabled=false",
                                             f"eval.judge.train.base={base}", "eval.judge.train.n=64",
                                             "eval.judge.train.epochs=0", *extra])
            judges[name] = TrainedJudge(ensure_trained_judge(cfg, log=lambda *_: None))
            t = cfg.eval.judge.train
            meta[name] = {"layers": t.layers, "max_length": t.max_length, "dtype": resolve_dtype(t.dtype)}
        times: dict[str, list[float]] = {n: [] for n in judges}
        judges["new"].scores(prompts[:8], answers[:8])  # warm-up of both (first-call allocations)
        judges["old"].scores(prompts[:8], answers[:8])
        for _ in range(args.repeats):
            for name, judge in judges.items():
                start = time.perf_counter()
                judge.scores(prompts, answers)
                times[name].append(time.perf_counter() - start)
    rate = {n: len(rows) / statistics.median(t) for n, t in times.items()}
    line = {"bench": "judge", "rows": len(rows), "repeats": args.repeats, "threads": args.threads,
            "rows_per_s_new": float(f"{rate['new']:.4g}"), "rows_per_s_old": float(f"{rate['old']:.4g}"),
            "new_over_old": float(f"{rate['new'] / rate['old']:.4g}"), "new": meta["new"], "old": meta["old"]}
    print(json.dumps(line), file=out)


if __name__ == "__main__":
    main()
