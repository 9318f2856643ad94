"""The ML backend as Label Studio 1.23 calls it, on FastAPI.

Endpoints (``ml/api_connector.py`` in Label Studio is the other side):

===========  ======================================================  ========================
GET /health  liveness; Label Studio sends it with basic auth          basic auth
POST /setup  ``{"project", "schema", ...}`` -> ``{"model_version"}``  basic auth
POST /predict ``{"tasks": [...]}`` -> ``{"results": [...]}``, one      basic auth
             per task, in order
GET /versions ``{"versions": [...]}`` (registry versions)             basic auth
POST /webhook annotation events -> ``mammoflag.retrain`` enqueued;    secret header, or basic
             START_TRAINING (sent by Label Studio's ML connector      auth without the header
             with basic auth); TASKS_CREATED -> ``mammoflag.repredict``  (START_TRAINING)
===========  ======================================================  ========================

Everything else is 401, logged with method, path and peer only (never headers or payload).
Bodies over ``MAX_REQUEST_BYTES`` and /predict calls with more than ``MAX_TASKS_PER_REQUEST``
tasks get 413 naming the limit; one bad task (a NUL in its URL, a huge PNG, ``data`` that is not
an object) gets an error entry of its own and never fails the request.

The routes are module-level handlers on two ``APIRouter`` objects whose dependencies
authenticate every call; :func:`create_app` reads the settings into a :class:`BackendConfig`
on ``app.state`` and includes them.
The model is loaded once at start-up and swapped when the registry's ``current`` pointer moves
(see :class:`ml_backend.predictor.CurrentModel`); nothing trains in a request.
"""

from __future__ import annotations

import json
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.concurrency import run_in_threadpool

from mammoflag.jobs import TaskName
from mammoflag.registry import Registry
from mammoflag.settings import Settings
from ml_backend.predictor import CurrentModel, TaskPrediction, predict_tasks

log = logging.getLogger(__name__)

WEBHOOK_SECRET_HEADER = "X-Mammoflag-Webhook-Secret"
# Label Studio webhook actions that change what the model should learn from.
RETRAIN_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED",
                             "ANNOTATIONS_DELETED", "START_TRAINING"})
# New tasks get predictions from the current model at once (in a worker).
REPREDICT_ACTIONS = frozenset({"TASKS_CREATED"})
WEBHOOK_ACTIONS = tuple(sorted(RETRAIN_ACTIONS - {"START_TRAINING"} | REPREDICT_ACTIONS))

RETRAIN_TASK = TaskName.RETRAIN.value
REPREDICT_TASK = TaskName.REPREDICT.value

# enqueue(task name, args) -> job id, or None when an equivalent job is already waiting. Injected so
# the app never builds a broker connection itself when a test or an embedding wants another queue.
Enqueue = Callable[[str, Sequence[Any]], str | None]

_basic = HTTPBasic(auto_error=False, realm="mammoflag ML backend")


class WebhookPayloadError(ValueError):
    pass


def webhook_jobs(payload: Mapping[str, Any], current_version: str | None) -> list[tuple[str, list[Any]]]:
    """The Celery jobs a Label Studio webhook payload asks for (pure; no I/O).

    Annotation changes and START_TRAINING enqueue a retrain of the project (START_TRAINING is a
    person pressing "Start training": ``force`` it past the minimum-new-labels rule). New tasks
    enqueue a re-prediction with the current model when there is one.
    """
    action = payload.get("action")
    if not isinstance(action, str):
        raise WebhookPayloadError("webhook payload has no 'action'")
    if action not in RETRAIN_ACTIONS and action not in REPREDICT_ACTIONS:
        return []
    project = payload.get("project")
    project_id = project.get("id") if isinstance(project, Mapping) else None
    if not isinstance(project_id, int):
        raise WebhookPayloadError(f"webhook payload for {action} has no integer 'project.id'")
    if action in RETRAIN_ACTIONS:
        return [(RETRAIN_TASK, [project_id, action == "START_TRAINING"])]
    return [(REPREDICT_TASK, [project_id, current_version])] if current_version else []


def celery_enqueue(settings: Settings) -> Enqueue:
    """Send tasks by name through the one Celery app (no I/O until the first send)."""
    from mammoflag.jobs import create_app as create_celery_app

    celery = create_celery_app(settings)
    # A webhook has 1 s: give a broker hiccup two quick retries, then fail the request.
    policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.2}

    def enqueue(name: str, args: Sequence[Any]) -> str | None:
        lock = None
        if name == RETRAIN_TASK and not args[1]:  # forced runs (START_TRAINING) always go
            from mammoflag.jobs import run_lock_for

            lock = run_lock_for(settings, args[0])
            if not lock.mark_queued():
                return None  # a retrain is waiting: it reads every annotation when it starts
        try:
            return celery.send_task(name, args=list(args), retry=True, retry_policy=policy).id
        except Exception:
            if lock is not None:
                lock.clear_queued()  # not sent: the next annotation must try again
            raise

    return enqueue


def _same(given: str | None, expected: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


def _refuse(request: Request, reason: str) -> HTTPException:
    peer = request.client.host if request.client else "?"
    log.warning("401 %s %s from %s: %s", request.method, request.url.path, peer, reason)
    return HTTPException(status_code=401, detail="authentication required",
                         headers={"WWW-Authenticate": 'Basic realm="mammoflag ML backend"'})


# Request limits. Label Studio asks /predict about one task at a time (or a page of a few dozen);
# re-prediction of a whole project goes through the Celery task, not HTTP. Larger requests get 413.
MAX_REQUEST_BYTES = 8 * 2**20
MAX_TASKS_PER_REQUEST = 1000


@dataclass(frozen=True)
class BackendConfig:
    """What the routes need, read once by :func:`create_app` (secrets included, so a missing one fails at start)."""

    user: str
    password: str = field(repr=False)
    webhook_secret: str = field(repr=False)
    data_root: Path
    registry: Registry
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_tasks: int = MAX_TASKS_PER_REQUEST


def _config(request: Request) -> BackendConfig:
    return request.app.state.config


def basic_auth(request: Request, credentials: HTTPBasicCredentials | None = Depends(_basic)) -> None:
    config = _config(request)
    if credentials is None:
        raise _refuse(request, "no basic-auth credentials")
    # Compare both fields, always, so timing does not tell which one was wrong.
    ok_user = _same(credentials.username, config.user)
    ok_password = _same(credentials.password, config.password)
    if not (ok_user and ok_password):
        raise _refuse(request, "wrong basic-auth credentials")


def webhook_auth(request: Request, credentials: HTTPBasicCredentials | None = Depends(_basic)) -> None:
    # Label Studio webhooks carry our secret header (setup-project puts it on the webhook).
    # "Start training" comes from Label Studio's ML connector instead, with the backend's basic
    # auth and no header; a request that shows a header must show the right one.
    header = request.headers.get(WEBHOOK_SECRET_HEADER)
    if header is not None:
        if not _same(header, _config(request).webhook_secret):
            raise _refuse(request, f"wrong {WEBHOOK_SECRET_HEADER}")
        return
    basic_auth(request, credentials)


# Every route Label Studio calls; the router's dependency authenticates each one.
router = APIRouter(dependencies=[Depends(basic_auth)])
webhook_router = APIRouter(dependencies=[Depends(webhook_auth)])


@router.get("/health")
def health(request: Request) -> dict[str, Any]:
    model = request.app.state.model.loaded  # never loads: Label Studio gives /health 1 s
    return {"status": "UP", "model_class": "mammoflag-onnx", "model_version": model.name if model else None}


@router.post("/setup")
async def setup(request: Request) -> JSONResponse:
    body = await _json_object(request)
    model = await run_in_threadpool(request.app.state.model.get)  # may load a new version: off the loop
    schema = body.get("schema")
    if model is not None and isinstance(schema, str):
        problem = _schema_problem(schema, model.spec)
        if problem:
            log.error("setup for project %s refused: %s", _loggable(body.get("project")), problem)
            return JSONResponse({"error": problem}, status_code=400)
    log.info("setup from Label Studio for project %s: model_version %s", _loggable(body.get("project")),
             model.name if model else None)
    return JSONResponse({"model_version": model.name if model else None})


@router.post("/predict")
async def predict(request: Request) -> dict[str, Any]:
    config = _config(request)
    body = await _json_object(request)
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise HTTPException(status_code=400, detail="'tasks' must be a list of task objects")
    if len(tasks) > config.max_tasks:
        raise HTTPException(status_code=413, detail=f"at most {config.max_tasks} tasks per /predict request")
    # A task that is not an object fails alone (its own error entry); the others are predicted.
    predictions = await run_in_threadpool(_predict, request.app.state.model, tasks, config.data_root)
    failed = sum(p.error is not None for p in predictions)
    if failed:
        log.warning("/predict: %d of %d task(s) failed", failed, len(tasks))
    return {"results": [p.to_label_studio() for p in predictions]}


@router.get("/versions")
def versions(request: Request) -> dict[str, Any]:
    registry = _config(request).registry
    return {"versions": [v.name for v in registry.versions()], "current": registry.current_name()}


class ReviewRefresher:
    """Refreshes the disputed marks of the tasks an annotation webhook names (ml_backend.review), after the
    webhook is answered; one Label Studio client for the app's life, made at the first use. Without Label
    Studio credentials it says so once and does nothing (``setup-project`` still refreshes every task)."""

    def __init__(self, settings: Settings):
        from mammoflag.spec import ModelSpec

        self._settings = settings
        self._spec = ModelSpec.from_label_config(settings.label_config())
        self._client: Any = None
        self._unavailable = False

    def __call__(self, task_ids: Sequence[int]) -> None:
        from mammoflag.settings import MissingSecret
        from ml_backend.review import refresh_tasks

        if self._unavailable:
            return
        try:
            if self._client is None:
                from mammoflag.labelstudio import connect

                self._client = connect(self._settings)
            done = refresh_tasks(self._client, task_ids, self._spec, self._settings.adjudicators)
        except MissingSecret as exc:
            self._unavailable = True
            log.warning("disputed marks are not refreshed from webhooks: %s", exc)
            return
        except Exception as exc:  # Label Studio away: the webhook itself has succeeded; setup-project catches up
            log.warning("could not refresh the disputed marks of task(s) %s: %s", list(task_ids), type(exc).__name__)
            return
        if done.marked or done.cleared:
            log.info("disputed marks: task(s) %s: +%d marked, -%d cleared", list(task_ids), done.marked, done.cleared)


@webhook_router.post("/webhook")
async def webhook(request: Request, background: BackgroundTasks) -> JSONResponse:
    from ml_backend.review import webhook_task_ids

    payload = await _json_object(request)
    try:  # the pointer file, not the loaded model: a webhook must not wait for a model load
        jobs = webhook_jobs(payload, _config(request).registry.current_name())
    except WebhookPayloadError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    review_tasks = webhook_task_ids(payload)
    refresh = getattr(request.app.state, "review_refresh", None)
    if review_tasks and refresh is not None:  # runs after the response: Label Studio waits for no one
        background.add_task(refresh, review_tasks)
    if not jobs:
        return JSONResponse({"status": "ignored", "action": _loggable(payload.get("action"))})
    queued = []
    for name, args in jobs:
        try:
            job_id = await run_in_threadpool(request.app.state.enqueue, name, args)
        except Exception as exc:  # the broker is down: say so; Label Studio does not retry anyway
            log.error("could not enqueue %s%s: %s", name, tuple(args), type(exc).__name__)
            return JSONResponse({"status": "error", "error": f"could not enqueue {name}"}, status_code=503)
        if job_id is None:
            log.info("%s -> %s%s already queued", payload["action"], name, tuple(args))
            queued.append({"task": name, "args": args, "id": None, "already_queued": True})
            continue
        log.info("%s -> enqueued %s%s as %s", payload["action"], name, tuple(args), job_id)
        queued.append({"task": name, "args": args, "id": job_id})
    return JSONResponse({"status": "queued", "jobs": queued}, status_code=202)


def create_app(settings: Settings, *, enqueue: Enqueue | None = None, check_model_every_s: float = 2.0,
               model_threads: int | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               max_tasks: int = MAX_TASKS_PER_REQUEST) -> FastAPI:
    """The backend application. Secrets are read here, so a missing one fails at start, not per request."""
    config = BackendConfig(user=settings.backend_user, password=settings.backend_password.get(),
                           webhook_secret=settings.webhook_secret.get(), data_root=settings.data_root,
                           registry=Registry(settings.models_dir), max_request_bytes=max_request_bytes,
                           max_tasks=max_tasks)
    label_config = settings.label_config()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.model = CurrentModel(config.registry, label_config, check_every_s=check_model_every_s,
                                       threads=model_threads)
        if app.state.model.load_now() is None:
            log.warning("starting without a model: %s; /predict answers empty results", app.state.model.why_none)
        app.state.enqueue = enqueue or celery_enqueue(settings)
        app.state.review_refresh = ReviewRefresher(settings)
        yield

    app = FastAPI(title="mammoflag ML backend", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.include_router(router)
    app.include_router(webhook_router)
    return app


def _loggable(value: Any) -> Any:
    """A payload value fit for a log line: an int as it is, anything else only by its type."""
    return value if isinstance(value, int) and not isinstance(value, bool) else type(value).__name__


def _predict(current: CurrentModel, tasks: list[dict[str, Any]], data_root: Path) -> list[TaskPrediction]:
    """Runs in the server's thread pool: a model load (new version) or inference never blocks the loop."""
    model = current.get()
    if model is None:
        log.warning("/predict for %d task(s) answered empty: %s", len(tasks), current.why_none)
    return predict_tasks(tasks, model, data_root)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status_code=413, detail=f"request body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked uploads have no Content-Length: count as they come
        size += len(chunk)
        if size > limit:
            raise HTTPException(status_code=413, detail=f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await _body(request, _config(request).max_request_bytes)
    try:
        body = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        raise HTTPException(status_code=400, detail="request body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(status_code=400, detail="request body must be a JSON object")
    return body


def _schema_problem(schema: str, spec) -> str | None:
    """Why a project's label config does not fit the model (None when it does), via the SDK's parser."""
    from label_studio_sdk.label_interface import LabelInterface

    try:
        control = LabelInterface(schema).get_control(spec.choices_name)
    except Exception as exc:  # the SDK raises bare Exception for unknown names and parse errors
        return f"label config has no usable <Choices name={spec.choices_name!r}>: {exc}"
    missing = [c for c in (*spec.classes, spec.negative) if c not in control.labels]
    if missing:
        return f"label config choices {control.labels} lack the model's {missing}"
    if spec.image_name not in control.to_name:
        return f"<Choices name={spec.choices_name!r}> does not point at <Image name={spec.image_name!r}>"
    return None
