"""Fixtures for the training tests: the model spec at CI size and a small fake-free display set."""

from __future__ import annotations


import pytest

from mammoflag.settings import Settings
from mammoflag.spec import ModelSpec

TEST_INPUT_SIZE = 64


@pytest.fixture(scope="session")
def spec() -> ModelSpec:
    return ModelSpec.from_label_config(Settings.from_env({}).label_config(), input_size=TEST_INPUT_SIZE)
