"""RecBole atomic files: every atomic type read from a tiny fixture; a bad header, byte or id gives one clear
error naming the file (and field, line, value)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys_lab.data.sources.atomic import AtomicFiles
from recsys_lab.data.sources.raw import SourceError
from tests.source_fixtures import col, write, write_bytes, write_toy_atomic


@pytest.fixture
def toy_atomic(tmp_path) -> Path:
    return write_toy_atomic(tmp_path / "toy")


def test_atomic_files(toy_atomic):
    source = AtomicFiles("toy", str(toy_atomic))
    data = source.load()
    assert data.interactions.columns == ["user_id", "item_id", "timestamp", "label", "device"]
    assert data.interactions.rows() == [
        ("u1", "i1", 100, 1, "mobile"),
        ("u2", "i2", 170, 0, None),  # "1.7e2" is an integral float; an empty token is null
        ("u1", "i2", 300, 1, "desktop"),
    ]
    assert data.interactions.schema["label"] == pl.Int64 and data.labels == ["label"]
    items = data.items
    assert col(items, "item_name") == ["Red  Shoes", "Blue Hat"]
    assert col(items, "tags") == [["sport", "red"], []]
    assert col(items, "price") == [9.5, None]
    assert col(items, "emb") == [[0.1, 0.2], [0.3, 0.4]]
    assert data.users.rows() == [("u1", "25", 0.5), ("u2", None, 1.0)]
    assert data.item_text == "item_name"
    assert data.features == {
        "device": "categorical",
        "age": "categorical",
        "score": "numeric",
        "item_name": "text",
        "tags": "multi_categorical",
        "price": "numeric",
        "emb": "dense_vector",
    }
    assert [Path(f).name for f in data.files] == ["toy.inter", "toy.user", "toy.item"]
    assert len(source.fingerprint()) == 16


def test_atomic_fingerprint_follows_the_files(toy_atomic):
    """Same files, same key (even in another folder); a changed optional file changes it."""
    before = AtomicFiles("toy", str(toy_atomic)).fingerprint()
    assert AtomicFiles("toy", str(toy_atomic)).fingerprint() == before
    write(toy_atomic / "toy.user", "user_id:token\tage:token\tscore:float\nu1\t26\t0.5\nu2\t\t1\n")
    assert AtomicFiles("toy", str(toy_atomic)).fingerprint() != before


def test_atomic_without_timestamp_uses_row_order(tmp_path):
    write(tmp_path / "t.inter", "user_id:token\titem_id:token\trating:float\na\tx\t3\nb\ty\t4\n")
    data = AtomicFiles("t", str(tmp_path)).load()
    assert data.interactions.rows() == [("a", "x", 0, 3.0), ("b", "y", 1, 4.0)]
    assert data.users is None and data.items is None and data.item_text is None


def test_atomic_errors(tmp_path):
    write(tmp_path / "t.inter", "user_id:token\titem:token\tts:float\na\tx\t3\n")
    with pytest.raises(SourceError, match=r"t.inter: required field 'item_id' is missing.*'item_id:token'"):
        AtomicFiles("t", str(tmp_path)).load()
    write(tmp_path / "t.inter", "user_id\titem_id\na\tx\n")
    with pytest.raises(SourceError, match=r"header field 'user_id' is not of the form name:type"):
        AtomicFiles("t", str(tmp_path)).load()
    write(tmp_path / "t.inter", "user_id:token\titem_id:token\tlabel:float\na\tx\t2\n")
    with pytest.raises(
        SourceError, match=r"label column 'label' must be 0 or 1.*line 2, data row 1 \(value '2'\)"
    ):
        AtomicFiles("t", str(tmp_path)).load()
    write(tmp_path / "t.inter", "user_id:token\titem_id:token\n\tx\n")
    with pytest.raises(SourceError, match=r"column 'user_id' holds ids"):
        AtomicFiles("t", str(tmp_path)).load()
    write(tmp_path / "t.inter", "user_id:token\titem_id:token\na\tx\n")
    write(tmp_path / "t.item", "item_id:token\temb:float_seq\nx\t1 2\ny\t1 2 3\n")
    with pytest.raises(SourceError, match=r"'emb' must hold vectors of one length; found lengths \[2, 3\]"):
        AtomicFiles("t", str(tmp_path)).load()
    with pytest.raises(SourceError, match=r"nope.inter not found"):
        AtomicFiles("nope", str(tmp_path)).load()


# ---- declared types of the fixed fields --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "meaning", "expected"),
    [
        ("timestamp:token_seq", "seconds since the epoch", "timestamp:float"),
        ("timestamp:token", "seconds since the epoch", "timestamp:float"),
        ("user_id:float", "an id", "user_id:token"),
        ("item_id:token_seq", "an id", "item_id:token"),
        ("rating:token", "a rating", "rating:float"),
        ("label:float_seq", "a 0/1 label", "label:float"),
    ],
)
def test_atomic_fixed_field_with_another_declared_type(tmp_path, field, meaning, expected):
    """These used to be read as if declared correctly, the declared type silently ignored."""
    header = {"user_id": "user_id:token", "item_id": "item_id:token", field.split(":")[0]: field}
    write(tmp_path / "t.inter", "\t".join(header.values()) + "\n" + "\t".join(["1"] * len(header)) + "\n")
    name, kind = field.split(":")
    with pytest.raises(
        SourceError,
        match=rf"t.inter: header field '{field}' declares type '{kind}', but '{name}' is read as {meaning}; "
        rf"expected '{expected}'",
    ):
        AtomicFiles("t", str(tmp_path)).load()


def test_atomic_fixed_field_type_checked_in_item_file(tmp_path):
    write(tmp_path / "t.inter", "user_id:token\titem_id:token\na\tx\n")
    write(tmp_path / "t.item", "item_id:float\ttitle:token_seq\n1\tA film\n")
    with pytest.raises(SourceError, match=r"t.item: header field 'item_id:float' declares type 'float'"):
        AtomicFiles("t", str(tmp_path)).load()


def test_atomic_repeated_header_field(tmp_path):
    write(tmp_path / "t.inter", "user_id:token\titem_id:token\titem_id:token\na\tx\ty\n")
    with pytest.raises(SourceError, match=r"t.inter: header field 'item_id' appears twice"):
        AtomicFiles("t", str(tmp_path)).load()


# ---- bytes and ids -----------------------------------------------------------------------------------------
def test_atomic_non_utf8_byte_names_file_and_line(tmp_path):
    """A latin-1 byte used to raise a bare UnicodeDecodeError without the file's name."""
    write_bytes(tmp_path / "t.inter", b"user_id:token\titem_id:token\na\tx\nb\tcaf\xe9\n")
    with pytest.raises(
        SourceError,
        match=r"t.inter: line 3 is not valid UTF-8 \(byte b'\\xe9' at offset 37\); expected UTF-8",
    ):
        AtomicFiles("t", str(tmp_path)).load()
    write_bytes(tmp_path / "t.inter", b"user_id:token\titem_\xffid:token\na\tx\n")
    with pytest.raises(SourceError, match=r"t.inter: line 1 is not valid UTF-8"):
        AtomicFiles("t", str(tmp_path)).load()


def test_atomic_byte_order_mark_is_not_part_of_the_first_field(tmp_path):
    write_bytes(tmp_path / "t.inter", "\ufeffuser_id:token\titem_id:token\na\tx\n".encode())
    assert AtomicFiles("t", str(tmp_path)).load().interactions.rows() == [("a", "x", 0)]


@pytest.mark.parametrize("value", ["NaN", "null", "None", "N/A"])
def test_atomic_null_spelled_id(tmp_path, value):
    write(tmp_path / "t.inter", f"user_id:token\titem_id:token\na\tx\nb\t{value}\n")
    with pytest.raises(
        SourceError,
        match=rf"t.inter: column 'item_id' holds ids, but 1 of 2 rows hold a spelling of a missing value; the "
        rf"first is line 3, data row 2 \(value '{value}'\)",
    ):
        AtomicFiles("t", str(tmp_path)).load()


def test_atomic_id_with_surrounding_whitespace(tmp_path):
    write(tmp_path / "t.inter", "user_id:token\titem_id:token\nu1\tx\nu1 \ty\n")
    with pytest.raises(
        SourceError,
        match=r"t.inter: column 'user_id' holds ids, but 1 of 2 rows have leading or trailing whitespace; the "
        r"first is line 3, data row 2 \(value 'u1 '\)\. 'u1' and 'u1 ' would be two different ids",
    ):
        AtomicFiles("t", str(tmp_path)).load()


def test_atomic_null_spelled_id_in_user_file(tmp_path):
    write(tmp_path / "t.inter", "user_id:token\titem_id:token\na\tx\n")
    write(tmp_path / "t.user", "user_id:token\tage:token\na\t20\nNULL\t30\n")
    with pytest.raises(
        SourceError, match=r"t.user: column 'user_id' holds ids.* line 3, data row 2 \(value 'NULL'\)"
    ):
        AtomicFiles("t", str(tmp_path)).load()


# ---- paths -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("table", ["item", "user"])
def test_atomic_optional_file_that_is_a_directory(toy_atomic, table):
    """An optional .item / .user that is a directory used to be skipped silently (its features dropped)."""
    (toy_atomic / f"toy.{table}").unlink()
    (toy_atomic / f"toy.{table}").mkdir()
    expected = rf"toy.{table} is a directory; expected the RecBole atomic file toy.{table} \(or nothing"
    with pytest.raises(SourceError, match=expected):
        AtomicFiles("toy", str(toy_atomic)).fingerprint()
    with pytest.raises(SourceError, match=expected):
        AtomicFiles("toy", str(toy_atomic)).load()


def test_atomic_path_forms(toy_atomic, tmp_path):
    """fingerprint() runs before load(): a wrong data.path fails there with the reader's message."""
    with pytest.raises(SourceError, match=r"data.source.path=.*nope does not exist; it should be a folder"):
        AtomicFiles("toy", str(tmp_path / "nope")).fingerprint()
    with pytest.raises(SourceError, match=r"toy.inter not found in .*empty"):
        (tmp_path / "empty").mkdir()
        AtomicFiles("toy", str(tmp_path / "empty")).fingerprint()
    # the .inter file itself is a valid path; a directory named like it is not
    assert (
        AtomicFiles("toy", str(toy_atomic / "toy.inter")).fingerprint()
        == AtomicFiles("toy", str(toy_atomic)).fingerprint()
    )
    (tmp_path / "other" / "toy.inter").mkdir(parents=True)
    with pytest.raises(
        SourceError,
        match=r"data.source.path=.*toy.inter is a directory, but source 'atomic-toy' reads it as a file",
    ):
        AtomicFiles("toy", str(tmp_path / "other" / "toy.inter")).fingerprint()
