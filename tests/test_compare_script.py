"""scripts/compare.py: synthetic multiruns whose numbers are known, so that every cell of the table can be
checked against stats.mean_ci and scipy's paired tests on the seed-averaged per-query values."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats as scipy_stats

from recsys_lab.analysis import stats
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import compare  # noqa: E402

# 60 test queries; one user with two queries has keys "<user>#<n>"
KEYS = [f"u{i}" for i in range(58)] + ["u58#1", "u58#2"]
# per model: (test/ndcg@10, test/recall@10) of each seed. sasrec is best on ndcg with gru4rec's interval
# overlapping its own; bpr's single run is best on recall.
SEEDS = {
    "bpr": [(0.10, 0.50)],
    "gru4rec": [(0.20, 0.30), (0.22, 0.32), (0.24, 0.34)],
    "sasrec": [(0.25, 0.40), (0.26, 0.42), (0.27, 0.44)],
}


def write_run(folder: Path, model: str, seed: int, metrics: dict, per_query: dict | None, **results) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      model: {model}\n")
    record = {
        "model": f"recsys_lab.models.{model}.{model.upper()}",
        "seed": seed,
        "metrics": metrics,
        "data_fingerprint": "d362753bc4b76da2",
        "protocol": {"protocol_preset": "recbole_sequential", "eval_candidates": "full"},
    } | results
    (folder / "results.json").write_text(json.dumps(record))
    if per_query is not None:
        order = np.random.default_rng(seed).permutation(
            len(per_query["query_key"])
        )  # row order is not key order
        frame = pl.DataFrame(per_query)[order]
        frame.with_columns(pl.lit("head").alias("slice:popularity")).write_parquet(
            folder / "per_query.parquet"
        )


def ranking_multirun(root: Path, models=SEEDS) -> dict[str, dict[str, np.ndarray]]:
    """Writes the runs; returns per model and column the per-query values of every seed, (seeds, queries),
    in KEYS order. Each run's results.json holds the mean of its per-query values, like train.py writes."""
    rng = np.random.default_rng(0)
    base = {"ndcg@10": rng.uniform(0, 0.3, len(KEYS)), "recall@10": rng.uniform(0, 0.5, len(KEYS))}
    written = {}
    for model, seeds in models.items():
        written[model] = {column: [] for column in base}
        for seed, targets in enumerate(seeds, start=1):
            per_query = {"query_key": KEYS, "user": [key.split("#")[0] for key in KEYS]}
            for column, target in zip(base, targets, strict=True):
                values = base[column] + rng.normal(0, 0.05, len(KEYS))
                per_query[column] = values - values.mean() + target
                written[model][column].append(per_query[column])
            metrics = {f"test/{c}": float(np.mean(per_query[c])) for c in base} | {"test/coverage@10": 0.3}
            write_run(root / f"{model}_{seed}", model, seed, metrics, per_query)
    return {model: {c: np.vstack(v) for c, v in columns.items()} for model, columns in written.items()}


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["model"]: row for row in csv.DictReader(handle)}


def seed_values(root: Path, model: str, metric: str) -> list[float]:
    return [
        json.loads(p.read_text())["metrics"][metric] for p in sorted(root.glob(f"{model}_*/results.json"))
    ]


def test_table_cells_equal_mean_ci_and_scipy_paired_tests(tmp_path, capsys):
    written = ranking_multirun(tmp_path)
    out = tmp_path / "out"
    assert (
        compare.main([str(tmp_path), "--metrics", "ndcg@10", "recall@10", "coverage@10", "--out", str(out)])
        == 0
    )
    rows = read_csv(out / "compare.csv")
    assert list(rows) == ["bpr", "gru4rec", "sasrec"] and rows["bpr"]["baseline"] == "True"
    for model in rows:
        for metric in ("test/ndcg@10", "test/recall@10"):
            mean, low, high, n = stats.mean_ci(seed_values(tmp_path, model, metric))
            assert float(rows[model][f"{metric}_mean"]) == pytest.approx(mean, rel=1e-12)
            assert int(rows[model][f"{metric}_n"]) == n == len(SEEDS[model])
            if n > 1:
                assert float(rows[model][f"{metric}_low"]) == pytest.approx(low, rel=1e-12)
                assert float(rows[model][f"{metric}_high"]) == pytest.approx(high, rel=1e-12)
            else:
                assert rows[model][f"{metric}_low"] == rows[model][f"{metric}_high"] == ""
    # paired tests: seed-averaged per-query values against the baseline's (bpr, the first label in order)
    raw_t, raw_w = [], []
    for model in ("gru4rec", "sasrec"):
        for column in ("ndcg@10", "recall@10"):
            a, b = written[model][column].mean(axis=0), written["bpr"][column].mean(axis=0)
            row = rows[model]
            assert float(row[f"test/{column}_p_t"]) == pytest.approx(
                scipy_stats.ttest_rel(a, b).pvalue, rel=1e-9
            )
            assert float(row[f"test/{column}_p_wilcoxon"]) == pytest.approx(
                scipy_stats.wilcoxon(a, b).pvalue, rel=1e-9
            )
            assert float(row[f"test/{column}_mean_diff"]) == pytest.approx(np.mean(a - b))
            assert row[f"test/{column}_pairs"] == "60"
            raw_t.append(float(row[f"test/{column}_p_t"]))
            raw_w.append(float(row[f"test/{column}_p_wilcoxon"]))
        assert row["test/coverage@10_p_t"] == ""  # no per-query column: no test
    # Holm over the whole table: the 4 t-tests together, the 4 Wilcoxon tests together
    adjusted_t = [
        float(rows[m][f"test/{c}_p_t_adj"]) for m in ("gru4rec", "sasrec") for c in ("ndcg@10", "recall@10")
    ]
    adjusted_w = [
        float(rows[m][f"test/{c}_p_wilcoxon_adj"])
        for m in ("gru4rec", "sasrec")
        for c in ("ndcg@10", "recall@10")
    ]
    np.testing.assert_allclose(adjusted_t, stats.holm(raw_t), rtol=1e-12)
    np.testing.assert_allclose(adjusted_w, stats.holm(raw_w), rtol=1e-12)
    assert rows["bpr"]["test/ndcg@10_p_t"] == ""  # the baseline is not tested against itself
    printed = capsys.readouterr().out
    assert printed.startswith((out / "compare.md").read_text())
    assert "Baseline: bpr (the first row in sorted order; choose with --baseline)" in printed
    assert "Holm–Bonferroni adjustment over the family of all 4 paired t-tests" in printed
    assert sorted(p.name for p in out.glob("*.png")) == [
        "bar_coverage@10.png",
        "bar_ndcg@10.png",
        "bar_recall@10.png",
    ]
    assert all((out / name).stat().st_size > 1024 for name in ("bar_ndcg@10.png", "bar_recall@10.png"))


def test_best_is_bold_ties_and_significance_are_marked_in_markdown_and_latex(tmp_path):
    ranking_multirun(tmp_path)
    compare.main([str(tmp_path), "--metrics", "ndcg@10", "recall@10", "--baseline", "gru4rec"])
    md = (tmp_path / "compare.md").read_text()  # --out defaults to the first input folder
    _, _, sasrec_high, _ = stats.mean_ci(seed_values(tmp_path, "sasrec", "test/ndcg@10"))
    _, _, gru_high, _ = stats.mean_ci(seed_values(tmp_path, "gru4rec", "test/ndcg@10"))
    sasrec_ndcg = f"0.2600 ± {sasrec_high - 0.26:.4f}"
    gru_ndcg = f"0.2200 ± {gru_high - 0.22:.4f}"
    main_table = md.split("\n\n")[0].splitlines()
    lines = {line.split(" | ")[0]: line for line in main_table}
    # ndcg: sasrec best; gru4rec's interval overlaps it (≈); bpr's 0.10 lies far below, and differs from
    # gru4rec significantly in both tests. recall: bpr's single run (0.50) is best, no interval to overlap.
    assert lines["| sasrec"] == f"| sasrec | 3 | **{sasrec_ndcg}** \\*† | 0.4200 ± 0.0497 \\*† |"
    assert lines["| gru4rec (baseline)"] == f"| gru4rec (baseline) | 3 | {gru_ndcg} ≈ | 0.3200 ± 0.0497 |"
    assert lines["| bpr"] == "| bpr | 1 | 0.1000 \\*† | **0.5000** \\*† |"
    assert "≈: its 95% CI overlaps the best row's" in md
    tex = (tmp_path / "compare.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "Model & $n$ & ndcg@10 & recall@10 \\\\" in tex
    sasrec_tex, gru_tex = (cell.replace("±", "$\\pm$") for cell in (sasrec_ndcg, gru_ndcg))
    assert (
        f"sasrec & 3 & \\textbf{{{sasrec_tex}}}$^{{*,\\dagger}}$ & 0.4200 $\\pm$ 0.0497$^{{*,\\dagger}}$"
        in tex
    )
    assert f"gru4rec & 3 & {gru_tex}$^{{\\approx}}$ & 0.3200 $\\pm$ 0.0497 \\\\" in tex


def test_corrections_bh_and_none(tmp_path):
    ranking_multirun(tmp_path)
    for correction in ("bh", "none"):
        out = tmp_path / correction
        compare.main(
            [
                str(tmp_path),
                "--metrics",
                "ndcg@10",
                "recall@10",
                "--correction",
                correction,
                "--out",
                str(out),
            ]
        )
        rows = read_csv(out / "compare.csv")
        cells = [(m, c) for m in ("gru4rec", "sasrec") for c in ("test/ndcg@10", "test/recall@10")]
        raw = [float(rows[m][f"{c}_p_t"]) for m, c in cells]
        adjusted = [float(rows[m][f"{c}_p_t_adj"]) for m, c in cells]
        expected = scipy_stats.false_discovery_control(raw, method="bh") if correction == "bh" else raw
        np.testing.assert_allclose(adjusted, expected, rtol=1e-12)


def test_ctr_runs_pair_users_leaving_out_nan_gauc(tmp_path):
    rng = np.random.default_rng(5)
    users = [str(u) for u in range(80)]
    one_class = rng.uniform(size=80) < 0.25  # these users' impressions hold one class: no per-user AUC
    gauc = {}
    for model, shift in (("deepfm", 0.0), ("din", 0.03)):
        gauc[model] = []
        for seed in (1, 2):
            values = np.clip(rng.normal(0.7 + shift, 0.1, 80), 0, 1)
            values[one_class] = np.nan
            logloss = rng.normal(0.45 - shift, 0.02, 80)
            per_query = {"query_key": users, "user": users, "impressions": rng.integers(2, 30, 80)}
            per_query |= {"gauc": values, "logloss": logloss}
            metrics = {"test/auc": 0.7 + shift + seed / 1000, "test/gauc": float(np.nanmean(values))}
            metrics |= {"test/logloss": float(logloss.mean())}
            write_run(tmp_path / f"{model}_{seed}", model, seed, metrics, per_query)
            gauc[model].append(values)
    compare.main([str(tmp_path), "--out", str(tmp_path / "out")])  # default metrics: auc, gauc, logloss
    rows = read_csv(tmp_path / "out" / "compare.csv")
    a, b = np.mean(gauc["din"], axis=0), np.mean(gauc["deepfm"], axis=0)
    usable = ~np.isnan(a)
    assert rows["din"]["test/gauc_pairs"] == str(usable.sum()) == str(80 - one_class.sum())
    assert float(rows["din"]["test/gauc_p_t"]) == pytest.approx(
        scipy_stats.ttest_rel(a[usable], b[usable]).pvalue
    )
    assert rows["din"]["test/auc_p_t"] == ""  # no per-user column for the pooled AUC
    md = (tmp_path / "out" / "compare.md").read_text()
    logloss_cells = {line.split(" | ")[0]: line.split(" | ")[-1] for line in md.splitlines()[2:4]}
    assert logloss_cells["| din"].startswith("**")  # lower is better
    assert not logloss_cells["| deepfm (baseline)"].startswith("**")


def test_models_tested_on_different_queries_or_data_are_an_error(tmp_path):
    ranking_multirun(tmp_path, {"gru4rec": SEEDS["gru4rec"][:2]})
    ranking_multirun(tmp_path / "other", {"sasrec": SEEDS["sasrec"][:2]})
    folder = tmp_path / "other" / "sasrec_2"
    frame = pl.read_parquet(folder / "per_query.parquet")
    frame.filter(pl.col("query_key") != "u3").write_parquet(folder / "per_query.parquet")
    with pytest.raises(SystemExit, match=r"compare: the runs of sasrec were tested on different queries: .*"):
        compare.main([str(tmp_path)])
    for seed in (1, 2):  # the same 59 queries in both sasrec runs, but not gru4rec's 60
        frame.filter(pl.col("query_key") != "u3").write_parquet(
            tmp_path / "other" / f"sasrec_{seed}" / "per_query.parquet"
        )
    with pytest.raises(
        SystemExit,
        match=r"sasrec and the baseline gru4rec were tested on different test sets \(59 queries against 60; "
        r"0 only in sasrec, 1 only in gru4rec \(e.g. u3\)\)",
    ):
        compare.main([str(tmp_path)])
    for seed in (1, 2):
        path = tmp_path / "other" / f"sasrec_{seed}" / "results.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"data_fingerprint": "0123456789abcdef"}))
    with pytest.raises(SystemExit, match="data fingerprint 0123456789abcdef against d362753bc4b76da2"):
        compare.main([str(tmp_path)])


def test_models_with_different_views_of_the_same_prepared_data_are_paired(tmp_path):
    """The data fingerprint also covers what a model's view gathers (history or not); the prepared data's
    fingerprint, recorded by train.py, is what says the test set is the same."""
    written = ranking_multirun(tmp_path, {"gru4rec": SEEDS["gru4rec"], "sasrec": SEEDS["sasrec"]})
    for folder in tmp_path.iterdir():
        path = folder / "results.json"
        results = json.loads(path.read_text())
        view = "aaaaaaaaaaaaaaaa" if folder.name.startswith("sasrec") else "bbbbbbbbbbbbbbbb"
        path.write_text(json.dumps(results | {"data_fingerprint": view, "prepared_fingerprint": "p" * 16}))
    out = tmp_path / "out"
    compare.main([str(tmp_path), "--metrics", "ndcg@10", "--out", str(out)])
    a, b = written["sasrec"]["ndcg@10"].mean(axis=0), written["gru4rec"]["ndcg@10"].mean(axis=0)
    p = float(read_csv(out / "compare.csv")["sasrec"]["test/ndcg@10_p_t"])
    assert p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-9)
    results = json.loads((tmp_path / "sasrec_1" / "results.json").read_text())
    (tmp_path / "sasrec_1" / "results.json").write_text(
        json.dumps(results | {"prepared_fingerprint": "q" * 16})
    )
    with pytest.raises(SystemExit, match="different data fingerprints"):
        compare.main([str(tmp_path), "--metrics", "ndcg@10", "--out", str(out)])


def test_runs_without_per_query_values_get_no_test_and_a_note(tmp_path, capsys):
    ranking_multirun(tmp_path, {"gru4rec": SEEDS["gru4rec"], "sasrec": SEEDS["sasrec"]})
    write_run(tmp_path / "item_knn_1", "item_knn", 1, {"test/ndcg@10": 0.15, "test/recall@10": 0.3}, None)
    compare.main([str(tmp_path), "--metrics", "ndcg@10", "--baseline", "gru4rec"])
    printed = capsys.readouterr().out
    assert f"no per_query.parquet (no paired tests for item_knn): {tmp_path / 'item_knn_1'}" in printed
    assert "| item_knn | ndcg@10 | — | — | — | — | — | — |" in printed
    assert "| sasrec | ndcg@10 | +0.0400 | 60 |" in printed
    assert "item\\_knn & 1 & 0.1500 \\\\" in (tmp_path / "compare.tex").read_text()


def test_by_overrides_splits_rows_on_the_other_overrides(tmp_path):
    for seed, content in [(1, "text"), (2, "text"), (3, "image")]:
        folder = tmp_path / str(seed)
        write_run(folder, "two_tower", seed, {"test/ndcg@10": seed / 10}, None)
        overrides = ["model=two_tower", f"model/content={content}", f"seed={seed}"]
        (folder / ".hydra" / "overrides.yaml").write_text("\n".join(f"- {o}" for o in overrides))
    compare.main([str(tmp_path), "--by-overrides", "--metrics", "ndcg@10"])
    rows = read_csv(tmp_path / "compare.csv")
    assert {label: row["seeds"] for label, row in rows.items()} == {
        "two_tower model/content=image": "1",
        "two_tower model/content=text": "2",
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--baseline", "lightgcn"],
            "compare: unknown baseline 'lightgcn'; the models are bpr, gru4rec, sasrec",
        ),
        (
            ["--metrics", "ndcg@5"],
            "compare: unknown metric test/ndcg@5; the runs have test/coverage@10, test/ndcg@10",
        ),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, args, message):
    ranking_multirun(tmp_path)
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        compare.main([str(tmp_path), *args])


def test_bad_input_files_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=f"compare: no results.json under {tmp_path / 'empty'}"):
        compare.main([str(tmp_path / "empty")])
    ranking_multirun(tmp_path / "runs", {"gru4rec": SEEDS["gru4rec"][:2], "sasrec": SEEDS["sasrec"][:2]})
    broken = tmp_path / "runs" / "sasrec_1" / "per_query.parquet"
    broken.write_bytes(b"PAR1 not really a parquet file")
    with pytest.raises(SystemExit, match=f"compare: {broken} is not a readable parquet file"):
        compare.main([str(tmp_path / "runs")])


class FakeRun:
    """What log_to_wandb uses of a wandb run: `log`."""

    def __init__(self):
        self.logged = []

    def log(self, payload):
        self.logged.append(payload)


def test_wandb_logs_the_table_and_the_charts(tmp_path, monkeypatch):
    import wandb

    ranking_multirun(tmp_path, {"gru4rec": SEEDS["gru4rec"], "sasrec": SEEDS["sasrec"]})
    run, closed = FakeRun(), []
    monkeypatch.setattr(compare, "start_wandb_run", lambda out, group: (run, lambda: closed.append(out)))
    compare.main([str(tmp_path), "--metrics", "ndcg@10", "--wandb"])
    (payload,) = run.logged
    table = payload["compare/table"]
    assert isinstance(table, wandb.Table)
    with (tmp_path / "compare.csv").open() as handle:
        header = next(csv.reader(handle))
    assert table.columns == header
    assert [row[0] for row in table.data] == ["gru4rec", "sasrec"]
    assert isinstance(payload["compare/bar_ndcg@10"], wandb.Image)
    assert closed == [tmp_path]


class FakeFile:
    def __init__(self, source: Path):
        self.name, self.source = source.name, source

    def download(self, root: str, replace: bool = False):
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / self.name).write_bytes(self.source.read_bytes())


class FakeApiRun:
    """A run as wandb.Api returns it, built from a run folder: config = train.py's run_info."""

    def __init__(self, folder: Path):
        results = json.loads((folder / "results.json").read_text())
        self.id = self.name = folder.name
        self.config = {
            "config": {"seed": results["seed"], "model": {"net": {"_target_": results["model"]}}},
            "data_fingerprint": results["data_fingerprint"],
            "protocol": results["protocol"],
        }
        self.summary_metrics = results["metrics"] | {"_runtime": 12.0, "val/ndcg@10": 0.5}
        self.folder = folder

    def files(self, names):
        return [FakeFile(self.folder / name) for name in names if (self.folder / name).is_file()]


def test_wandb_group_reads_runs_through_the_api(tmp_path, monkeypatch):
    import wandb

    written = ranking_multirun(tmp_path / "runs", {"gru4rec": SEEDS["gru4rec"], "sasrec": SEEDS["sasrec"]})
    (tmp_path / "runs" / "sasrec_3" / "per_query.parquet").unlink()  # not uploaded: no test for sasrec
    queried = []

    class FakeApi:
        def __init__(self, timeout):
            assert timeout == 30

        def runs(self, path, filters):
            queried.append((path, filters))
            return [FakeApiRun(folder) for folder in sorted((tmp_path / "runs").iterdir())]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    out = tmp_path / "out"
    compare.main(["--wandb-group", "lab/recsys/seq-sweep", "--metrics", "ndcg@10", "--out", str(out)])
    assert queried == [("lab/recsys", {"group": "seq-sweep"})]
    rows = read_csv(out / "compare.csv")
    assert list(rows) == ["GRU4REC", "SASREC"]  # W&B has no Hydra choice: the model class names the row
    mean, low, _, _ = stats.mean_ci(seed_values(tmp_path / "runs", "gru4rec", "test/ndcg@10"))
    assert float(rows["GRU4REC"]["test/ndcg@10_low"]) == pytest.approx(low)
    assert rows["SASREC"]["test/ndcg@10_p_t"] == ""
    assert (
        "no per_query.parquet (no paired tests for SASREC): wandb:lab/recsys/sasrec_3"
        in (out / "compare.md").read_text()
    )
    # with every file uploaded, the p-values are the folder runs' ones
    FakeFile(tmp_path / "runs" / "sasrec_1" / "per_query.parquet").download(
        str(tmp_path / "runs" / "sasrec_3")
    )
    compare.main(["--wandb-group", "lab/recsys/seq-sweep", "--metrics", "ndcg@10", "--out", str(out)])
    a, b = written["sasrec"]["ndcg@10"], written["gru4rec"]["ndcg@10"].mean(axis=0)
    a = np.vstack([a[0], a[1], a[0]]).mean(axis=0)  # sasrec_3 now carries sasrec_1's values
    assert float(read_csv(out / "compare.csv")["SASREC"]["test/ndcg@10_p_t"]) == pytest.approx(
        scipy_stats.ttest_rel(a, b).pvalue, rel=1e-9
    )


def test_wandb_runs_are_labelled_by_their_model_choice(tmp_path, monkeypatch):
    import wandb

    ranking_multirun(tmp_path / "runs", {"gru4rec": SEEDS["gru4rec"], "sasrec": SEEDS["sasrec"]})

    class ChoiceRun(FakeApiRun):  # train.py now logs the config groups chosen (run_info["choices"])
        def __init__(self, folder: Path):
            super().__init__(folder)
            self.config["choices"] = {"model": folder.name.rsplit("_", 1)[0], "data": "movielens"}

    class FakeApi:
        def __init__(self, timeout):
            pass

        def runs(self, path, filters):
            return [ChoiceRun(folder) for folder in sorted((tmp_path / "runs").iterdir())]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    out = tmp_path / "out"
    compare.main(["--wandb-group", "lab/recsys/seq-sweep", "--metrics", "ndcg@10", "--out", str(out)])
    assert list(read_csv(out / "compare.csv")) == ["gru4rec", "sasrec"]


@pytest.mark.slow
def test_cli_writes_the_outputs(tmp_path):
    ranking_multirun(tmp_path, {"gru4rec": SEEDS["gru4rec"], "sasrec": SEEDS["sasrec"]})
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare.py"), str(tmp_path), "--metrics", "ndcg@10"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "| sasrec | 3 | **0.2600" in done.stdout
    assert {"compare.md", "compare.csv", "compare.tex", "bar_ndcg@10.png"} <= {
        p.name for p in tmp_path.iterdir()
    }
    failed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare.py"), str(tmp_path), "--baseline", "x"],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and failed.stderr.strip().startswith("compare: unknown baseline 'x'")
    assert "Traceback" not in failed.stderr


def test_fairness_gaps_are_lower_is_better():
    assert compare.lower_is_better("test/gap/user:gender/ndcg@10")
    assert compare.lower_is_better("test/logloss") and compare.lower_is_better("test/gini@10")
    assert not compare.lower_is_better("test/slice/user:gender/F/ndcg@10")
    assert not compare.lower_is_better("test/ndcg@10")


def test_a_row_pooling_two_data_sets_is_an_error(tmp_path):
    """model=a data=x,y under one sweep: the seeds of one model on two data sets are not one mean."""
    ranking_multirun(tmp_path, {"gru4rec": SEEDS["gru4rec"], "sasrec": SEEDS["sasrec"]})
    for name in ("gru4rec_1", "gru4rec_2", "gru4rec_3", "sasrec_1", "sasrec_2", "sasrec_3"):
        (tmp_path / name / "per_query.parquet").unlink()  # no paired test: only the row check can catch it
    path = tmp_path / "sasrec_2" / "results.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"prepared_fingerprint": "e" * 16}))
    with pytest.raises(SystemExit, match="the runs of sasrec have different data fingerprints"):
        compare.main([str(tmp_path), "--metrics", "ndcg@10"])
