"""Finding finished runs and grouping them into table rows, shared by scripts/summarize.py and
scripts/compare.py.

A run is a folder with a `results.json` (written by train.py). Runs are grouped by model config (Hydra's
`model=` choice, from the run's `.hydra/hydra.yaml`; the model class where that is missing), protocol preset
and evaluation candidates, so that the seeds of one setup make one row. Errors name the file and carry no
script prefix: each script adds its own name when it prints them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

# overrides that never tell a group apart: the seed varies inside a group, the model is the label already
IGNORED_OVERRIDES = ("seed=", "model=", "logger=", "hydra.", "+hydra.")


def model_choice(run_dir: Path, results: dict) -> str:
    """The `model=` option a run was started with; the model class name for runs without Hydra's record."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        choices = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {})
        choice = (choices.get("choices") or {}).get("model")
        if choice:
            return str(choice)
    return str(results.get("model", "?")).rsplit(".", 1)[-1]


def run_overrides(run_dir: Path) -> str:
    """The run's command-line overrides that tell its group apart ("" without Hydra's record)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(path.read_text()) if path.is_file() else []
    return " ".join(o for o in overrides or [] if not o.startswith(IGNORED_OVERRIDES))


def candidates(protocol: dict) -> str:
    """The evaluation candidates of a protocol as one string ("full", "uniform_100", or its JSON)."""
    value = protocol.get("eval_candidates", "?")
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def run_record(path: Path | str, model: str, results: dict) -> dict:
    """One run as the scripts read it: its group keys, test metrics, timing and the whole results dict."""
    protocol = results.get("protocol") or {}
    return {
        "path": path,
        "model": model,
        "protocol": str(protocol.get("protocol_preset") or "-"),
        "candidates": candidates(protocol),
        "seed": results.get("seed"),
        "metrics": results.get("metrics", {}),
        "timing": results.get("timing") or {},
        "results": results,
    }


def load_runs(folders: Iterable[Path], by_overrides: bool = False) -> list[dict]:
    """One record per results.json under the folders (or the results.json files given); with `by_overrides`
    the model's label carries the run's distinguishing overrides."""
    folders = list(folders)
    runs = []
    for folder in folders:
        if not folder.exists():
            raise FileNotFoundError(f"{folder} does not exist")
        files = [folder] if folder.is_file() else sorted(folder.rglob("results.json"))
        for path in files:
            try:
                results = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"{path} is not a readable results.json ({err})") from err
            label = model_choice(path.parent, results)
            if by_overrides and (overrides := run_overrides(path.parent)):
                label = f"{label} {overrides}"
            runs.append(run_record(path, label, results))
    if not runs:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, folders))}")
    return runs


def lookup(results: dict, dotted: str):
    """results["a"]["b"] for "a.b"; None where a part is missing."""
    value = results
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def group_runs(runs: Sequence[dict], by: Sequence[str] = ()) -> dict[tuple, list[dict]]:
    """Runs by (model, protocol, candidates, *the results' values at `by`), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = (
            run["model"],
            run["protocol"],
            run["candidates"],
            *(str(lookup(run["results"], b)) for b in by),
        )
        groups.setdefault(key, []).append(run)
    return groups
