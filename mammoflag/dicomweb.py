"""Reading a DICOM archive where it lives: a DICOMweb service (Orthanc, dcm4chee, a VNA, a cloud DICOM store).

Shared by the importer and the flagger (docs/CONTRACTS.md "DICOMweb sources"); every HTTP call goes
through the ``dicomweb-client`` package.

- :class:`DicomWebSource`: the service, parsed from a ``dicomweb+http(s)://HOST[:PORT]/PATH`` URL
  (the part after ``dicomweb+`` is the DICOMweb root, e.g. Orthanc's ``http://host:8042/dicom-web``).
  A URL carrying credentials is refused: they come from settings only.
- :class:`DicomWebAuth`: HTTP basic (``MAMMOFLAG_DICOMWEB_USER`` + ``MAMMOFLAG_DICOMWEB_PASSWORD``) or a
  bearer token (``MAMMOFLAG_DICOMWEB_TOKEN``), or none; the secrets have no defaults.
- :class:`DicomWebClient`: QIDO-RS listings, streamed (studies page by page, then one study's
  instances at a time: never a whole archive's list in memory), and WADO-RS retrieval of one
  instance, byte for byte as the archive stores it (``transfer-syntax=*``: no transcoding), to a file.
  Connection failures, timeouts, 408/429 and 5xx answers are retried with exponential back-off and
  jitter; when retries run out the service is :class:`DicomWebUnavailable` (the run stops and
  resumes when started again). 401/403 anywhere, and 404 on a listing, are :class:`DicomWebAccessError`;
  a 404/410 for one instance is :class:`InstanceUnavailable` (that instance fails, the run goes on).
  Messages name the URL without its query string and never a credential. Instances are asked for
  without HTTP compression (``Accept-Encoding: identity``): gzipping pixel data costs the server
  seconds per mammogram and saves little.
- :func:`retrieve_ordered`: instances retrieved by a bounded pool of threads, yielded in order.

The modality filter (default ``MG``) is applied per study instance listing (``Modality=MG`` on
``studies/{uid}/instances``); a study whose listing says ``ModalitiesInStudy`` without the modality
is passed over without asking for its instances. Orthanc 1.10 pages a ``ModalitiesInStudy`` *filter*
wrongly (its ``limit`` counts studies before filtering), so the study listing never sends one unless
``--query`` asks for it.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

from mammoflag.datadir import is_valid_uid
from mammoflag.settings import MissingSecret, Secret, Settings

log = logging.getLogger(__name__)

SCHEME_PREFIX = "dicomweb+"
DEFAULT_MODALITY = "MG"
STUDY_PAGE = 500  # studies per QIDO-RS request
INSTANCE_PAGE = 1000  # instances per QIDO-RS request within one study
ACCEPT_ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]{1,63}$")

T = TypeVar("T")


class DicomWebError(RuntimeError):
    """A DICOMweb problem; the message is safe to print (URL without query, no credentials)."""


class DicomWebAccessError(DicomWebError):
    """401/403 (credentials), or 404 on a listing (a wrong URL): nothing can be read, the run stops."""


class DicomWebUnavailable(DicomWebError):
    """The service did not answer (connection refused, timeouts, 5xx) after every retry: stop, resume later."""


class InstanceUnavailable(DicomWebError):
    """One instance could not be retrieved (404/410, or an answer that holds no DICOM part)."""


class DicomWebUrlError(ValueError):
    """Not a usable ``dicomweb+http(s)://`` URL."""


def is_dicomweb_url(value: object) -> bool:
    return isinstance(value, str) and value.lower().startswith((SCHEME_PREFIX + "http://", SCHEME_PREFIX + "https://"))


@dataclass(frozen=True)
class DicomWebSource:
    """A DICOMweb service root: ``base_url`` is ``http(s)://host[:port]/path`` (no credentials, no query)."""

    base_url: str

    @classmethod
    def parse(cls, url: str) -> "DicomWebSource":
        if not is_dicomweb_url(url):
            raise DicomWebUrlError("a DICOMweb source is written dicomweb+http://HOST/PATH or dicomweb+https://HOST/PATH")
        parts = urlsplit(url[len(SCHEME_PREFIX):])
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise DicomWebUrlError("the DICOMweb URL must not carry credentials: set MAMMOFLAG_DICOMWEB_USER and "
                                   "MAMMOFLAG_DICOMWEB_PASSWORD, or MAMMOFLAG_DICOMWEB_TOKEN")
        if not parts.hostname:
            raise DicomWebUrlError("the DICOMweb URL has no host")
        if parts.query or parts.fragment:
            raise DicomWebUrlError("the DICOMweb URL must not have a query (use --query KEY=VALUE)")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise DicomWebUrlError("the DICOMweb URL has an invalid port") from None
        path = parts.path.rstrip("/")
        return cls(urlunsplit((parts.scheme.lower(), parts.netloc, path, "", "")))

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.base_url

    def url_of(self, ref: "InstanceRef") -> str:
        return f"{self.base_url}/{ref.path}"


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """One instance in the archive, as its listing names it."""

    study_uid: str
    series_uid: str
    sop_uid: str

    @property
    def path(self) -> str:
        """The WADO-RS path below the service root: the report's ``path`` and the flagger's unit id."""
        return f"studies/{self.study_uid}/series/{self.series_uid}/instances/{self.sop_uid}"

    @classmethod
    def from_path(cls, path: str) -> "InstanceRef":
        parts = path.strip("/").split("/")
        if len(parts) != 6 or parts[0::2] != ["studies", "series", "instances"] or \
                not all(is_valid_uid(p) for p in parts[1::2]):
            raise ValueError("not a studies/<uid>/series/<uid>/instances/<uid> path")
        return cls(parts[1], parts[3], parts[5])


@dataclass(frozen=True)
class DicomWebAuth:
    """How requests authenticate: a bearer token, or HTTP basic, or nothing."""

    user: str = ""
    password: Secret | None = field(default=None, repr=False)
    token: Secret | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> "DicomWebAuth":
        auth = cls(settings.dicomweb_user, settings.dicomweb_password, settings.dicomweb_token)
        auth.check()
        return auth

    def check(self) -> None:
        """MissingSecret when a user is named without a password."""
        if self.user and not (self.token and self.token.is_set) and self.password is not None:
            self.password.get()

    @property
    def kind(self) -> str:
        if self.token is not None and self.token.is_set:
            return "bearer"
        return "basic" if self.user else "none"

    def apply(self, session: Any) -> None:
        if self.kind == "bearer" and self.token is not None:
            session.headers["Authorization"] = f"Bearer {self.token.get()}"
        elif self.kind == "basic" and self.password is not None:
            session.auth = (self.user, self.password.get())

    def refused_hint(self) -> str:
        if self.kind == "bearer":
            return "the token in MAMMOFLAG_DICOMWEB_TOKEN was refused"
        if self.kind == "basic":
            return "the user and password in MAMMOFLAG_DICOMWEB_USER / MAMMOFLAG_DICOMWEB_PASSWORD were refused"
        return "set MAMMOFLAG_DICOMWEB_USER and MAMMOFLAG_DICOMWEB_PASSWORD, or MAMMOFLAG_DICOMWEB_TOKEN"


@dataclass(frozen=True)
class DicomWebQuery:
    """What to list: instances of ``modality`` ("" for any) in studies matching ``filters`` (QIDO-RS keys)."""

    modality: str = DEFAULT_MODALITY
    filters: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, filters: Iterable[str] = (), modality: str = DEFAULT_MODALITY) -> "DicomWebQuery":
        """``["StudyDate=20240101-20241231", "00081030=SCREEN*"]`` -> a query; ValueError on a bad term."""
        parsed = []
        for term in filters:
            key, sep, value = term.partition("=")
            key = key.strip()
            if not sep or not (_KEYWORD.match(key) or _TAG.match(key)):
                raise ValueError("--query takes KEY=VALUE with a DICOM keyword or an 8-digit hex tag as KEY")
            parsed.append((key, value.strip()))
        modality = modality.strip()
        if modality in ("*", "any", "ANY"):
            modality = ""
        return cls(modality.upper(), tuple(parsed))


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries per request (the first included)
    backoff_s: float = 0.5  # wait before the 2nd try; doubled each time, with jitter
    max_backoff_s: float = 30.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "RetryPolicy":
        return cls(attempts=max(1, settings.dicomweb_retries), read_timeout_s=settings.dicomweb_timeout_s)

    def wait(self, attempt: int) -> float:
        """Seconds before try ``attempt + 1`` (attempt counts from 1)."""
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)


def _values(item: dict, tag: str) -> list:
    element = item.get(tag) or {}
    return list(element.get("Value") or []) if isinstance(element, dict) else []


def _first(item: dict, tag: str) -> str:
    values = _values(item, tag)
    return str(values[0]).strip() if values and isinstance(values[0], (str, int, float)) else ""


STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITIES_IN_STUDY, MODALITY, INSTANCE_NUMBER = "00080061", "00080060", "00200013"


class DicomWebClient:
    """One service, one HTTP session (thread-safe for these GETs), retries as ``retry`` says."""

    def __init__(self, source: DicomWebSource, auth: DicomWebAuth = DicomWebAuth(),
                 retry: RetryPolicy = RetryPolicy(), pool_size: int = 16):
        import requests
        from dicomweb_client import DICOMwebClient

        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its INFO lines name every UID
        logging.getLogger("urllib3").setLevel(logging.WARNING)  # its DEBUG lines quote every URL with its query
        self.source, self.auth, self.retry = source, auth, retry
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=max(2, pool_size))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        auth.apply(session)
        self._client = DICOMwebClient(source.base_url, session=session,
                                      timeout=(retry.connect_timeout_s, retry.read_timeout_s))
        self._client.set_http_retry_params(retry=False)  # retried here: 5xx, timeouts and lost connections too
        self.invalid_uids = 0  # listed instances left out because a UID was not a UID
        self._lock = threading.Lock()

    # -- requests, retried -------------------------------------------------------------------

    def _call(self, what: str, url: str, fn: Callable[[], T], listing: bool) -> T:
        import requests

        shown = url.split("?", 1)[0]
        last = ""
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                reason = (exc.response.reason or "") if exc.response is not None else ""
                if status in (401, 403):
                    raise DicomWebAccessError(f"the DICOMweb server answered {status} {reason} to {what} {shown}: "
                                              f"{self.auth.refused_hint()}") from None
                if status in (404, 410):
                    if listing:
                        raise DicomWebAccessError(f"the DICOMweb server answered {status} {reason} to {what} {shown}: "
                                                  "is the URL the service's DICOMweb root?") from None
                    raise InstanceUnavailable(f"WADO-RS answered {status} {reason}: the instance is no longer "
                                              "on the server") from None
                if status not in RETRIED_STATUSES:
                    raise DicomWebError(f"the DICOMweb server answered {status} {reason} to {what} {shown}") from None
                last = f"{status} {reason}".strip()
            except (requests.Timeout, requests.ConnectionError) as exc:
                # ChunkedEncodingError (a connection cut mid-answer) is a ConnectionError's sibling: below
                last = type(exc).__name__
            except requests.exceptions.ChunkedEncodingError as exc:
                last = type(exc).__name__
            if attempt < self.retry.attempts:
                time.sleep(self.retry.wait(attempt))
        raise DicomWebUnavailable(f"the DICOMweb server did not answer {what} {shown} after {self.retry.attempts} "
                                  f"tries ({last}); run the same command again to resume")

    def _search(self, what: str, fn: Callable[..., list], url: str, **kwargs: Any) -> list[dict]:
        result = self._call(what, url, lambda: fn(**kwargs), listing=True)
        return [item for item in result if isinstance(item, dict)]

    # -- QIDO-RS -----------------------------------------------------------------------------

    def iter_studies(self, query: DicomWebQuery = DicomWebQuery()) -> Iterator[str]:
        """Study Instance UIDs matching the query, page by page (until an empty page), in the server's order."""
        url = f"{self.source.base_url}/studies"
        offset = 0
        while True:
            page = self._search("QIDO-RS", self._client.search_for_studies, url, limit=STUDY_PAGE, offset=offset,
                                fields=["ModalitiesInStudy"], search_filters=dict(query.filters) or None)
            if not page:
                return
            offset += len(page)
            for item in page:
                uid = _first(item, STUDY_UID)
                if not is_valid_uid(uid):
                    with self._lock:
                        self.invalid_uids += 1
                    continue
                modalities = {str(m).upper() for m in _values(item, MODALITIES_IN_STUDY)}
                if query.modality and modalities and query.modality not in modalities:
                    continue  # the listing says so: no need to ask for its instances
                yield uid

    def instances_of_study(self, study_uid: str, query: DicomWebQuery = DicomWebQuery()) -> list[InstanceRef]:
        """The study's instances of the query's modality, sorted by series, instance number and SOP UID."""
        url = f"{self.source.base_url}/studies/{study_uid}/instances"
        filters = {"Modality": query.modality} if query.modality else None
        found: dict[str, tuple[str, int, InstanceRef]] = {}
        offset = 0
        while True:
            page = self._search("QIDO-RS", self._client.search_for_instances, url, study_instance_uid=study_uid,
                                limit=INSTANCE_PAGE, offset=offset, search_filters=filters,
                                fields=["SeriesInstanceUID", "InstanceNumber", "Modality"])
            for item in page:
                series, sop = _first(item, SERIES_UID), _first(item, SOP_UID)
                modality = _first(item, MODALITY).upper()
                if query.modality and modality and modality != query.modality:
                    continue  # a server that ignored the filter
                if not (is_valid_uid(series) and is_valid_uid(sop)):
                    with self._lock:
                        self.invalid_uids += 1
                    continue
                try:
                    number = int(float(_first(item, INSTANCE_NUMBER) or 0))
                except ValueError:
                    number = 0
                found.setdefault(sop, (series, number, InstanceRef(study_uid, series, sop)))
            if len(page) < INSTANCE_PAGE:
                break
            offset += len(page)
        return [ref for _, _, ref in sorted(found.values(), key=lambda v: (v[0], v[1], v[2].sop_uid))]

    def iter_instances(self, query: DicomWebQuery = DicomWebQuery()) -> Iterator[InstanceRef]:
        """Every matching instance, study by study (one study's list in memory at a time)."""
        for study in self.iter_studies(query):
            yield from self.instances_of_study(study, query)

    # -- WADO-RS -----------------------------------------------------------------------------

    def retrieve_to_file(self, ref: InstanceRef, path: Path) -> int:
        """The instance's bytes as stored (no transcoding) into ``path``; returns their count."""
        url = self.source.url_of(ref)

        def get() -> int:
            # identity: Orthanc (HttpCompressionEnabled, on by default) would gzip every instance on the fly
            # for a client that accepts it, as requests does: 26 MB took 2.9 s instead of 0.4 s here
            response = self._client._http_get(url, headers={"Accept": ACCEPT_ANY_SYNTAX, "Accept-Encoding": "identity"},
                                              stream=True)
            content_type = response.headers.get("Content-Type", "")
            if content_type.lower().startswith("application/dicom"):  # a non-multipart answer (some servers)
                parts: Iterable[bytes] = [response.content]
            elif content_type.lower().startswith("multipart/related"):
                parts = self._client._decode_multipart_message(response, stream=True)
            else:
                raise InstanceUnavailable("WADO-RS answered with no DICOM part (content type "
                                          f"{content_type.split(';')[0][:40] or 'missing'})")
            written = 0
            with open(path, "wb") as fh:
                try:
                    for n, part in enumerate(parts):
                        if n > 0:
                            raise InstanceUnavailable("WADO-RS answered with more than one instance")
                        fh.write(part)
                        written = len(part)
                except ValueError:  # dicomweb-client's multipart parser: a part without its headers
                    raise InstanceUnavailable("WADO-RS answered with a malformed multipart message") from None
            if not written:
                raise InstanceUnavailable("WADO-RS answered with an empty body")
            return written

        try:
            return self._call("WADO-RS", url, get, listing=False)
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise


@dataclass
class Retrieved:
    """One item's retrieval: the file (``path``), or the per-instance problem (``problem``)."""

    path: Path | None = None
    problem: InstanceUnavailable | None = None
    seconds: float = 0.0
    size: int = 0


def retrieve_ordered(client: DicomWebClient, items: Iterable[T], ref_of: Callable[[T], InstanceRef | None],
                     dest: Path, concurrency: int = 4, window: int | None = None) -> Iterator[tuple[T, Retrieved]]:
    """Retrieve each item's instance into ``dest`` with ``concurrency`` threads; yield ``(item, Retrieved)`` in order.

    An item whose ``ref_of`` is None passes through with an empty :class:`Retrieved` (nothing to get).
    At most ``window`` (default 2 x concurrency) retrievals are in flight or waiting to be taken, so
    memory and temporary disk stay bounded. The caller owns the yielded files (remove or keep them).
    A :class:`DicomWebAccessError` / :class:`DicomWebUnavailable` stops the iteration (raised here);
    the files of retrievals not yet yielded are removed.
    """
    dest.mkdir(parents=True, exist_ok=True)
    window = window or 2 * max(1, concurrency)

    def fetch(ref: InstanceRef) -> Retrieved:
        path = dest / f"{uuid.uuid4().hex}.dcm"
        started = time.monotonic()
        try:
            size = client.retrieve_to_file(ref, path)
        except InstanceUnavailable as problem:
            return Retrieved(problem=problem, seconds=time.monotonic() - started)
        return Retrieved(path, seconds=time.monotonic() - started, size=size)

    in_flight: deque[tuple[T, Future | None]] = deque()
    source = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="wado") as pool:
        try:
            exhausted = False
            while True:
                while not exhausted and len(in_flight) < window:
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    ref = ref_of(item)
                    in_flight.append((item, pool.submit(fetch, ref) if ref is not None else None))
                if not in_flight:
                    return
                item, future = in_flight.popleft()
                yield item, (future.result() if future is not None else Retrieved())
        finally:
            for _, future in in_flight:
                if future is not None and not future.cancel():
                    try:
                        done = future.result()
                    except BaseException:
                        continue
                    if done.path is not None:
                        done.path.unlink(missing_ok=True)


def client_from_settings(source: DicomWebSource, settings: Settings, pool_size: int = 16) -> DicomWebClient:
    """A client with the settings' credentials and retry policy (MissingSecret when a user has no password)."""
    return DicomWebClient(source, DicomWebAuth.from_settings(settings), RetryPolicy.from_settings(settings),
                          pool_size=pool_size)


def keep_path(keep_dir: Path, ref: InstanceRef) -> Path:
    """Where ``--keep-dicom DIR`` keeps an instance: ``DIR/<study>/<series>/<sop>.dcm``."""
    return keep_dir / ref.study_uid / ref.series_uid / f"{ref.sop_uid}.dcm"


def keep_or_remove(path: Path, ref: InstanceRef | None, keep_dir: Path | None) -> None:
    """A retrieved file after its import: moved under ``keep_dir`` when asked, else removed."""
    if keep_dir is not None and ref is not None:
        target = keep_path(keep_dir, ref)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    else:
        path.unlink(missing_ok=True)


__all__ = ["DicomWebSource", "DicomWebAuth", "DicomWebQuery", "DicomWebClient", "InstanceRef", "RetryPolicy",
           "Retrieved", "retrieve_ordered", "client_from_settings", "is_dicomweb_url", "DicomWebError",
           "DicomWebAccessError", "DicomWebUnavailable", "InstanceUnavailable", "DicomWebUrlError", "MissingSecret",
           "keep_or_remove", "keep_path"]
