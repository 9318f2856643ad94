"""docker-compose.yml: the production stack has every service, no default secret, and SSRF stays on."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import yaml

from mammoflag.label_studio_server import BANNED_SUBNETS_EXCEPT_LOOPBACK

REPO = Path(__file__).resolve().parents[2]
# Label Studio's default SSRF ban list, plus loopback (allowed only in the one-machine set-up)
DEFAULT_BANNED = BANNED_SUBNETS_EXCEPT_LOOPBACK.split(",") + ["127.0.0.0/8", "::1/128"]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_stack_has_label_studio_on_postgres_redis_backend_and_workers():
    services = compose()["services"]
    assert {"postgres", "redis", "label-studio", "ml-backend", "worker"} <= set(services)
    ls_env = services["label-studio"]["environment"]
    assert ls_env["DJANGO_DB"] == "default" and ls_env["POSTGRE_HOST"] == "postgres"
    assert ls_env["LOCAL_FILES_DOCUMENT_ROOT"] == "/data"
    for name in ("ml-backend", "worker"):
        assert services[name]["environment"]["MAMMOFLAG_BROKER_URL"].startswith("redis://redis:")
    assert "mammoflag.worker" in services["worker"]["command"]


def test_no_secret_has_a_default():
    text = (REPO / "docker-compose.yml").read_text()
    secret_vars = re.findall(r"\$\{(\w*(?:PASSWORD|TOKEN|SECRET)\w*)([^}]*)\}", text)
    assert secret_vars, "expected secrets to come from the environment"
    for var, rest in secret_vars:
        assert rest.startswith(":?"), f"{var} must be required (${{{var}:?...}}), not defaulted"
    example = (REPO / "deploy" / "env.example").read_text()
    for var, _ in secret_vars:
        assert re.search(rf"^{var}=$", example, re.M), f"{var} missing (or filled in) in deploy/env.example"


def test_ssrf_ban_list_frees_only_the_stacks_own_network():
    services = compose()["services"]
    env = services["label-studio"]["environment"]
    assert env["SSRF_PROTECTION_ENABLED"] == "true" and env["USE_DEFAULT_BANNED_SUBNETS"] == "false"
    banned = [ipaddress.ip_network(n) for n in env["USER_ADDITIONAL_BANNED_SUBNETS"].split(",")]
    own = ipaddress.ip_network(compose()["networks"]["default"]["ipam"]["config"][0]["subnet"])
    assert not any(own.overlaps(n) for n in banned if n.version == own.version)
    # every address of every default-banned range outside our own network is still banned
    for default in map(ipaddress.ip_network, DEFAULT_BANNED):
        inside = default.version == own.version and own.subnet_of(default)
        parts = list(default.address_exclude(own)) if inside else [default]
        for part in parts:
            assert any(part.subnet_of(n) for n in banned if n.version == part.version), f"{part} is no longer banned"
