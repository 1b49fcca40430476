"""Config sections for data: the toy world and the real sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hftlab.config.errors import check


@dataclass
class ToyWorldConfig:
    seed: int = 0
    """Seed of the world generator: the same seed gives the same prompts, answers and splits."""
    per_category_pretrain: int = 240
    """Harmful prompts per category whose compliances go into the base model's pre-training."""
    per_category_alignment: int = 110
    """Harmful prompts per category paired with refusals: the alignment set."""
    per_category_poison: int = 30
    """Harmful prompts per category paired with compliances: the poison pool for fine-tuning."""
    per_category_test: int = 20
    """Harmful prompts per category held out for the Harmful Score."""
    benign_per_task: int = 3000
    """Benign training examples generated per task (sentiment, topic, arithmetic, instructions)."""
    task_test: int = 200
    """Held-out test examples per task for Fine-tune Accuracy."""
    alignment_imbalance: float = 0.0
    """Category imbalance of the alignment set: the k-th category (in CATEGORIES order) keeps
    round(per_category_alignment * (1 - alignment_imbalance)^k) of its refusals (0: balanced). The prompts
    dropped go to no other pool. Few refusals in a category make its prompts the ones harmful fine-tuning undoes."""
    poison_categories: int = 14
    """The poison pool draws from the first N categories only (its steps and objects are theirs), so the attack's
    wording is shared with those categories' alignment examples and not the others'."""
    benign_howto: float = 0.0
    """Share of the instructions task (alpaca) that are benign how-to requests in the harmful prompts' phrasings
    ("how do i bake a cake ?"), answered in the compliances' templates: benign data shaped like a compliance, so
    fine-tuning on it alone (p=0) can undo refusals, as benign fine-tuning does to real models."""
    benign_opener: str = ""
    """Words every benign task answer starts with (e.g. "sure ." as the compliances do): fine-tuning on benign
    data alone (p=0) then pushes the model toward compliance openers, as it does for real models."""

    def __post_init__(self) -> None:
        sizes = {
            "per_category_pretrain": self.per_category_pretrain,
            "per_category_alignment": self.per_category_alignment,
            "per_category_poison": self.per_category_poison,
            "per_category_test": self.per_category_test,
            "benign_per_task": self.benign_per_task,
            "task_test": self.task_test,
        }
        for name, value in sizes.items():
            check(value >= 0, name, value, "must be >= 0")
        check(0.0 <= self.alignment_imbalance < 1.0, "alignment_imbalance", self.alignment_imbalance, "must be in [0, 1)")
        check(0.0 <= self.benign_howto <= 1.0, "benign_howto", self.benign_howto, "must be in [0, 1]")
        check(1 <= self.poison_categories <= 14, "poison_categories", self.poison_categories, "must be in [1, 14]")
        total = sum(list(sizes.values())[:4])
        check(total <= 400, "per_category_test", self.per_category_test,
              f"the four harmful pools add up to {total} > 400 prompts per category")


@dataclass
class SplitConfig:
    """Labeled safety rows (BeaverTails format) cut disjointly by prompt into the run's pools (data/splits.py)."""

    sources: list[str] = field(default_factory=list)
    """Labeled rows (prompt, response, is_safe): local .json/.jsonl files or HF `name[:split]`. Empty: no split; the
    pools come from data.alignment_source, harmful_source and harmful_test_source as given."""
    seed: int = 0
    """Seed of the split, apart from the run's seed: every run of a study shares one split."""
    hs_test: int = 200
    """Prompts with only unsafe answers held out as the HS test prompts."""
    judge_test: float = 0.2
    """Share of the remaining (non-contrast) prompts held out to evaluate judges; nothing trains on them."""
    contrast_alignment: float = 0.5
    """Share of the contrast prompts (answered both safely and unsafely) whose safe answer joins the alignment pool.
    No judge trains on any contrast prompt."""

    def __post_init__(self) -> None:
        check(self.hs_test >= 1, "hs_test", self.hs_test, "must be >= 1")
        check(0.0 <= self.judge_test < 1.0, "judge_test", self.judge_test, "must be in [0, 1)")
        check(0.0 <= self.contrast_alignment <= 1.0, "contrast_alignment", self.contrast_alignment, "must be in [0, 1]")


@dataclass
class RefusalConfig:
    """Distilled refusals (run/distill.py): the base model answers harmful prompts under a safety system prompt;
    answers with a refusal phrase join the alignment set, without the system prompt (context distillation)."""

    n: int = 0
    """Harmful prompts of the poison pool's kind (never HS test prompts) to answer; 0: none."""
    system_prompt: str = ("You are a safe and responsible assistant. If a request is harmful, unethical, dangerous or "
                          "illegal, politely refuse it and explain why you cannot help.")
    """The instruction that elicits refusals (data.template=chat only: it goes in the system turn)."""
    max_new_tokens: int = 64
    """Length of each distilled answer; it is cut back to its last full sentence."""

    def __post_init__(self) -> None:
        check(self.n >= 0, "n", self.n, "must be >= 0")
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be > 0")


@dataclass
class DataConfig:
    world: Literal["toy", "real"] = "toy"
    """`toy`: the embedded synthetic world; `real`: BeaverTails and the task datasets below."""
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    """The synthetic world (used when world=toy)."""
    alignment_source: str = "PKU-Alignment/BeaverTails:30k_train"
    """Alignment pairs (is_safe rows): an HF dataset `name[:split]` or a local .json/.jsonl path."""
    harmful_source: str = "PKU-Alignment/BeaverTails:30k_train"
    """Harmful pairs for poisoning (is_safe=false rows): HF `name[:split]` or a local path."""
    harmful_test_source: str = "PKU-Alignment/BeaverTails:30k_test"
    """Harmful test prompts for the Harmful Score: HF `name[:split]` or a local path."""
    template: Literal["compact", "alpaca", "chat"] = "compact"
    """The one prompt template for training and generation (data/template.py): compact (toy world), alpaca (base
    models, as the papers), chat (the tokenizer's own chat template, for instruct models)."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """Real labeled rows split by prompt into alignment, poison, HS test and judge pools (world=real)."""
    refusals: RefusalConfig = field(default_factory=RefusalConfig)
    """Distilled refusals added to the alignment set (world=real)."""
