"""Paper tables from many runs: per model, each test metric's mean and 95% confidence interval over seeds, and
paired significance tests of every model against a baseline on the same test queries.

    python train.py -m model=sasrec,gru4rec,bert4rec data=movielens protocol=recbole_sequential seed=1,2,3,4,5
    python scripts/compare.py logs/train/multiruns/<time> --metrics recall@10 ndcg@10 --baseline gru4rec

Runs are found and grouped into rows as scripts/summarize.py does (recsys_lab.analysis.runs): Hydra's
`model=` choice, protocol preset and candidates; `--by-overrides` splits on the other overrides. Each row
gives mean ± half-width of the Student-t 95% interval over its runs (seeds). Paired tests use the runs'
`per_query.parquet`: each model's per-query values are averaged over its seeds per `query_key`, then paired
with the baseline's on the same keys (paired t-test and Wilcoxon signed-rank); all p-values of one test
across the table are adjusted together (`--correction`, Holm by default). Different query sets or data
fingerprints between a model and the baseline stop the script: a test over different test sets means nothing.

Writes compare.md (also printed), compare.csv, compare.tex (booktabs) and bar_<metric>.png into `--out`
(default: the first input folder); `--wandb` logs the table and charts to a W&B run, and `--wandb-group
entity/project/group` reads the runs from W&B instead of (or besides) folders.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recsys_lab.analysis import plots, stats
from recsys_lab.analysis.runs import group_runs, load_runs, run_record

DEFAULT_METRICS = ("test/recall@10", "test/ndcg@10", "test/mrr@10", "test/auc", "test/gauc", "test/logloss")
# metric names (without the stage) where smaller is better: exact names and prefixes
LOWER_IS_BETTER = {"logloss", "ece"}
LOWER_IS_BETTER_PREFIXES = ("gini", "popularity")
CONFIDENCE = 0.95
ALPHA = 0.05
PER_QUERY_FILE = "per_query.parquet"
CORRECTION_NAMES = {"holm": "Holm–Bonferroni", "bh": "Benjamini–Hochberg", "none": "no correction"}
WANDB_INIT_TIMEOUT = 20  # seconds; the run falls back to offline (or stops) rather than waiting longer
NO_TEST = "—"


@dataclass
class Cell:
    """One model's value of one metric over its seeds, and its paired test against the baseline."""

    mean: float
    low: float
    high: float
    n: int
    best: bool = False
    tied: bool = False  # its confidence interval overlaps the best row's
    test: dict | None = None  # stats.paired_tests + "pairs", "p_t_adj", "p_wilcoxon_adj"


@dataclass
class Row:
    label: str
    protocol: str
    candidates: str
    runs: list[dict]
    cells: dict[str, Cell | None] = field(default_factory=dict)  # metric -> None when no run has it


@dataclass
class Comparison:
    rows: list[Row]
    metrics: list[str]
    baseline: str
    baseline_chosen: bool  # given with --baseline (else the first row in sorted order)
    correction: str
    notes: list[str]


def short(metric: str) -> str:
    """The metric's name without its stage: test/ndcg@10 -> ndcg@10 (the per-query column name)."""
    return metric.split("/", 1)[1] if metric.startswith("test/") else metric


def lower_is_better(metric: str) -> bool:
    """Losses, calibration error, exposure concentration, popularity, and fairness gaps (test/gap/...)."""
    name = metric.rsplit("/", 1)[-1]
    return "/gap/" in metric or name in LOWER_IS_BETTER or name.startswith(LOWER_IS_BETTER_PREFIXES)


# ---------------------------------------------------------------------------------------------- collecting


def folder_runs(folders: Sequence[Path], by_overrides: bool) -> list[dict]:
    """Runs under the folders, each with the path of its per_query.parquet (None without one)."""
    runs = load_runs(folders, by_overrides)
    for run in runs:
        per_query = Path(run["path"]).parent / PER_QUERY_FILE
        run["per_query"] = per_query if per_query.is_file() else None
    return runs


def first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _config_value(value):
    """W&B's API has returned config entries both as values and as {"value": ..., "desc": ...}."""
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
        return value["value"]
    return value


def wandb_runs(group_path: str, download_to: Path) -> list[dict]:
    """The runs of a W&B group ("entity/project/group") as run records, read through the public API.

    train.py logs `run_info` as the run's config: {"config": the resolved Hydra config, "data_fingerprint",
    "protocol", "training", "git_commit", "choices"}. The label is the `model=` choice (`choices.model`); runs
    logged before it was recorded get the model class (`config.model.net._target_`). Test metrics are
    the summary's `test/*` values; a run's uploaded per_query.parquet is downloaded under `download_to`.
    """
    import wandb

    parts = group_path.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"--wandb-group '{group_path}': expected entity/project/group")
    entity, project, group = parts
    try:
        found = list(wandb.Api(timeout=30).runs(f"{entity}/{project}", filters={"group": group}))
    # the API's errors (network, authentication, unknown project) have no common base class
    except Exception as err:
        raise ValueError(f"W&B group {group_path} could not be read ({first_line(err)})") from err
    runs = []
    for run in found:
        config = {key: _config_value(value) for key, value in dict(run.config).items()}
        hydra_config = config.get("config") or {}
        model = hydra_config.get("model") or {}
        target = (model.get("net") or {}).get("_target_") or model.get("_target_") or run.name
        # train.py logs the `model=` choice too; older runs are labelled by their model class
        label = (config.get("choices") or {}).get("model") or str(target).rsplit(".", 1)[-1]
        results = {
            "metrics": {
                key: float(value)
                for key, value in dict(run.summary_metrics).items()
                if key.startswith("test/") and isinstance(value, int | float)
            },
            "model": target,
            "seed": hydra_config.get("seed"),
            "data_fingerprint": config.get("data_fingerprint"),
            "prepared_fingerprint": config.get("prepared_fingerprint"),
            "protocol": config.get("protocol") or {},
        }
        record = run_record(f"wandb:{entity}/{project}/{run.id}", label, results)
        record["per_query"] = None
        for remote in run.files(names=[PER_QUERY_FILE]):
            if remote.name == PER_QUERY_FILE:
                remote.download(root=str(download_to / run.id), replace=True)
                record["per_query"] = download_to / run.id / PER_QUERY_FILE
        runs.append(record)
    if not runs:
        raise FileNotFoundError(f"no runs in W&B group {group_path}")
    return runs


def make_rows(runs: list[dict]) -> list[Row]:
    """Rows sorted by label; the label is the model, with protocol and candidates where a model has several."""
    groups = group_runs(runs)
    models = [model for model, *_ in groups]
    rows = []
    for (model, protocol, candidates), members in groups.items():
        label = model if models.count(model) == 1 else f"{model} [{protocol}, {candidates}]"
        rows.append(Row(label, protocol, candidates, members))
    return sorted(rows, key=lambda row: row.label)


def choose_metrics(runs: list[dict], requested: Sequence[str] | None) -> list[str]:
    """The metrics as results.json names ("ndcg@10" means test/ndcg@10); each must be in some run."""
    available = sorted({name for run in runs for name in run["metrics"]})
    if not requested:
        chosen = [m for m in DEFAULT_METRICS if m in available]
        return chosen or [m for m in available if m.startswith("test/")]
    # "ndcg@10" and "gap/user:gender/ndcg@10" mean test/...; val/ and best_ names are taken as they are
    chosen = [m if m.startswith(("test/", "val/", "best_")) else f"test/{m}" for m in requested]
    unknown = [m for m in chosen if m not in available]
    if unknown:
        plain = [m for m in available if "/slice/" not in m and "/gap/" not in m]
        sliced = len(available) - len(plain)
        more = f" (and {sliced} slice and gap metrics, test/slice/... and test/gap/...)" if sliced else ""
        raise ValueError(f"unknown metric {', '.join(unknown)}; the runs have {', '.join(plain)}{more}")
    return list(dict.fromkeys(chosen))


# ---------------------------------------------------------------------------------------------- statistics


def summarize_cells(row: Row, metrics: Sequence[str]) -> None:
    for metric in metrics:
        values = [run["metrics"][metric] for run in row.runs if metric in run["metrics"]]
        if values and len(values) != len(row.runs):
            missing = [run_name(run) for run in row.runs if metric not in run["metrics"]]
            raise ValueError(f"{metric} is missing from some runs of {row.label}: {', '.join(missing)}")
        try:
            row.cells[metric] = Cell(*stats.mean_ci(values, CONFIDENCE)) if values else None
        except ValueError as err:  # a NaN in a results.json
            raise ValueError(
                f"{metric} of {row.label} ({', '.join(map(run_name, row.runs))}): {err}"
            ) from None


def mark_best(rows: list[Row], metric: str) -> None:
    """Bold the best mean (ties in the mean all bold); mark rows whose interval overlaps the best's.
    A single run's interval is its value."""
    cells = [row.cells[metric] for row in rows if row.cells.get(metric) is not None]
    if not cells:
        return
    pick = min if lower_is_better(metric) else max
    best_mean = pick(cell.mean for cell in cells)

    def interval(cell: Cell) -> tuple[float, float]:
        return (cell.mean, cell.mean) if math.isnan(cell.low) else (cell.low, cell.high)

    best_intervals = [interval(cell) for cell in cells if cell.mean == best_mean]
    for cell in cells:
        cell.best = cell.mean == best_mean
        low, high = interval(cell)
        cell.tied = not cell.best and any(low <= b_high and b_low <= high for b_low, b_high in best_intervals)


def run_name(run: dict) -> str:
    """The run's folder (or W&B path), for messages."""
    path = run["path"]
    return str(path.parent) if isinstance(path, Path) and path.name == "results.json" else str(path)


def read_per_query(path: Path) -> pl.DataFrame:
    try:
        frame = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as err:
        raise ValueError(f"{path} is not a readable parquet file ({first_line(err)})") from err
    if "query_key" not in frame.columns:
        raise ValueError(f"{path} has no query_key column; columns are {', '.join(frame.columns)}")
    duplicates = frame.height - frame["query_key"].n_unique()
    if duplicates:
        raise ValueError(f"{path}: query_key is not unique ({duplicates} repeated keys)")
    return frame.with_columns(pl.col("query_key").cast(pl.String)).sort("query_key")


def key_difference(name_a: str, keys_a: np.ndarray, name_b: str, keys_b: np.ndarray) -> str:
    """How two query sets differ: their sizes and up to three keys found on one side only."""

    def only(keys: np.ndarray, name: str) -> str:
        examples = f" (e.g. {', '.join(map(str, keys[:3]))})" if len(keys) else ""
        return f"{len(keys)} only in {name}{examples}"

    only_a, only_b = np.setdiff1d(keys_a, keys_b), np.setdiff1d(keys_b, keys_a)
    return f"{len(keys_a)} queries against {len(keys_b)}; {only(only_a, name_a)}, {only(only_b, name_b)}"


def seed_averaged(row: Row, columns: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The row's query keys, sorted (Q,), and per metric column the mean over its seeds per key (Q,).
    A column missing from any of its runs is left out; a NaN in any seed stays NaN."""
    keys, first, stacks = None, None, {}
    for run in row.runs:
        frame = read_per_query(run["per_query"])
        run_keys = frame["query_key"].to_numpy()
        if keys is None:
            keys, first = run_keys, run
        elif not np.array_equal(keys, run_keys):
            raise ValueError(
                f"the runs of {row.label} were tested on different queries: {first['per_query']} and "
                f"{run['per_query']} ({key_difference('the first', keys, 'the second', run_keys)})"
            )
        for column in columns:
            if column in frame.columns:
                stacks.setdefault(column, []).append(frame[column].cast(pl.Float64).to_numpy())
    averaged = {c: np.vstack(v).mean(axis=0) for c, v in stacks.items() if len(v) == len(row.runs)}  # (Q,)
    return keys, averaged


def test_set_fingerprint(results: dict) -> str | None:
    """What identifies a run's held-out interactions: the prepared data's fingerprint (source, preprocessing,
    split, candidates; train.py records it as `prepared_fingerprint`), the same for every model tested on it.
    Older runs have only `data_fingerprint`, which also covers what the model's view gathers."""
    return results.get("prepared_fingerprint") or results.get("data_fingerprint")


def fingerprints(row: Row) -> set[str]:
    found = {test_set_fingerprint(run["results"]) for run in row.runs} - {None}
    if len(found) > 1:
        raise ValueError(
            f"the runs of {row.label} have different data fingerprints ({', '.join(sorted(found))})"
        )
    return found


def check_same_test_set(row: Row, base: Row, keys: np.ndarray, base_keys: np.ndarray) -> None:
    """A paired test needs the same data, protocol and queries on both sides; anything else is an error."""
    problem = None
    row_prints, base_prints = fingerprints(row), fingerprints(base)
    if row_prints and base_prints and row_prints != base_prints:
        problem = f"data fingerprint {', '.join(row_prints)} against {', '.join(base_prints)}"
    elif (row.protocol, row.candidates) != (base.protocol, base.candidates):
        problem = (
            f"protocol {row.protocol}, candidates {row.candidates} against "
            f"protocol {base.protocol}, candidates {base.candidates}"
        )
    elif not np.array_equal(keys, base_keys):
        problem = key_difference(row.label, keys, base.label, base_keys)
    if problem:
        raise ValueError(
            f"{row.label} and the baseline {base.label} were tested on different test sets ({problem}); "
            "paired tests need the same queries: compare runs of the same data and protocol"
        )


def paired_against_baseline(rows: list[Row], base: Row, metrics: Sequence[str], notes: list[str]) -> None:
    """Fill each cell's test with the paired tests of the row's seed-averaged per-query values against the
    baseline's; NaN values (a CTR user with one class) and infinite ones are left out pair by pair, and the
    pairs used are counted."""
    lacking = {row.label: [run_name(r) for r in row.runs if r.get("per_query") is None] for row in rows}
    for label, paths in lacking.items():
        if paths:
            notes.append(f"no {PER_QUERY_FILE} (no paired tests for {label}): {', '.join(paths)}")
    if lacking[base.label]:
        notes.append(f"the baseline {base.label} lacks per-query values, so no model has a paired test")
        return
    columns = [short(m) for m in metrics]
    base_keys, base_values = seed_averaged(base, columns)
    untested = [m for m in metrics if short(m) not in base_values]
    if untested:
        notes.append(f"no per-query values, so no paired test: {', '.join(untested)}")
    if {"gauc", "logloss"} & set(base_values):  # CTR runs: the per-query values are per-user means
        notes.append(
            "CTR: the paired tests compare per-user AUC and per-user mean log loss, each user counting once; "
            "the table's gauc and logloss weight users by their impressions, so Δ need not equal the "
            "difference of the table's means"
        )
    for row in rows:
        if row is base or lacking[row.label]:
            continue
        keys, values = seed_averaged(row, columns)
        check_same_test_set(row, base, keys, base_keys)
        for metric in metrics:
            column, cell = short(metric), row.cells[metric]
            if (
                cell is None
                or base.cells[metric] is None
                or column not in values
                or column not in base_values
            ):
                continue
            a, b = values[column], base_values[column]
            usable = np.isfinite(a) & np.isfinite(b)
            if usable.sum() < 2:
                notes.append(f"{row.label} {metric}: {usable.sum()} usable query pairs, no paired test")
                continue
            cell.test = stats.paired_tests(a[usable], b[usable]) | {"pairs": int(usable.sum())}


def adjust_table(rows: list[Row], metrics: Sequence[str], correction: str) -> int:
    """Adjust all p-values of each test (t, Wilcoxon) across the whole table; returns the family size."""
    tested = [row.cells[m] for row in rows for m in metrics if row.cells.get(m) and row.cells[m].test]
    for key in ("p_t", "p_wilcoxon"):
        adjusted = stats.adjust([cell.test[key] for cell in tested], correction)
        for cell, value in zip(tested, adjusted, strict=True):
            cell.test[f"{key}_adj"] = float(value)
    return len(tested)


def compare(
    runs: list[dict], metrics: Sequence[str] | None, baseline: str | None, correction: str
) -> Comparison:
    if correction not in CORRECTION_NAMES:
        raise ValueError(
            f"correction '{correction}' is unknown; expected one of {', '.join(CORRECTION_NAMES)}"
        )
    metrics = choose_metrics(runs, metrics)
    rows = make_rows(runs)
    labels = [row.label for row in rows]
    if baseline is not None and baseline not in labels:
        raise ValueError(f"unknown baseline '{baseline}'; the models are {', '.join(labels)}")
    base = rows[labels.index(baseline)] if baseline is not None else rows[0]
    for row in rows:
        fingerprints(row)  # one test set per row: a row pooling two data sets would average across them
        summarize_cells(row, metrics)
    for metric in metrics:
        mark_best(rows, metric)
    notes: list[str] = []
    paired_against_baseline(rows, base, metrics, notes)
    adjust_table(rows, metrics, correction)
    return Comparison(rows, list(metrics), base.label, baseline is not None, correction, notes)


# ---------------------------------------------------------------------------------------------- writing


def fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}"


def fmt_p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def significant(cell: Cell, key: str) -> bool:
    return cell.test is not None and cell.test[f"{key}_adj"] < ALPHA


def legend(comparison: Comparison) -> list[str]:
    tests = [cell.test for row in comparison.rows for cell in row.cells.values() if cell and cell.test]
    lower = ", ".join([*sorted(LOWER_IS_BETTER), *(f"{p}*" for p in LOWER_IS_BETTER_PREFIXES), "gap/*"])
    how = (
        "the first row in sorted order; choose with --baseline"
        if not comparison.baseline_chosen
        else "--baseline"
    )
    if not tests:
        family = "none needed, there are no paired tests"
    elif comparison.correction == "none":
        family = f"no correction: raw p-values of the {len(tests)} tests of each kind"
    else:
        family = (
            f"{CORRECTION_NAMES[comparison.correction]} adjustment over the family of all {len(tests)} paired "
            "t-tests of the table (every model × metric with per-query values, against the baseline), and "
            f"separately over the {len(tests)} Wilcoxon tests"
        )
    return [
        f"Mean ± half-width of the {CONFIDENCE:.0%} Student-t confidence interval over seeds (n = seeds). "
        f"Baseline: {comparison.baseline} ({how}).",
        f"Bold: best mean of the column (higher is better; lower for {lower}). "
        f"≈: its {CONFIDENCE:.0%} CI overlaps the best row's.",
        f"\\*: differs from the baseline at p < {ALPHA} (after the correction below) in a paired t-test, †: in a Wilcoxon "
        "signed-rank test (two-sided, over the test queries, each model's values averaged over its seeds).",
        f"Multiple testing: {family}.",
    ]


def md_cell(cell: Cell | None) -> str:
    if cell is None:
        return "n/a"
    text = fmt(cell.mean) if math.isnan(cell.low) else f"{fmt(cell.mean)} ± {fmt(cell.high - cell.mean)}"
    text = f"**{text}**" if cell.best else text
    marks = "≈" * cell.tied + "\\*" * significant(cell, "p_t") + "†" * significant(cell, "p_wilcoxon")
    return f"{text} {marks}" if marks else text


def tests_table(comparison: Comparison) -> list[str]:
    """Markdown lines: per model and metric, the mean difference, the pairs used and the raw and adjusted
    p-values of both tests ("—" where there is no test)."""
    others = [row for row in comparison.rows if row.label != comparison.baseline]
    if not any(cell and cell.test for row in others for cell in row.cells.values()):
        return ["No paired tests (see the notes)."]
    method = CORRECTION_NAMES[comparison.correction]
    lines = [
        f"Paired tests against {comparison.baseline} (Δ = model − baseline; adj.: {method}):",
        "",
        "| model | metric | Δ mean | pairs | p t-test | p t-test adj. | p Wilcoxon | p Wilcoxon adj. |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in others:
        for metric in comparison.metrics:
            test = row.cells[metric].test if row.cells[metric] else None
            values = [NO_TEST] * 6
            if test is not None:
                values = [f"{test['mean_diff']:+.4f}", str(test["pairs"])]
                values += [fmt_p(test[k]) for k in ("p_t", "p_t_adj", "p_wilcoxon", "p_wilcoxon_adj")]
            lines.append(f"| {row.label} | {short(metric)} | " + " | ".join(values) + " |")
    return lines


def markdown(comparison: Comparison) -> str:
    rows, metrics = comparison.rows, comparison.metrics
    lines = [
        "| model | n | " + " | ".join(short(m) for m in metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for row in rows:
        label = f"{row.label} (baseline)" if row.label == comparison.baseline else row.label
        cells = [md_cell(row.cells[m]) for m in metrics]
        lines.append(f"| {label} | {len(row.runs)} | " + " | ".join(cells) + " |")
    setups = sorted({(row.protocol, row.candidates) for row in rows})
    if len(setups) == 1:
        lines += ["", f"Protocol preset: {setups[0][0]}; candidates: {setups[0][1]}."]
    lines += ["", *legend(comparison)]
    lines += ["", *tests_table(comparison)]
    if comparison.notes:
        lines += ["", "Notes:", *(f"- {note}" for note in comparison.notes)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "mean",
    "low",
    "high",
    "n",
    "mean_diff",
    "pairs",
    "p_t",
    "p_t_adj",
    "p_wilcoxon",
    "p_wilcoxon_adj",
)


def table_records(comparison: Comparison) -> tuple[list[str], list[list]]:
    """The CSV (and W&B) table: one row per model; per metric `<metric>_<field>`; None where there is none."""
    header = ["model", "protocol", "candidates", "seeds", "baseline"]
    header += [f"{metric}_{name}" for metric in comparison.metrics for name in CSV_FIELDS]
    records = []
    for row in comparison.rows:
        record = [row.label, row.protocol, row.candidates, len(row.runs), row.label == comparison.baseline]
        for metric in comparison.metrics:
            cell = row.cells[metric]
            values = dict.fromkeys(CSV_FIELDS)
            if cell is not None:
                values |= {"mean": cell.mean, "low": cell.low, "high": cell.high, "n": cell.n}
                values |= {k: cell.test[k] for k in CSV_FIELDS[4:]} if cell.test else {}
            record += [None if isinstance(v, float) and math.isnan(v) else v for v in values.values()]
        records.append(record)
    return header, records


def write_csv(comparison: Comparison, path: Path) -> None:
    header, records = table_records(comparison)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in record] for record in records])


LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in text)


def tex_cell(cell: Cell | None) -> str:
    if cell is None:
        return "--"
    text = fmt(cell.mean) if math.isnan(cell.low) else f"{fmt(cell.mean)} $\\pm$ {fmt(cell.high - cell.mean)}"
    text = f"\\textbf{{{text}}}" if cell.best else text
    marks = (
        [r"\approx"] * cell.tied
        + ["*"] * significant(cell, "p_t")
        + [r"\dagger"] * significant(cell, "p_wilcoxon")
    )
    return f"{text}$^{{{','.join(marks)}}}$" if marks else text


def latex(comparison: Comparison) -> str:
    metrics = comparison.metrics
    lines = ["% " + line.replace("\\*", "*") for line in legend(comparison)]
    lines += [
        "% needs \\usepackage{booktabs}",
        "\\begin{tabular}{lr" + "r" * len(metrics) + "}",
        "\\toprule",
        "Model & $n$ & " + " & ".join(latex_escape(short(m)) for m in metrics) + " \\\\",
        "\\midrule",
    ]
    for row in comparison.rows:
        cells = [tex_cell(row.cells[m]) for m in metrics]
        lines.append(f"{latex_escape(row.label)} & {len(row.runs)} & " + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def chart_name(metric: str) -> str:
    return "bar_" + re.sub(r"[^A-Za-z0-9@._-]+", "_", short(metric)) + ".png"


def bar_charts(comparison: Comparison, out: Path) -> list[Path]:
    paths = []
    for metric in comparison.metrics:
        shown = [(row.label, row.cells[metric]) for row in comparison.rows if row.cells[metric] is not None]
        paths.append(
            plots.bar_chart_ci(
                [label for label, _ in shown],
                [cell.mean for _, cell in shown],
                [cell.low for _, cell in shown],
                [cell.high for _, cell in shown],
                metric,
                out / chart_name(metric),
            )
        )
    return paths


def start_wandb_run(out: Path, group_path: str | None):
    """A W&B run for the comparison, started the lab's way (recsys_lab.utils.wandb_logging): WANDB_MODE if
    set, online with an API key and a reachable server, else offline into `out`; never waiting longer than
    the init timeout. Returns the run and a function that closes it."""
    from recsys_lab.utils.wandb_logging import finish_loggers, wandb_logger

    entity, project, group = group_path.split("/") if group_path else (None, "recsys_lab", None)
    logger = wandb_logger(
        mode="auto",
        init_timeout=WANDB_INIT_TIMEOUT,
        project=project,
        entity=entity,
        group=group,
        save_dir=str(out),
        job_type="compare",
        name=f"compare {out.name}",
    )
    return logger.experiment, lambda: finish_loggers([logger])


def log_to_wandb(comparison: Comparison, charts: list[Path], out: Path, group_path: str | None) -> None:
    import wandb

    header, records = table_records(comparison)
    run, close = start_wandb_run(out, group_path)
    try:
        payload = {"compare/table": wandb.Table(columns=header, data=records)}
        payload |= {f"compare/{path.stem}": wandb.Image(str(path)) for path in charts}
        run.log(payload)
    finally:
        close()


# ---------------------------------------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "folders", nargs="*", type=Path, help="multirun or run folders (or results.json files)"
    )
    parser.add_argument("--metrics", nargs="+", help="results.json metrics (ndcg@10 means test/ndcg@10)")
    parser.add_argument("--baseline", help="row label the paired tests compare against (default: the first)")
    parser.add_argument(
        "--correction", default="holm", choices=list(CORRECTION_NAMES), help="multiple testing"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: the first input folder)")
    parser.add_argument(
        "--by-overrides",
        action="store_true",
        help="split rows on the runs' other overrides (run folders only)",
    )
    parser.add_argument("--wandb", action="store_true", help="log the table and bar charts to a W&B run")
    parser.add_argument("--wandb-group", help="read the runs of this W&B group: entity/project/group")
    args = parser.parse_args(argv)
    if not args.folders and not args.wandb_group:
        parser.error("give run folders, --wandb-group, or both")
    return args


def output_folder(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if args.folders:
        first = args.folders[0]
        return first.parent if first.is_file() else first
    return Path(f"compare_{args.wandb_group.rsplit('/', 1)[-1]}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = output_folder(args)
    try:
        runs = folder_runs(args.folders, args.by_overrides) if args.folders else []
        if args.wandb_group:
            runs += wandb_runs(args.wandb_group, out / "wandb_per_query")
        comparison = compare(runs, args.metrics, args.baseline, args.correction)
        text = markdown(comparison)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(text)
        write_csv(comparison, out / "compare.csv")
        (out / "compare.tex").write_text(latex(comparison))
        charts = bar_charts(comparison, out)
        if args.wandb:
            log_to_wandb(comparison, charts, out, args.wandb_group)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"compare: {err}") from None
    print(text)
    print(f"wrote compare.md, compare.csv, compare.tex and {len(charts)} bar charts to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
