"""The per-example harmfulness matrix on Ray Data: (proxy, checkpoint, example) -> answer -> judge -> Parquet.

With groups.method=loss the actors skip generation and the judge: each row is one forward pass for the safe
response's loss, `hs` is NOT_JUDGED and the answer empty.

Generation is HF's (MatrixWorker) or vLLM's (VLLMMatrixWorker, groups.backend=vllm): one engine per actor, moved
from checkpoint to checkpoint by reloading its weights in place instead of starting a new engine (20-50 s each on
CPU). ray.data.llm's vLLM processor runs here too (16 rows in 41.7 s, start included: ../shared/REAL-MODELS.md), but
it binds one engine to one model, so the matrix's T+1 models would cost T+1 engine starts; `jobs/bench/groups.py
--real --ray-data-llm` measures it beside this pipeline.

One actor pool serves every proxy run: starting an actor (importing torch and transformers, then
the first model load) is most of the fixed cost, so it is paid once per stage, not once per proxy.
Each distinct model is answered once: checkpoint 0 (the aligned model) is shared by all proxies.
Rows are sorted by model, so each `map_batches` call sees one or two models; an actor keeps its
model until the rows move on. Ray restarts a dead actor and retries its batch, so the written
matrix has every row exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hftlab.config.schema import Config, JudgeConfig
from hftlab.data.records import AlignmentPair
from hftlab.data.template import encode
from hftlab.generation.hf import HFGenerator
from hftlab.judges import make_judge
from hftlab.models.loading import load_model
from hftlab.training.batches import collate

COLUMNS = ["proxy", "checkpoint", "id", "hs", "answer", "loss"]
NOT_JUDGED = -1
"""`hs` of a row that was not generated (groups.method=loss): its answer is empty."""


@torch.no_grad()
def response_losses(model, tokenizer, pairs: list[tuple[str, str]], *, template: str, max_length: int,
                    batch_size: int = 64) -> list[float]:
    """Mean token cross-entropy of each safe response given its prompt: one forward pass per example. Rows are
    batched by length (longest first), so a batch pads to about its own rows' length, not the longest row's."""
    encoded = encode(tokenizer, pairs, template, max_length)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out = [float("nan")] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(model.device) for k, v in collate([encoded[i] for i in rows], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        mask = (labels != -100).float()
        for i, loss in zip(rows, (nll.sum(1) / mask.sum(1).clamp(min=1)).tolist(), strict=True):
            out[i] = loss
    return out


class MatrixWorker:
    """A Ray Data actor: loads each checkpoint once, answers its prompts in batches, judges them."""

    def __init__(self, *, template: str, max_new_tokens: int, gen_batch_size: int, judge: JudgeConfig | None,
                 threads: int, max_length: int, with_loss: bool, dtype: str = "float32",
                 trust_remote_code: bool = False) -> None:
        """`judge=None`: the loss score alone (groups.method=loss): nothing is generated or judged."""
        torch.set_num_threads(threads)
        self.template, self.max_new_tokens, self.gen_batch_size = template, max_new_tokens, gen_batch_size
        self.max_length, self.with_loss, self.dtype, self.trust = max_length, with_loss, dtype, trust_remote_code
        self.judge = make_judge(judge, trust_remote_code=trust_remote_code) if judge is not None else None
        self.loaded: tuple[str, object, object, HFGenerator] | None = None

    def model(self, path: str):
        """(model, tokenizer, generator) of `path`, loaded once while the rows stay on it."""
        if self.loaded is None or self.loaded[0] != path:
            self.loaded = None  # free the previous checkpoint first
            model, tok = load_model(path, dtype=self.dtype, trust_remote_code=self.trust)
            gen = HFGenerator(model, tok, template=self.template, max_new_tokens=self.max_new_tokens,
                              batch_size=self.gen_batch_size, progress=False)
            self.loaded = (path, model, tok, gen)
        return self.loaded[1:]

    def answer(self, path: str, prompts: list[str], responses: list[str]) -> tuple[list[str], list[float]]:
        """Greedy answers of the model at `path`, and the safe responses' losses (NaN without the loss score)."""
        model, tok, gen = self.model(path)
        got = gen.generate(prompts) if self.judge is not None else [""] * len(prompts)
        losses = (response_losses(model, tok, list(zip(prompts, responses, strict=True)), template=self.template,
                                  max_length=self.max_length) if self.with_loss else [float("nan")] * len(prompts))
        return got, losses

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        answers, hs, loss = [""] * n, [0] * n, [float("nan")] * n
        for path in dict.fromkeys(batch["path"].tolist()):
            rows = [i for i in range(n) if batch["path"][i] == path]
            prompts = [str(batch["prompt"][i]) for i in rows]
            got, losses = self.answer(path, prompts, [str(batch["response"][i]) for i in rows])
            verdicts = self.judge.judge(prompts, got) if self.judge is not None else [NOT_JUDGED] * len(rows)
            for j, i in enumerate(rows):
                answers[i], hs[i], loss[i] = got[j], int(verdicts[j]), losses[j]
        return {"id": batch["id"], "model": batch["model"], "hs": np.array(hs, dtype=np.int8),
                "answer": np.array(answers, dtype=object), "loss": np.array(loss, dtype=np.float64)}


class VLLMMatrixWorker(MatrixWorker):
    """A Ray Data actor with one vLLM engine (generation/vllm.py) that walks the checkpoints by reloading weights in
    place; the loss score comes from the engine's prompt log-probabilities, so no second copy of a model is loaded.
    LoRA stages (the aligned model) are served as merged copies: vLLM 0.29 gives no prompt log-probabilities in a
    LoRA-enabled engine, and every proxy checkpoint is a full model anyway."""

    def __init__(self, *, settings, cache: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings, self.cache = settings, cache
        self.gen = None

    def answer(self, path: str, prompts: list[str], responses: list[str]) -> tuple[list[str], list[float]]:
        from hftlab.generation.vllm import VLLMGenerator

        if self.gen is None:
            self.gen = VLLMGenerator(path, template=self.template, max_new_tokens=self.max_new_tokens,
                                     batch_size=self.gen_batch_size, cache=Path(self.cache), dtype=self.dtype,
                                     trust_remote_code=self.trust, settings=self.settings, merge_lora=True)
        else:
            self.gen.serve(path)
        got = self.gen.generate(prompts) if self.judge is not None else [""] * len(prompts)
        losses = (self.gen.response_losses(list(zip(prompts, responses, strict=True)), max_length=self.max_length)
                  if self.with_loss else [float("nan")] * len(prompts))
        return got, losses


def matrix_rows(examples: list[AlignmentPair], models: list[str]) -> list[dict]:
    """One row per (model, example), ordered by model."""
    return [{"id": ex.id, "model": m, "path": path, "prompt": ex.prompt, "response": ex.response}
            for m, path in enumerate(models) for ex in examples]


def resolved_judge(cfg: Config) -> JudgeConfig:
    """eval.judge with the trained judge's weights named: an actor has no run config to find (or train) it with."""
    judge = cfg.eval.judge
    if judge.kind == "trained":
        from hftlab.judges.trained import trained_judge_model

        judge = dataclasses.replace(judge, model=trained_judge_model(judge, cfg))
    return judge


def worker_kwargs(cfg: Config) -> dict:
    """The MatrixWorker arguments a config implies (groups.method=loss: no judge, so none is trained either)."""
    judge = resolved_judge(cfg) if cfg.groups.method == "forgot_num" else None
    return dict(template=cfg.data.template, max_new_tokens=cfg.eval.max_new_tokens, gen_batch_size=cfg.eval.batch_size,
                judge=judge, threads=cfg.groups.threads_per_actor, max_length=cfg.base.max_length,
                with_loss=cfg.groups.loss_score, dtype=cfg.base.dtype, trust_remote_code=cfg.base.trust_remote_code)


def read_journal(journal: Path | None, models: list[str]) -> pd.DataFrame:
    """The rows a killed matrix job had finished (one JSON object per line; a cut last line is dropped)."""
    done = []
    if journal is not None and journal.is_file():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the kill landed mid-line: that row is answered again
            if row["path"] in models:
                done.append(row)
    frame = pd.DataFrame(done, columns=["id", "path", "hs", "answer", "loss"])
    frame = frame.astype({"hs": np.int8, "loss": np.float64})  # as the actors return them (null: NaN)
    return frame.drop_duplicates(["path", "id"])


def build_matrix(cfg: Config, examples: list[AlignmentPair], runs: list[list[str]], out_path: str | Path,
                 actors: int | None = None, journal: str | Path | None = None, log=print) -> pd.DataFrame:
    """The matrix of every proxy run (`runs[k]` = its checkpoint paths, the aligned model first) on Ray Data.

    Written as one Parquet file at `out_path` (columns: proxy, checkpoint, id, hs, answer, loss) and
    returned as a DataFrame.

    The rows come back to the driver (a few MB even at paper scale) and are written there at once,
    through a temporary name: a reader never sees half a matrix, and no write tasks wait at the end
    for the CPUs the actors hold (Ray Data's `write_parquet` did, 1.5-2 s of a 15 s matrix on 2 cores).
    `journal`: a file every answered batch is appended to as it arrives, so a rerun after a killed driver answers
    only the rows it lacks; removed once the matrix is written.
    """
    import ray

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    model_of = {path: m for m, path in enumerate(dict.fromkeys(p for run in runs for p in run))}  # each distinct model once
    g, rows = cfg.groups, matrix_rows(examples, list(model_of))
    journal = Path(journal) if journal is not None else None
    done = read_journal(journal, list(model_of))
    if len(done):
        finished = set(zip(done["path"], done["id"], strict=True))
        rows = [r for r in rows if (r["path"], r["id"]) not in finished]
        log(f"[groups] matrix: {len(done)} rows taken up from {journal}, {len(rows)} to answer")
    answered = [done.assign(model=done["path"].map(model_of)).drop(columns="path")] if len(done) else []
    if rows:
        answered += _answer(cfg, rows, worker_kwargs(cfg), actors or g.actors, journal, list(model_of))
    where = pd.DataFrame([(k, t, model_of[path]) for k, run in enumerate(runs) for t, path in enumerate(run)],
                         columns=["proxy", "checkpoint", "model"])
    matrix = where.merge(pd.concat(answered), on="model")[COLUMNS].sort_values(["proxy", "checkpoint", "id"])
    matrix = matrix.reset_index(drop=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    matrix.to_parquet(partial, index=False)
    os.replace(partial, out_path)
    if journal is not None:
        journal.unlink(missing_ok=True)
    return matrix


def _answer(cfg: Config, rows: list[dict], kwargs: dict, actors: int, journal: Path | None,
            models: list[str]) -> list[pd.DataFrame]:
    """Answer and judge `rows` on a Ray Data actor pool; each batch appended to `journal` as it comes back."""
    import ray

    g = cfg.groups
    # about one batch per block: work is handed out in small pieces, so no actor idles at the end
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / g.batch_size)))
    # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: a dead actor comes back
    # and its batch is retried, which is what keeps the matrix exact when a worker dies.
    worker = MatrixWorker
    if g.generation_backend == "vllm":
        from hftlab.storage import cache_root

        worker = VLLMMatrixWorker
        kwargs.update(settings=cfg.eval.vllm, cache=str(cache_root(cfg)))
    ds = ds.map_batches(
        worker, fn_constructor_kwargs=kwargs, batch_size=g.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=g.cpus_per_actor,
        num_gpus=g.gpus_per_actor or None,
    )
    out: list[pd.DataFrame] = []
    sink = None
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        cut = journal.is_file() and journal.stat().st_size and not journal.read_bytes().endswith(b"\n")
        sink = journal.open("a", encoding="utf-8")
        if cut:  # a killed driver's last line: end it, so the next row starts a line of its own
            sink.write("\n")
    try:
        for arrays in ds.iter_batches(batch_format="numpy", batch_size=None):
            batch = pd.DataFrame({k: list(v) if v.dtype == object else v for k, v in arrays.items()})
            out.append(batch)
            if sink is not None:
                paths = batch["model"].map(dict(enumerate(models)))
                sink.write("".join(json.dumps({"id": str(i), "path": p, "hs": int(h), "answer": str(a),
                                               "loss": None if math.isnan(lo) else float(lo)}) + "\n"
                                   for i, p, h, a, lo in zip(batch["id"], paths, batch["hs"], batch["answer"],
                                                             batch["loss"], strict=True)))
                sink.flush()
    finally:
        if sink is not None:
            sink.close()
    return out
