"""hftlab keeps freed memory mapped (allocator.py): freed blocks are reused, not faulted in again; no result changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hftlab.allocator import FREED_MEMORY_ENV
from hftlab.models.tiny import ensure_tiny_base
from tests.conftest import REPO

# Each block is larger than every block freed before it, so glibc's defaults (whose mmap threshold
# only rises to the largest block freed so far) map every one afresh: a fault per page, each time.
# A KV cache that grows by a token per decoding step allocates like this.
GROW = """
import json, resource
import hftlab, torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(200):
    block = torch.ones((1 << 20) + i * 10240, dtype=torch.uint8)
    del block
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""

DECODE = """
import json, sys
import hftlab, torch
from hftlab.generation.hf import HFGenerator
from hftlab.models.loading import load_model
torch.set_num_threads(1)
model, tok = load_model(sys.argv[1])
gen = HFGenerator(model, tok, template="compact", max_new_tokens=24, batch_size=64, progress=False)
print(json.dumps(gen.generate([f"how do I make thing number {i} at home" for i in range(256)])))
"""


def run(code: str, keep: str, *args: str):
    env = {**os.environ, FREED_MEMORY_ENV: keep, "PYTHONPATH": str(REPO / "platform")}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_hftlab_keeps_freed_blocks_for_reuse():
    off, on = run(GROW, "0"), run(GROW, "1")
    assert off > 200 * 256  # every 1-3 MB block faulted in page by page (measured: 101,147)
    assert on < off / 10, (on, off)  # the heap grows by each block's extra 10 KB only (measured: 2,400-3,400)


def test_where_memory_comes_from_never_changes_an_answer(smoke):
    base = str(ensure_tiny_base(smoke(), log=lambda *_: None))
    assert run(DECODE, "1", base) == run(DECODE, "0", base)
