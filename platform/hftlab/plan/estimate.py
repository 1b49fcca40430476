"""`hftlab plan CONFIG_OR_SWEEP`: every trial's stages, which ones trials share, their sizes and what they cost, before
anything runs. No model is loaded and no hub is reached: sizes come from the config (and, for the toy world, its
generator's constants), model sizes from plan/costs.py.

A stage's identity here is a hash of the config sections it depends on and of its parents' identities, the same
inputs as the stage cache keys of run/stages.py, groups/ and run/distill.py (which hash the data too): two trials with the
same identity compute the stage once and share it. Sizes where the config leaves them to the data (e.g.
`align.n_alignment: null` over a hub dataset) are unknown here and counted as 0 with a note, never guessed.
Training tokens are an upper bound: examples x epochs x base.max_length (sequences are cut there, most are shorter).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from hftlab.config import Config, digest, load_config
from hftlab.plan.costs import ACCELERATORS, BYTES, gpu_seconds, memory_gb, model_params_b, train_flops
from hftlab.training.builtin_methods import groups_parent
from hftlab.training.methods import method_of

PROMPT_TOKENS = 64
"""Tokens assumed per prompt when prompts are processed (generation prefill, judging): the HS prompt sets' prompts
are short requests; a stated assumption."""


@dataclass
class Stage:
    kind: str
    key: str
    model: str
    params_b: float
    examples: int = 0
    train_tokens: float = 0.0
    passes: float = 1.0
    lora: bool = True
    decode_tokens: float = 0.0
    prefill_tokens: float = 0.0
    judge_params_b: float = 0.0
    judge_tokens: float = 0.0
    gpu_hours: float = 0.0
    memory_gb: float = 0.0
    notes: list[str] = field(default_factory=list)


def _passes(cfg: Config, kind: str) -> float:
    """Forward+backward passes per optimizer step relative to SFT's: the method's record says (over 1000 steps)."""
    stage = getattr(cfg, kind)
    return method_of(stage).passes(stage, 1000)


def _alignment_examples(cfg: Config, notes: list[str]) -> int:
    if cfg.data.world == "toy":
        from hftlab.data.toyworld import CATEGORIES

        t = cfg.data.toy
        n = sum(round(t.per_category_alignment * (1 - t.alignment_imbalance) ** i) for i in range(len(CATEGORIES)))
        n = n if cfg.align.n_alignment is None else min(n, cfg.align.n_alignment)
    elif cfg.align.n_alignment is None:
        notes.append("align.n_alignment is null: the whole source, size unknown before the data is read")
        n = 0
    else:
        n = cfg.align.n_alignment
    return n + cfg.align.n_benign + (cfg.data.refusals.n if cfg.data.world == "real" else 0)


def _harmful_prompts(cfg: Config, notes: list[str]) -> int:
    if cfg.eval.n_harmful is not None:
        return cfg.eval.n_harmful * max(len(cfg.eval.prompt_sets), 1)
    if cfg.data.world == "toy":
        from hftlab.data.toyworld import CATEGORIES

        return cfg.data.toy.per_category_test * len(CATEGORIES)
    notes.append("eval.n_harmful is null: every prompt of the sets, count unknown here")
    return 0


def _cost(st: Stage, acc_name: str, dtype_bytes: int, batch: int) -> Stage:
    acc = ACCELERATORS[acc_name]
    flops = train_flops(st.params_b, st.train_tokens, lora=st.lora, checkpointing=False, passes=st.passes)
    seconds = gpu_seconds(acc, train_flops=flops, decode_tokens=st.decode_tokens, prefill_tokens=st.prefill_tokens,
                          params_b=st.params_b, dtype_bytes=dtype_bytes, batch=batch)
    seconds += gpu_seconds(acc, prefill_tokens=st.judge_tokens, params_b=st.judge_params_b)  # the judge reads answers
    st.gpu_hours = seconds / 3600
    st.memory_gb = max(memory_gb(st.params_b, dtype_bytes, lora=st.lora),
                       memory_gb(st.judge_params_b, dtype_bytes, lora=True))
    return st


def stages_of(cfg: Config, accelerator: str = "h100") -> list[Stage]:
    """The stages one trial needs, in the order the pipeline runs them, each with its identity and cost."""
    notes: list[str] = []
    base = cfg.base
    n = model_params_b(base.name_or_path, "base.name_or_path", asdict(base.tiny))
    dtype_bytes = BYTES["bfloat16" if base.dtype == "auto" else base.dtype]  # auto: bf16 on the GPUs costed
    batch, new = cfg.eval.batch_size, cfg.eval.max_new_tokens
    judge = cfg.eval.judge
    judge_b = model_params_b(judge.model, "eval.judge.model") if judge.kind in ("moderation", "llama_guard") and \
        judge.model else 0.0
    st: list[Stage] = [Stage("base", digest({"base": base.name_or_path, "tiny": base.tiny, "dtype": base.dtype}),
                             base.name_or_path, n)]
    if judge.kind == "trained":
        st.append(Stage("judge", digest({"train": judge.train}), judge.train.base, 0.0,
                        notes=["the CPU judge: trained once, cached (docs/judges.md), no GPU"]))
    if cfg.data.world == "real" and cfg.data.refusals.n:
        st.append(Stage("refusals", digest({"base": st[0].key, "refusals": cfg.data.refusals}), base.name_or_path, n,
                        examples=cfg.data.refusals.n, decode_tokens=cfg.data.refusals.n * cfg.data.refusals.max_new_tokens,
                        prefill_tokens=cfg.data.refusals.n * PROMPT_TOKENS))
    n_align = _alignment_examples(cfg, notes)
    groups_key = None
    if method_of(cfg.align).groups_stage(cfg.align):
        # stage 1 starts from the SFT-aligned model (pipeline.vaa_groups): the SFT arm's own alignment, shared
        sft = _train(replace(cfg, align=groups_parent(cfg.align)), "align", st[0].key, n_align, n, None)
        st.append(sft)
        proxy_keys, checkpoints = [], 0
        for proxy in cfg.groups.proxies:
            per_epoch = math.ceil(proxy.n / proxy.batch_size)
            checkpoints += math.ceil(per_epoch * proxy.epochs / (proxy.checkpoint_every or per_epoch))
            proxy_keys.append(digest({"parent": sft.key, "proxy": proxy,
                                      "seed": cfg.seed if proxy.seed is None else proxy.seed}))
            st.append(Stage("proxy", proxy_keys[-1], base.name_or_path, n, examples=proxy.n, lora=False,
                            train_tokens=proxy.n * proxy.epochs * base.max_length))
        rows = n_align * (1 + checkpoints)  # the aligned model and every proxy checkpoint answer every example
        g = cfg.groups
        if g.method == "loss":  # one forward pass of prompt + safe response a row: nothing generated or judged
            groups_key = digest({"proxies": proxy_keys, "method": g.method, "loss_share": g.loss_share})
            st.append(Stage("groups", groups_key, base.name_or_path, n, examples=rows,
                            prefill_tokens=rows * min(base.max_length, 2 * PROMPT_TOKENS),
                            notes=[f"{rows} (checkpoint, example) rows scored by the safe response's loss"]))
        else:
            groups_key = digest({"proxies": proxy_keys, "rule": g.rule, "at_least": g.at_least})
            st.append(Stage("groups", groups_key, base.name_or_path, n, examples=rows, decode_tokens=rows * new,
                            prefill_tokens=rows * PROMPT_TOKENS, judge_params_b=judge_b,
                            judge_tokens=rows * (PROMPT_TOKENS + new),
                            notes=[f"{rows} (checkpoint, example) rows generated and judged"]))
    st.append(_train(cfg, "align", st[0].key, n_align, n, groups_key))
    st.append(_train(cfg, "finetune", st[-1].key, cfg.finetune.n, n, None))
    harmful = _harmful_prompts(cfg, notes)
    prompts = harmful + (cfg.eval.n_task or 0) + (cfg.eval.n_refusal or 0) * len(cfg.eval.refusal_sets)
    for label, parent in (("eval base", st[0]), ("eval aligned", st[-2]), ("eval finetuned", st[-1])):
        key = digest({"model": parent.key, "eval": cfg.eval, "task": cfg.finetune.task, "data": cfg.data})
        st.append(Stage(label, key, base.name_or_path, n, examples=prompts,
                        decode_tokens=prompts * new, prefill_tokens=prompts * PROMPT_TOKENS, judge_params_b=judge_b,
                        judge_tokens=harmful * (PROMPT_TOKENS + new)))
    for s in st:
        _cost(s, accelerator, dtype_bytes, batch)
    st[0].notes += notes
    return st


def _train(cfg: Config, kind: str, parent: str, examples: int, n: float, groups: str | None) -> Stage:
    stage = getattr(cfg, kind)
    key = digest({"parent": parent, "cfg": stage, "data": cfg.data, "seed": cfg.seed, "groups": groups,
                  "max_length": cfg.base.max_length})
    return Stage(kind, key, cfg.base.name_or_path, n, examples=examples, passes=_passes(cfg, kind),
                 lora=stage.lora.enabled, train_tokens=examples * stage.epochs * cfg.base.max_length)


def trials(path: str | Path, overrides: list[str]) -> tuple[list[tuple[str, Config]], dict]:
    """(name, config) per trial of a sweep file or a single config, and the sweep's resources per trial."""
    from hftlab.config.loader import read_yaml

    raw = read_yaml(path, "config")
    if "space" not in raw and not isinstance(raw.get("base"), str):  # a sweep file names its base config
        return [("run", load_config(path, overrides))], {"cpu": None, "gpu": None}
    from hftlab.sweep.spec import load_sweep, to_overrides, trial_dotlist, trial_name

    spec, fixed = load_sweep(path, overrides)
    axes = {k: (v if kind in ("grid", "choice") else [v[0]]) for k, d in spec.space.items() for kind, v in d.items()}
    out = []
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values, strict=True))
        cfg = load_config(spec.base, fixed + trial_dotlist(point))
        for sample in range(spec.num_samples):
            name = trial_name(cfg, point) + (f" #{sample}" if spec.num_samples > 1 else "")
            out.append((name + (" fixed attack" if spec.attack.enabled else ""), cfg))
            if spec.attack.enabled:  # a nested sweep: the undefended reference and the defense's attacks
                ref = [o for k, v in spec.attack.guard.reference.items() for o in to_overrides(k, v)]
                if spec.attack.guard.fa_share is not None:
                    out.append((f"{name} reference", load_config(spec.base, fixed + trial_dotlist(point) + ref)))
                for i, attack in enumerate(attack_points(spec.attack)):
                    out.append((f"{name} attack {i}", load_config(spec.base, fixed + trial_dotlist(point | attack))))
    return out, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}


def attack_points(attack) -> list[dict]:
    """The attacks a nested sweep runs per defense: the grid's points, or `budget` draws (seeded by attack.seed; the
    same distributions as Tune's, not its exact draws: enough for costs)."""
    import math
    import random

    if attack.search == "grid":
        axes = {k: d["grid"] for k, d in attack.space.items()}
        return [dict(zip(axes, vals, strict=True)) for vals in itertools.product(*axes.values())]
    rng = random.Random(attack.seed)

    def draw(dist: dict):
        kind, v = next(iter(dist.items()))
        if kind in ("grid", "choice"):
            return rng.choice(v)
        return rng.uniform(*v) if kind == "uniform" else math.exp(rng.uniform(math.log(v[0]), math.log(v[1])))

    return [{k: draw(d) for k, d in attack.space.items()} for _ in range(attack.trials)]


def make_plan(path: str | Path, overrides: list[str] | None = None, accelerator: str = "h100") -> dict:
    """The plan as plain data: trials, their stages, the shared ones, totals (see format_plan)."""
    if accelerator not in ACCELERATORS:
        from hftlab.config.errors import ConfigError

        raise ConfigError("accelerator", accelerator, f"is not one of {sorted(ACCELERATORS)}")
    runs, resources = trials(path, list(overrides or []))
    per_trial = [(name, stages_of(cfg, accelerator)) for name, cfg in runs]
    unique: dict[str, Stage] = {}
    users: dict[str, int] = {}
    for _, stages in per_trial:
        for s in stages:
            unique.setdefault(s.key, s)
            users[s.key] = users.get(s.key, 0) + 1
    needed = sum(len(stages) for _, stages in per_trial)
    return {
        "accelerator": accelerator, "source": ACCELERATORS[accelerator].source, "resources": resources,
        "trials": [{"name": name, "stages": [asdict(s) for s in stages]} for name, stages in per_trial],
        "stages_needed": needed, "stages_unique": len(unique),
        "shared": sorted(({"kind": s.kind, "key": s.key, "trials": users[k]} for k, s in unique.items() if users[k] > 1),
                         key=lambda d: (-d["trials"], d["kind"])),
        "gpu_hours": sum(s.gpu_hours for s in unique.values()),
        "gpu_hours_unshared": sum(s.gpu_hours for _, stages in per_trial for s in stages),
        "train_tokens": sum(s.train_tokens * s.passes for s in unique.values()),
        "decode_tokens": sum(s.decode_tokens for s in unique.values()),
        "peak_memory_gb": max((s.memory_gb for s in unique.values()), default=0.0),
        "notes": sorted({note for s in unique.values() for note in s.notes if "unknown" in note}),
    }


def gpus_per_trial(cfg: Config) -> float:
    """GPUs a trial's own config asks for (a sweep's `resources.gpu` overrides it)."""
    return float(max(cfg.align.workers if cfg.align.use_gpu else 0, cfg.finetune.workers if cfg.finetune.use_gpu else 0,
                     cfg.groups.gpus_per_actor * cfg.groups.actors))


def check_cluster(plan: dict, cluster: dict[str, float], need_gpu: float, need_cpu: float) -> str | None:
    """One line saying what the cluster (ray.cluster_resources()) lacks for one trial of the plan, or None."""
    acc = ACCELERATORS[plan["accelerator"]]
    if need_gpu and plan["peak_memory_gb"] > acc.memory_gb:
        return f"a stage needs about {plan['peak_memory_gb']:.0f} GB on one GPU; an {acc.name} has {acc.memory_gb:.0f} GB"
    for resource, need in (("GPU", need_gpu), ("CPU", need_cpu)):
        have = cluster.get(resource, 0.0)
        if need > have:
            return f"the cluster has {have:g} {resource}, a trial of this plan needs {need:g}"
    return None


def format_plan(plan: dict, path: str, max_trials: int = 12) -> str:
    hours = plan["gpu_hours"]
    lines = [f"plan: {path}: {len(plan['trials'])} trial(s), {plan['stages_needed']} stages needed, "
             f"{plan['stages_unique']} distinct (each computed once, the rest reused)",
             f"estimate on one {plan['accelerator']}: {hours:.2f} GPU-hours with the shared stages computed once "
             f"({plan['gpu_hours_unshared']:.2f} if nothing were shared); an estimate from datasheet peaks and "
             f"stated efficiencies (hftlab/plan/costs.py): {plan['source']}",
             f"tokens: {plan['train_tokens']:.3g} trained (upper bound, x passes), {plan['decode_tokens']:.3g} generated; "
             f"peak memory of a stage about {plan['peak_memory_gb']:.1f} GB (weights + optimizer states; activations "
             f"and KV cache extra)"]
    res = plan["resources"]
    if res["cpu"] is not None:
        lines.append(f"resources per trial (sweep file): {res['cpu']:g} CPU, {res['gpu']:g} GPU")
    kinds: dict[str, list] = {}
    seen: set[str] = set()
    for trial in plan["trials"]:
        for s in trial["stages"]:
            entry = kinds.setdefault(s["kind"], [0, 0, 0.0, 0])
            entry[1] += 1
            if s["key"] not in seen:
                seen.add(s["key"])
                entry[0] += 1
                entry[2] += s["gpu_hours"]
                entry[3] += s["examples"]
    lines += ["", f"{'stage':<16} {'distinct':>8} {'needed':>7} {'examples':>10} {'GPU-h':>8}"]
    lines += [f"{k:<16} {v[0]:>8} {v[1]:>7} {v[3]:>10} {v[2]:>8.2f}" for k, v in kinds.items()]
    if plan["shared"]:
        lines += ["", "shared stages (trials using each):"]
        lines += [f"  {s['kind']:<16} {s['key']}  x{s['trials']}" for s in plan["shared"][:max_trials]]
    lines += ["", "trials (GPU-hours if run alone):"]
    for trial in plan["trials"][:max_trials]:
        lines.append(f"  {trial['name']:<48} {sum(s['gpu_hours'] for s in trial['stages']):>8.2f}")
    if len(plan["trials"]) > max_trials:
        lines.append(f"  ... and {len(plan['trials']) - max_trials} more")
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)
