"""Configs: dotted overrides, and errors that name the field and the value before any work."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from hftlab.cli import main
from hftlab.config import Config, ConfigError, apply_overrides, build, flatten, load_config, to_dict
from tests.conftest import REPO

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_overrides_reach_typed_fields():
    cfg = load_config(QUICKSTART, ["align.lr=1e-4", "finetune.poison_ratio=0.2", "eval.n_harmful=50",
                                   "align.lora.enabled=true", "align.lora.target_modules=[q_proj,k_proj]"])
    assert cfg.align.lr == 1e-4 and isinstance(cfg.align.lr, float)
    assert cfg.finetune.poison_ratio == 0.2
    assert cfg.eval.n_harmful == 50
    assert cfg.align.lora.enabled is True and cfg.align.lora.target_modules == ["q_proj", "k_proj"]


def test_params_are_the_override_keys():
    params = flatten(to_dict(load_config(QUICKSTART)))
    assert params["finetune.poison_ratio"] == 0.1
    assert params["base.tiny.hidden_size"] == 192
    assert params["eval.judge.kind"] == "refusal"
    # every flattened key round-trips as an override
    key, value = "align.epochs", params["align.epochs"]
    assert load_config(QUICKSTART, [f"{key}={value + 1}"]).align.epochs == value + 1


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("finetune.poison_ratio=1.7", "finetune.poison_ratio", 1.7),
        ("finetune.poison_ratio=-0.1", "finetune.poison_ratio", -0.1),
        ("align.epochs=-1", "align.epochs", -1),
        ("finetune.epochs=-3", "finetune.epochs", -3),
        ("align.method=dpo", "align.method", "dpo"),
        ("finetune.method=lisa2", "finetune.method", "lisa2"),
        ("finetune.task=mnist", "finetune.task", "mnist"),
        ("align.lr=fast", "align.lr", "fast"),
        ("align.batch_size=2.5", "align.batch_size", 2.5),
        ("eval.judge.kind=gpt4", "eval.judge.kind", "gpt4"),
        ("align.lrr=0.1", "align.lrr", 0.1),
        ("base.tiny.num_heads=5", "base.tiny.num_heads", 5),
        ("data.toy.per_category_test=300", "data.toy.per_category_test", 300),
        ("tracking.enabled=maybe", "tracking.enabled", "maybe"),
        ("align.workers=0", "align.workers", 0),
        ("output_dir=s3://bucket/outputs", "output_dir", "s3://bucket/outputs"),  # a URI, not a mounted path
        ("cache_dir=gs://bucket/cache", "cache_dir", "gs://bucket/cache"),
    ],
)
def test_bad_values_name_field_and_value(override, field, value):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert err.value.field == field
    assert err.value.value == value
    assert str(err.value).startswith(f"{field}={value!r}")


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match=r"^trainer=.*unknown key"):
        build(Config, apply_overrides({}, ["trainer.lr=1"]))


def test_malformed_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# hftlab run bad.yaml\nalign:\n  lr: [1e-4\n")
    with pytest.raises(ConfigError, match=r"^config='.*bad.yaml': malformed YAML"):
        load_config(bad)


def test_section_given_a_scalar(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("align: 0.1\n")
    with pytest.raises(ConfigError, match=r"^align=0.1: must be a mapping"):
        load_config(bad)


def test_cli_reports_config_errors_with_exit_2(capsys):
    assert main(["run", str(QUICKSTART), "finetune.poison_ratio=1.7"]) == 2
    assert "finetune.poison_ratio=1.7: must be in [0, 1]" in capsys.readouterr().err


def test_job_entry_point_fails_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "jobs/run.py", "--config", "configs/smoke.yaml", f"output_dir={tmp_path / 'out'}",
                          "finetune.poison_ratio=1.7"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "finetune.poison_ratio=1.7" in out.stderr
    assert not (tmp_path / "out").exists()  # nothing was written


def test_cli_config_prints_resolved_yaml(capsys):
    assert main(["config", str(QUICKSTART), "seed=3"]) == 0
    assert "seed: 3" in capsys.readouterr().out


def test_align_job_is_the_pipeline_up_to_the_aligned_model_and_checks_first(tmp_path):
    out = subprocess.run([sys.executable, "jobs/align.py", "--config", "configs/smoke.yaml", f"output_dir={tmp_path / 'out'}",
                          "align.method=vaccine", "align.vaccine.rho=-1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "align.vaccine.rho=-1" in out.stderr
    assert not (tmp_path / "out").exists()


def test_missing_vllm_is_a_config_error_naming_the_field(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^eval\.backend='vllm': vLLM is not installed"):
        load_config(REPO / "configs" / "smoke.yaml", ["eval.backend=vllm"])
    with pytest.raises(ConfigError, match=r"^groups\.backend='vllm': vLLM is not installed"):
        load_config(REPO / "configs" / "smoke.yaml", ["groups.backend=vllm"])


def test_a_cache_key_does_not_depend_on_the_order_of_a_nested_dataclass_fields():
    """Stage keys hash dicts that hold config sections: a field moved to a base class must not retrain every stage."""
    from dataclasses import dataclass

    from hftlab.config.loader import digest

    @dataclass
    class Before:
        method: str = "sft"
        lr: float = 1e-4

    @dataclass
    class Recipe:
        lr: float = 1e-4

    @dataclass
    class After(Recipe):
        method: str = "sft"

    assert digest({"cfg": Before(), "parts": [Before()]}) == digest({"cfg": After(), "parts": [After()]})
    assert digest({"cfg": Before(lr=2e-4)}) != digest({"cfg": Before()})
