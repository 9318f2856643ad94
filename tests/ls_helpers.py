"""Simulated annotators for tests: Label Studio users posting annotations through label-studio-sdk.

The admin token may post an annotation on behalf of another member of the organization
(``completed_by``), which is what several readers labelling the same task look like to
Label Studio and to training.

    readers = ensure_annotators(client, ["reader1", "reader2"])
    truth = truth_by_key(ground_truth_rows)
    annotate_from_truth(client, project_id, truth, spec, readers)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mammoflag.spec import ModelSpec

TEST_EMAIL_DOMAIN = "annotators.mammoflag.test"


def ensure_annotators(client, names: Sequence[str]) -> list[int]:
    """User ids for these usernames, created (in the admin's organization) when missing."""
    existing = {u.username: u.id for u in client.users.list()}
    ids = []
    for name in names:
        if name not in existing:
            user = client.users.create(username=name, email=f"{name}@{TEST_EMAIL_DOMAIN}", first_name=name)
            existing[name] = user.id
        ids.append(existing[name])
    return ids


def choices_result(choices: Iterable[str], spec: ModelSpec) -> list[dict[str, Any]]:
    """The Label Studio result list for a set of choices of the spec's <Choices> tag."""
    return [{"from_name": spec.choices_name, "to_name": spec.image_name, "type": "choices",
             "value": {"choices": list(choices)}}]


def choices_from_truth(row: Mapping[str, Any], spec: ModelSpec) -> list[str]:
    """Choices for a ground-truth row (labels as 0/1 or "0"/"1" per class); none -> the negative."""
    chosen = [c for c in spec.classes if str(row.get(c, "0")) in ("1", "True", "true")]
    return chosen or [spec.negative]


def truth_by_key(rows: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """ground_truth.csv rows keyed like tasks: ``<sop_instance_uid>:<frame>``."""
    return {f"{r['sop_instance_uid']}:{r.get('frame', 0)}": r for r in rows}


def annotate(client, task_id: int, choices: Iterable[str], spec: ModelSpec, user_id: int | None = None,
             was_cancelled: bool = False) -> int:
    """Post one annotation (as ``user_id`` when given); returns its id."""
    kwargs: dict[str, Any] = {"result": [] if was_cancelled else choices_result(choices, spec),
                              "was_cancelled": was_cancelled}
    if user_id is not None:
        kwargs["completed_by"] = user_id
    return client.annotations.create(id=task_id, **kwargs).id


def project_tasks(client, project_id: int) -> list[dict[str, Any]]:
    """[{id, data}] for every task of the project."""
    return [{"id": t.id, "data": dict(t.data)} for t in client.tasks.list(project=project_id, fields="task_only")]


def annotate_from_truth(client, project_id: int, truth: Mapping[str, Mapping[str, Any]], spec: ModelSpec,
                        user_ids: Sequence[int], limit: int | None = None,
                        overrides: Mapping[str, Sequence[Sequence[str]]] | None = None,
                        order: Sequence[str] | None = None) -> list[int]:
    """Every reader in ``user_ids`` labels tasks (in ``order`` of keys if given) with their true choices.

    ``overrides[key]`` gives one choice list per reader instead (to stage disagreements and
    contradictions). Returns the ids of the annotated tasks.
    """
    tasks = {t["data"].get("key"): t for t in project_tasks(client, project_id)}
    keys = [k for k in (order or sorted(tasks)) if k in tasks and k in truth]
    if limit is not None:
        keys = keys[:limit]
    done = []
    for key in keys:
        per_reader = (overrides or {}).get(key)
        for n, user in enumerate(user_ids):
            choices = per_reader[n] if per_reader else choices_from_truth(truth[key], spec)
            annotate(client, tasks[key]["id"], choices, spec, user)
        done.append(tasks[key]["id"])
    return done


def import_tasks(client, project_id: int, task_list: Sequence[Mapping[str, Any]], chunk: int = 500) -> list[int]:
    """Import tasks ({"data": {...}}) into a project; returns the new task ids."""
    ids: list[int] = []
    for i in range(0, len(task_list), chunk):
        response = client.projects.import_tasks(id=project_id, request=[{"data": t["data"]} for t in
                                                                        task_list[i:i + chunk]],
                                                return_task_ids=True)
        ids.extend(response.task_ids or [])
    return ids


def export_from_truth(task_list: Sequence[Mapping[str, Any]], truth: Mapping[str, Mapping[str, Any]],
                      spec: ModelSpec, readers: Sequence[int] = (1,), first_task_id: int = 1) -> list[dict[str, Any]]:
    """A Label Studio JSON export (tasks with ids and annotations) labelled from ground truth, offline.

    ``task_list`` is an importer's tasks.json; tasks without a truth row stay unlabelled.
    """
    out, ann_id = [], 0
    for n, task in enumerate(task_list):
        data = dict(task["data"])
        row = truth.get(data.get("key"))
        annotations = []
        if row is not None:
            for reader in readers:
                ann_id += 1
                annotations.append({"id": ann_id, "completed_by": reader, "was_cancelled": False,
                                    "result": choices_result(choices_from_truth(row, spec), spec)})
        out.append({"id": first_task_id + n, "data": data, "annotations": annotations})
    return out


def import_synthetic(work: Path, data_root: Path, name: str, n_studies: int, seed: int, long_side: int = 256,
                     secret: str = "synthetic-test-secret", **synth: Any) -> tuple[Path, Path]:
    """A synthetic DICOM cohort written under ``work`` and imported below ``data_root/name``: (DATA_DIR, ground truth)."""
    from importers.run import import_dicoms
    from importers.synthetic import write_synthetic_cohort
    from mammoflag.dicom.types import NormalizeOptions

    gt = write_synthetic_cohort(work / "dicom", n_studies, seed=seed, **synth)
    out = data_root / name
    import_dicoms(work / "dicom", out, NormalizeOptions(long_side=long_side), secret, data_root=data_root, workers=1,
                  progress=False)
    return out, gt
