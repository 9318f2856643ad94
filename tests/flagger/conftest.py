"""Fixtures of the flagger tests: the tiny model's registry and the known cohort (see flagger_cohorts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from factories import tiny_model_version
from flagger_cohorts import KNOWN_STUDIES, TEMPERATURES, THRESHOLDS, write_display_cohort
from label_config import load_label_config
from mammoflag.spec import ModelSpec


@pytest.fixture(scope="session")
def flag_spec() -> ModelSpec:
    return ModelSpec.from_label_config(load_label_config(), input_size=64).with_calibration(TEMPERATURES, THRESHOLDS)


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory, flag_spec) -> Path:
    root = tmp_path_factory.mktemp("flagger-models")
    tiny_model_version(root, flag_spec)
    return root


@pytest.fixture(scope="session")
def known_cohort(tmp_path_factory) -> Path:
    return write_display_cohort(tmp_path_factory.mktemp("known-cohort"), KNOWN_STUDIES)


