"""`mammoflag up`'s home is private to its user, and a leftover secrets.tmp cannot expose the secrets."""

from __future__ import annotations

import os
import stat

from mammoflag.platform import SECRETS_FILE, ensure_secrets, make_private


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_home_and_everything_under_it_is_private(tmp_path):
    home = tmp_path / "home"
    (home / "label-studio").mkdir(parents=True)
    db = home / "label-studio" / "label_studio.sqlite3"
    db.write_text("admin token in clear")
    os.chmod(db, 0o644)
    os.chmod(home / "label-studio", 0o755)
    os.chmod(home, 0o755)
    make_private(home)
    assert (mode(home), mode(home / "label-studio"), mode(db)) == (0o700, 0o700, 0o600)


def test_a_leftover_world_readable_secrets_tmp_does_not_leak(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    leftover = home / "secrets.tmp"
    leftover.write_text("junk")
    os.chmod(leftover, 0o644)
    generated = ensure_secrets(home)
    assert generated and mode(home / SECRETS_FILE) == 0o600
    assert not leftover.exists()
    assert not list(home.glob("*.partial"))
