"""mammoflag.dicomweb without Orthanc: URLs, queries, credentials, and the retry rules against a tiny HTTP server."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from mammoflag.dicomweb import (
    DicomWebAccessError,
    DicomWebAuth,
    DicomWebClient,
    DicomWebQuery,
    DicomWebSource,
    DicomWebUnavailable,
    DicomWebUrlError,
    InstanceRef,
    InstanceUnavailable,
    RetryPolicy,
    is_dicomweb_url,
)
from mammoflag.settings import MissingSecret, Secret, Settings


def test_source_urls():
    assert DicomWebSource.parse("dicomweb+http://pacs:8042/dicom-web/").base_url == "http://pacs:8042/dicom-web"
    assert str(DicomWebSource.parse("dicomweb+https://h/x")) == "dicomweb+https://h/x"
    assert is_dicomweb_url("DICOMWEB+HTTPS://h") and not is_dicomweb_url("/data/dicom")
    for bad in ("http://h/dicom-web", "dicomweb+ftp://h", "dicomweb+http:///x", "dicomweb+http://h:99999/x",
                "dicomweb+http://h/x?PatientID=1"):
        with pytest.raises(DicomWebUrlError):
            DicomWebSource.parse(bad)
    with pytest.raises(DicomWebUrlError) as caught:
        DicomWebSource.parse("dicomweb+http://reader:s3cret-pw@h/dicom-web")
    assert "s3cret-pw" not in str(caught.value) and "MAMMOFLAG_DICOMWEB_USER" in str(caught.value)


def test_queries_and_refs():
    q = DicomWebQuery.parse(["StudyDate=20240101-20241231", "00081030=SCREEN*"], "mg")
    assert q.modality == "MG" and q.filters == (("StudyDate", "20240101-20241231"), ("00081030", "SCREEN*"))
    assert DicomWebQuery.parse([], "*").modality == ""
    for bad in (["StudyDate"], ["Study Date=1"], ["=x"]):
        with pytest.raises(ValueError):
            DicomWebQuery.parse(bad)
    ref = InstanceRef("1.2", "1.2.3", "1.2.3.4")
    assert InstanceRef.from_path(ref.path) == ref
    for bad in ("studies/1/series/2", "studies/../series/2/instances/3", "x/1/series/2/instances/3"):
        with pytest.raises(ValueError):
            InstanceRef.from_path(bad)


def test_credentials_from_settings():
    env = {"MAMMOFLAG_DICOMWEB_USER": "reader"}
    with pytest.raises(MissingSecret, match="MAMMOFLAG_DICOMWEB_PASSWORD"):
        DicomWebAuth.from_settings(Settings.from_env(env))
    auth = DicomWebAuth.from_settings(Settings.from_env({**env, "MAMMOFLAG_DICOMWEB_PASSWORD": "pw-123"}))
    session = requests.Session()
    auth.apply(session)
    assert auth.kind == "basic" and session.auth == ("reader", "pw-123") and "pw-123" not in repr(auth)
    bearer = DicomWebAuth.from_settings(Settings.from_env({"MAMMOFLAG_DICOMWEB_TOKEN": "tok-456"}))
    session = requests.Session()
    bearer.apply(session)
    assert bearer.kind == "bearer" and session.headers["Authorization"] == "Bearer tok-456"
    assert DicomWebAuth.from_settings(Settings.from_env({})).kind == "none"


class _Server:
    """A tiny HTTP server answering each GET with the next scripted (status, body) and counting requests."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append((self.path, self.headers.get("Authorization")))
                status, body = outer.script.pop(0) if outer.script else (200, b"[]")
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.source = DicomWebSource.parse(f"dicomweb+http://127.0.0.1:{self.httpd.server_port}/dicom-web")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


FAST = RetryPolicy(attempts=3, backoff_s=0.01, connect_timeout_s=2, read_timeout_s=2)
BASIC = DicomWebAuth("reader", Secret("MAMMOFLAG_DICOMWEB_PASSWORD", "test", "pw-789"))


def test_5xx_is_retried_with_back_off_then_gives_up_clearly():
    server = _Server([(503, b""), (502, b""), (200, b"[]")])
    try:
        assert list(DicomWebClient(server.source, BASIC, FAST).iter_studies()) == []
        assert len(server.requests) == 3
        assert all(auth and auth.startswith("Basic ") for _, auth in server.requests)
        server.script, server.requests = [(500, b"")] * 3, []
        with pytest.raises(DicomWebUnavailable) as caught:
            list(DicomWebClient(server.source, BASIC, FAST).iter_studies(DicomWebQuery.parse(["PatientID=PID42"])))
        assert len(server.requests) == 3
        text = str(caught.value)
        assert "/dicom-web/studies" in text and "500" in text and "run the same command again" in text
        assert "pw-789" not in text and "PID42" not in text  # no credentials, no query values
    finally:
        server.close()


def test_401_403_404_are_clear_and_not_retried(tmp_path):
    server = _Server([(401, b""), (403, b""), (404, b""), (404, b"")])
    try:
        client = DicomWebClient(server.source, BASIC, FAST)
        for status in (401, 403, 404):
            with pytest.raises(DicomWebAccessError) as caught:
                list(client.iter_studies())
            assert str(status) in str(caught.value) and "/dicom-web/studies" in str(caught.value)
            assert "pw-789" not in str(caught.value)
        with pytest.raises(InstanceUnavailable):  # one instance gone: that instance fails, not the run
            client.retrieve_to_file(InstanceRef("1.2", "1.2.3", "1.2.3.4"), tmp_path / "x.dcm")
        assert not (tmp_path / "x.dcm").exists()
        assert len(server.requests) == 4
    finally:
        server.close()


def test_a_server_that_does_not_answer_times_out_and_is_unavailable():
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    try:
        source = DicomWebSource.parse(f"dicomweb+http://127.0.0.1:{listener.getsockname()[1]}/dicom-web")
        policy = RetryPolicy(attempts=2, backoff_s=0.01, connect_timeout_s=0.5, read_timeout_s=0.3)
        with pytest.raises(DicomWebUnavailable, match="ReadTimeout"):
            list(DicomWebClient(source, retry=policy).iter_studies())
    finally:
        listener.close()
