"""The plan: every input of a run, loaded and checked before any model is built.

`plan(cfg)` reads the data the config names (the toy world, or real sources: BeaverTails rows split by prompt,
task datasets), checks every size against it and every model reference (named model, path or hub name), and
returns a `Plan`. A bad value fails here with `dotted.field=value: reason`, before minutes of work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from hftlab.config.errors import ConfigError
from hftlab.config.schema import Config
from hftlab.data import sources
from hftlab.data.corpus import PromptIndex
from hftlab.data.mixing import finetune_mix
from hftlab.data.prompt_sets import OWN, load_prompt_set, load_safe_set, set_name, set_path
from hftlab.data.records import AlignmentPair, HarmfulPair, TaskExample, prompt_key
from hftlab.data.splits import Split, load_split
from hftlab.data.toyworld import build_world
from hftlab.training.methods import method_of


@dataclass
class Plan:
    """Everything the run will train on and evaluate, loaded and checked up front."""

    alignment: list[AlignmentPair]
    align_pairs: list[tuple[str, str]]
    harmful: list[HarmfulPair]
    defense_harmful: list[HarmfulPair]
    proxy_tasks: dict[str, list[TaskExample]]
    finetune_pairs: list[tuple[str, str]]
    n_poison: int
    harmful_test: list[HarmfulPair]
    task_test: list[TaskExample]
    split: Split | None = None
    """The real rows' split by prompt (data.split.sources), written with the run."""
    refusal_prompts: list[HarmfulPair] = field(default_factory=list)
    """Harmful prompts whose distilled refusals join the alignment set (data.refusals; taken out of the poison pool)."""
    harmful_sets: list[str] = field(default_factory=list)
    """The prompt set (eval.prompt_sets) of each HS test prompt, in order; empty: all the run's own."""
    safe_test: list[str] = field(default_factory=list)
    """Safe prompts whose refusals are over-refusal (eval.refusal_sets), and each one's set in `safe_sets`."""
    safe_sets: list[str] = field(default_factory=list)


def check_models(cfg: Config) -> None:
    """Every model the run will load exists (named model installed, path present, hub name reachable)."""
    from hftlab.models.sources import check_model_ref

    if cfg.base.name_or_path != "tiny":
        check_model_ref(cfg.base.name_or_path, "base.name_or_path")
    elif cfg.data.template == "chat":
        raise ConfigError("data.template", "chat", "the tiny toy model has no chat template (use compact or alpaca)")
    check_judges(cfg)


def check_judges(cfg: Config) -> None:
    """Every judge the run makes (eval.judge.kind and eval.judge.compare) has its weights, or its training rows."""
    from hftlab.models.sources import check_model_ref

    judge = cfg.eval.judge
    for kind in dict.fromkeys([judge.kind, *judge.compare]):
        model = judge.model_for(kind)
        if kind == "trained" and model is not None:
            if not (Path(model).expanduser() / "judge.json").is_file():
                raise ConfigError("eval.judge.model", model, "is not a trained judge (no judge.json; see `hftlab judge train`)")
        elif kind == "trained":
            if judge.train.source in ("split", "corpus") and not cfg.data.split.sources:
                raise ConfigError("eval.judge.train.source", judge.train.source,
                                  "needs data.split.sources (the labeled rows to split)")
            if judge.train.source == "corpus":  # every file the corpus reads, before any work
                for name in ("corpus", "eval_whole", "exclude_prompts"):
                    for f in getattr(judge.train, name):
                        if not Path(f).is_file():
                            raise ConfigError(f"eval.judge.train.{name}", f, "no such file")
            if judge.train.source != "split" and sources.is_local(judge.train.source) and not Path(judge.train.source).is_file():
                raise ConfigError("eval.judge.train.source", judge.train.source, "no such file")
            check_model_ref(judge.train.base, "eval.judge.train.base")
        elif model is not None:
            check_model_ref(model, "eval.judge.model")


def _real_pools(cfg: Config) -> tuple[list[AlignmentPair], list[HarmfulPair], list[HarmfulPair], Split | None]:
    """(alignment, harmful, harmful test) from the split of labeled rows, or from the three sources as given."""
    if cfg.data.split.sources:
        split = load_split(cfg.data.split)
        return split.alignment(), split.poison(), split.test_prompts(), split
    alignment = sources.load_pairs(cfg.data.alignment_source, "data.alignment_source", safe=True)
    harmful = sources.load_pairs(cfg.data.harmful_source, "data.harmful_source", safe=False)
    harmful_test = sources.load_pairs(cfg.data.harmful_test_source, "data.harmful_test_source", safe=False)
    return alignment, harmful, harmful_test, None


def _task(cfg: Config, task: str, field_name: str, test: bool, source: str | None = None) -> list[TaskExample]:
    ft = cfg.finetune
    other = ft.train_source if test else ft.test_source
    return sources.load_task(task, source, field_name, test=test, holdout=(other, ft.test_share, cfg.data.split.seed))


def plan(cfg: Config, proxies: bool = False) -> Plan:
    """Load the data the config names and check every size against it; raises ConfigError.

    With `proxies`, also the task data of VAA's proxy runs (cfg.groups.proxies).
    """
    if cfg.data.world == "real" and cfg.base.name_or_path == "tiny":
        raise ConfigError("base.name_or_path", "tiny", "the tiny model only knows the toy world's words")
    if cfg.data.world == "real" and cfg.align.n_benign > 0:
        raise ConfigError("align.n_benign", cfg.align.n_benign, "benign mixing needs data.world=toy")
    if cfg.data.world == "toy" and cfg.data.refusals.n > 0:
        raise ConfigError("data.refusals.n", cfg.data.refusals.n, "distilled refusals need data.world=real")
    rng = random.Random(cfg.seed)
    benign: list[TaskExample] = []
    split = None
    refusal_prompts: list[HarmfulPair] = []
    if cfg.data.world == "toy":
        world = build_world(cfg.data.toy)
        alignment: list[AlignmentPair] = world.alignment
        harmful, harmful_test = world.poison, world.test_harmful
        defense_harmful = world.alignment_harmful  # never the attack's poison or the HS test prompts
        task_train, task_test = world.task_train[cfg.finetune.task], world.task_test[cfg.finetune.task]
        benign = [ex for examples in world.task_train.values() for ex in examples]
        proxy_tasks = {px.task: world.task_train[px.task] for px in cfg.groups.proxies} if proxies else {}
    else:
        alignment, harmful, harmful_test, split = _real_pools(cfg)
        n_ref = cfg.data.refusals.n
        if n_ref >= len(harmful):
            raise ConfigError("data.refusals.n", n_ref, f"the harmful pool has {len(harmful)} pairs (the rest are poison)")
        if n_ref:  # their prompts leave the poison pool: the attack never trains on an alignment prompt
            order = random.Random(cfg.data.split.seed).sample(range(len(harmful)), len(harmful))
            refusal_prompts = [harmful[i] for i in sorted(order[:n_ref])]
            harmful = [harmful[i] for i in sorted(order[n_ref:])]
        defense_harmful = harmful  # BeaverTails' unsafe training pairs: the attack samples from the same pool
        task_train = _task(cfg, cfg.finetune.task, "finetune.train_source", False, cfg.finetune.train_source)
        task_test = _task(cfg, cfg.finetune.task, "finetune.test_source", True, cfg.finetune.test_source)
        # a proxy on the user's task reads its training rows (never its test rows); another task its default source
        proxy_tasks = ({px.task: task_train if px.task == cfg.finetune.task else _task(cfg, px.task, "groups.proxies.task", False)
                        for px in cfg.groups.proxies} if proxies else {})

    harmful_test, harmful_sets = test_sets(cfg, harmful_test)
    safe = [(q, set_name(name)) for name in cfg.eval.refusal_sets
            for q in load_safe_set(name, cfg.eval.prompts_dir)[: cfg.eval.n_refusal]]
    if len(cfg.eval.prompt_sets) > 1 or cfg.eval.prompt_sets[0] != OWN:  # their prompts never train anything
        banned = PromptIndex({prompt_key(h.prompt) for h in harmful_test})
        alignment = [a for a in alignment if prompt_key(a.prompt) not in banned]
        harmful = [h for h in harmful if prompt_key(h.prompt) not in banned]
        refusal_prompts = [h for h in refusal_prompts if prompt_key(h.prompt) not in banned]
    n_align = len(alignment) if cfg.align.n_alignment is None else cfg.align.n_alignment
    if n_align > len(alignment):
        raise ConfigError("align.n_alignment", n_align, f"the alignment source has {len(alignment)} pairs")
    if n_align == 0 and not refusal_prompts:
        raise ConfigError("align.n_alignment", 0, "leaves no alignment data (set data.refusals.n for distilled refusals)")
    if cfg.align.n_benign > len(benign) and cfg.data.world == "toy":
        raise ConfigError("align.n_benign", cfg.align.n_benign, f"the toy world has {len(benign)} benign examples")
    align_pairs = [(a.prompt, a.response) for a in alignment[:n_align]]
    align_pairs += [(b.prompt, b.answer) for b in rng.sample(benign, cfg.align.n_benign)]
    mix = finetune_mix(task_train, harmful, n=cfg.finetune.n, poison_ratio=cfg.finetune.poison_ratio, seed=cfg.seed)
    p = Plan(
        alignment=alignment[:n_align],
        align_pairs=align_pairs,
        harmful=list(harmful),
        defense_harmful=list(defense_harmful),
        proxy_tasks=proxy_tasks,
        finetune_pairs=[(m.prompt, m.response) for m in mix],
        n_poison=sum(m.poison for m in mix),
        harmful_test=harmful_test,
        harmful_sets=harmful_sets,
        safe_test=[q for q, _ in safe],
        safe_sets=[n for _, n in safe],
        task_test=task_test[: cfg.eval.n_task or len(task_test)],
        split=split,
        refusal_prompts=refusal_prompts,
    )
    for kind in ("align", "finetune"):
        side_pairs(getattr(cfg, kind), p)  # a method's side data is checked here too
    check_models(cfg)
    return p


def test_sets(cfg: Config, own: list[HarmfulPair]) -> tuple[list[HarmfulPair], list[str]]:
    """The HS test prompts of every eval.prompt_sets set (the first eval.n_harmful of each) and each one's set name."""
    if cfg.data.world == "toy" and cfg.eval.prompt_sets != [OWN]:
        raise ConfigError("eval.prompt_sets", cfg.eval.prompt_sets, f"the toy world has only its own ({OWN!r})")
    prompts: list[HarmfulPair] = []
    names: list[str] = []
    for name in cfg.eval.prompt_sets:
        rows = own if name == OWN else load_prompt_set(name, cfg.eval.prompts_dir)
        rows = rows[: cfg.eval.n_harmful or len(rows)]
        prompts += rows
        names += [set_name(name)] * len(rows)
    t = cfg.eval.judge.train
    if t.source == "corpus" and cfg.eval.judge.kind == "trained" and cfg.eval.judge.model is None:
        excluded = {Path(f).resolve() for f in t.exclude_prompts}
        for name in cfg.eval.prompt_sets:
            if name != OWN and set_path(name, cfg.eval.prompts_dir).resolve() not in excluded:
                raise ConfigError("eval.prompt_sets", name, "its prompts may train the judge: add its file to "
                                  "eval.judge.train.exclude_prompts")
    return prompts, names


def with_refusals(p: Plan, refusals: list[AlignmentPair]) -> Plan:
    """The plan with distilled refusals first in the alignment set (run/distill.py made them from the base model)."""
    return replace(p, alignment=refusals + p.alignment, align_pairs=[(a.prompt, a.response) for a in refusals] + p.align_pairs)


def side_pairs(stage_cfg, p: Plan) -> list[tuple[str, str]] | None:
    """The extra data a method trains with: SafeGrad's and Lisa's alignment pairs, Booster's and RepNoise's harmful
    pairs (RepNoise `paired`: row i the harmful answer to alignment pair i's prompt, see harmful_counterparts)."""
    method = method_of(stage_cfg)
    if method.side == "alignment":
        field_name, n = method.side_limit(stage_cfg) if method.side_limit else (f"{stage_cfg.method}.n_alignment", None)
        if n is not None and n > len(p.alignment) + len(p.refusal_prompts):
            raise ConfigError(field_name, n, f"the alignment set has {len(p.alignment)} pairs")
        return [(a.prompt, a.response) for a in p.alignment[:n]]
    if method.side == "harmful":
        if method.side_paired(stage_cfg):
            return harmful_counterparts(p)
        return [(h.prompt, h.response) for h in p.defense_harmful]
    return None


def harmful_counterparts(p: Plan) -> list[tuple[str, str]]:
    """Per alignment pair, a harmful answer to the same prompt (the defenses' harmful pool, or the harmful answers
    whose prompts became distilled refusals), else the alignment pair itself: RepNoise's paired data, where such a
    self-pair has no differing tokens (representation-noising datasets.py pairs refusals and harmful answers by row)."""
    harmful: dict[str, str] = {}
    for h in [*p.defense_harmful, *p.refusal_prompts]:
        harmful.setdefault(h.prompt, h.response)
    pairs = [(prompt, harmful.get(prompt, response)) for prompt, response in p.align_pairs]
    if not p.refusal_prompts and not any(prompt in harmful for prompt, _ in p.align_pairs):  # refusals join later
        raise ConfigError("align.repnoise.paired", True, "no alignment prompt has a harmful answer to pair it with")
    return pairs
