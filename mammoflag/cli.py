"""The ``mammoflag`` console script: one subcommand per stage, each a thin shell.

Each stage package owns its subcommands in its own ``cli.py`` with a
``register(subparsers)`` function; nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mammoflag.settings import MissingSecret, Settings, environment_with_secrets

# (module, register function) per stage; modules register their subcommands and set `func`.
STAGES = [
    "importers.cli",
    "training.cli",
    "ml_backend.cli",
    "flagger.cli",
    "reports.cli",
    "mammoflag.platform",
    "mammoflag.users",
    "mammoflag.worker",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mammoflag", description="Human-in-the-loop study-level flags for mammography archives.")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: MAMMOFLAG_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the environment wins; `mammoflag up` keeps generated secrets in $MAMMOFLAG_HOME/secrets.env
    settings = Settings.from_env(environment_with_secrets(os.environ))
    logging.basicConfig(
        level=(args.log_level or settings.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args, settings) or 0)
    except MissingSecret as exc:
        print(f"mammoflag: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
