"""Promotion never lets trust regress: a version that has not learned a class cannot replace one that has."""

from __future__ import annotations

import numpy as np

from factories import tiny_model_version
from label_config import load_label_config
from mammoflag.card import ClassTrust, TrustGate, TrustRule, Verdict
from mammoflag.preprocess import CHANNELS
from mammoflag.registry import Registry
from mammoflag.spec import ModelSpec
from training.promotion import decide_promotion, trust_regressions


def _gate(**verdicts: Verdict) -> TrustGate:
    return TrustGate(TrustRule(), {c: ClassTrust(v, f"{c} stated {v.value}", 20, 20) for c, v in verdicts.items()})


def _inputs(n: int, size: int):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (n, len(CHANNELS), size, size)).astype(np.float32)  # the model input's planes
    y = np.stack([np.arange(n) % 2, (np.arange(n) // 2) % 2], axis=1).astype(np.float32)
    return x, y


def test_a_version_that_has_not_learned_a_class_never_replaces_one_that_has(tmp_path):
    spec = ModelSpec.from_label_config(load_label_config(), input_size=32)
    current = tiny_model_version(tmp_path / "models", spec)  # its card: every class learned
    x, y = _inputs(16, 32)
    better = y + 0.0  # a perfect candidate on this validation set ...
    lost = _gate(biopsy_tool=Verdict.NOT_LEARNED, mag_view=Verdict.LEARNED)  # ... whose gate says otherwise
    assert trust_regressions(lost, current) == ["biopsy_tool"]
    decision = decide_promotion(better, x, y, [], spec, lost, current, epsilon=0.005)
    assert not decision.become_current and "trust would regress" in decision.reason
    assert "biopsy_tool: NOT LEARNED" in decision.reason and decision.compared_with == current.name
    assert decision.new_mean_auroc == 1.0 and decision.current_mean_auroc is not None

    kept = _gate(biopsy_tool=Verdict.LEARNED, mag_view=Verdict.LEARNED)
    assert decide_promotion(better, x, y, [], spec, kept, current, epsilon=0.005).become_current


def test_a_current_version_that_learned_nothing_does_not_block(tmp_path):
    spec = ModelSpec.from_label_config(load_label_config(), input_size=32)
    unlearned = {c: Verdict.NOT_LEARNED for c in spec.classes}
    current = tiny_model_version(tmp_path / "models", spec, verdicts=unlearned)
    assert Registry(tmp_path / "models").current().card.trust.learned_classes() == ()
    x, y = _inputs(16, 32)
    gate = _gate(biopsy_tool=Verdict.INSUFFICIENT_EVIDENCE, mag_view=Verdict.NOT_LEARNED)
    assert trust_regressions(gate, current) == []
    assert decide_promotion(y + 0.0, x, y, [], spec, gate, current, epsilon=0.005).become_current
