"""The report as static HTML: tables, matplotlib figures as PNG files, thumbnails; opens from disk.

Nothing here computes a figure (reports/build.py does); every number in a table is also in
``report.json`` beside ``index.html``. No patient identifier is written: images are named by
task id, thumbnails carry pixels only, the key shown is the SOP Instance UID and frame.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mammoflag.card import to_jsonable
from mammoflag.fileio import atomic_write
from mammoflag.stats import ReliabilityCurve
from reports.build import ORDER_ACTIVE, ORDER_RANDOM, ORDER_UNKNOWN, Report, fmt
from reports.inputs import TaskRecord

THUMB_SIDE = 256
SECTIONS = (("summary", "Labels"), ("agreement", "Agreement between readers"), ("calibration", "Calibration"),
            ("subgroups", "Sites and devices"), ("learning", "Learning curve"), ("audit", "Header against model"),
            ("images", "Flagged and uncertain images"), ("cohort", "Flagged cohort"))


def _e(x: object) -> str:
    return html.escape(str(x))


def _ci(ci: Sequence[float] | None) -> str:
    return "n/a" if ci is None else f"{ci[0]:.2f}&ndash;{ci[1]:.2f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _figure(fig, out: Path, name: str) -> str:
    path = out / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return f'<img class="figure" src="figures/{path.name}" alt="{_e(name)}">'


def _new_figure(w: float = 4.2, h: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    return fig, fig.subplots()


def _reliability_figure(version: str, cls: str, n: int, temperature: str, before: ReliabilityCurve,
                        after: ReliabilityCurve, out: Path) -> str:
    fig, ax = _new_figure()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect")
    for curve, label in ((before, f"before T (ECE {before.ece:.3f})"),
                         (after, f"after {temperature} (ECE {after.ece:.3f})")):
        pts = [(b.mean_predicted, b.observed) for b in curve.bins if b.n]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
           title=f"{version} · {cls} (out of fold, n={n})")
    ax.legend(loc="upper left", fontsize=8)
    return _figure(fig, out, f"reliability-{version}-{cls}")


def _learning_figure(report: Report, out: Path) -> str:
    fig, ax = _new_figure(6, 3.6)
    pts = report.learning
    orders = {p.order for p in pts}
    if ORDER_ACTIVE in orders and ORDER_RANDOM in orders:  # both exist: one series per acquisition order
        for order, marker in ((ORDER_RANDOM, "s"), (ORDER_ACTIVE, "o"), (ORDER_UNKNOWN, "x")):
            sel = [p for p in pts if p.order == order]
            if sel:
                ax.plot([p.label_count for p in sel], [np.nan if p.mean_auroc is None else p.mean_auroc for p in sel],
                        marker=marker, label=f"mean AUROC, {order}")
        for p in pts:
            share = p.model_ordered_share
            if p.order == ORDER_ACTIVE and share is not None and p.mean_auroc is not None:
                ax.annotate(f"{share:.0%}", (p.label_count, p.mean_auroc), fontsize=7, xytext=(3, -9),
                            textcoords="offset points")
        title = "Every registered version, by how its labels were acquired (% = model-ordered share)"
    else:
        xs = [p.label_count for p in pts]
        ax.plot(xs, [np.nan if p.mean_auroc is None else p.mean_auroc for p in pts], marker="o", label="mean AUROC")
        title = "Every registered version" + (f" ({next(iter(orders))})" if len(orders) == 1 else "")
    xs = [p.label_count for p in pts]
    for c in report.classes:
        ax.plot(xs, [np.nan if p.oof_sensitivity.get(c) is None else p.oof_sensitivity[c] for p in pts], ls="--",
                marker=".", label=f"out-of-fold sensitivity {c}")
    ax.set(xlabel="labels", ylabel="validation metric", ylim=(0, 1.02))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return _figure(fig, out, "learning-curve")


def _thumb(record: TaskRecord | None, out: Path) -> str | None:
    if record is None or record.image is None or not record.image.exists():
        return None
    from PIL import Image

    path = out / "thumbs" / f"task-{record.task_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        with Image.open(record.image) as src:
            im = src.convert("L")
            im.thumbnail((THUMB_SIDE, THUMB_SIDE))
            im.save(path)  # pixels only: a new PNG without the source's text chunks
    return f"thumbs/{path.name}"


def render_report(report: Report, records: Sequence[TaskRecord], out: Path,
                  cam_files: Mapping[tuple[int, str], str] | None = None, cam_note: str = "") -> Path:
    """Write ``out/index.html`` (plus figures/, thumbs/, report.json); returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    by_id: Mapping[int, TaskRecord] = {r.task_id: r for r in records}
    parts: list[str] = []

    def section(sid: str, title: str, body: str) -> None:
        parts.append(f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>')

    titles = dict(SECTIONS)
    ls = report.label_status
    section("summary", titles["summary"],
            f"<p>{report.tasks_read} tasks read. Judged model version: <b>{_e(report.judged_version or 'none')}</b>."
            "</p>" + _table(["status", "tasks"], [[_e(k), f'<span data-status="{_e(k)}">{v}</span>']
                                                  for k, v in ls.items()])
            + "".join(f'<p class="note">{_e(n)}</p>' for n in report.notes))

    rows, pair_rows, model_rows = [], [], []
    for c, a in report.agreement.items():
        f = a.fleiss
        rows.append([_e(c), f'<span data-fleiss="{_e(c)}">{fmt(f.kappa, 3)}</span>', _ci(f.ci95),
                     f'<span data-double-read="{_e(c)}">{a.double_read_tasks}</span>', fmt(f.observed, 3)])
        for p in a.pairs:
            pair_rows.append([_e(c), f"reader {_e(p.reader_a)} &ndash; reader {_e(p.reader_b)}",
                              f'<span data-cohen="{_e(c)}:{_e(p.reader_a)}:{_e(p.reader_b)}">{fmt(p.estimate.kappa, 3)}'
                              "</span>", _ci(p.estimate.ci95), str(p.estimate.tasks)])
        for r, e in a.reader_vs_model.items():
            model_rows.append([_e(c), f"reader {_e(r)}", f'<span data-vs-model="{_e(c)}:{_e(r)}">{fmt(e.kappa, 3)}</span>',
                               _ci(e.ci95), str(e.tasks)])
    section("agreement", titles["agreement"],
            "<p>Chance-corrected agreement per class; 95 % intervals from a bootstrap over tasks. Readers are "
            "Label Studio user ids. Below about 0.6 a class's labels deserve a second look.</p>"
            "<h3>Fleiss' kappa (all readers, double-read tasks)</h3>"
            + _table(["class", "Fleiss' kappa", "95 % CI", "double-read tasks", "observed agreement"], rows, "fleiss")
            + "<h3>Cohen's kappa per pair of readers</h3>"
            + _table(["class", "pair", "Cohen's kappa", "95 % CI", "tasks"], pair_rows, "pairs")
            + f"<h3>Each reader against the model ({_e(report.judged_version or 'none')})</h3>"
            + _table(["class", "reader", "Cohen's kappa", "95 % CI", "tasks"], model_rows, "vs-model"))

    cal_rows, figs = [], []
    for row in report.calibration:
        key = f"{_e(row.version)}:{_e(row.cls)}"
        cal_rows.append([_e(row.version), _e(row.cls), f'<span data-oof-n="{key}">{row.n}</span>', str(row.positives),
                         f"{row.temperature:.3f}", " / ".join(f"{t:.3f}" for t in row.fold_temperatures),
                         f'<span data-ece-before="{key}">{row.before.ece:.4f}</span>',
                         f'<span data-ece-after="{key}">{row.after.ece:.4f}</span>', _e(row.split)])
        figs.append(_reliability_figure(row.version, row.cls, row.n, "T of the other fold", row.before, row.after,
                                        out))
    held_rows = [[_e(r.version), _e(r.cls), str(r.n), str(r.positives), f"{r.temperature:.3f}",
                  f'<span data-held-ece-before="{_e(r.version)}:{_e(r.cls)}">{r.before.ece:.4f}</span>',
                  f'<span data-held-ece-after="{_e(r.version)}:{_e(r.cls)}">{r.after.ece:.4f}</span>']
                 for r in report.held_out_calibration]
    section("calibration", titles["calibration"],
            "<p>Per version and class, from the version's model card: its <b>out-of-fold</b> estimate (the "
            "validation patients split in two by patient; each half scored with the temperature fitted on the other "
            "half, so no image is judged by a calibration fitted on it). Before: the network's own sigmoid; after: "
            "divided by the other fold's temperature. Nothing here is re-scored by the report.</p>"
            + _table(["version", "class", "images", "positives", "served T", "fold T", "ECE before", "ECE after",
                      "split"], cal_rows, "calibration")
            + "".join(f'<p class="note">{_e(m)}</p>' for m in report.calibration_missing)
            + f'<div class="figures">{"".join(figs)}</div>'
            + "<h3>Also: on images read after each version was made</h3><p>Another split, for comparison: images "
            "humans first read after the version was registered (never trained or calibrated on), scored by the "
            "report as served.</p>"
            + _table(["version", "class", "images", "positives", "temperature", "ECE before", "ECE after"], held_rows,
                     "held-out-calibration"))

    sg_rows = []
    for s in report.subgroups:
        key = f"{s.grouping}:{s.value}:{s.cls}"
        sg_rows.append([_e(s.grouping), _e(s.value), _e(s.cls), str(s.n),
                        f'<span data-positives="{_e(key)}">{s.positives}</span>',
                        f'<span data-sensitivity="{_e(key)}">{fmt(s.sensitivity)}</span>', _ci(s.sensitivity_ci95),
                        f'<span data-specificity="{_e(key)}">{fmt(s.specificity)}</span>', _ci(s.specificity_ci95),
                        f'<span class="note">{_e(s.note)}</span>'])
    section("subgroups", titles["subgroups"],
            f"<p>{_e(report.judged_version or 'No version')} at its thresholds, on the {report.subgroup_images} images "
            "read after it was made; Wilson 95 % intervals. Site is what the import calls it (import name or keyed "
            "hash), never an institution's name.</p>"
            + _table(["by", "group", "class", "images", "positives", "sensitivity", "95 % CI", "specificity",
                      "95 % CI", "note"], sg_rows, "subgroups"))

    def _acq(p) -> str:
        if not p.acquisition:
            return "not recorded"
        share = p.model_ordered_share
        counts = ", ".join(f"{_e(k)} {v}" for k, v in sorted(p.acquisition.items()) if v)
        return (f'<span data-order="{_e(p.version)}">{_e(p.order)}</span> ({counts}'
                + (f"; {share:.0%} model-ordered" if share is not None else "") + ")")

    lc_rows = [[_e(p.version) + (" (current)" if p.current else ""), f'<span data-labels="{_e(p.version)}">'
                f"{p.label_count}</span>", fmt(p.mean_auroc, 3),
                ", ".join(f"{_e(c)} {fmt(v)}" for c, v in p.oof_sensitivity.items()),
                ", ".join(f"{_e(c)}: {_e(v)}" for c, v in p.verdicts.items()), _acq(p)] for p in report.learning]
    section("learning", titles["learning"],
            "<p>Validation metrics of every registered version against the labels it was trained on, split by how "
            "those labels were acquired (recorded in each model card: a label is model-ordered when it was first "
            "answered after a model of the project first became current under uncertainty sampling; see "
            "docs/CONTRACTS.md).</p>"
            f'<p class="note" id="learning-orders">{_e(report.learning_orders)}.</p>'
            + (_learning_figure(report, out) if report.learning else "")
            + _table(["version", "labels", "mean AUROC", "out-of-fold sensitivity", "trust", "labels acquired"],
                     lc_rows, "learning"))

    au_rows = [[_e(a.manufacturer), _e(a.header_field), _e(a.cls), str(a.images),
                f'<span data-header-not-model="{_e(a.manufacturer)}:{_e(a.header_field)}">{a.header_yes_model_no}</span>',
                f'<span data-model-not-header="{_e(a.manufacturer)}:{_e(a.header_field)}">{a.header_no_model_yes}</span>',
                str(a.both_yes)] for a in report.audit]
    section("audit", titles["audit"],
            f"<p>From {_e(report.audit_source)}: images whose header says magnification, spot compression or a "
            "biopsy-procedure Image Type while the model does not flag the matching class, and the reverse.</p>"
            + _table(["manufacturer", "header says", "model class", "images", "header yes, model no",
                      "model yes, header no", "both"], au_rows, "audit"))

    cards = []
    for t in report.thumbs:
        src = _thumb(by_id.get(t.task_id), out)
        img = f'<img src="{src}" alt="task {t.task_id}">' if src else "<div class='noimg'>no image</div>"
        cam = (cam_files or {}).get((t.task_id, t.cls))
        if cam:
            img += f'<img class="cam" src="{cam}" alt="class activation map: {_e(t.cls)}, task {t.task_id}">'
        cards.append(f'<figure class="thumb {t.kind}" data-task="{t.task_id}">{img}<figcaption>{_e(t.kind)}: '
                     f"{_e(t.cls)} p={t.probability:.2f} (threshold {t.threshold:.2f})<br>task {t.task_id} · "
                     f"{_e(t.view)}<br><small>{_e(t.key)}</small></figcaption></figure>")
    section("images", titles["images"],
            "<p>The judged version's most confidently flagged and most uncertain images; beside each, the class "
            "activation map of the class named (the last convolutional features weighted by the classifier's "
            "weights, from one forward pass of the version's fp32 ONNX model) over the image as the model sees it "
            "(letterboxed). For a tiled network (markerpatch) each full-resolution tile's own logit is added where "
            "the tile was cut, so a marker found by the tiles shows as a bright square. A map on a frame edge or a "
            "text label instead of the marker is a model to distrust."
            f"{' ' + _e(cam_note) if cam_note else ''}</p>"
            f'<div class="thumbs">{"".join(cards)}</div>')

    if report.cohort:
        co = report.cohort
        shift = ""
        if co.shift is not None:
            shift = (f'<p class="{"warn" if co.shift.shifted else "note"}" data-shifted="{int(co.shift.shifted)}">'
                     f'{"Unlike the validation: " if co.shift.shifted else "Novelty: "}{_e(co.shift.explain())}.</p>')
        section("cohort", titles["cohort"],
                f"<p>{co.studies} studies flagged by {_e(co.model_version)}.</p>" + shift
                + _table(["class", "studies flagged", "of them by a human label", "reliable (trust gate)"],
                         [[_e(c), f'<span data-flagged="{_e(c)}">{n}</span>', str(co.flagged_by_human.get(c, 0)),
                           "yes" if co.reliable.get(c) else "no"] for c, n in co.flagged.items()]))

    nav = "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t in SECTIONS if sid != "cohort" or report.cohort)
    doc = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mammoflag report: {_e(report.project)}</title>
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:0 2em 3em;color:#222}}nav{{position:sticky;top:0;background:#fff;
padding:.5em 0;border-bottom:1px solid #ddd}}nav a{{margin-right:1em}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}th{{background:#f3f3f3}}.note{{color:#a40}}.warn{{color:#a00;font-weight:bold}}
.figures img,.figure{{margin:4px;border:1px solid #eee}}.thumbs{{display:flex;flex-wrap:wrap;gap:8px}}
.thumb{{margin:0;width:412px}}.thumb img{{width:200px;height:auto;margin-right:6px;background:#000;vertical-align:top}}.thumb.flagged{{border-top:4px solid #c22}}
.thumb.uncertain{{border-top:4px solid #e90}}</style></head><body>
<h1>mammoflag report: {_e(report.project)}</h1><p>Generated {_e(report.generated_at)}. Classes: {_e(", ".join(report.classes))}.
No patient identifiers: readers are user ids, images are named by task id and SOP Instance UID.</p>
<nav>{nav}</nav>{"".join(parts)}</body></html>"""
    atomic_write(out / "report.json", json.dumps(to_jsonable(report), indent=1, default=str))
    index = out / "index.html"
    atomic_write(index, doc)
    return index
