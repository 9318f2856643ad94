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
