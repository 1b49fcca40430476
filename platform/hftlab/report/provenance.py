"""The line every report opens with: which machine and code made its runs, and how long they took."""

from __future__ import annotations

from hftlab.tracking import client as tracking


def provenance(uri: str, parent: str | None, runs: list[dict]) -> str:
    """Machine, code commit(s) and wall time behind the runs (first start to last end), as recorded in MLflow."""
    tags = tracking.get_run(uri, parent)["tags"] if parent else {}
    commits = sorted({r["tags"].get("hftlab.git_commit", "not recorded") for r in runs})
    ends = [r["end_time"] for r in runs if r.get("end_time")]
    wall = (max(ends) - min(r["start_time"] for r in runs)) / 60000 if ends else float("nan")
    return (f"Machine: {tags.get('hftlab.machine', 'not recorded')}. Commit: {', '.join(commits)}. "
            f"Wall time: {wall:.0f} min from the first run's start to the last run's end.")
