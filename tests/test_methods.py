"""A method is one record (training/methods.py): the platform asks the record, so a new defense needs no other edit."""

from __future__ import annotations

import pytest

from hftlab.config import ConfigError
from hftlab.training.methods import REGISTRY, Method, method_of, names, register


def ascent_record(calls: dict) -> Method:
    """A toy defense: the alignment loss minus a tenth of the loss on a harmful side batch (gradient ascent on
    harmful answers, a classic unlearning baseline), declared as a record and nothing else."""

    def build(stage, engine, inputs):
        def step(model, batch, eng):
            loss = inputs.loss_fn(model, batch)
            harmful = inputs.loss_fn(model, inputs.side())
            eng.backward(loss - 0.1 * harmful)
            eng.step()
            calls["steps"] += 1
            calls["harmful"].append(harmful.item())
            return {"loss": loss.item(), "harmful_loss": harmful.item(), "n_backward": 1}

        return step

    return Method("ascent", ("align",), passes=lambda stage, total: 2.0, build=build, side="harmful")


@pytest.fixture
def ascent():
    calls: dict = {"steps": 0, "harmful": []}
    register(ascent_record(calls))
    yield calls
    REGISTRY.pop("ascent")


@pytest.mark.slow
def test_a_method_registered_through_its_record_alone_runs_through_the_smoke_pipeline(smoke, ascent):
    from hftlab.plan.estimate import stages_of
    from hftlab.run.pipeline import run
    from hftlab.training.methods import step_budget

    cfg = smoke("align.method=ascent", "align.epochs=1", "finetune.epochs=1", "tracking.enabled=false")
    assert "ascent" in names("align") and "ascent" not in names("finetune")
    align = next(s for s in stages_of(cfg) if s.kind == "align")
    assert align.passes == 2.0  # the planner costs it by its record

    summary = run(cfg, log=lambda *_: None)
    for stage in ("base", "aligned", "finetuned"):
        assert 0.0 <= summary[stage]["hs"] <= 100.0 and 0.0 <= summary[stage]["fa"] <= 100.0
    from hftlab.run.inputs import plan

    p = plan(cfg)
    assert ascent["steps"] == step_budget(cfg.align, len(p.align_pairs)) > 0  # every step was the record's
    assert ascent["harmful"][-1] > ascent["harmful"][0]  # and it read the harmful side data it asked for
    assert summary["aligned"]["hs"] <= summary["base"]["hs"]


def test_a_record_without_a_cost_or_stage_is_refused_and_an_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match="passes"):
        register(Method("free", ("align",), passes=None, build=lambda *a: None))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kinds"):
        register(Method("nowhere", ("eval",), passes=lambda s, t: 1.0, build=lambda *a: None))
    assert "free" not in REGISTRY and "nowhere" not in REGISTRY
    from hftlab.config.schema import AlignConfig, FinetuneConfig

    with pytest.raises(ConfigError, match=r"^method='ascent'.*'vaa'"):
        AlignConfig(method="ascent")
    with pytest.raises(ConfigError, match=r"^method='vaa'.*'safegrad'"):
        FinetuneConfig(method="vaa")
    assert method_of(AlignConfig(method="vaa")).grouped and method_of(FinetuneConfig(method="safegrad")).side == "alignment"


def test_method_names_appear_only_in_their_records_algorithms_and_config():
    """No module compares a method's name: grep for each quoted name finds its record, its algorithm or the config."""
    import re

    from tests.conftest import REPO

    package = REPO / "platform" / "hftlab"
    allowed = {"training/method.py", "training/builtin_methods.py", "config/stages.py", "config/methods.py"}
    for name in REGISTRY:
        found = {str(p.relative_to(package)) for p in package.rglob("*.py")
                 if re.search(rf"""["']{name}["']""", p.read_text())}
        assert found <= allowed | {f"algorithms/{name}.py"}, (name, found - allowed)
