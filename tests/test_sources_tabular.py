"""Your own parquet / CSV (`data=tabular`): reading, the column mapping as configured, and one clear error
(file, column, line, value or config key) for each kind of bad input."""

from __future__ import annotations

import re
from datetime import datetime

import polars as pl
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from recsys_lab.data.sources.raw import SourceError
from recsys_lab.data.sources.tabular import Tabular
from tests.source_fixtures import write, write_bytes

UI = {"user": "u", "item": "i"}


def test_tabular_csv_with_features_from_interactions(tmp_path):
    path = write(
        tmp_path / "clicks.csv",
        "customer,sku,ts,clicked,brand,price,tags,name\n"
        "c1,s1,2024-01-02 10:00:00,1,Acme,9.5,a|b,Red shoe\n"
        "c2,s1,2024-01-01 10:00:00,0,Old,8.0,a,Red shoe old\n"  # earlier: not s1's last value
        "c1,s2,2024-01-03 00:00:00,1,Zed,,,Blue hat\n",
    )
    source = Tabular(
        str(path),
        columns={"user": "customer", "item": "sku", "timestamp": "ts", "label": "clicked"},
        item_features={
            "brand": "categorical",
            "price": "numeric",
            "tags": "multi_categorical",
            "name": "text",
        },
        timestamp_format="%Y-%m-%d %H:%M:%S",
    )
    data = source.load()
    times = ("2024-01-02 10:00:00", "2024-01-01 10:00:00", "2024-01-03 00:00:00")
    stamp = [int(datetime.fromisoformat(t + "+00:00").timestamp()) for t in times]  # naive times are UTC
    assert data.interactions.rows() == [
        ("c1", "s1", stamp[0], 1),
        ("c2", "s1", stamp[1], 0),
        ("c1", "s2", stamp[2], 1),
    ]
    assert data.labels == ["clicked"] and data.users is None
    assert data.items.rows() == [
        ("s1", "Acme", 9.5, ["a", "b"], "Red shoe"),
        ("s2", "Zed", None, [], "Blue hat"),
    ]
    assert data.item_text == "name"
    assert data.features == {
        "brand": "categorical",
        "price": "numeric",
        "tags": "multi_categorical",
        "name": "text",
    }
    assert source.name == "tabular-clicks"


def test_tabular_parquet_with_tables(tmp_path):
    inter = pl.DataFrame(
        {
            "user": [1, 2, 1],
            "item": [10, 20, 20],
            "when": [datetime(2024, 1, 1), datetime(2024, 1, 2), datetime(2024, 1, 3)],
            "stars": [4, 5, 3],
        }
    )
    inter.write_parquet(tmp_path / "inter.parquet")
    pl.DataFrame({"user": [1, 2], "segment": ["a", "b"], "vec": [[0.1, 0.2], [0.3, 0.4]]}).write_parquet(
        tmp_path / "users.parquet"
    )
    write(tmp_path / "items.csv", "item,category\n10,books\n20,toys\n")  # CSV ids are strings: cast to int
    data = Tabular(
        str(tmp_path / "inter.parquet"),
        columns={"user": "user", "item": "item", "timestamp": "when", "rating": "stars"},
        user_features={"segment": "categorical", "vec": "dense_vector"},
        item_features={"category": "categorical"},
        users_path=str(tmp_path / "users.parquet"),
        items_path=str(tmp_path / "items.csv"),
    ).load()
    assert data.interactions.rows() == [
        (1, 10, 1704067200, 4.0),
        (2, 20, 1704153600, 5.0),
        (1, 20, 1704240000, 3.0),
    ]
    assert data.users.rows() == [(1, "a", [0.1, 0.2]), (2, "b", [0.3, 0.4])]
    assert data.items.rows() == [(10, "books"), (20, "toys")]
    assert len(data.files) == 3


def test_tabular_without_timestamp_uses_row_order(tmp_path):
    path = write(tmp_path / "x.csv", "u,i,seg\na,x,s1\nb,y,s2\na,y,s3\n")
    data = Tabular(str(path), columns=UI, user_features={"seg": "categorical"}).load()
    assert data.interactions.rows() == [("a", "x", 0), ("b", "y", 1), ("a", "y", 2)]
    assert data.users.rows() == [("a", "s3"), ("b", "s2")]  # the user's last row in the file


def test_tabular_unmapped_columns_do_not_change_the_fingerprint(tmp_path):
    """The config lists every key (null = not in the file): the same mapping written either way is one cache."""
    path = write(tmp_path / "x.csv", "u,i\na,x\n")
    short = Tabular(str(path), columns=UI)
    full = Tabular(str(path), columns={**UI, "timestamp": None, "rating": None, "label": None})
    assert full.columns == UI and full.fingerprint() == short.fingerprint()
    assert Tabular(str(path), columns={**UI, "rating": "r"}).fingerprint() != short.fingerprint()


def test_tabular_errors(tmp_path):
    path = write(tmp_path / "x.csv", "u,i,r,t\na,x,4,100\nb,y,high,200\n")
    missing = r"x.csv: missing column\(s\) \['nope'\] \(the file has \['u', 'i', 'r', 't'\]\)"
    with pytest.raises(SourceError, match=missing):
        Tabular(str(path), columns={"user": "nope", "item": "i"}).load()
    with pytest.raises(
        SourceError, match=r"x.csv: column 'r' must be numeric.*line 3, data row 2 \(value 'high'\)"
    ):
        Tabular(str(path), columns={**UI, "rating": "r"}).load()
    with pytest.raises(SourceError, match=r"missing column\(s\) \['brand'\]"):
        Tabular(str(path), columns=UI, item_features={"brand": "categorical"}).load()
    with pytest.raises(SourceError, match=r"unknown feature kind 'cat'"):
        Tabular(str(path), columns=UI, item_features={"r": "cat"})
    with pytest.raises(SourceError, match=r"must map 'user' and 'item'"):
        Tabular(str(path), columns={"user": "u"})
    with pytest.raises(
        SourceError,
        match=r"data.columns.rating \(or data.source.columns.rating\) = \['r'\]: expected a column name of the file$",
    ):
        Tabular(str(path), columns={**UI, "rating": ["r"]})

    path = write(tmp_path / "ids.csv", "u,i\na,x\n,y\n")
    with pytest.raises(SourceError, match=r"ids.csv: column 'u' holds ids .* data row 2"):
        Tabular(str(path), columns=UI).load()

    path = write(tmp_path / "ts.csv", "u,i,t\na,x,2024-01-01 10:00:00\nb,y,2024-13-45 10:00:00\n")
    with pytest.raises(
        SourceError, match=r"ts.csv: column 't' must hold times in the format .*'2024-13-45 10:00:00'"
    ):
        Tabular(
            str(path),
            columns={**UI, "timestamp": "t"},
            timestamp_format="%Y-%m-%d %H:%M:%S",
        ).load()
    with pytest.raises(SourceError, match=r"integer seconds .*timestamp_format"):
        Tabular(str(path), columns={**UI, "timestamp": "t"}).load()

    path = write(tmp_path / "items.csv", "i,brand\nx,A\nx,B\n")
    with pytest.raises(SourceError, match=r"items.csv: column 'i' must have one row per id"):
        Tabular(
            str(write(tmp_path / "ok.csv", "u,i\na,x\n")),
            columns=UI,
            item_features={"brand": "categorical"},
            items_path=str(path),
        ).load()
    with pytest.raises(SourceError, match=r"unknown table format '.json'"):
        Tabular(str(write(tmp_path / "x.json", "{}")), columns=UI).load()


# ---- ids: null spellings and whitespace --------------------------------------------------------------------
@pytest.mark.parametrize(
    "value", ["NaN", "nan", "NULL", "null", "None", "NA", "N/A", "#N/A", "<NA>", " nan "]
)
def test_tabular_null_spelled_user_id(tmp_path, value):
    """Read as text, each of these used to become one real user pooling every row that lacks an id."""
    path = write(tmp_path / "x.csv", f"u,i,t\na,x,1\n{value},y,2\n{value},z,3\n")
    with pytest.raises(
        SourceError,
        match=rf"x.csv: column 'u' holds ids, but 2 of 3 rows hold a spelling of a missing value; the first is "
        rf"line 3, data row 2 \(value '{value}'\)\. Read as text it would become one id pooling unrelated rows",
    ):
        Tabular(str(path), columns={**UI, "timestamp": "t"}).load()


def test_tabular_null_spelled_item_id(tmp_path):
    path = write(tmp_path / "x.csv", "u,i\na,x\nb,y\nc,Null\n")
    with pytest.raises(
        SourceError, match=r"x.csv: column 'i' holds ids, but 1 of 3 .* line 4, data row 3 \(value 'Null'\)"
    ):
        Tabular(str(path), columns=UI).load()


@pytest.mark.parametrize("value", [" 1", "1 ", "\t1"])
def test_tabular_id_with_surrounding_whitespace(tmp_path, value):
    """ " 1" and "1" used to become two users."""
    path = write(tmp_path / "x.csv", f'u,i\n1,x\n"{value}",y\n')
    with pytest.raises(
        SourceError,
        match=r"x.csv: column 'u' holds ids, but 1 of 2 rows have leading or trailing whitespace; the first is "
        rf"line 3, data row 2 \(value {re.escape(repr(value))}\)\. '1' and {re.escape(repr(value))} would be two "
        r"different ids",
    ):
        Tabular(str(path), columns=UI).load()


def test_tabular_line_counts_quoted_fields_spanning_lines(tmp_path):
    """A quoted field with a line break moves every later row down a line: the message counts lines as an
    editor shows them, not rows."""
    path = write(tmp_path / "x.csv", 'u,i,note\na,x,"two\nlines"\n\nb,y,ok\nNaN,z,ok\n')
    with pytest.raises(
        SourceError, match=r"column 'u' holds ids and must not be null or empty.* line 4, data row 2"
    ):
        Tabular(str(path), columns=UI).load()  # the blank line 4 is a row of nulls
    path = write(tmp_path / "x.csv", 'u,i,note\na,x,"two\nlines"\nb,y,ok\nNaN,z,ok\n')
    with pytest.raises(SourceError, match=r"line 5, data row 3 \(value 'NaN'\)"):
        Tabular(str(path), columns=UI).load()


def test_tabular_tsv_and_parquet_locations(tmp_path):
    path = write(tmp_path / "x.tsv", "u\ti\na\tx\nNULL\ty\n")
    with pytest.raises(
        SourceError, match=r"x.tsv: column 'u' holds ids.* line 3, data row 2 \(value 'NULL'\)"
    ):
        Tabular(str(path), columns=UI).load()
    pl.DataFrame({"u": ["a", "nan"], "i": ["x", "y"]}).write_parquet(tmp_path / "x.parquet")
    # a parquet file has no lines: the row is named
    with pytest.raises(
        SourceError, match=r"x.parquet: column 'u' holds ids.* the first is data row 2 \(value 'nan'\)"
    ):
        Tabular(str(tmp_path / "x.parquet"), columns=UI).load()


def test_tabular_null_spelled_id_in_feature_table(tmp_path):
    inter = write(tmp_path / "x.csv", "u,i\na,x\n")
    items = write(tmp_path / "items.csv", "i,brand\nx,A\nNaN,B\n")
    with pytest.raises(
        SourceError, match=r"items.csv: column 'i' holds ids.* line 3, data row 2 \(value 'NaN'\)"
    ):
        Tabular(str(inter), columns=UI, item_features={"brand": "categorical"}, items_path=str(items)).load()


# ---- timestamps ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "-inf", "1e30", "9223372036854775808"])
def test_tabular_timestamp_without_int64_value(tmp_path, value):
    """An infinite or out-of-range number used to become a null timestamp, silently."""
    path = write(tmp_path / "x.csv", f"u,i,t\na,x,1\nb,y,{value}\n")
    with pytest.raises(
        SourceError,
        match=rf"x.csv: column 't' must hold integer seconds since the epoch.*1 rows do not, the first at line 3, "
        rf"data row 2 \(value '{value}'\)",
    ):
        Tabular(str(path), columns={**UI, "timestamp": "t"}).load()


@pytest.mark.parametrize("value", ["", "NaN", "NULL"])
def test_tabular_missing_timestamp(tmp_path, value):
    path = write(tmp_path / "x.csv", f"u,i,t\na,x,1\nb,y,{value}\n")
    with pytest.raises(
        SourceError, match=r"x.csv: column 't' must hold integer seconds.* line 3, data row 2"
    ):
        Tabular(str(path), columns={**UI, "timestamp": "t"}).load()


def test_tabular_parquet_infinite_float_timestamp(tmp_path):
    pl.DataFrame({"u": ["a", "b"], "i": ["x", "y"], "t": [1.0, float("inf")]}).write_parquet(
        tmp_path / "x.parquet"
    )
    with pytest.raises(SourceError, match=r"column 't' must hold integer seconds.*data row 2 \(value inf\)"):
        Tabular(str(tmp_path / "x.parquet"), columns={**UI, "timestamp": "t"}).load()


# ---- features from the interactions file -------------------------------------------------------------------
def test_tabular_bad_feature_value_on_a_superseded_row(tmp_path):
    """Each item keeps the value of its last row, but a bad value on an earlier row is still bad input: it
    used to pass unseen, and messages named rows of the de-duplicated table instead of the file's."""
    path = write(tmp_path / "x.csv", "u,i,t,price\na,x,1,abc\nb,x,2,3.5\n")
    with pytest.raises(
        SourceError,
        match=r"x.csv: column 'price' must be numeric; 1 rows are not, the first at line 2, data row 1",
    ):
        Tabular(str(path), columns={**UI, "timestamp": "t"}, item_features={"price": "numeric"}).load()


# ---- bytes -----------------------------------------------------------------------------------------------------
def test_tabular_non_utf8_csv_names_the_line(tmp_path):
    path = write_bytes(tmp_path / "x.csv", b"u,i\na,x\nb,caf\xe9\n")
    with pytest.raises(SourceError, match=r"x.csv: line 3 is not valid UTF-8 \(byte b'\\xe9' at offset 13\)"):
        Tabular(str(path), columns=UI).load()


# ---- paths ---------------------------------------------------------------------------------------------------
def test_tabular_without_path_names_data_path():
    """data=tabular without data.path used to fail with a TypeError from Path(None)."""
    with pytest.raises(
        SourceError,
        match=r"data.path is not set: data=tabular reads your own interactions file \(.parquet, .pq, .csv, .tsv, .jsonl, .ndjson\), "
        r"e.g. python train.py data=tabular data.path=/data/clicks.parquet",
    ):
        Tabular(None, columns=UI)


@pytest.mark.parametrize(
    ("key", "state"),
    [
        ("data.path", "is a directory"),
        ("data.path", "does not exist"),
        ("data.source.items_path", "is a directory"),
    ],
)
def test_tabular_path_that_is_not_a_file(tmp_path, key, state):
    """fingerprint() runs before load(): it used to raise a bare IsADirectoryError / FileNotFoundError."""
    inter = write(tmp_path / "x.csv", "u,i,brand\na,x,A\n")
    target = tmp_path / ("dir.csv" if state == "is a directory" else "nope.csv")
    if state == "is a directory":
        target.mkdir()
    paths = {"path": str(target)} if key == "data.path" else {"path": str(inter), "items_path": str(target)}
    source = Tabular(**paths, columns=UI, item_features={"brand": "categorical"})
    expected = rf"{key}=.*{target.name} {state}; expected a table file \(.parquet, .pq, .csv, .tsv, .jsonl, .ndjson\)"
    with pytest.raises(SourceError, match=expected):
        source.fingerprint()
    with pytest.raises(SourceError, match=expected):
        source.load()


def test_tabular_unknown_suffix_fails_in_fingerprint(tmp_path):
    path = write(tmp_path / "x.json", "{}")
    with pytest.raises(SourceError, match=r"data.path=.*x.json: unknown table format '.json'"):
        Tabular(str(path), columns=UI).fingerprint()


# ---- the config: data.columns.* and data.source.columns.* ----------------------------------------------------
def _columns(make_cfg, overrides: list[str]) -> dict:
    cfg = make_cfg(["data=tabular", "data.path=/data/clicks.csv", *overrides])
    return instantiate(cfg.data.source).columns


def test_tabular_config_default_columns(make_cfg):
    assert _columns(make_cfg, []) == {"user": "user_id", "item": "item_id", "timestamp": "timestamp"}


@pytest.mark.parametrize("prefix", ["data.columns", "data.source.columns"])
def test_tabular_config_column_overrides(make_cfg, prefix):
    """The README's data.source.columns.rating=... used to fail with Hydra's "not in struct", and the
    data.columns.* shorthand did not exist."""
    overrides = [
        f"{prefix}.user=uid",
        f"{prefix}.item=sku",
        f"{prefix}.timestamp=ts",
        f"{prefix}.rating=stars",
    ]
    assert _columns(make_cfg, [*overrides, f"{prefix}.label=clicked"]) == {
        "user": "uid",
        "item": "sku",
        "timestamp": "ts",
        "rating": "stars",
        "label": "clicked",
    }
    multi = _columns(make_cfg, [*overrides, f"{prefix}.label=[click,buy]", f"{prefix}.timestamp=null"])
    assert multi == {"user": "uid", "item": "sku", "rating": "stars", "label": ["click", "buy"]}


def test_tabular_config_without_path(make_cfg):
    cfg = make_cfg(["data=tabular"])
    with pytest.raises(InstantiationException, match=r"data.path is not set"):
        instantiate(cfg.data.source)


def test_tabular_config_loads_a_csv(make_cfg, tmp_path):
    path = write(tmp_path / "clicks.csv", "uid,sku,ts,stars,clicked\na,x,10,4,1\nb,x,20,2,0\na,y,30,5,1\n")
    cfg = make_cfg(
        [
            "data=tabular",
            f"data.path={path}",
            "data.columns.user=uid",
            "data.columns.item=sku",
            "data.columns.timestamp=ts",
            "data.source.columns.rating=stars",  # both spellings in one run
            "data.columns.label=clicked",
        ]
    )
    data = instantiate(cfg.data.source).load()
    assert data.interactions.columns == ["user_id", "item_id", "timestamp", "rating", "clicked"]
    assert data.interactions.rows() == [
        ("a", "x", 10, 4.0, 1),
        ("b", "x", 20, 2.0, 0),
        ("a", "y", 30, 5.0, 1),
    ]
    assert data.labels == ["clicked"] and data.files == [str(path)]
