"""The prepared-data cache: written once and reused, keyed by source and protocol, corrupt or foreign caches
named, concurrent builders serialised (a reader sees no cache or a whole one), unwritable folders named."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil

import polars as pl
import pytest
import torch

from recsys_lab.data.prepare import PREPARE_VERSION, DataCacheError, Prepared, PreparedCache
from recsys_lab.data.processing import Preprocess
from recsys_lab.data.sources.simulator import EcommerceSimulator
from recsys_lab.data.splits import TemporalSplit
from tests.datamodule_fixtures import SMALL, cache_root, count_loads, dm, make_dm  # noqa: F401

CACHE_FILES = [
    "items.parquet",
    "meta.json",
    "queries_test.parquet",
    "queries_val.parquet",
    "rows.parquet",
    "users.parquet",
]


def test_cache_written_once_and_reused(tmp_path):
    sim = EcommerceSimulator(**SMALL, seed=0)
    calls = count_loads(sim)
    first = make_dm(tmp_path, source=sim)
    first.prepare_data()
    assert calls == [1]
    folder = first.cache_path
    assert folder == tmp_path / f"ecommerce-{first.protocol_fingerprint()}"
    assert sorted(p.name for p in folder.iterdir()) == CACHE_FILES
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["fingerprint"] == first.protocol_fingerprint() and meta["format"] == PREPARE_VERSION
    assert meta["row_counts"]["users"] == 300 and meta["row_counts"]["items"] == 200
    assert meta["row_counts"]["rows"] == EcommerceSimulator(**SMALL, seed=0).load().interactions.height
    first.prepare_data()
    first.setup()
    assert calls == [1]  # prepared once
    assert first.audit_report["status"] == "passed"

    sim2 = EcommerceSimulator(**SMALL, seed=0)
    calls2 = count_loads(sim2)
    second = make_dm(tmp_path, source=sim2)
    assert second.cache_path == folder
    second.prepare_data()
    second.setup()
    assert calls2 == []  # read from the cache, not simulated again
    assert second.counts == first.counts
    assert torch.equal(second.store.item, first.store.item) and torch.equal(
        second.store.n_prior, first.store.n_prior
    )
    assert torch.equal(second.schema.item_counts, first.schema.item_counts)
    assert second.split.cutoffs_ == first.split.cutoffs_ is not None  # restored from the cache
    assert second.fingerprint() == first.fingerprint()


def test_changed_source_or_protocol_uses_another_folder(tmp_path, dm):
    sim = EcommerceSimulator(**SMALL, seed=0)
    base = make_dm(tmp_path, source=sim)
    # choices that do not change the prepared tables share the folder
    for same in (
        {"batch_size": 7},
        {"history_len": 3},
        {"ctr_eval": "ranking"},
        {"max_train_rows": 100},
        {"train_negatives": "uniform_2"},
    ):
        assert make_dm(tmp_path, **same).cache_path == base.cache_path, same
    # the source's parameters, the preprocessing, the split, the candidates and the normalisers do not
    changed = {
        "n_days": make_dm(tmp_path, source=EcommerceSimulator(**{**SMALL, "n_days": 21}, seed=0)),
        "seed": make_dm(tmp_path, source=EcommerceSimulator(**SMALL, seed=1)),
        "preprocess": make_dm(tmp_path, preprocess=Preprocess(deduplicate="last")),
        "split": make_dm(tmp_path, split=TemporalSplit(val_fraction=0.2, test_fraction=0.1)),
        "eval_candidates": make_dm(tmp_path, eval_candidates="uniform_20"),
        "log_dense": make_dm(tmp_path, log_dense=[]),
    }
    folders = {name: d.cache_path for name, d in changed.items()}
    assert len({*folders.values(), base.cache_path}) == len(folders) + 1, folders
    assert all(f.parent == tmp_path and f.name.startswith("ecommerce-") for f in folders.values())

    # a changed source and a changed protocol are really rebuilt, next to the first cache
    base.prepare_data()
    for name in ("n_days", "split"):
        d = changed[name]
        calls = count_loads(d.source)
        d.prepare_data()
        assert calls == [1], name
        assert (d.cache_path / "meta.json").exists()
        d.setup()
        assert d.fingerprint() != dm.fingerprint()
    assert (base.cache_path / "meta.json").exists()  # the first cache is untouched
    wider = changed["split"]
    assert wider.counts["val_rows"] > 1.5 * dm.counts["val_rows"]
    assert wider.split.cutoffs_[0] < dm.split.cutoffs_[0]


def test_setup_without_prepare_writes_cache(tmp_path):
    sim = EcommerceSimulator(**SMALL, seed=0)
    calls = count_loads(sim)
    d = make_dm(tmp_path, source=sim)
    d.setup()
    assert calls == [1] and (d.cache_path / "meta.json").exists()
    d.setup()  # idempotent
    d.prepare_data()
    assert calls == [1]


@pytest.fixture
def cache_copy(tmp_path, dm):
    """A private copy of the module's cache folder, safe to damage (make_dm(tmp_path) reads it)."""
    folder = tmp_path / dm.cache_path.name
    shutil.copytree(dm.cache_path, folder)
    assert make_dm(tmp_path).cache_path == folder
    return folder


@pytest.mark.parametrize("name", CACHE_FILES)
def test_corrupt_cache_file_raises(tmp_path, cache_copy, name):
    path = cache_copy / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated write
    with pytest.raises(DataCacheError, match="corrupt") as info:
        make_dm(tmp_path).prepare_data()
    assert str(path) in str(info.value)
    assert f"delete the folder {cache_copy}" in str(info.value)


def test_mismatched_or_missing_parquet_raises(tmp_path, cache_copy):
    users = pl.read_parquet(cache_copy / "users.parquet")
    users.head(10).write_parquet(cache_copy / "users.parquet")
    with pytest.raises(DataCacheError, match="has 10 rows, meta.json says 300") as info:
        make_dm(tmp_path).prepare_data()
    assert str(cache_copy / "users.parquet") in str(info.value)
    users.write_parquet(cache_copy / "users.parquet")  # repaired; now another file goes missing
    make_dm(tmp_path).prepare_data()
    (cache_copy / "rows.parquet").unlink()
    with pytest.raises(DataCacheError, match="corrupt or missing") as info:
        make_dm(tmp_path).setup()
    assert str(cache_copy / "rows.parquet") in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"), [("format", PREPARE_VERSION + 1), ("fingerprint", "0123456789abcdef")]
)
def test_cache_from_another_version_raises(tmp_path, cache_copy, key, value):
    meta_path = cache_copy / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta[key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataCacheError, match="another version") as info:
        make_dm(tmp_path).prepare_data()
    assert str(cache_copy) in str(info.value)


def _build_in_process(folder: str, fingerprint: str, barrier, out) -> None:
    """Prepare the small simulator through PreparedCache, all processes released at the same moment."""
    d = make_dm(folder)
    loads = count_loads(d.source)
    barrier.wait()
    prepared = d.prepared()
    out.put((len(loads), prepared.rows.height, d.protocol_fingerprint() == fingerprint))


def test_concurrent_builds_wait_for_one_another(tmp_path):
    """Three processes start on an empty cache together: one builds, the others wait and read its result;
    nobody reads a half-written folder, nothing is left behind but the cache and its lock."""
    fingerprint = make_dm(tmp_path).protocol_fingerprint()
    ctx = multiprocessing.get_context("spawn")  # fork would copy locked thread pools (polars, torch)
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_build_in_process, args=(str(tmp_path), fingerprint, barrier, out))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    results = [out.get(timeout=5) for _ in procs]
    rows = EcommerceSimulator(**SMALL, seed=0).load().interactions.height
    assert all(height == rows and same for _, height, same in results)
    assert sorted(loads for loads, _, _ in results) == [0, 0, 1]  # one process built, two read its result
    names = sorted(p.name for p in tmp_path.iterdir())
    folder = make_dm(tmp_path).cache_path.name
    assert names == [f".{folder}.lock", folder]  # no temporary folder left
    assert sorted(p.name for p in (tmp_path / folder).iterdir()) == CACHE_FILES


def test_a_builder_never_exposes_a_partial_folder(tmp_path, monkeypatch):
    """While the tables are being written, the cache folder does not exist yet: a concurrent reader finds
    nothing (and waits on the lock to build), never a folder with half its files."""
    d = make_dm(tmp_path)
    seen = []
    save = Prepared.save

    def save_and_peek(self, folder, fingerprint):
        save(self, folder, fingerprint)
        seen.append((folder.name.startswith("."), d.cache_path.exists()))

    monkeypatch.setattr(Prepared, "save", save_and_peek)
    d.prepare_data()
    assert seen == [(True, False)]  # written into a hidden temporary folder, the cache path still absent
    assert (d.cache_path / "meta.json").exists()


def test_an_unfinished_folder_of_an_older_version_is_rebuilt(tmp_path, dm):
    """Before atomic writes a crash could leave a folder without meta.json: it is rebuilt, not trusted."""
    folder = make_dm(tmp_path).cache_path
    folder.mkdir(parents=True)
    (folder / "rows.parquet").write_bytes(b"half")
    d = make_dm(tmp_path)
    d.setup()
    assert d.counts == dm.counts


def test_unwritable_cache_folder_is_named(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DataCacheError, match=r"not writable.*paths\.data_dir") as info:
            make_dm(locked / "data").prepare_data()
        assert str(locked) in str(info.value)
    finally:
        locked.chmod(0o700)


def test_unwritable_cache_folder_is_named_even_as_root(tmp_path, monkeypatch):
    """The same message when the file system refuses the write (a read-only mount refuses root too)."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(PreparedCache, "_lock", staticmethod(lambda path: refuse()))
    with pytest.raises(
        DataCacheError, match=r"is not writable \(Permission denied: .*ro\); point paths\.data_dir"
    ):
        make_dm(tmp_path / "ro").prepare_data()
