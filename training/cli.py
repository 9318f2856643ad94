"""``mammoflag train``: a thin shell over training.train."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mammoflag.settings import Settings


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a model version from Label Studio labels and register it",
                                  description="Train, calibrate, export to ONNX and register a model version; "
                                              "prints the model card summary.")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--project", type=int, metavar="ID", help="read annotations live from this Label Studio project")
    source.add_argument("--export", type=Path, metavar="FILE", help="a Label Studio JSON export file")
    train.add_argument("--data-root", type=Path, metavar="DIR",
                       help="the root task image URLs are relative to (required with --export; "
                            "default MAMMOFLAG_DATA_ROOT)")
    train.add_argument("--models", type=Path, metavar="DIR", help="model registry (default MAMMOFLAG_MODELS_DIR)")
    train.add_argument("--mode", choices=["fine_tune", "frozen", "head_only", "auto"],
                       help="how to fit (default fine_tune; auto: head-only refits between full fine-tunes)")
    train.add_argument("--epochs", type=int, help="whole-network epochs after the frozen ones")
    train.add_argument("--input-size", type=int, help="model input side (default MAMMOFLAG_INPUT_SIZE)")
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    from mammoflag.registry import Registry
    from mammoflag.spec import ModelSpec
    from training.dataset import DatasetError, labelled_set_from_export, labelled_set_from_project
    from training.modelcard import card_summary
    from training.train import NotEnoughLabels, TrainConfig, train_version

    if args.export and not args.data_root:
        print("mammoflag train: --export needs --data-root (the folder the task image URLs are relative to)",
              file=sys.stderr)
        return 2
    data_root = (args.data_root or settings.data_root).resolve()
    spec = ModelSpec.from_label_config(settings.label_config(), input_size=args.input_size or settings.input_size)
    overrides = {k: v for k, v in (("mode", args.mode), ("epochs", args.epochs)) if v is not None}
    config = TrainConfig.from_settings(settings, **overrides)
    try:
        if args.project is not None:
            from mammoflag.labelstudio import connect

            labelled = labelled_set_from_project(connect(settings), args.project, spec, data_root,
                                                 adjudicators=settings.adjudicators)
            source = {"project_id": args.project}
        else:
            labelled = labelled_set_from_export(args.export, spec, data_root, adjudicators=settings.adjudicators)
            source = {"export": args.export.name}
        result = train_version(labelled, spec, Registry(args.models or settings.models_dir), config, source)
    except (DatasetError, NotEnoughLabels) as exc:
        print(f"mammoflag train: {exc}", file=sys.stderr)
        return 1
    print(card_summary(result.card))
    return 0

