"""Double reading against a real Label Studio: the overlap share and readers per task, and the Data
Manager tab that lists exactly the disputed tasks until an adjudicator answers."""

from __future__ import annotations

import pytest

from label_config import load_label_config
from ls_helpers import annotate, ensure_annotators
from mammoflag.labelstudio import find_or_create_project
from mammoflag.spec import ModelSpec
from ml_backend.review import DISPUTED_VIEW_TITLE, Overlap, ensure_review

pytestmark = pytest.mark.label_studio

SPEC = ModelSpec.from_label_config(load_label_config())


def _tasks(n: int) -> list[dict]:
    return [{"data": {"image": f"/data/local-files/?d=review/{i}.png", "key": f"1.2.9.{i}:0"}} for i in range(n)]


def test_overlap_and_the_disputed_tab(ls_client):
    project = find_or_create_project(ls_client, "review overlap", load_label_config().xml)
    ls_client.projects.import_tasks(project.id, request=_tasks(20))
    setup = ensure_review(ls_client, project.id, SPEC, frozenset(), Overlap(0.25, 2))
    assert (setup.maximum_annotations, setup.overlap_percentage) == (2, 25)
    tasks = list(ls_client.tasks.list(project=project.id, fields="all"))
    overlaps = sorted(t.overlap for t in tasks)
    assert overlaps.count(2) == 5 and overlaps.count(1) == 15  # a quarter of the tasks, two readers each
    # tasks imported later join the cohort in the same share
    ls_client.projects.import_tasks(project.id, request=_tasks(40)[20:])
    assert sum(t.overlap == 2 for t in ls_client.tasks.list(project=project.id, fields="all")) == 10

    r1, r2, adj = ensure_annotators(ls_client, ["review-r1", "review-r2", "review-adj"])
    double = [t.id for t in ls_client.tasks.list(project=project.id, fields="all") if t.overlap == 2]
    annotate(ls_client, double[0], ["biopsy_tool"], SPEC, r1)
    annotate(ls_client, double[0], ["neither"], SPEC, r2)  # disputed
    annotate(ls_client, double[1], ["mag_view"], SPEC, r1)
    annotate(ls_client, double[1], ["mag_view"], SPEC, r2)  # consensus
    setup = ensure_review(ls_client, project.id, SPEC, frozenset())
    assert (setup.disputed, setup.marked, setup.cleared) == (1, 1, 0)
    assert (setup.maximum_annotations, setup.overlap_percentage) == (2, 25)  # no --overlap: left as it was
    [view] = [v for v in ls_client.views.list(project=project.id) if (v.data or {}).get("title") == DISPUTED_VIEW_TITLE]
    assert view.id == setup.disputed_view_id
    assert [t.id for t in ls_client.tasks.list(project=project.id, view=view.id)] == [double[0]]

    # the adjudicator answers: the adjudicated label wins, the task leaves the tab; running again changes nothing
    annotate(ls_client, double[0], ["biopsy_tool"], SPEC, adj)
    setup = ensure_review(ls_client, project.id, SPEC, frozenset({str(adj)}))
    assert (setup.disputed, setup.marked, setup.cleared) == (0, 0, 1)
    assert list(ls_client.tasks.list(project=project.id, view=view.id)) == []
    again = ensure_review(ls_client, project.id, SPEC, frozenset({str(adj)}))
    assert again.disputed_view_id == view.id and (again.marked, again.cleared) == (0, 0)
    with pytest.raises(ValueError):
        Overlap(1.5, 2)


def _review_mark(ls_client, task_id: int) -> str | None:
    return (ls_client.tasks.get(str(task_id)).data or {}).get("mammoflag_review")


def _wait_for(check, timeout_s: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return check()


def test_annotation_webhooks_refresh_the_disputed_marks_of_their_task(label_studio, ls_client, data_root, tmp_path,
                                                                      redis_url, backend_factory):
    """Readers disagree -> Label Studio's webhook -> the backend marks that task; the adjudicator answers -> the
    mark is cleared; a task no webhook names is left alone (no project scan per annotation)."""
    from mlb_helpers import backend_environment, setup_project

    r1, r2, adj = ensure_annotators(ls_client, ["hook-r1", "hook-r2", "hook-adj"])
    env = backend_environment(tmp_path / "home", data_root, redis_url, MAMMOFLAG_LABEL_STUDIO_URL=label_studio.url,
                              MAMMOFLAG_LABEL_STUDIO_TOKEN=label_studio.token, MAMMOFLAG_ADJUDICATORS=str(adj))
    backend = backend_factory(env)
    env["MAMMOFLAG_BACKEND_URL"] = backend.url
    pid = setup_project(env, "review webhooks")
    ls_client.projects.import_tasks(pid, request=_tasks(3))
    a, b, c = sorted(t.id for t in ls_client.tasks.list(project=pid))

    annotate(ls_client, a, ["biopsy_tool"], SPEC, r1)
    annotate(ls_client, a, ["neither"], SPEC, r2)
    assert _wait_for(lambda: _review_mark(ls_client, a) == "disputed"), backend.log()[-3000:]
    annotate(ls_client, b, ["mag_view"], SPEC, r1)
    annotate(ls_client, b, ["mag_view"], SPEC, r2)  # consensus: never marked

    # task a's mark removed behind the backend's back (a task update sends no webhook it listens to)
    ls_client.tasks.update(str(a), data={k: v for k, v in ls_client.tasks.get(str(a)).data.items()
                                         if k != "mammoflag_review"})
    annotate(ls_client, c, ["biopsy_tool"], SPEC, r1)
    annotate(ls_client, c, ["mag_view"], SPEC, r2)
    assert _wait_for(lambda: _review_mark(ls_client, c) == "disputed"), backend.log()[-3000:]
    assert _review_mark(ls_client, a) is None and _review_mark(ls_client, b) is None  # only c was looked at

    # the adjudicator answers c: the adjudicated label wins and the mark goes at once
    annotate(ls_client, c, ["biopsy_tool"], SPEC, adj)
    assert _wait_for(lambda: _review_mark(ls_client, c) is None), backend.log()[-3000:]
    assert "disputed marks: task(s)" in backend.log()
    # setup-project still refreshes every task: a is marked again
    setup_project(env, "review webhooks")
    assert _review_mark(ls_client, a) == "disputed"
