"""A real full disk: a small tmpfs mounted in a user + mount namespace (`unshare -Urm`), no root needed.

Two cases, as docs/reliability.md promises: a disk too small for the run is refused before any work (the field, the
path and the free space), and a disk that fills mid-run (filled right after the aligned model's evaluation) stops the
fine-tuning stage with one DiskFullError, leaves no half-written stage or temp file, and a rerun after space is freed
reuses the finished stages and completes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO

SCRIPT = r"""
import hashlib, json, sys
from pathlib import Path
from hftlab.config import ConfigError, load_config
from hftlab.faults import DiskFullError
from hftlab.run.pipeline import run

disk, cache, case = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
out = disk / "outputs"
cfg = load_config(sys.argv[4], [f"output_dir={out}", f"cache_dir={cache}", "tracking.enabled=false",
                                "finetune.checkpoint_every=2"])
seen = {}
logs = []


def entries():
    return sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if p.name != "filler")


def digest(stage):
    (d,) = [d for d in out.glob(f"{stage}-*") if not d.name.startswith(".")]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir()) if f.is_file()}


if case == "small":
    try:
        run(cfg, log=logs.append)
    except ConfigError as err:
        seen.update(error=str(err), field=err.field, entries=entries())
    print("RESULT", json.dumps(seen))
    sys.exit(0)


def fill(stage, summary):
    if stage == "aligned":  # another job takes the rest of the disk, after the run's own free-space check
        with open(disk / "filler", "wb", buffering=0) as fh:
            for chunk in (2**20, 4096, 1):
                try:
                    while fh.write(b"\0" * chunk):
                        pass
                except OSError:
                    pass
        seen["aligned"] = digest("align")


try:
    run(cfg, log=logs.append, on_stage=fill)
    seen["error"] = None
except DiskFullError as err:
    seen["error"] = str(err)
seen["after_fault"] = entries()
(disk / "filler").unlink()
rerun = []
summary = run(cfg, log=rerun.append)
seen.update(rerun_log="\n".join(rerun), aligned_after=digest("align"), finetuned=summary["finetuned"]["hs"],
            final=entries())
print("RESULT", json.dumps(seen))
"""


def _on_tmpfs(tmp_path, tiny_cache, size: str, case: str) -> dict:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1): a real small filesystem needs a mount namespace")
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "case.py").write_text(SCRIPT)
    mount = f"mount -t tmpfs -o size={size} hftlab-test {disk}"
    cmd = f'{mount} && exec "$0" "$@"'
    args = ["unshare", "-Urm", "sh", "-c", cmd, sys.executable, str(tmp_path / "case.py"), str(disk), str(tiny_cache),
            case, str(REPO / "configs" / "smoke.yaml")]
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", mount], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def test_a_disk_too_small_for_the_run_is_refused_before_any_work(tmp_path, tiny_cache):
    seen = _on_tmpfs(tmp_path, tiny_cache, "8m", "small")
    assert seen["field"] == "output_dir", seen
    assert "GB free" in seen["error"] and "needs about" in seen["error"] and str(tmp_path / "disk") in seen["error"]
    assert seen["entries"] == ["outputs"]  # the directory made by the check, nothing in it


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_stops_cleanly_and_a_rerun_completes(tmp_path, tiny_cache):
    seen = _on_tmpfs(tmp_path, tiny_cache, "512m", "fills")
    err = seen["error"]
    assert err is not None and err.startswith(f"the disk under {tmp_path / 'disk' / 'outputs'}"), err
    assert "nothing was marked finished" in err
    after = seen["after_fault"]
    assert not [e for e in after if ".tmp-" in e], after  # no half-written stage or file left behind
    assert [e for e in after if e.startswith("outputs/align-") and e.count("/") == 1]  # the aligned stage kept
    assert not [e for e in after if e.startswith("outputs/finetune-")], after  # fine-tuning not marked finished
    log = seen["rerun_log"]
    assert "[align] reusing" in log, log
    assert seen["aligned_after"] == seen["aligned"]  # the finished stage untouched by the fault and the rerun
    assert isinstance(seen["finetuned"], float)
    assert [e for e in seen["final"] if e.startswith("outputs/finetune-") and e.count("/") == 1]
    assert not [e for e in seen["final"] if ".tmp-" in e]
