"""Fixtures of the ML backend tests (helpers live in mlb_helpers.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from factories import tiny_model_version
from mlb_helpers import BackendProcess, backend_environment, model_spec, start_backend, stop_backend


@pytest.fixture
def backend_factory(tmp_path):
    """start(env) -> BackendProcess; every backend started is stopped after the test."""
    started: list[BackendProcess] = []

    def start(env: dict[str, str]) -> BackendProcess:
        b = start_backend(env, tmp_path / f"backend-{uuid.uuid4().hex[:6]}.log")
        started.append(b)
        return b

    yield start
    for b in started:
        stop_backend(b)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, label_studio, data_root, redis_url):
    """A tiny current model and the backend process, wired to the session's Label Studio."""
    home = tmp_path_factory.mktemp("mlb-home")
    env = backend_environment(home, data_root, redis_url, MAMMOFLAG_LABEL_STUDIO_URL=label_studio.url,
                              MAMMOFLAG_LABEL_STUDIO_TOKEN=label_studio.token)
    version = tiny_model_version(Path(env["MAMMOFLAG_MODELS_DIR"]), model_spec())
    backend = start_backend(env, home / "backend.log")
    env["MAMMOFLAG_BACKEND_URL"] = backend.url
    backend.env = env
    backend.version = version  # type: ignore[attr-defined]
    yield backend
    stop_backend(backend)
