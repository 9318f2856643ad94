"""One way for benchmarks to add a result to their JSON file under benchmarks/results/."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def merge_results(key: str, value: dict, results_path: Path, machine: dict[str, Any]) -> None:
    """``results_path[key] = value`` plus the machine it ran on and when; other keys are kept; atomic replace."""
    results_path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(results_path.read_text()) if results_path.exists() else {}
    current[key] = {**value, "machine": {**machine, "when": time.strftime("%F %T")}}
    tmp = results_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
    os.replace(tmp, results_path)
