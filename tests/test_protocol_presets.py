"""Protocol presets (`conf/protocol/*`): each composes with `data=movielens`, runs one step of each stage with a
model (two-tower under ranking presets, DIN under the CTR ones) and prints the settings it promises; the
RecBole presets are checked against RecBole's rules on the prepared tables (split counts, masking, labels)."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import polars as pl
import pytest
import torch

from recsys_lab.data.splits import TEST, TRAIN, VAL, recbole_split_counts
from recsys_lab.train import train
from tests.helpers import REPO
from tests.source_fixtures import ML100K, random_ml1m, random_ml100k

PRESETS = sorted(p.stem for p in (REPO / "conf" / "protocol").glob("*.yaml"))
CTR_PRESETS = {"recbole_ctr", "recbole_ctr_seq", "tallrec_movie"}
# presets that rank 100 sampled negatives need a catalogue of well over 100 items: the generated ML-1M files
ML1M_PRESETS = {"ncf_sampled", "sasrec_sampled", "bert4rec_sampled"}

NO_FILTER = {"user_core": 0, "item_core": 0, "iterative_core": True, "min_history": 0}
IMPLICIT = {"rating_threshold": None, "keep_negatives": False}
LABELLED = {"rating_threshold": 4.0, "keep_negatives": True}
FIVE_CORE = {"user_core": 5, "item_core": 5, "iterative_core": True, "min_history": 0}
RANDOM_8_1_1 = {"split": "random_ratio", "ratios": [0.8, 0.1, 0.1], "split_seed": 0}
LOO_ROWS = {"split": "leave_one_out", "hold_out": "rows", "min_train_rows": 2}

# What each preset must print (a subset of results["protocol"]).
EXPECTED: dict[str, dict] = {
    "recbole_general": {
        **RANDOM_8_1_1,
        "preprocess": {**IMPLICIT, "deduplicate": "none", **NO_FILTER},
        "evaluation": "ranking",
        "eval_candidates": "full",
        "train_negatives": {"negatives": "uniform_1", "negatives_n": 1},
    },
    "recbole_sequential": {
        **LOO_ROWS,
        "preprocess": {**IMPLICIT, "deduplicate": "none", **NO_FILTER},
        "evaluation": "ranking",
        "eval_candidates": "full_unmasked",
        "train_negatives": None,
        "history_len": 50,
    },
    "recbole_ctr": {
        **RANDOM_8_1_1,
        "group_by": "none",
        "preprocess": {**LABELLED, "deduplicate": "none", **NO_FILTER},
        "evaluation": "impressions",
        "eval_candidates": "logged impressions",
        "train_negatives": None,
    },
    "recbole_ctr_seq": {
        **LOO_ROWS,
        "preprocess": {**LABELLED, "deduplicate": "none", **NO_FILTER},
        "evaluation": "impressions",
        "train_negatives": None,
        "history_len": 50,
    },
    "ncf_sampled": {
        "split": "leave_one_out",
        "preprocess": {**IMPLICIT, "deduplicate": "last", **NO_FILTER},
        "evaluation": "ranking",
        "eval_candidates": "uniform_99",
        "train_negatives": {"negatives": "uniform_4", "negatives_n": 4},
    },
    "sasrec_sampled": {
        "split": "leave_one_out",
        "preprocess": {**IMPLICIT, "deduplicate": "last", **FIVE_CORE},
        "eval_candidates": "uniform_100",
        "train_negatives": None,
    },
    "bert4rec_sampled": {
        "split": "leave_one_out",
        "preprocess": {**IMPLICIT, "deduplicate": "last", **FIVE_CORE},
        "eval_candidates": "popularity_100",
        "train_negatives": None,
    },
    "loo_full": {
        "split": "leave_one_out",
        "preprocess": {**IMPLICIT, "deduplicate": "last", **NO_FILTER},
        "evaluation": "ranking",
        "eval_candidates": "full",
        "train_negatives": None,
    },
    "window": {  # time windows (incremental training): window 0 trains, window 1 tests
        "split": "window",
        "windows": 4,
        "window": 0,
        "train": "window",
        "val_fraction": 0.1,
        "evaluation": "ranking",
    },
    "tallrec_movie": {
        "split": "last_samples",
        "samples": 10000,
        "min_history": 10,
        "ratios": [0.8, 0.1, 0.1],
        "preprocess": {**LABELLED, "deduplicate": "none", **NO_FILTER},
        "evaluation": "impressions",
        "train_negatives": None,
        "history_len": 10,
        "cold_items": True,
    },
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preset_sources")
    random_ml100k(root / "ml100k", np.random.default_rng(0))
    random_ml1m(root / "ml1m", np.random.default_rng(1))
    return root


def data_overrides(preset: str, files: Path) -> list[str]:
    if preset in ML1M_PRESETS:
        return ["data=movielens", "data.version=1m", f"data.path={files / 'ml1m'}"]
    return ["data=movielens", f"data.path={files / 'ml100k'}"]


def prepared_module(make_cfg, preset: str, files: Path):
    """The DataModule a `protocol=<preset>` run builds, prepared (no model, no training)."""
    cfg = make_cfg([*data_overrides(preset, files), f"protocol={preset}", "model=two_tower", "logger=none"])
    dm = hydra.utils.instantiate(cfg.data, _convert_="partial")
    dm.prepare_data()
    dm.setup()
    return dm


def test_every_preset_is_covered():
    assert set(PRESETS) == set(EXPECTED)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_runs_and_prints_its_protocol(preset, files, make_cfg):
    model = "din" if preset in CTR_PRESETS else "two_tower"
    cfg = make_cfg(
        [
            *data_overrides(preset, files),
            f"protocol={preset}",
            f"model={model}",
            "logger=none",
            "debug=fast_dev_run",
        ]
    )
    assert cfg.protocol_preset == preset
    results = train(cfg)
    protocol, metrics = results["protocol"], results["metrics"]
    assert protocol["protocol_preset"] == preset
    for key, value in EXPECTED[preset].items():
        assert protocol[key] == value, key
    assert protocol["leakage_audit"]["status"] == "passed"
    if preset in CTR_PRESETS:
        assert {"test/auc", "test/logloss"} <= set(metrics)
    else:
        assert {"test/hit@10", "test/ndcg@10", "test/recall@10"} <= set(metrics)
    assert (
        Path(results["output_dir"], "results.json").read_text().count(f'"protocol_preset": "{preset}"') == 1
    )


def test_runs_without_a_preset_say_so(files, make_cfg):
    cfg = make_cfg(
        [*data_overrides("loo_full", files), "model=two_tower", "logger=none", "debug=fast_dev_run"]
    )
    assert train(cfg)["protocol"]["protocol_preset"] is None


def _per_user(dm) -> pl.DataFrame:
    rows = dm.prepared().rows
    return rows.group_by("user").agg(
        pl.len().alias("n"), *(pl.col("split").eq(c).sum().alias(str(c)) for c in (TRAIN, VAL, TEST))
    )


def test_recbole_general_follows_recbole(files, make_cfg):
    dm = prepared_module(make_cfg, "recbole_general", files)
    counts = dm.prepared().meta.counts
    assert counts["rows_in"] == counts["rows_out"] == 30 * 12  # every rating a positive, nothing filtered
    # each user's rows are cut by RecBole's _calcu_split_ids (12 rows: int(1.2) = 1 -> 10 / 1 / 1)
    for n, train_rows, val_rows, test_rows in _per_user(dm).select("n", "0", "1", "2").iter_rows():
        assert (train_rows, val_rows, test_rows) == recbole_split_counts(n, (0.8, 0.1, 0.1))
    # at test time the training AND validation items are masked (RecBole's used_ids - test positives)
    rows = dm.prepared().rows
    code = dm.prepared().items["item_id_code"].to_numpy()
    queries = dm.queries["test"]
    for i in range(len(queries)):
        user = int(queries.users[i])
        earlier = rows.filter((pl.col("user") == user) & (pl.col("split") < TEST))["item"].to_numpy()
        seen = queries.seen.gather(torch.tensor([i])).ids[0].tolist()
        assert sorted(seen) == sorted({int(c) for c in code[earlier] if c > 0})


def test_recbole_sequential_masks_nothing_and_holds_out_the_last_rows(files, make_cfg):
    dm = prepared_module(make_cfg, "recbole_sequential", files)
    queries, rows = dm.queries["test"], dm.prepared().rows
    assert int(queries.seen.lengths(torch.arange(len(queries))).sum()) == 0  # repeatable: nothing masked
    # 12 rows per user: the last by time tests, the one before validates
    last = (
        rows.sort("timestamp", maintain_order=True)
        .group_by("user", maintain_order=True)
        .agg(pl.col("split").last().alias("last"), pl.col("split").get(-2).alias("before"))
    )
    assert set(last["last"]) == {TEST} and set(last["before"]) == {VAL}
    assert _per_user(dm)["0"].to_list() == [10] * 30


def test_recbole_ctr_cuts_all_rows_at_once_with_threshold_labels(files, make_cfg):
    dm = prepared_module(make_cfg, "recbole_ctr", files)
    rows = dm.prepared().rows
    n = rows.height
    assert n == 30 * 12  # ratings below 4 stay, labelled 0
    sizes = tuple(int((rows["split"] == c).sum()) for c in (TRAIN, VAL, TEST))
    assert sizes == recbole_split_counts(n, (0.8, 0.1, 0.1)) == (288, 36, 36)
    raw = pl.read_csv(
        files / "ml100k" / "u.data",
        separator="\t",
        has_header=False,
        new_columns=["user", "item", "rating", "t"],
    )
    assert int(rows["positive"].sum()) == int((raw["rating"] >= 4).sum())
    assert rows["label"].to_list() == rows["positive"].cast(pl.Float32).to_list()


def test_recbole_ctr_seq_holds_out_last_rows_whatever_their_label(files, make_cfg):
    dm = prepared_module(make_cfg, "recbole_ctr_seq", files)
    rows = dm.prepared().rows
    test = rows.filter(pl.col("split") == TEST)
    assert test.height == 30 and test["user"].n_unique() == 30  # one row per user, the last in time
    assert 0 < int(test["positive"].sum()) < 30  # held out whatever the label: both labels occur


@pytest.mark.skipif(not ML100K.exists(), reason="shared MovieLens-100K copy not present")
def test_recbole_general_on_real_movielens_100k(make_cfg):
    cfg = make_cfg(["data=movielens", f"data.path={ML100K}", "protocol=recbole_general", "model=two_tower"])
    dm = hydra.utils.instantiate(cfg.data, _convert_="partial")
    dm.prepare_data()
    counts = dm.prepared().meta.counts
    # RecBole's ml-100k: 943 users, 1,682 items, 100,000 interactions, none filtered
    assert counts["rows_in"] == counts["rows_out"] == 100_000
    assert (counts["users_out"], counts["items_out"]) == (943, 1682)
    per_user = dm.prepared().rows.group_by("user").len()["len"].to_list()
    expected = np.sum([recbole_split_counts(n, (0.8, 0.1, 0.1)) for n in per_user], axis=0).tolist()
    assert [counts["train_rows"], counts["val_rows"], counts["test_rows"]] == expected


class _Frames:
    """A source over a given interactions frame (hand-computed cases)."""

    name = "frames"

    def __init__(self, interactions: pl.DataFrame) -> None:
        self.interactions = interactions

    def fingerprint(self) -> str:
        return f"preset-frames-{self.interactions.hash_rows().sum()}"

    def describe(self) -> dict:
        return {"source": self.name}

    def load(self):
        from recsys_lab.data.sources.raw import RawData

        return RawData(interactions=self.interactions)


def test_unmasked_full_ranking_keeps_re_consumed_targets(tmp_path):
    from recsys_lab.data.datamodule import RecDataModule
    from recsys_lab.data.processing import Preprocess
    from recsys_lab.data.sampling import UnmaskedFullRanking
    from recsys_lab.data.splits import LeaveOneOutSplit

    # a: items 1, 2, 3, then 1 again (a re-watch) -> train 1, 2 / val 3 / test 1; b: 3, 4, 1, 2 -> test 2
    inter = pl.DataFrame(
        {
            "user_id": ["a"] * 4 + ["b"] * 4,
            "item_id": [1, 2, 3, 1, 3, 4, 1, 2],
            "timestamp": [1, 2, 3, 4, 1, 2, 3, 4],
        }
    )

    def module(candidates, folder: str) -> RecDataModule:
        dm = RecDataModule(
            _Frames(inter),
            LeaveOneOutSplit(hold_out="rows", min_train_rows=2),
            cache_dir=str(tmp_path / folder),
            preprocess=Preprocess(deduplicate="none"),
            eval_candidates=candidates,
        )
        dm.prepare_data()
        dm.setup()
        return dm

    masked, unmasked = module("full", "masked"), module(UnmaskedFullRanking(), "unmasked")
    # masked (RecBole's general models): a's test item 1 is one of its training items, so a has no test query
    assert masked.counts["test_queries"] == 1 and masked.counts["test_users_without_new_targets"] == 1
    # unmasked (RecBole's sequential models): a's re-watch is a target, and nothing is masked for anyone
    q = unmasked.queries["test"]
    assert unmasked.counts["test_queries"] == 2 and unmasked.counts["test_users_without_new_targets"] == 0
    assert int(q.seen.lengths(torch.arange(2)).sum()) == 0
    users = unmasked.prepared().users["user_id"].to_list()
    code_to_item = dict(
        zip(
            unmasked.prepared().items["item_id_code"].to_list(),
            unmasked.prepared().items["item_id"].to_list(),
            strict=True,
        )
    )
    targets = {
        users[int(u)]: [code_to_item[int(c)] for c in q.targets.gather(torch.tensor([i])).ids[0]]
        for i, u in enumerate(q.users)
    }
    assert targets == {"a": [1], "b": [2]}
    assert unmasked.prepared().meta.eval_candidates == "full_unmasked"
    assert unmasked.eval_candidates.describe() == {"eval_candidates": "full_unmasked"}
    assert unmasked.protocol_fingerprint() != masked.protocol_fingerprint()
