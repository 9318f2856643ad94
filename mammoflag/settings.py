"""One typed settings object, read from the environment once and passed in.

Secrets have no defaults: reading one that is unset raises :class:`MissingSecret`
naming the variable, at the moment a command needs it (not at import time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mammoflag.spec import DEFAULT_INPUT_SIZE


# torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, written out so that settings import no torchvision
IMAGENET_RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
SECRETS_FILE = "secrets.env"  # under MAMMOFLAG_HOME, mode 0600, written by `mammoflag up`


def home_of(env: Mapping[str, str]) -> Path:
    return Path(env.get("MAMMOFLAG_HOME") or Path.cwd() / "var").expanduser().resolve()


def read_secrets_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines; comments and blank lines ignored; no file: nothing."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def environment_with_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """The environment, with values from ``$MAMMOFLAG_HOME/secrets.env`` where it sets none."""
    return {**read_secrets_file(home_of(env) / SECRETS_FILE), **env}


class MissingSecret(RuntimeError):
    def __init__(self, var: str, purpose: str):
        super().__init__(f"{var} is not set ({purpose}); secrets have no defaults. "
                         f"`make start` generates them into var/secrets.env.")
        self.var = var


@dataclass(frozen=True)
class Secret:
    """A secret value that never shows up in repr() or logs."""

    var: str
    purpose: str
    value: str | None = field(default=None, repr=False)

    def get(self) -> str:
        if not self.value:
            raise MissingSecret(self.var, self.purpose)
        return self.value

    @property
    def is_set(self) -> bool:
        return bool(self.value)

    def __repr__(self) -> str:  # pragma: no cover - trivial
        return f"Secret({self.var}, {'set' if self.value else 'unset'})"


def _path(env: Mapping[str, str], var: str, default: Path) -> Path:
    return Path(env.get(var) or default).expanduser().resolve()


@dataclass(frozen=True)
class Settings:
    home: Path  # var/ : everything the platform writes by default
    data_root: Path  # display images; Label Studio serves files below it, nothing else
    models_dir: Path  # model registry
    label_config_path: Path | None
    label_studio_url: str
    label_studio_token: Secret
    patient_key_secret: Secret
    backend_user: str
    backend_password: Secret
    webhook_secret: Secret
    backend_url: str  # how Label Studio reaches the ML backend
    broker_url: str
    result_backend: str
    retrain_min_new_annotations: int
    retrain_time_limit_s: int
    display_long_side: int
    input_size: int  # model input side in pixels (the model spec records it per version)
    pretrained_weights: Path | None  # ImageNet ResNet18 state dict; torch hub cache is tried when unset
    # where a ResNet18 body's ImageNet weights come from when neither exists (torchvision's file, its SHA-256
    # checked by its name); "" (MAMMOFLAG_PRETRAINED_DOWNLOAD=0): never download, train from random weights
    pretrained_url: str
    target_sensitivity: float
    log_level: str
    # Label Studio users (emails or ids) whose answer settles a disputed task (docs/CONTRACTS.md)
    adjudicators: frozenset[str] = frozenset()
    # MAMMOFLAG_TRAIN_<KNOB> values by knob name (lower case), parsed by training.train.TrainConfig
    train_knobs: Mapping[str, str] = field(default_factory=dict)
    # The labeling pool (ml_backend/pool.py): unlabeled tasks a project holds at most, and archive
    # images scored per top-up round (the rotating candidate window), and the seconds after a round's
    # start past which no more window images are started (the pool itself is always re-predicted; 0: none)
    pool_size: int = 2000
    pool_window: int = 1000
    pool_round_s: float = 50.0
    pool_workers: int = 0  # processes scoring a round (pool + window); 0: one per core, at most 4
    # A DICOMweb archive (mammoflag/dicomweb.py): HTTP basic user + password, or a bearer token; no defaults
    dicomweb_user: str = ""
    dicomweb_password: Secret = Secret("MAMMOFLAG_DICOMWEB_PASSWORD", "password of MAMMOFLAG_DICOMWEB_USER on the "
                                       "DICOMweb server")
    dicomweb_token: Secret = Secret("MAMMOFLAG_DICOMWEB_TOKEN", "bearer token for the DICOMweb server")
    dicomweb_retries: int = 5  # tries per DICOMweb request (5xx, timeouts, lost connections), with back-off
    dicomweb_timeout_s: float = 120.0  # read timeout of one DICOMweb request

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        home = _path(env, "MAMMOFLAG_HOME", Path.cwd() / "var")
        broker = env.get("MAMMOFLAG_BROKER_URL") or f"sqla+sqlite:///{home / 'celery-broker.sqlite'}"
        return cls(
            home=home,
            data_root=_path(env, "MAMMOFLAG_DATA_ROOT", home / "data"),
            models_dir=_path(env, "MAMMOFLAG_MODELS_DIR", home / "models"),
            label_config_path=Path(env["MAMMOFLAG_LABEL_CONFIG"]) if env.get("MAMMOFLAG_LABEL_CONFIG") else None,
            label_studio_url=(env.get("MAMMOFLAG_LABEL_STUDIO_URL") or "http://127.0.0.1:8080").rstrip("/"),
            label_studio_token=Secret("MAMMOFLAG_LABEL_STUDIO_TOKEN", "Label Studio API token",
                                      env.get("MAMMOFLAG_LABEL_STUDIO_TOKEN")),
            patient_key_secret=Secret("MAMMOFLAG_PATIENT_KEY_SECRET", "key for hashing PatientID into patient_key",
                                      env.get("MAMMOFLAG_PATIENT_KEY_SECRET")),
            backend_user=env.get("MAMMOFLAG_BACKEND_USER") or "labelstudio",
            backend_password=Secret("MAMMOFLAG_BACKEND_PASSWORD", "basic-auth password of the ML backend",
                                    env.get("MAMMOFLAG_BACKEND_PASSWORD")),
            webhook_secret=Secret("MAMMOFLAG_WEBHOOK_SECRET", "shared secret header on Label Studio webhooks",
                                  env.get("MAMMOFLAG_WEBHOOK_SECRET")),
            backend_url=(env.get("MAMMOFLAG_BACKEND_URL") or "http://127.0.0.1:9090").rstrip("/"),
            broker_url=broker,
            result_backend=env.get("MAMMOFLAG_RESULT_BACKEND")
            or (broker if broker.startswith("redis") else f"db+sqlite:///{home / 'celery-results.sqlite'}"),
            retrain_min_new_annotations=int(env.get("MAMMOFLAG_RETRAIN_MIN_NEW", "20")),
            retrain_time_limit_s=int(env.get("MAMMOFLAG_RETRAIN_TIME_LIMIT_S", "1800")),
            display_long_side=int(env.get("MAMMOFLAG_DISPLAY_LONG_SIDE", "1024")),
            input_size=int(env.get("MAMMOFLAG_INPUT_SIZE", str(DEFAULT_INPUT_SIZE))),
            pretrained_weights=Path(env["MAMMOFLAG_PRETRAINED_WEIGHTS"]).expanduser()
            if env.get("MAMMOFLAG_PRETRAINED_WEIGHTS") else None,
            pretrained_url="" if (env.get("MAMMOFLAG_PRETRAINED_DOWNLOAD") or "1").lower() in ("0", "false", "no")
            else env.get("MAMMOFLAG_PRETRAINED_URL") or IMAGENET_RESNET18_URL,
            target_sensitivity=float(env.get("MAMMOFLAG_TARGET_SENSITIVITY", "0.95")),
            log_level=env.get("MAMMOFLAG_LOG_LEVEL", "INFO"),
            adjudicators=frozenset(a.strip().lower() for a in (env.get("MAMMOFLAG_ADJUDICATORS") or "").split(",")
                                   if a.strip()),
            train_knobs={k[len("MAMMOFLAG_TRAIN_"):].lower(): v for k, v in env.items()
                         if k.startswith("MAMMOFLAG_TRAIN_") and v},
            pool_size=int(env.get("MAMMOFLAG_POOL_SIZE", "2000")),
            pool_window=int(env.get("MAMMOFLAG_POOL_WINDOW", "1000")),
            pool_round_s=float(env.get("MAMMOFLAG_POOL_ROUND_S", "50")),
            pool_workers=int(env.get("MAMMOFLAG_POOL_WORKERS", "0")),
            dicomweb_user=(env.get("MAMMOFLAG_DICOMWEB_USER") or "").strip(),
            dicomweb_password=Secret("MAMMOFLAG_DICOMWEB_PASSWORD", "password of MAMMOFLAG_DICOMWEB_USER on the "
                                     "DICOMweb server", env.get("MAMMOFLAG_DICOMWEB_PASSWORD")),
            dicomweb_token=Secret("MAMMOFLAG_DICOMWEB_TOKEN", "bearer token for the DICOMweb server",
                                  env.get("MAMMOFLAG_DICOMWEB_TOKEN")),
            dicomweb_retries=int(env.get("MAMMOFLAG_DICOMWEB_RETRIES", "5")),
            dicomweb_timeout_s=float(env.get("MAMMOFLAG_DICOMWEB_TIMEOUT_S", "120")),
        )

    def label_config(self):
        from label_config import load_label_config

        return load_label_config(self.label_config_path)
