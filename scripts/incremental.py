"""Keeping up with new data on the simulator: a model retrained from scratch every window, one updated
incrementally, and one never updated — test quality per window and training cost.

Run from the repository root (after `pip install -e .`):

    python scripts/incremental.py                                       # din, 4 one-week windows of 28 days
    python scripts/incremental.py --model two_tower --out logs/incremental/two_tower
    python scripts/incremental.py --windows 4 trainer.max_epochs=3      # any override of conf/train.yaml

Every run is `train.py`'s (composed from conf/train.yaml with `protocol=window`, trained in this process), so
each has its own run directory, results.json and checkpoints under `--out`. For each window w = 0 .. W-2 the
test period is window w + 1 and the validation period the latest 10% of window w (`WindowSplit`):

- scratch: a fresh model trained on windows 0..w (`window_split.train=all`), vocabularies fitted on them;
- incremental: at w = 0 the scratch model (there is nothing earlier); then, from w = 1 on, the previous
  window's incremental model warm-started (`init_from`) with its vocabularies grown (`data.vocab_from`): old
  ids keep their embedding rows, new ids get fresh rows, and it trains on window w only, the earlier windows
  serving as history (behaviour sequences) without being trained on. The optimizer starts afresh;
- never updated: the window-0 model evaluated on window w + 1 as it was deployed: its weights (`init_from`)
  and its vocabularies frozen (`data.vocab_extend=false`), so a user or item it never saw reads row 0,
  "unknown" — what a deployed model that is never retrained does with a new id (giving new ids freshly
  initialised rows instead would be random, not the old model). Only the histories are up to date.

All three are scored on the same test rows of window w + 1 (CTR models: the logged impressions, so the AUCs
compare exactly). For ranking models the queries differ a little: targets on items outside a model's
vocabulary cannot be ranked and are counted (`test_targets_unknown_item` in results.json), not scored.
Training seconds are the fit's training time (validation excluded, `timing.seconds_per_epoch` x epochs).

Outputs in `--out`: results.json (every run's metrics, timing and protocol), a markdown table (printed, with
the command), and a plot: incremental.png with matplotlib, else incremental.svg (written without it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from recsys_lab.train import CONFIG_DIR, train  # importing it registers the resolvers

KINDS = ("scratch", "incremental", "never")
LABELS = {"scratch": "retrained from scratch", "incremental": "incremental", "never": "never updated"}
# the metric reported per model when --metric is not given; other models report their task's headline metric
# (test/auc for CTR models; the retrieval headline is ndcg@10, while recall@50 says more about a first stage)
DEFAULT_METRICS = {"din": "test/auc", "two_tower": "test/recall@50"}


def compose_run(model: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """conf/train.yaml as `train.py <overrides>` composes it, writing into `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", "protocol=window", "logger=none", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)  # `${hydra:runtime.output_dir}` has no value outside an app
    return cfg


def run(model: str, overrides: list[str], output_dir: Path, metric: str | None) -> dict:
    """Train (or only evaluate, with train=false) one configuration; its headline test metric and cost."""
    results = train(compose_run(model, overrides, output_dir))
    metric = metric or results["monitor"].replace("val/", "test/")  # the task's headline metric
    timing = results.get("timing") or {}
    seconds = (timing.get("seconds_per_epoch") or 0.0) * (timing.get("epochs") or 0)
    protocol = results["protocol"]
    return {
        "run_dir": str(output_dir),
        "metric": metric,
        "value": results["metrics"][metric],
        "train_seconds": seconds,
        "epochs": timing.get("epochs", 0),
        "train_rows": protocol.get("train_rows"),
        "test_rows": protocol.get("test_rows"),
        "test_queries": protocol.get("test_queries"),
        "test_targets_unknown_item": protocol.get("test_targets_unknown_item"),
        "warm_start": results["training"].get("warm_start"),
    }


def experiment(model: str, windows: int, out: Path, overrides: list[str], metric: str | None) -> list[dict]:
    """One row per window w = 0 .. windows-2: the scratch, incremental and never-updated runs."""
    common = [f"window_split.windows={windows}", *overrides]
    rows = []
    for w in range(windows - 1):
        scratch = run(
            model, [*common, f"data.window={w}", "window_split.train=all"], out / f"scratch_w{w}", metric
        )
        if w == 0:  # nothing earlier to start from: all three are the window-0 model
            incremental = never = scratch
        else:
            earlier = rows[-1]["incremental"]["run_dir"]
            grown = [f"data.vocab_from={earlier}", f"init_from={earlier}"]
            incremental = run(model, [*common, f"data.window={w}", *grown], out / f"incremental_w{w}", metric)
            first = rows[0]["scratch"]["run_dir"]
            frozen = [
                f"data.vocab_from={first}",
                "data.vocab_extend=false",
                f"init_from={first}",
                "train=false",
            ]
            never = run(model, [*common, f"data.window={w}", *frozen], out / f"never_w{w}", metric)
        rows.append({"window": w, "scratch": scratch, "incremental": incremental, "never": never})
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table: per window, each model's test metric and training seconds."""
    metric = rows[0]["scratch"]["metric"]
    lines = [
        f"| train window w | test window | scratch {metric} | scratch train s | incremental {metric} | "
        f"incremental train s | never updated {metric} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, i, n = r["scratch"], r["incremental"], r["never"]
        lines.append(
            f"| {r['window']} (scratch: 0..{r['window']}) | {r['window'] + 1} | {s['value']:.4f} | "
            f"{s['train_seconds']:.1f} | {i['value']:.4f} | {i['train_seconds']:.1f} | {n['value']:.4f} |"
        )
    total = {
        k: sum(r[k]["train_seconds"] for r in rows) for k in KINDS
    }  # window 0's run counts once per kind
    lines.append(
        f"| total training s | | | {total['scratch']:.1f} | | {total['incremental']:.1f} | "
        f"{total['never']:.1f} (window 0 only) |"
    )
    return "\n".join(lines)


def plot(rows: list[dict], folder: Path) -> Path:
    """Test metric per test window, one line per model: a PNG with matplotlib, else an SVG written by hand."""
    metric = rows[0]["scratch"]["metric"]
    series = {k: [(r["window"] + 1, r[k]["value"]) for r in rows] for k in KINDS}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(series, metric, folder / "incremental.svg")
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, points in series.items():
        ax.plot(*zip(*points, strict=True), marker="o", label=LABELS[kind])
    ax.set(xlabel="test window", ylabel=metric, xticks=[w for w, _ in series["scratch"]])
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "incremental.png", dpi=120)
    return folder / "incremental.png"


def _svg(series: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> Path:
    """A line chart as SVG text (no plotting library needed): x = test window, y = metric."""
    width, height, pad = 480, 320, 50
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys) - 0.01, max(ys) + 0.01

    def at(x: float, y: float) -> tuple[float, float]:  # data -> pixels (y grows downwards in SVG)
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad), height - pad - (y - y0) / (y1 - y0) * (
            height - 2 * pad
        )

    colours = {"scratch": "#1f77b4", "incremental": "#ff7f0e", "never": "#2ca02c"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="12">']
    parts.append(f'<rect width="{width}" height="{height}" fill="white"/>')
    parts.append(f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">test window</text>')
    parts.append(
        f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle">'
        f"{metric}</text>"
    )
    for y in (y0 + 0.01, (y0 + y1) / 2, y1 - 0.01):
        px, py = at(x0, y)
        parts.append(f'<text x="{px - 6}" y="{py + 4}" text-anchor="end">{y:.3f}</text>')
    for x in sorted(set(xs)):
        px, py = at(x, y0)
        parts.append(f'<text x="{px}" y="{py + 16}" text-anchor="middle">{x}</text>')
    for n, (kind, points) in enumerate(series.items()):
        line = " ".join("{:.1f},{:.1f}".format(*at(x, y)) for x, y in points)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colours[kind]}" stroke-width="2"/>')
        parts += [
            f'<circle cx="{at(x, y)[0]:.1f}" cy="{at(x, y)[1]:.1f}" r="3" fill="{colours[kind]}"/>'
            for x, y in points
        ]
        parts.append(
            f'<text x="{width - pad}" y="{20 + 16 * n}" text-anchor="end" fill="{colours[kind]}">'
            f"{LABELS[kind]}</text>"
        )
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="din", help="conf/model/<name> (din, two_tower, ...)")
    parser.add_argument(
        "--windows", type=int, default=4, help="equal windows the log's time span is cut into"
    )
    parser.add_argument("--out", type=Path, default=Path("logs/incremental"), help="output folder")
    parser.add_argument("--metric", default=None, help="test metric to report (default: DEFAULT_METRICS)")
    parser.add_argument("overrides", nargs="*", help="overrides of conf/train.yaml, as for train.py")
    args = parser.parse_args(argv)
    if args.windows < 2:
        raise SystemExit(f"--windows={args.windows}: expected at least 2 (one to train on, one to test on)")
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "scripts/incremental.py", *(argv if argv is not None else sys.argv[1:])])
    metric = args.metric or DEFAULT_METRICS.get(args.model)
    rows = experiment(args.model, args.windows, args.out.resolve(), args.overrides, metric)
    report = {"command": command, "model": args.model, "windows": args.windows, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    text = table(rows)
    figure = plot(rows, args.out)
    print(f"\n{command}\n\n{text}\n\nresults: {args.out / 'results.json'}, plot: {figure}")
    return report


if __name__ == "__main__":
    main()
