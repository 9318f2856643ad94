"""The trust gate at the flagger: only learned classes are flagged by default, refusals name the class.

The model is the tiny hand-set one with verdicts stated in its card (biopsy_tool not learned,
mag_view learned), run through the real ``mammoflag flag`` / ``mammoflag cohort`` commands.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from factories import tiny_model_version
from flagger.core import FlagOptions, FlagOutputs, flag_cohort
from flagger.reliability import UnreliableClass, select_classes
from flagger_cohorts import read_csv
from mammoflag.card import Verdict

REPO = Path(__file__).resolve().parents[2]
HALF = {"biopsy_tool": Verdict.NOT_LEARNED, "mag_view": Verdict.LEARNED}


@pytest.fixture(scope="module")
def half_learned(tmp_path_factory, flag_spec) -> Path:
    root = tmp_path_factory.mktemp("half-learned")
    tiny_model_version(root, flag_spec, verdicts=HALF)
    return root


def _mammoflag(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAMMOFLAG_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-m", "mammoflag.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_by_default_only_learned_classes_are_flagged(known_cohort, half_learned, tmp_path):
    from mammoflag.registry import resolve_model

    out = FlagOutputs(tmp_path / "flags.csv", images=tmp_path / "images.csv")
    summary = flag_cohort(known_cohort, resolve_model(half_learned), out,
                          options=FlagOptions(workers=0, progress=False))
    rows = read_csv(out.flags)
    assert rows and all(r["flag_biopsy_tool"] == "" and r["source_biopsy_tool"] == "" for r in rows)
    assert all(r["reliable_biopsy_tool"] == "0" and r["reliable_mag_view"] == "1" for r in rows)
    assert {r["flag_mag_view"] for r in rows} == {"0", "1"}  # the learned class is flagged as before
    assert all(r["max_prob_biopsy_tool"] for r in rows)  # the probabilities are still there to look at
    assert set(summary.flagged) == {"mag_view"}
    images = read_csv(out.images)
    assert all(r["flag_biopsy_tool"] == "" and r["prob_biopsy_tool"] for r in images)


def test_asking_for_an_unlearned_class_is_refused_naming_it(known_cohort, half_learned, tmp_path):
    refused = _mammoflag(tmp_path, "flag", str(known_cohort), "--model", str(half_learned), "--out",
                         str(tmp_path / "f.csv"), "--classes", "biopsy_tool", "--no-progress")
    assert refused.returncode == 2 and not (tmp_path / "f.csv").exists()
    assert "biopsy_tool: NOT LEARNED" in refused.stderr and "--allow-unreliable" in refused.stderr

    allowed = _mammoflag(tmp_path, "flag", str(known_cohort), "--model", str(half_learned), "--out",
                         str(tmp_path / "f.csv"), "--allow-unreliable", "--no-progress")
    assert allowed.returncode == 0, allowed.stderr
    assert "flagged anyway (--allow-unreliable)" in allowed.stderr
    rows = read_csv(tmp_path / "f.csv")
    assert {r["flag_biopsy_tool"] for r in rows} == {"0", "1"} and {r["reliable_biopsy_tool"] for r in rows} == {"0"}

    # the cohort export refuses to select on the unreliable class, and says what the card says
    cohort = _mammoflag(tmp_path, "cohort", str(tmp_path / "f.csv"), "--where", "flag_biopsy_tool=1", "--out",
                        str(tmp_path / "c.csv"))
    assert cohort.returncode == 2 and "refusing to select on biopsy_tool" in cohort.stderr
    assert not (tmp_path / "c.csv").exists()
    ok = _mammoflag(tmp_path, "cohort", str(tmp_path / "f.csv"), "--where", "flag_mag_view=1", "--out",
                    str(tmp_path / "c.csv"))
    assert ok.returncode == 0, ok.stderr
    anyway = _mammoflag(tmp_path, "cohort", str(tmp_path / "f.csv"), "--where", "flag_biopsy_tool=1",
                        "--allow-unreliable", "--out", str(tmp_path / "c2.csv"))
    assert anyway.returncode == 0 and read_csv(tmp_path / "c2.csv")


def test_a_model_that_learned_nothing_flags_nothing(flag_spec, tmp_path):
    from mammoflag.registry import resolve_model

    root = tmp_path / "models"
    tiny_model_version(root, flag_spec, verdicts={c: Verdict.INSUFFICIENT_EVIDENCE for c in flag_spec.classes})
    with pytest.raises(UnreliableClass, match="no class of model .* is learned"):
        select_classes(resolve_model(root).card)
    selection, warnings = select_classes(resolve_model(root).card, allow_unreliable=True)
    assert selection.flagged == set(flag_spec.classes) and not any(selection.reliable(c) for c in flag_spec.classes)
    assert len(warnings) == 2


def test_studies_from_manufacturers_the_card_never_validated_on_are_named(known_cohort, tmp_path, flag_spec):
    """The verdicts speak for the manufacturers of the validation images; the run names the others and counts
    their studies (flags.csv itself is unchanged), and says nothing when every manufacturer was validated."""
    from collections import Counter

    from mammoflag.registry import resolve_model

    tiny_model_version(tmp_path / "m0", flag_spec, verdicts=HALF)
    first = FlagOutputs(tmp_path / "all.csv")
    flag_cohort(known_cohort, resolve_model(tmp_path / "m0"), first, options=FlagOptions(workers=0, progress=False))
    by_maker = Counter(r["manufacturer"] for r in read_csv(first.flags))
    assert len(by_maker) >= 2, by_maker  # the cohort has several manufacturers to tell apart
    seen, *unseen = sorted(by_maker)

    tiny_model_version(tmp_path / "m1", flag_spec, verdicts=HALF, validated_manufacturers=[seen])
    out = FlagOutputs(tmp_path / "flags.csv")
    summary = flag_cohort(known_cohort, resolve_model(tmp_path / "m1"), out,
                          options=FlagOptions(workers=0, progress=False))
    assert summary.unvalidated == {m: by_maker[m] for m in unseen}
    text = summary.format()
    assert f"{sum(by_maker[m] for m in unseen)} of {summary.studies} studies come from manufacturers" in text
    assert all(f"{m}: {by_maker[m]}" in text for m in unseen) and f"{seen}:" not in text
    def cells(path):  # every cell but the model's name
        return [{k: v for k, v in r.items() if k != "model_version"} for r in read_csv(path)]

    assert cells(out.flags) == cells(first.flags)  # a report, not a change to the flags

    everyone = tiny_model_version(tmp_path / "m2", flag_spec, verdicts=HALF, validated_manufacturers=sorted(by_maker))
    assert everyone.card.metrics.by_manufacturer
    quiet = flag_cohort(known_cohort, resolve_model(tmp_path / "m2"), FlagOutputs(tmp_path / "q.csv"),
                        options=FlagOptions(workers=0, progress=False))
    assert quiet.unvalidated == {} and "never validated" not in quiet.format()
