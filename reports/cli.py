"""``mammoflag report``: a thin shell over reports.run."""

from __future__ import annotations

import argparse
from pathlib import Path

from mammoflag.settings import Settings


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="static HTML report: reader agreement, calibration, sites/devices, learning curve, header audit",
        description="Writes DIR/index.html (open it from disk), figures/, thumbs/ and report.json. No patient "
                    "identifiers.")
    p.add_argument("--project", required=True, metavar="ID_OR_TITLE", help="the Label Studio project")
    p.add_argument("--flags", type=Path, default=None, help="flags.csv of a flagged cohort (adds the cohort section)")
    p.add_argument("--images", type=Path, default=None,
                   help="the cohort's images.csv for the header audit (default: images.csv beside --flags)")
    p.add_argument("--version", default=None, help="model version judged (default: the current one)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for kappa intervals")
    p.add_argument("--max-images", type=int, default=2000, help="images scored per model version at most")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from reports.run import report_for_project

    result = report_for_project(settings, args.project, args.out, judged=args.version, flags=args.flags,
                                images=args.images, resamples=args.resamples, max_images=args.max_images)
    print(f"report: {result.index} ({result.tasks} read tasks, {result.versions} model versions, "
          f"{result.seconds:.1f} s)")
    return 0
