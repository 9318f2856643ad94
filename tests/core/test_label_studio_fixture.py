"""The Label Studio fixture starts a real server that the API token opens, on SQLite or PostgreSQL."""

import os

import httpx
import pytest

pytestmark = pytest.mark.label_studio


def test_real_label_studio_answers_with_token(label_studio, ls_client):
    me = ls_client.users.whoami()
    assert me.email == label_studio.username
    r = httpx.get(f"{label_studio.url}/api/projects/", headers={"Authorization": "Token wrong-token"})
    assert r.status_code == 401


def test_database_is_the_configured_one(label_studio):
    env = label_studio.environment()
    if os.environ.get("MAMMOFLAG_TEST_DB") == "postgres":
        import psycopg

        assert env["DJANGO_DB"] == "default"
        with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={env['POSTGRE_NAME']}") as conn:
            n = conn.execute("select count(*) from htx_user").fetchone()[0]
        assert n >= 1
    else:
        assert (label_studio.data_dir / "label_studio.sqlite3").exists()
