"""The toy world's base model: a tiny Llama with a word-level tokenizer, pre-trained from scratch.

Pre-training mixes the four benign tasks with harmful compliances, so the base is capable and
unaligned, like the real protocol's base model. The result is an ordinary HF model directory,
cached by the content hash of everything that made it: built once per machine, then loaded by
path through models/loading.py like any other model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hftlab.config.loader import digest
from hftlab.config.schema import Config
from hftlab.data.template import TEMPLATES
from hftlab.data.toyworld import build_world
from hftlab.models.loading import device
from hftlab.storage import atomic_dir, cache_root, computed_once
from hftlab.training.loop import train

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
VERSION = 1  # bump when this file changes what it builds


def tiny_base_path(cfg: Config) -> Path:
    """The cache path for this config's base: a hash of world, architecture, training and template."""
    key = digest({"world": cfg.data.toy, "tiny": cfg.base.tiny, "max_length": cfg.base.max_length,
                  "template": cfg.data.template, "v": VERSION})
    return cache_root(cfg) / f"tiny-{key}"


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over the world's own words; prepends <s> like Llama's."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def ensure_tiny_base(cfg: Config, log=print) -> Path:
    """Return the cached base model's directory, building it first if this machine has none."""
    path = tiny_base_path(cfg)
    with computed_once(path, (path / "config.json").is_file, log) as todo:  # one process builds, the others wait
        if todo:
            _build(cfg, path, log)
    return path


def _build(cfg: Config, path: Path, log) -> None:
    tiny = cfg.base.tiny
    start = time.time()
    world = build_world(cfg.data.toy)
    template_words = [head for head, _ in TEMPLATES.values()]
    tokenizer = train_tokenizer(world.texts() + template_words)
    torch.manual_seed(tiny_seed(cfg))
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny.hidden_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_heads,
            intermediate_size=tiny.intermediate_size,
            max_position_embeddings=max(cfg.base.max_length, 128),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    ).to(device())
    pairs = [(ex.prompt, ex.answer) for examples in world.task_train.values() for ex in examples]
    pairs += [(h.prompt, h.response) for h in world.pretrain_harmful]
    log(f"building tiny base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"vocab {len(tokenizer)}, {len(pairs)} pre-training examples x {tiny.pretrain_epochs} epochs")
    stats = train(model, tokenizer, pairs, template=cfg.data.template, epochs=tiny.pretrain_epochs,
                  lr=tiny.pretrain_lr, batch_size=tiny.batch_size, seed=tiny_seed(cfg), max_length=cfg.base.max_length,
                  desc="build tiny base")
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        info = {"pretrain_loss": stats["loss"], "steps": stats["steps"], "seconds": time.time() - start,
                "examples": len(pairs)}
        (tmp / "hftlab_tiny.json").write_text(json.dumps(info, indent=1))
    log(f"tiny base ready in {time.time() - start:.0f}s (loss {stats['loss']:.3f}): {path}")


def tiny_seed(cfg: Config) -> int:
    """The base model's own seed (base.tiny.seed, else the world's), independent of the run's alignment/fine-tuning seed."""
    return cfg.data.toy.seed if cfg.base.tiny.seed is None else cfg.base.tiny.seed
