"""The report end to end: read the project, the registry and the flagger's files; score; render."""

from __future__ import annotations

import csv
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from mammoflag.novelty import ShiftTest, cohort_shift, study_mean
from mammoflag.registry import FP32_FILE, INT8_FILE, ModelVersion, Registry
from mammoflag.settings import Settings
from reports.build import CohortSummary, Scores, VersionInfo, build_report
from reports.inputs import TaskRecord, audit_images_from_csv, records_from_tasks
from reports.render import render_report

log = logging.getLogger(__name__)
BATCH = 32


def onnx_scorer(max_images: int = 2000):
    """Scores records with a version's served ONNX file (INT8 when kept): raw logits, one load per version."""
    from PIL import Image

    from mammoflag.inference import OnnxClassifier
    from mammoflag.preprocess import model_input_batch

    loaded: dict[str, OnnxClassifier] = {}

    def score(version: VersionInfo, records: Sequence[TaskRecord]) -> Scores:
        if version.name not in loaded:
            if version.path is None:
                raise ValueError(f"version {version.name} has no registry folder to load")
            loaded[version.name] = OnnxClassifier(ModelVersion(version.path, version.card))
        model = loaded[version.name]
        chosen = [r for r in records if r.image is not None and r.image.exists()][:max_images]
        logits = []
        for i in range(0, len(chosen), BATCH):
            displays = []
            for r in chosen[i:i + BATCH]:
                assert r.image is not None
                with Image.open(r.image) as im:
                    displays.append(np.asarray(im.convert("L"), dtype=np.uint8))
            logits.append(np.asarray(model.logits(model_input_batch(displays, model.spec.input_size)), np.float64))
        z = np.concatenate(logits) if logits else np.zeros((0, len(version.card.spec.classes)))
        return Scores(version.name, tuple(r.task_id for r in chosen), z)

    return score


def versions_of(registry: Registry) -> list[VersionInfo]:
    current = registry.current_name()
    out = []
    for v in registry.versions():
        out.append(VersionInfo(v.name, v.card, v.name == current, v.path))
    return out


def cohort_from_flags(path: Path) -> CohortSummary:
    """flags.csv (docs/CONTRACTS.md "Flagger outputs"): studies flagged per class, by whom, reliable or not."""
    flagged: dict[str, int] = {}
    by_human: dict[str, int] = {}
    reliable: dict[str, bool] = {}
    studies, version, variant = 0, "", ""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        classes = [c[len("flag_"):] for c in reader.fieldnames or [] if c.startswith("flag_")]
        for row in reader:
            studies += 1
            version = row.get("model_version") or version
            variant = row.get("model_variant") or variant
            for c in classes:
                flagged.setdefault(c, 0)
                by_human.setdefault(c, 0)
                if row.get(f"flag_{c}") == "1":
                    flagged[c] += 1
                    by_human[c] += int(row.get(f"source_{c}") == "human")
                reliable[c] = row.get(f"reliable_{c}") == "1"
    return CohortSummary(studies, flagged, by_human, reliable, version, variant)


def cohort_shift_from_images(images: Path, cohort: CohortSummary, versions: Sequence[VersionInfo]) -> ShiftTest | None:
    """The flagging run's shift test again, from images.csv's novelty column and the reference the flagging
    version kept (None when the column is empty, or the version or its reference is not in this registry)."""
    version = next((v for v in versions if v.name == cohort.model_version and v.path is not None), None)
    if version is None or version.path is None:
        return None
    scored = novel = 0
    by_study: dict[str, list[float]] = {}
    with open(images, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row.get("novelty"):
                scored += 1
                novel += float(row["novelty"]) > 1.0
                by_study.setdefault(row["study_id"], []).append(float(row["novelty"]))
    model_file = INT8_FILE if cohort.model_variant == "int8" else FP32_FILE
    return cohort_shift(version.path, model_file, scored, novel, Counter(study_mean(v) for v in by_study.values()))


def cam_images(version: VersionInfo, records: Sequence[TaskRecord], thumbs, out: Path
               ) -> tuple[dict[tuple[int, str], str], str]:
    """Class activation maps of the thumbnails' images as PNGs under out/cams; (files, note when none)."""
    from PIL import Image

    from mammoflag.preprocess import model_input_batch
    from reports.cam import NoCam, class_maps, load_cam_model, overlay_png

    if version.path is None or not thumbs:
        return {}, ""
    try:
        cam = load_cam_model(ModelVersion(version.path, version.card).onnx_path)
    except (NoCam, OSError) as exc:
        log.warning("no class activation maps for %s: %s", version.name, exc)
        return {}, f"(No maps for {version.name}: {exc}.)"
    by_id = {r.task_id: r for r in records}
    wanted = [t for t in thumbs if by_id.get(t.task_id) is not None and by_id[t.task_id].image is not None]
    classes = list(version.card.spec.classes)
    files: dict[tuple[int, str], str] = {}
    for i in range(0, len(wanted), BATCH):
        chunk = wanted[i:i + BATCH]
        displays = []
        for t in chunk:
            image = by_id[t.task_id].image
            assert image is not None
            with Image.open(image) as im:
                displays.append(np.asarray(im.convert("L"), dtype=np.uint8))
        batch = model_input_batch(displays, version.card.spec.input_size)
        _, maps = class_maps(cam, batch, displays)  # the displays place a tiled network's tiles
        for j, t in enumerate(chunk):
            name = f"cams/task-{t.task_id}-{t.cls}.png"
            overlay_png(batch[j], maps[j, classes.index(t.cls)], out / name)
            files[(t.task_id, t.cls)] = name
    return files, ""


@dataclass(frozen=True)
class ReportResult:
    index: Path
    tasks: int
    versions: int
    seconds: float


def make_report(records: Sequence[TaskRecord], registry: Registry, project: str, out: Path, judged: str | None = None,
                flags: Path | None = None, images: Path | None = None, resamples: int = 1000,
                max_images: int = 2000) -> ReportResult:
    t0 = time.monotonic()
    versions = versions_of(registry)
    cohort = cohort_from_flags(flags) if flags else None
    if images is None and flags is not None and (flags.parent / "images.csv").exists():
        images = flags.parent / "images.csv"
    classes = versions[0].card.spec.classes if versions else ()
    cohort_images = audit_images_from_csv(images, classes) if images else None
    if cohort is not None and images is not None:
        cohort = replace(cohort, shift=cohort_shift_from_images(images, cohort, versions))
    report = build_report(project, records, versions, onnx_scorer(max_images), judged, cohort_images, cohort,
                          resamples)
    by_name = {v.name: v for v in versions}
    judged_v = by_name.get(report.judged_version or "")
    cam_files, cam_note = ({}, "") if judged_v is None else cam_images(judged_v, records, report.thumbs, out)
    index = render_report(report, records, out, cam_files, cam_note)
    return ReportResult(index, len(records), len(versions), time.monotonic() - t0)


def report_for_project(settings: Settings, id_or_title: str, out: Path, **kw) -> ReportResult:
    from mammoflag.labelstudio import LabelStudioError, adjudicator_ids, connect, find_project, iter_annotated_tasks

    client = connect(settings)
    project = find_project(client, id_or_title)
    if project is None:
        raise LabelStudioError(f"no Label Studio project {id_or_title!r}")
    config = settings.label_config()
    registry = Registry(settings.models_dir)
    current = registry.current()
    spec = current.spec if current else None
    if spec is None:
        versions = registry.versions()
        spec = versions[-1].spec if versions else None
    if spec is None:
        from mammoflag.spec import ModelSpec

        spec = ModelSpec.from_label_config(config)
    records = records_from_tasks(iter_annotated_tasks(client, project.id), spec, settings.data_root,
                                 config.image_value, adjudicator_ids(client, settings.adjudicators))
    return make_report(records, registry, f"{project.title} (project {project.id})", out, **kw)
