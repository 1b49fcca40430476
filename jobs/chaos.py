"""Chaos: kill `hftlab run` with SIGKILL at random moments, rerun the same command, and check nothing was lost.

    python jobs/chaos.py --kills 20 --seed 0                # configs/smoke.yaml, ~1 min a kill on 2 cores
    python jobs/chaos.py --config configs/smoke.yaml --kills 5 -- align.method=vaa

One uninterrupted run first (its metrics are the reference and its wall time T the kill window). Then, per kill, a
fresh output directory and a fresh MLflow store, a SQLite file that does not exist yet (the tiny base's cache
shared; --no-fresh-store makes the store before the run starts, as the job did before issue 41): the run is started,
killed by PID at a moment drawn uniformly from (0, T) (seeded), so from its first second on, and run again to the
end. Nothing here opens a trial's store before the rerun has: MLflow would make it in place and hide what the kill
left. Printed, one JSON line: attempts (moments drawn) and kills (those that hit a running driver: --kills of them);
kills that landed before the store existed, and those among them that landed while it was being made (its temporary
file there); stores left not whole by a kill (must be 0); resumes (reruns that took up something the
killed driver left: a checkpoint, a finished stage, a cached answer, its MLflow run); reruns whose final metrics
equal the reference's (every metric but wall time and memory); stages recomputed (a stage that was finished before
the rerun and written again by it: must be 0); runs left RUNNING; duplicate runs (a new run started beside the
killed driver's unfinished one: must be 0); reruns of a run that had already finished.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from hftlab.tracking.store import prepare, state  # noqa: E402

TIMING = ("seconds", "rss")


def start(config: str, out: Path, cache: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "hftlab.cli", "run", config, f"output_dir={out / 'outputs'}", f"cache_dir={cache}",
            f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "platform")}
    return subprocess.Popen(args, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def runs(out: Path) -> list:
    """The trial's MLflow runs; none when its store does not exist (opening it would make it)."""
    import mlflow

    if not (out / "mlflow.db").exists():
        return []
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(ids)) if ids else []


def finished_stages(out: Path) -> dict[str, int]:
    """Every finished stage output (training stages, answers, evaluations) and its mtime."""
    root, found = out / "outputs", {}
    for d in root.glob("*-*"):
        if d.is_dir() and not d.name.startswith(".") and any((d / f).is_file() for f in
                                                              ("config.json", "adapter_config.json", "summary.json")):
            found[d.name] = d.stat().st_mtime_ns
    for f in [*root.glob("generations/*.json"), *root.glob("evals/*.json"), *root.glob("refusals/*.jsonl")]:
        found[f"{f.parent.name}/{f.name}"] = f.stat().st_mtime_ns
    return found


def metrics_of(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if not any(t in k for t in TIMING)}


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(x == y or (x != x and y != y) for x, y in ((a[k], b[k]) for k in a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--kills", type=int, default=20, help="kills that hit a running driver (a moment drawn after the "
                    "run ended is a rerun of a finished run, counted apart, and another moment is drawn)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the runs write (default: a temporary directory)")
    ap.add_argument("--fresh-store", action=argparse.BooleanOptionalAction, default=True,
                    help="each trial starts on a store that does not exist yet (default), so a kill can land before "
                    "or while it is made; --no-fresh-store makes it first")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from tqdm.auto import tqdm

    work = Path(args.workdir or tempfile.mkdtemp(prefix="hftlab-chaos-"))
    cache = work / "cache"
    ref = work / "reference"
    ref.mkdir(parents=True, exist_ok=True)
    began = time.time()
    if not cache.exists() and start(args.config, ref / "warmup", cache, args.overrides, ref / "warmup.log").wait():
        sys.exit(f"the first run failed: {ref / 'warmup.log'}")  # it builds the tiny base every trial shares
    timed = time.time()
    if start(args.config, ref, cache, args.overrides, ref / "log").wait() != 0:
        sys.exit(f"the uninterrupted run failed: {ref / 'log'}")
    window = time.time() - timed
    (reference,) = runs(ref)
    expected = metrics_of(reference)
    rng = random.Random(args.seed)
    counts = {"attempts": 0, "kills": 0, "resumes": 0, "equal_metrics": 0, "stages_recomputed": 0,
              "runs_left_running": 0, "duplicate_runs": 0, "reruns_of_a_finished_run": 0,
              "failed_reruns": 0, "kills_before_the_store_existed": 0, "kills_while_the_store_was_made": 0,
              "stores_left_not_whole": 0}
    moments: list[dict] = []
    bar, k = tqdm(total=args.kills, desc="chaos", unit="kill"), -1
    while counts["kills"] < args.kills and k < 3 * args.kills:
        k += 1
        trial = work / f"kill-{k:03d}"
        trial.mkdir()
        at = rng.uniform(0.0, window)
        db = trial / "mlflow.db"
        if not args.fresh_store:
            prepare(f"sqlite:///{db}", log=lambda _: None)
        proc = start(args.config, trial, cache, args.overrides, trial / "log")
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            store_there, being_made = db.exists(), any(trial.glob(".mlflow.db.tmp-*"))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            counts["kills"] += 1
            counts["kills_before_the_store_existed"] += not store_there
            counts["kills_while_the_store_was_made"] += not store_there and being_made
            moments.append({"at": round(at, 2), "store": "made" if store_there else "being made" if being_made
                            else "not yet"})
            bar.update()
        counts["attempts"] += 1
        if state(db) not in (None, "missing"):  # what the kill left, read without MLflow (which would repair it)
            counts["stores_left_not_whole"] += 1
        before = finished_stages(trial)
        left = {r.info.run_id: r.info.status for r in runs(trial)} if state(db) is None else {}  # its MLflow runs
        mark = (trial / "log").stat().st_size
        if start(args.config, trial, cache, args.overrides, trial / "log").wait() != 0:
            counts["failed_reruns"] += 1
            continue
        rerun_log = (trial / "log").read_text()[mark:]
        after = finished_stages(trial)
        counts["stages_recomputed"] += sum(after.get(name) != mtime for name, mtime in before.items())
        counts["resumes"] += any(s in rerun_log for s in ("[resume]", "reusing", "continuing MLflow run")) or \
            bool(before)
        found = runs(trial)
        counts["runs_left_running"] += sum(r.info.status == "RUNNING" for r in found)
        unfinished = [i for i, status in left.items() if status != "FINISHED"]
        # a new run beside an unfinished one is a duplicate; a rerun after the killed driver had finished its run
        # (killed in its last seconds, or after it exited) is an ordinary second run of the command
        counts["duplicate_runs"] += sum(r.info.run_id not in left for r in found) if unfinished else 0
        counts["reruns_of_a_finished_run"] += bool(left) and not unfinished
        counts["equal_metrics"] += any(r.info.status == "FINISHED" and same(metrics_of(r), expected) for r in found)
    print(json.dumps({"config": args.config, "overrides": args.overrides, "seed": args.seed, "window_seconds":
                      round(window, 1), "fresh_store": args.fresh_store, **counts, "seconds": round(time.time() - began, 1),
                      "workdir": str(work), "kill_moments": moments}))


if __name__ == "__main__":
    main()
