"""`mammoflag users add EMAIL` against a real Label Studio: an invitation link that works, signup
without it (or with a reset one) refused, no password anywhere in what the command prints."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from mammoflag.users import invitation, members

pytestmark = pytest.mark.label_studio
REPO = Path(__file__).resolve().parents[2]


def _signup(base_url: str, token: str | None, email: str, password: str) -> int:
    path = "/user/signup/" + (f"?token={token}" if token else "")
    with httpx.Client(base_url=base_url, follow_redirects=False, timeout=30) as c:
        c.get(path)
        r = c.post(path, data={"email": email, "password": password, "csrfmiddlewaretoken": c.cookies["csrftoken"]},
                   headers={"Referer": base_url + path})
        return r.status_code


def test_users_add_prints_a_working_invitation_and_no_password(label_studio, ls_client, tmp_path):
    email = f"reader-{secrets.token_hex(3)}@annotators.mammoflag.test"
    env = {"MAMMOFLAG_HOME": str(tmp_path), "MAMMOFLAG_LABEL_STUDIO_URL": label_studio.url,
           "MAMMOFLAG_LABEL_STUDIO_TOKEN": label_studio.token, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "mammoflag.cli", "users", "add", email], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    [link] = [w for w in out.split() if w.startswith(label_studio.url)]
    token = parse_qs(urlsplit(link).query)["token"][0]
    assert label_studio.password not in out and label_studio.token not in out
    assert "only on this machine" in out  # a loopback URL says so

    password = secrets.token_urlsafe(12)  # the annotator's own, never seen by mammoflag
    assert _signup(label_studio.url, None, f"x{email}", password) == 403  # no link: refused
    assert _signup(label_studio.url, token, email, password) == 302  # signed up, redirected in
    joined = {m.email: m.id for m in members(ls_client)}
    assert email in joined
    again = invitation(ls_client, label_studio.url, email)
    assert again.existing_user_id == joined[email] and "already a member" in again.as_text()

    # a new link revokes the old one
    fresh = invitation(ls_client, label_studio.url, f"y{email}", new_link=True)
    assert token not in fresh.link
    assert _signup(label_studio.url, token, f"z{email}", password) == 403
    with pytest.raises(ValueError):
        invitation(ls_client, label_studio.url, "not an email")
