"""`mammoflag up`'s secrets: generated once, private, never defaulted, and read by every command."""

from __future__ import annotations

import stat

from mammoflag.platform import GENERATED_SECRETS, ensure_secrets
from mammoflag.settings import SECRETS_FILE, environment_with_secrets
from mammoflag.settings import Settings


def test_secrets_are_generated_once_private_and_unique(tmp_path):
    first = ensure_secrets(tmp_path)
    assert set(first) == set(GENERATED_SECRETS)
    assert len(set(first.values())) == len(first)  # no shared or constant value
    assert all(len(v) >= 32 for v in first.values())
    path = tmp_path / SECRETS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_secrets(tmp_path) == first  # a restart keeps the same token and passwords
    assert ensure_secrets(tmp_path / "other") != first


def test_environment_wins_over_the_secrets_file(tmp_path):
    generated = ensure_secrets(tmp_path)
    env = environment_with_secrets({"MAMMOFLAG_HOME": str(tmp_path), "MAMMOFLAG_WEBHOOK_SECRET": "from-env-123"})
    settings = Settings.from_env(env)
    assert settings.webhook_secret.get() == "from-env-123"
    assert settings.backend_password.get() == generated["MAMMOFLAG_BACKEND_PASSWORD"]
    assert not Settings.from_env({"MAMMOFLAG_HOME": str(tmp_path / "none")}).backend_password.is_set
