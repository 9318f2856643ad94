"""ImageNet weights for a ResNet18 body: configured, cached, or downloaded as torchvision does (SHA-256 checked).

The downloads come from a real HTTP server on a loopback port, never from the internet."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from mammoflag.fileio import download_checked, sha256_prefix_of
from mammoflag.settings import IMAGENET_RESNET18_URL, Settings


@pytest.fixture
def http_root(tmp_path):
    """(folder served, base URL): a threaded HTTP server on 127.0.0.1, stopped after the test."""
    root = tmp_path / "served"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _served(root: Path, stem: str, data: bytes, prefix: str | None = None) -> str:
    """Serve ``data`` as <stem>-<sha256 prefix>.pth (``prefix`` overrides the true one); return the name."""
    name = f"{stem}-{prefix or hashlib.sha256(data).hexdigest()[:8]}.pth"
    (root / name).write_bytes(data)
    return name


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchvision_names_carry_their_hash():
    assert sha256_prefix_of("resnet18-f37072fd.pth") == "f37072fd"
    assert sha256_prefix_of(Path(IMAGENET_RESNET18_URL).name) == "f37072fd"
    assert sha256_prefix_of("weights.pth") is None


def test_a_download_whose_bytes_match_its_name_is_kept(http_root, tmp_path):
    root, base = http_root
    data = np.random.default_rng(0).bytes(3 << 20)  # more than one read chunk
    name = _served(root, "body", data)
    dest = tmp_path / "cache" / name
    assert download_checked(f"{base}/{name}", dest) == dest
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == [name]  # no partial file left beside it


def test_bytes_that_do_not_match_are_refused_and_nothing_is_left(http_root, tmp_path):
    root, base = http_root
    name = _served(root, "body", b"not the weights", prefix="0123abcd")
    dest = tmp_path / "cache" / name
    with pytest.raises(ValueError, match=r"body-0123abcd\.pth.*does not start with 0123abcd"):
        download_checked(f"{base}/{name}", dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_a_name_without_a_hash_or_a_non_http_url_is_refused(http_root, tmp_path):
    root, base = http_root
    (root / "weights.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="no SHA-256 prefix"):
        download_checked(f"{base}/weights.pth", tmp_path / "w.pth")
    with pytest.raises(ValueError, match="only http"):
        download_checked(f"file://{root}/body-00000000.pth", tmp_path / "w.pth")


def test_unreachable_and_missing_are_oserrors(http_root, tmp_path):
    _, base = http_root
    with pytest.raises(OSError):
        download_checked(f"http://127.0.0.1:{_closed_port()}/body-0123abcd.pth", tmp_path / "w.pth", timeout_s=2)
    with pytest.raises(OSError):  # HTTP 404 (urllib's HTTPError is an OSError)
        download_checked(f"{base}/absent-0123abcd.pth", tmp_path / "w.pth", timeout_s=2)
    assert list(tmp_path.glob("*.partial")) == []


def test_settings_download_by_default_and_can_be_told_not_to():
    assert Settings.from_env({}).pretrained_url == IMAGENET_RESNET18_URL
    assert Settings.from_env({"MAMMOFLAG_PRETRAINED_URL": "http://mirror/x-1234abcd.pth"}).pretrained_url \
        == "http://mirror/x-1234abcd.pth"
    assert Settings.from_env({"MAMMOFLAG_PRETRAINED_DOWNLOAD": "0"}).pretrained_url == ""

    from training.train import TrainConfig

    assert TrainConfig.from_settings(Settings.from_env({})).pretrained_url == IMAGENET_RESNET18_URL
    assert TrainConfig.from_settings(Settings.from_env({"MAMMOFLAG_PRETRAINED_DOWNLOAD": "0"})).pretrained_url is None
    assert TrainConfig().pretrained_url is None  # built by hand (benchmarks, tests): never downloads


def test_resnet18_downloads_its_weights_once_then_reads_the_cache(http_root, tmp_path, monkeypatch, spec, caplog):
    """The whole path: absent weights are downloaded into the torch hub cache, the body starts from them and
    the card says so; the next run reads the cache; offline, it trains from random weights and says why."""
    import torch
    from torchvision.models import resnet18

    from training.train import TrainConfig, _initialise, build_learner

    root, base = http_root
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # torch.hub.get_dir() follows it
    torch.manual_seed(3)
    reference = resnet18()
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    name = _served(root, "resnet18-test", weights.read_bytes())
    x = np.zeros((4, 3, 64, 64), np.float32)
    y = np.zeros((4, 2), np.float32)
    config = TrainConfig(architecture="resnet18", pretrained_url=f"{base}/{name}")

    learn = build_learner(x, y, x, y, 2, config)
    with caplog.at_level("WARNING"):
        assert _initialise(learn, config, None, spec) == f"imagenet:downloaded:{name}"
    assert "downloaded ImageNet ResNet18 weights" in caplog.text and "SHA-256 checked" in caplog.text
    assert torch.equal(learn.model[0][0].weight, reference.conv1.weight)
    assert (tmp_path / "torch-home" / "hub" / "checkpoints" / name).is_file()

    (root / name).unlink()  # the server no longer has it: the cache must answer
    again = build_learner(x, y, x, y, 2, config)
    assert _initialise(again, config, None, spec) == f"imagenet:{name}"
    assert torch.equal(again.model[0][0].weight, reference.conv1.weight)

    unreachable = f"http://127.0.0.1:{_closed_port()}/resnet18-other-0123abcd.pth"
    offline = TrainConfig(architecture="resnet18", pretrained_url=unreachable)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _initialise(build_learner(x, y, x, y, 2, offline), offline, None, spec) == "random-init"
    assert "could not download" in caplog.text and "RANDOM INITIALISATION" in caplog.text
