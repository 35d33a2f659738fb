"""MovieLens source: each GroupLens layout and RecBole's atomic conversion read from tiny fixtures; bad input
gives one clear error naming the file (and line, value) or the missing file."""

from __future__ import annotations

import time
import urllib.error
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from recsys_lab.data.sources import files
from recsys_lab.data.sources.movielens import MovieLens
from recsys_lab.data.sources.raw import RawData, SourceError
from tests.source_fixtures import (
    ML100K,
    col,
    write,
    write_bytes,
    write_ml100k,
    write_ml_atomic,
    write_ml_csv,
    zip_folder,
)


@pytest.fixture
def ml100k(tmp_path) -> Path:
    return write_ml100k(tmp_path / "ml-100k")


# ---- reading -----------------------------------------------------------------------------------------------
def test_movielens_100k(ml100k):
    data = MovieLens("100k", path=str(ml100k)).load()
    assert isinstance(data, RawData)
    inter = data.interactions
    assert inter.schema == {
        "user_id": pl.Int64,
        "item_id": pl.Int64,
        "timestamp": pl.Int64,
        "rating": pl.Float64,
    }
    assert col(inter, "user_id") == [1, 2, 1, 2]
    assert col(inter, "item_id") == [10, 10, 20, 30]
    assert col(inter, "timestamp") == [881250949, 881250950, 881250951, 881250952]
    assert col(inter, "rating") == [4.0, 3.0, 5.0, 1.0]
    items = data.items
    assert col(items, "item_id") == [10, 20, 30, 40]
    assert col(items, "title") == [
        "Toy Story (1995). Genres: Animation, Children's, Comedy",
        "Misérables, Les (1995). Genres: Drama",  # latin-1 decoded
        "unknown. Genres: unknown",
        "Some Film (1997). Genres: Drama, Western",  # year from the release date
    ]
    assert col(items, "genres") == [
        ["Animation", "Children's", "Comedy"],
        ["Drama"],
        ["unknown"],
        ["Drama", "Western"],
    ]
    assert col(items, "year") == ["1995", "1995", "unknown", "1997"]
    users = data.users
    assert users.columns == ["user_id", "age", "gender", "occupation", "zip_prefix"]
    assert users.rows() == [(1, "24", "M", "technician", "8"), (2, "53", "F", "other", "T")]
    assert data.item_text == "title" and data.labels == []
    assert data.features == {
        "title": "text",
        "genres": "multi_categorical",
        "year": "categorical",
        "age": "categorical",
        "gender": "categorical",
        "occupation": "categorical",
        "zip_prefix": "categorical",
    }
    assert sorted(Path(f).name for f in data.files) == ["u.data", "u.item", "u.user"]


def test_movielens_100k_atomic_matches_native(ml100k, tmp_path):
    """RecBole's conversion of the same data gives the same tables (its titles carry no year)."""
    folder = write_ml_atomic(tmp_path / "atomic")
    native = MovieLens("100k", path=str(ml100k)).load()
    atomic = MovieLens("100k", path=str(folder)).load()
    for table in ("interactions", "items", "users"):
        assert_frame_equal(getattr(atomic, table), getattr(native, table))
    assert atomic.features == native.features and atomic.item_text == native.item_text
    assert (
        MovieLens("100k", path=str(folder)).fingerprint() != MovieLens("100k", path=str(ml100k)).fingerprint()
    )


def test_movielens_1m(tmp_path):
    folder = tmp_path / "ml-1m"
    write(folder / "ratings.dat", "1::10::5::978300760\n2::20::3::978302109\n")
    write(
        folder / "movies.dat",
        "10::Toy Story (1995)::Animation|Children's|Comedy\n20::Café au lait (Métisse) (1993)::Comedy\n",
        encoding="latin-1",
    )
    write(folder / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    data = MovieLens("1m", path=str(folder)).load()
    assert data.interactions.rows() == [(1, 10, 978300760, 5.0), (2, 20, 978302109, 3.0)]
    assert col(data.items, "title") == [
        "Toy Story (1995). Genres: Animation, Children's, Comedy",
        "Café au lait (Métisse) (1993). Genres: Comedy",
    ]
    assert col(data.items, "genres") == [["Animation", "Children's", "Comedy"], ["Comedy"]]
    assert col(data.items, "year") == ["1995", "1993"]
    # users.dat's field order differs from u.user's; codes are kept as given
    assert data.users.rows() == [(1, "1", "F", "10", "4"), (2, "56", "M", "16", "7")]


@pytest.mark.parametrize("version", ["25m", "latest-small"])
def test_movielens_csv(tmp_path, version):
    folder = write_ml_csv(tmp_path / f"ml-{version}")
    source = MovieLens(version, path=str(folder))
    assert source.name == f"movielens-{version}"
    data = source.load()
    assert data.interactions.rows() == [(1, 1, 964982703, 4.0), (1, 3, 964981247, 4.5), (2, 2, 1, 0.5)]
    assert data.users is None
    assert col(data.items, "title") == [
        "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
        "American President, The (1995). Genres: Comedy, Drama, Romance",
        "Babylon 5",
        "Millions (2004). Genres: Crime",
    ]
    assert col(data.items, "genres") == [
        ["Adventure", "Animation", "Children", "Comedy", "Fantasy"],
        ["Comedy", "Drama", "Romance"],
        [],
        ["Crime"],
    ]
    assert col(data.items, "year") == ["1995", "1995", "unknown", "2004"]
    assert "age" not in data.features and data.features["genres"] == "multi_categorical"


def test_movielens_from_cache_folder_and_zip(ml100k, tmp_path):
    """Without a path the cache folder is read (also one level down, as a zip unpacks); a zip path is unpacked."""
    cache = tmp_path / "cache"
    archive = zip_folder(ml100k, tmp_path / "ml-100k.zip", "ml-100k")
    from_zip = MovieLens("100k", path=str(archive), cache_dir=str(cache)).load()
    assert (cache / "raw" / "movielens-100k" / "ml-100k" / "u.data").is_file()
    from_cache = MovieLens("100k", cache_dir=str(cache)).load()
    assert_frame_equal(from_cache.interactions, from_zip.interactions)
    assert from_cache.items.height == 4


@pytest.mark.skipif(not (ML100K / "ml-100k.inter").is_file(), reason="shared ml-100k folder not present")
def test_movielens_real_ml100k_atomic():
    source = MovieLens(version="100k", path=str(ML100K))
    data = source.load()
    inter = data.interactions
    assert inter.height == 100_000
    assert inter["user_id"].n_unique() == 943 and inter["item_id"].n_unique() == 1682
    assert data.users.height == 943 and data.items.height == 1682
    assert inter["rating"].min() == 1.0 and inter["rating"].max() == 5.0
    toy = data.items.filter(pl.col("item_id") == 1).row(0, named=True)
    assert toy == {
        "item_id": 1,
        "title": "Toy Story (1995). Genres: Animation, Children's, Comedy",
        "genres": ["Animation", "Children's", "Comedy"],
        "year": "1995",
    }
    assert data.users["zip_prefix"].null_count() == 0
    assert source.fingerprint() == MovieLens(version="100k", path=str(ML100K)).fingerprint()


def test_movielens_20m_atomic_needs_no_user_file(tmp_path):
    """20m and the other csv releases have no users, in GroupLens' files as in RecBole's conversion."""
    folder = write_ml_atomic(tmp_path / "ml-20m", stem="ml-20m", tables=("inter", "item"))
    data = MovieLens("20m", path=str(folder)).load()
    assert data.users is None and data.items.height == 4
    assert sorted(Path(f).name for f in data.files) == ["ml-20m.inter", "ml-20m.item"]


# ---- missing files, downloads ------------------------------------------------------------------------------
def test_movielens_unknown_version():
    with pytest.raises(SourceError, match=r"'10k'.*'100k', '1m', '20m', '25m', '32m', 'latest-small'"):
        MovieLens("10k")


def test_movielens_missing_files_fail_fast_without_network(tmp_path):
    start = time.monotonic()
    with pytest.raises(SourceError) as err:
        MovieLens("1m", cache_dir=str(tmp_path)).load()
    assert time.monotonic() - start < 2
    message = str(err.value)
    assert "ratings.dat" in message and "movies.dat" in message and "users.dat" in message
    assert str(tmp_path / "raw" / "movielens-1m") in message
    assert "data.source.path" in message and "allow_download=true" in message


def test_movielens_missing_file_in_given_folder(ml100k):
    (ml100k / "u.user").unlink()
    with pytest.raises(
        SourceError, match=r"u.user not found in .*ml-100k.*ml-100k.inter/.item/.user are read too"
    ):
        MovieLens("100k", path=str(ml100k)).load()


@pytest.mark.parametrize(
    ("version", "present", "missing"),
    [
        ("100k", ("inter", "user"), "ml-100k.item"),
        ("100k", ("inter", "item"), "ml-100k.user"),
        ("1m", ("inter",), "ml-1m.item, ml-1m.user"),
        ("20m", ("inter",), "ml-20m.item"),
    ],
)
def test_movielens_atomic_folder_missing_item_or_user_file_named_up_front(
    tmp_path, version, present, missing
):
    """Without its .item file an atomic folder used to load without items, and the run failed much later
    with a data.history_features error; fingerprint() (which runs first) names the missing file."""
    stem = f"ml-{version}"
    folder = write_ml_atomic(tmp_path / stem, stem=stem, tables=present)
    needed = {
        "100k": "+ ml-100k.item + ml-100k.user",
        "1m": "+ ml-1m.item + ml-1m.user",
        "20m": "+ ml-20m.item",
    }
    expected = (
        rf"source 'movielens-{version}': .*{stem} holds RecBole's {stem}.inter but not {missing}; MovieLens "
        rf"{version} in atomic form is {stem}.inter {needed[version].replace('+', '[+]')}\. Put {missing} next to "
        rf"{stem}.inter, or set data.path=<folder holding the GroupLens files"
    )
    with pytest.raises(SourceError, match=expected):
        MovieLens(version, path=str(folder)).fingerprint()
    with pytest.raises(SourceError, match=expected):
        MovieLens(version, path=str(folder)).load()


def test_movielens_atomic_item_file_that_is_a_directory(tmp_path):
    folder = write_ml_atomic(tmp_path / "ml-100k", tables=("inter", "user"))
    (folder / "ml-100k.item").mkdir()
    with pytest.raises(SourceError, match=r"but not ml-100k.item \(a directory, not a file\)"):
        MovieLens("100k", path=str(folder)).fingerprint()


def test_movielens_path_that_does_not_exist_or_is_a_file_of_another_layout(tmp_path):
    with pytest.raises(SourceError, match=r"data.source.path=.*nope does not exist; it should be a folder"):
        MovieLens("100k", path=str(tmp_path / "nope")).fingerprint()
    other = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n")
    with pytest.raises(
        SourceError, match=r"data.source.path=.*ratings.csv is a file, but source 'movielens-100k'"
    ):
        MovieLens("100k", path=str(other)).fingerprint()


def test_movielens_download_network_error_names_url(tmp_path, monkeypatch):
    def offline(url):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(files, "_open_url", offline)
    with pytest.raises(SourceError, match=r"could not download https://files.grouplens.org/.*/ml-100k.zip"):
        MovieLens("100k", cache_dir=str(tmp_path), allow_download=True).load()
    assert not list((tmp_path / "raw" / "movielens-100k").glob("*.part"))


def test_movielens_latest_small_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_open_url", lambda url: pytest.fail("no network access expected"))
    with pytest.raises(SourceError, match=r"no pinned checksum for https://.*ml-latest-small.zip"):
        MovieLens("latest-small", cache_dir=str(tmp_path), allow_download=True).load()


# ---- bad values --------------------------------------------------------------------------------------------
def test_movielens_bad_rating(ml100k):
    write(ml100k / "u.data", "1\t10\t4\t881250949\n2\t10\tabc\t881250950\n")
    with pytest.raises(
        SourceError, match=r"u.data: column 'rating' must be numeric.*line 2, data row 2 \(value 'abc'\)"
    ):
        MovieLens("100k", path=str(ml100k)).load()


def test_movielens_wrong_field_count(ml100k):
    write(ml100k / "u.data", "1\t10\t4\t881250949\t7\n")
    with pytest.raises(SourceError, match=r"u.data: found 5 fields per line; expected 4 fields"):
        MovieLens("100k", path=str(ml100k)).load()


def test_movielens_csv_missing_column_and_empty_id(tmp_path):
    folder = tmp_path / "ml-25m"
    write(folder / "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    write(folder / "ratings.csv", "userId,movieId,timestamp\n1,1,964982703\n")
    with pytest.raises(SourceError, match=r"ratings.csv: missing column\(s\) \['rating'\]"):
        MovieLens("25m", path=str(folder)).load()
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n,1,3.0,964982704\n")
    # the header is line 1: data row 2 is line 3
    with pytest.raises(
        SourceError, match=r"ratings.csv: column 'userId' holds ids .* 1 of 2 rows .* line 3, data row 2"
    ):
        MovieLens("25m", path=str(folder)).load()


def test_movielens_bad_timestamp(tmp_path):
    folder = tmp_path / "ml-25m"
    write(folder / "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,1,4.0,yesterday\n")
    with pytest.raises(SourceError, match=r"column 'timestamp' must hold integer seconds.*'yesterday'"):
        MovieLens("25m", path=str(folder)).load()


def test_movielens_line_counts_quoted_titles_spanning_lines(tmp_path):
    """movies.csv quotes titles; one holding a line break shifts every later row down a line."""
    folder = tmp_path / "ml-25m"
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n")
    write(folder / "movies.csv", 'movieId,title,genres\n1,"Two\nLines (1995)",Comedy\nx,Film (1996),Drama\n')
    with pytest.raises(
        SourceError, match=r"movies.csv: column 'item_id' must hold integer ids; line 4, data row 2 has 'x'"
    ):
        MovieLens("25m", path=str(folder)).load()


def test_movielens_non_utf8_ratings_name_the_line(ml100k):
    write_bytes(ml100k / "u.data", b"1\t10\t4\t881250949\n2\t1\xff0\t3\t881250950\n")
    with pytest.raises(
        SourceError, match=r"u.data: line 2 is not valid UTF-8 \(byte b'\\xff' at offset 20\)"
    ):
        MovieLens("100k", path=str(ml100k)).load()


def test_movielens_atomic_null_spelled_user_id(tmp_path):
    """RecBole's ids are tokens: a "NaN" would otherwise fail only as 'must hold integer ids' without saying
    why, or (in a token data set) become a user."""
    folder = write_ml_atomic(tmp_path / "ml-100k")
    inter = folder / "ml-100k.inter"
    write(inter, inter.read_text().replace("2\t10\t3", "NaN\t10\t3"))
    with pytest.raises(
        SourceError,
        match=r"ml-100k.inter: column 'user_id' holds ids, but 1 of 4 rows hold a spelling of a missing value; "
        r"the first is line 3, data row 2 \(value 'NaN'\)",
    ):
        MovieLens("100k", path=str(folder)).load()
