"""Real-data sources: each reads a tiny fixture written here in its real format; bad input gives one clear error.

No test touches the network: downloads go to `file://` URLs, a refused local port, or a patched opener.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
import urllib.error
import zipfile
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from recsys_lab.data.sources import files
from recsys_lab.data.sources.amazon import AmazonReviews
from recsys_lab.data.sources.atomic import AtomicFiles
from recsys_lab.data.sources.files import file_fingerprint, resolve_files
from recsys_lab.data.sources.movielens import MovieLens
from recsys_lab.data.sources.raw import RawData, SourceError
from recsys_lab.data.sources.tabular import Tabular

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
# u.genre: the order of u.item's 19 genre flags
GENRES_100K = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir Horror Musical "
    "Mystery Romance Sci-Fi Thriller War Western"
).split()


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def write_jsonl_gz(path: Path, rows: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def col(frame: pl.DataFrame, name: str) -> list:
    return frame.get_column(name).to_list()


def flags(*genres: str) -> str:
    """The 19 u.item genre flags with the named genres set."""
    return "|".join("1" if g in genres else "0" for g in GENRES_100K)


# ---- MovieLens ---------------------------------------------------------------------------------------------
@pytest.fixture
def ml100k(tmp_path) -> Path:
    folder = tmp_path / "ml-100k"
    write(
        folder / "u.data",
        "1\t10\t4\t881250949\n2\t10\t3\t881250950\n1\t20\t5\t881250951\n2\t30\t1\t881250952\n",
    )
    toy = flags("Animation", "Children's", "Comedy")
    write(
        folder / "u.item",
        f"10|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{toy}\n"
        f"20|Misérables, Les (1995)|01-Jan-1995||http://x|{flags('Drama')}\n"
        f"30|unknown||||{flags('unknown')}\n"
        f"40|Some Film|04-Mar-1997||http://y|{flags('Drama', 'Western')}\n",
        encoding="latin-1",
    )
    write(folder / "u.user", "1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    return folder


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
    folder = tmp_path / "atomic"
    write(
        folder / "ml-100k.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t4\t881250949\n2\t10\t3\t881250950\n1\t20\t5\t881250951\n2\t30\t1\t881250952\n",
    )
    write(
        folder / "ml-100k.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tToy Story\t1995\tAnimation Children's Comedy\n20\tMisérables, Les\t1995\tDrama\n"
        "30\tunknown\tunkonwn\tunknown\n40\tSome Film\t1997\tDrama Western\n",
    )
    write(
        folder / "ml-100k.user",
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\tT8H1N\n",
    )
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
    folder = tmp_path / f"ml-{version}"
    write(
        folder / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n2,2,0.5,1\n",
    )
    write(
        folder / "movies.csv",
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '2,"American President, The (1995)",Comedy|Drama|Romance\n'
        "3,Babylon 5,(no genres listed)\n"
        '4,"Millions (2004) ",Crime\n',
    )
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
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for f in ml100k.iterdir():
            bundle.write(f, f"ml-100k/{f.name}")
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


def test_movielens_bad_rating(ml100k):
    write(ml100k / "u.data", "1\t10\t4\t881250949\n2\t10\tabc\t881250950\n")
    with pytest.raises(
        SourceError, match=r"u.data: column 'rating' must be numeric.*data row 2 \(value 'abc'\)"
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
    with pytest.raises(
        SourceError, match=r"ratings.csv: column 'userId' holds ids .* 1 of 2 rows .* data row 2"
    ):
        MovieLens("25m", path=str(folder)).load()


def test_movielens_bad_timestamp(tmp_path):
    folder = tmp_path / "ml-25m"
    write(folder / "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,1,4.0,yesterday\n")
    with pytest.raises(SourceError, match=r"column 'timestamp' must hold integer seconds.*'yesterday'"):
        MovieLens("25m", path=str(folder)).load()


# ---- Amazon ------------------------------------------------------------------------------------------------
def amazon_2018(folder: Path) -> Path:
    write_jsonl_gz(
        folder / "Video_Games_5.json.gz",
        [
            {"overall": 5.0, "verified": True, "reviewerID": "A1", "asin": "B01", "unixReviewTime": 1400000000,
             "reviewText": "great", "style": {"Format:": " Video Game"}},
            {"overall": 3.0, "reviewerID": "A2", "asin": "B01", "unixReviewTime": 1400000100},
            {"overall": 4.0, "reviewerID": "A1", "asin": "B02", "unixReviewTime": 1400000200, "vote": "2"},
        ],
    )  # fmt: skip
    write_jsonl_gz(
        folder / "meta_Video_Games.json.gz",
        [
            {"asin": "B01", "title": "Space Game", "category": ["Video Games", "PC"], "brand": "Acme",
             "price": "$12.99", "also_buy": ["B02"]},
            {"asin": "B02", "title": "Big Box", "category": [], "brand": "", "price": "$1,299.00"},
            {"asin": "B03", "title": "Range", "category": ["Video Games"], "price": "$10.99 - $15.99"},
            {"asin": "B04", "title": "Garbage price", "brand": "Zed", "price": ".a-box-inner{background:#fff}"},
            {"asin": "B05", "title": "", "category": ["Toys"], "brand": "Zed", "price": ""},
            {"asin": "B01", "title": "Space Game (repeat)", "price": "$1.00"},
        ],
    )  # fmt: skip
    return folder


def test_amazon_2018(tmp_path):
    source = AmazonReviews("Video_Games", 2018, path=str(amazon_2018(tmp_path / "amz")))
    assert source.name == "amazon2018-Video_Games"
    data = source.load()
    assert data.interactions.schema == {
        "user_id": pl.String,
        "item_id": pl.String,
        "timestamp": pl.Int64,
        "rating": pl.Float64,
    }
    assert data.interactions.rows() == [
        ("A1", "B01", 1400000000, 5.0),
        ("A2", "B01", 1400000100, 3.0),
        ("A1", "B02", 1400000200, 4.0),
    ]
    items = data.items
    assert col(items, "item_id") == [
        "B01",
        "B02",
        "B03",
        "B04",
        "B05",
    ]  # the repeated B01 keeps its first row
    assert col(items, "price") == [12.99, 1299.0, 10.99, None, None]
    assert col(items, "brand") == ["Acme", None, None, "Zed", "Zed"]
    assert col(items, "categories") == [["Video Games", "PC"], [], ["Video Games"], [], ["Toys"]]
    assert col(items, "title") == [
        "Space Game. Categories: Video Games, PC. Brand: Acme",
        "Big Box",
        "Range. Categories: Video Games",
        "Garbage price. Brand: Zed",
        "Categories: Toys. Brand: Zed",
    ]
    assert data.features == {
        "title": "text",
        "categories": "multi_categorical",
        "brand": "categorical",
        "price": "numeric",
    }
    assert data.item_text == "title" and data.users is None


def test_amazon_2023(tmp_path):
    folder = tmp_path / "amz23"
    write_jsonl_gz(
        folder / "All_Beauty.jsonl.gz",
        [
            {"rating": 5.0, "title": "Nice", "text": "ok", "images": [], "asin": "B0V1", "parent_asin": "B0P1",
             "user_id": "U1", "timestamp": 1588687728923, "helpful_vote": 0, "verified_purchase": True},
            {"rating": 2, "asin": "B0V2", "parent_asin": "B0P1", "user_id": "U2", "timestamp": 1588687729999},
        ],
    )  # fmt: skip
    write_jsonl_gz(
        folder / "meta_All_Beauty.jsonl.gz",
        [
            {"main_category": "All Beauty", "title": "Face Cream", "categories": ["Beauty", "Skin Care"],
             "store": "Acme Store", "details": {"Brand": "Acme", "Item Weight": "1 pound"}, "price": 12.5,
             "parent_asin": "B0P1"},
            {"title": "Soap", "categories": [], "store": "SoapCo", "details": {"Color": "white"}, "price": None,
             "parent_asin": "B0P2"},
            {"title": "Brush", "categories": ["Tools"], "store": None, "details": "{\"Brand\": \"Bristle\"}",
             "price": "None", "parent_asin": "B0P3"},
        ],
    )  # fmt: skip
    data = AmazonReviews("All_Beauty", 2023, path=str(folder)).load()
    # parent_asin is the item; milliseconds become seconds
    assert data.interactions.rows() == [("U1", "B0P1", 1588687728, 5.0), ("U2", "B0P1", 1588687729, 2.0)]
    items = data.items
    assert col(items, "item_id") == ["B0P1", "B0P2", "B0P3"]
    assert col(items, "brand") == ["Acme", "SoapCo", "Bristle"]
    assert col(items, "price") == [12.5, None, None]
    assert col(items, "title") == [
        "Face Cream. Categories: Beauty, Skin Care. Brand: Acme",
        "Soap. Brand: SoapCo",
        "Brush. Categories: Tools. Brand: Bristle",
    ]


def test_amazon_errors(tmp_path):
    folder = amazon_2018(tmp_path / "amz")
    write_jsonl_gz(folder / "Video_Games_5.json.gz", [{"overall": 5.0, "asin": "B01", "unixReviewTime": 1}])
    with pytest.raises(SourceError, match=r"Video_Games_5.json.gz: column 'reviewerID' .*all of them"):
        AmazonReviews("Video_Games", 2018, path=str(folder)).load()
    write_jsonl_gz(
        folder / "Video_Games_5.json.gz",
        [{"overall": "five", "reviewerID": "A", "asin": "B01", "unixReviewTime": 1}],
    )
    with pytest.raises(SourceError, match=r"column 'overall' must be numeric.*'five'"):
        AmazonReviews("Video_Games", 2018, path=str(folder)).load()
    write_jsonl_gz(folder / "Video_Games_5.json.gz", ['{"overall": 5.0, "reviewerID": "A"', "{}"])
    with pytest.raises(SourceError, match=r"Video_Games_5.json.gz: cannot be read as JSON lines"):
        AmazonReviews("Video_Games", 2018, path=str(folder)).load()
    with pytest.raises(SourceError, match=r"year=2014.*\[2018, 2023\]"):
        AmazonReviews("Video_Games", 2014)


def test_amazon_missing_files_name_urls(tmp_path):
    with pytest.raises(SourceError) as err:
        AmazonReviews("Video_Games", 2023, cache_dir=str(tmp_path)).load()
    message = str(err.value)
    assert "Video_Games.jsonl.gz" in message and "meta_Video_Games.jsonl.gz" in message
    assert "amazon_2023/raw/review_categories/Video_Games.jsonl.gz" in message
    with pytest.raises(SourceError, match="no pinned checksum"):
        AmazonReviews("Video_Games", 2023, cache_dir=str(tmp_path), allow_download=True).load()


# ---- RecBole atomic ----------------------------------------------------------------------------------------
@pytest.fixture
def toy_atomic(tmp_path) -> Path:
    folder = tmp_path / "toy"
    write(
        folder / "toy.inter",
        "user_id:token\titem_id:token\ttimestamp:float\tlabel:float\tdevice:token\n"
        "u1\ti1\t100\t1\tmobile\nu2\ti2\t1.7e2\t0\t\nu1\ti2\t300\t1\tdesktop\n",
    )
    write(
        folder / "toy.item",
        "item_id:token\titem_name:token_seq\ttags:token_seq\tprice:float\temb:float_seq\n"
        "i1\tRed  Shoes\tsport red\t9.5\t0.1 0.2\ni2\tBlue Hat\t\t\t0.3 0.4\n",
    )
    write(folder / "toy.user", "user_id:token\tage:token\tscore:float\nu1\t25\t0.5\nu2\t\t1\n")
    return folder


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
    assert len(data.files) == 3 and len(source.fingerprint()) == 16


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
    with pytest.raises(SourceError, match=r"label column 'label' must be 0 or 1.*'2'"):
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


# ---- Tabular -----------------------------------------------------------------------------------------------
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
    data = Tabular(str(path), columns={"user": "u", "item": "i"}, user_features={"seg": "categorical"}).load()
    assert data.interactions.rows() == [("a", "x", 0), ("b", "y", 1), ("a", "y", 2)]
    assert data.users.rows() == [("a", "s3"), ("b", "s2")]  # the user's last row in the file


def test_tabular_errors(tmp_path):
    path = write(tmp_path / "x.csv", "u,i,r,t\na,x,4,100\nb,y,high,200\n")
    missing = r"x.csv: missing column\(s\) \['nope'\] \(the file has \['u', 'i', 'r', 't'\]\)"
    with pytest.raises(SourceError, match=missing):
        Tabular(str(path), columns={"user": "nope", "item": "i"}).load()
    with pytest.raises(SourceError, match=r"x.csv: column 'r' must be numeric.*data row 2 \(value 'high'\)"):
        Tabular(str(path), columns={"user": "u", "item": "i", "rating": "r"}).load()
    with pytest.raises(SourceError, match=r"missing column\(s\) \['brand'\]"):
        Tabular(str(path), columns={"user": "u", "item": "i"}, item_features={"brand": "categorical"}).load()
    with pytest.raises(SourceError, match=r"unknown feature kind 'cat'"):
        Tabular(str(path), columns={"user": "u", "item": "i"}, item_features={"r": "cat"})
    with pytest.raises(SourceError, match=r"must map 'user' and 'item'"):
        Tabular(str(path), columns={"user": "u"})

    path = write(tmp_path / "ids.csv", "u,i\na,x\n,y\n")
    with pytest.raises(SourceError, match=r"ids.csv: column 'u' holds ids .* data row 2"):
        Tabular(str(path), columns={"user": "u", "item": "i"}).load()

    path = write(tmp_path / "ts.csv", "u,i,t\na,x,2024-01-01 10:00:00\nb,y,2024-13-45 10:00:00\n")
    with pytest.raises(
        SourceError, match=r"ts.csv: column 't' must hold times in the format .*'2024-13-45 10:00:00'"
    ):
        Tabular(
            str(path),
            columns={"user": "u", "item": "i", "timestamp": "t"},
            timestamp_format="%Y-%m-%d %H:%M:%S",
        ).load()
    with pytest.raises(SourceError, match=r"integer seconds .*timestamp_format"):
        Tabular(str(path), columns={"user": "u", "item": "i", "timestamp": "t"}).load()

    path = write(tmp_path / "items.csv", "i,brand\nx,A\nx,B\n")
    with pytest.raises(SourceError, match=r"items.csv: column 'i' must have one row per id"):
        Tabular(
            str(write(tmp_path / "ok.csv", "u,i\na,x\n")),
            columns={"user": "u", "item": "i"},
            item_features={"brand": "categorical"},
            items_path=str(path),
        ).load()
    with pytest.raises(SourceError, match=r"unknown table format '.json'"):
        Tabular(str(write(tmp_path / "x.json", "{}")), columns={"user": "u", "item": "i"}).load()


# ---- file resolution and downloads -------------------------------------------------------------------------
@pytest.fixture
def archive(tmp_path) -> Path:
    path = tmp_path / "src" / "data.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr("data/a.txt", "hello")
        bundle.writestr("data/b.txt", "world")
    return path


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_download_verified_and_unpacked(tmp_path, archive, algorithm):
    digest = hashlib.new(algorithm, archive.read_bytes()).hexdigest()
    folder = resolve_files(
        "toy",
        ["a.txt", "b.txt"],
        path=None,
        cache_dir=str(tmp_path / "cache"),
        downloads={"data.zip": (archive.as_uri(), f"{algorithm}:{digest}")},
        allow_download=True,
    )
    assert folder == tmp_path / "cache" / "raw" / "toy" / "data"
    assert (folder / "a.txt").read_text() == "hello"


def test_download_checksum_mismatch(tmp_path, archive):
    cache = tmp_path / "cache"
    with pytest.raises(
        SourceError, match=r"checksum mismatch for data.zip downloaded from file://.*pinned value is 0+"
    ):
        resolve_files(
            "toy",
            ["a.txt"],
            path=None,
            cache_dir=str(cache),
            downloads={"data.zip": (archive.as_uri(), "sha256:" + "0" * 64)},
            allow_download=True,
        )
    assert not list((cache / "raw" / "toy").iterdir())  # neither the file nor its .part is kept


def test_download_unreachable_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"could not download http://127.0.0.1:9/data.zip"):
        resolve_files(
            "toy",
            ["a.txt"],
            path=None,
            cache_dir=str(tmp_path),
            downloads={"data.zip": ("http://127.0.0.1:9/data.zip", "md5:" + "0" * 32)},
            allow_download=True,
        )
    assert time.monotonic() - start < files.NETWORK_TIMEOUT_S + 2


def test_download_hanging_name_lookup_gives_up(tmp_path, monkeypatch):
    """getaddrinfo ignores socket timeouts: a resolver that never answers must not hang the run."""
    monkeypatch.setattr(files, "NETWORK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(files.socket, "getaddrinfo", lambda *args: time.sleep(3))
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"could not download http://grouplens.invalid/x.zip \(looking up"):
        resolve_files(
            "toy",
            ["a.txt"],
            None,
            str(tmp_path),
            {"x.zip": ("http://grouplens.invalid/x.zip", "md5:" + "0" * 32)},
            True,
        )
    assert time.monotonic() - start < 2


def test_download_off_by_default_and_unpinned_refused(tmp_path, archive, monkeypatch):
    monkeypatch.setattr(files, "_open_url", lambda url: pytest.fail("no network access expected"))
    with pytest.raises(
        SourceError, match=r"a.txt not found; looked in .*allow_download=true to fetch file://"
    ):
        resolve_files(
            "toy", ["a.txt"], None, str(tmp_path), {"data.zip": (archive.as_uri(), "md5:" + "0" * 32)}
        )
    with pytest.raises(SourceError, match=r"no pinned checksum for file://.*data.zip; download it yourself"):
        resolve_files("toy", ["a.txt"], None, str(tmp_path), {"data.zip": (archive.as_uri(), None)}, True)


def test_resolve_path_forms(tmp_path):
    folder = tmp_path / "d"
    write(folder / "a.txt", "1")
    write(folder / "b.txt", "2")
    assert resolve_files("toy", ["a.txt", "b.txt"], str(folder), str(tmp_path)) == folder
    assert resolve_files("toy", ["a.txt", "b.txt"], str(folder / "a.txt"), str(tmp_path)) == folder
    assert (
        resolve_files("toy", ["a.txt", "b.txt"], str(tmp_path), str(tmp_path / "c")) == folder
    )  # one level down
    with pytest.raises(SourceError, match=r"does not exist"):
        resolve_files("toy", ["a.txt"], str(tmp_path / "nope"), str(tmp_path))
    with pytest.raises(SourceError, match=r"c.txt not found in .*put c.txt into"):
        resolve_files("toy", ["a.txt", "c.txt"], str(folder), str(tmp_path))


def test_file_fingerprint(tmp_path):
    a = write(tmp_path / "x" / "f.txt", "same")
    b = write(tmp_path / "y" / "f.txt", "same")
    assert file_fingerprint([a]) == file_fingerprint([b])  # folder names do not matter
    write(b, "diff")
    assert file_fingerprint([a]) != file_fingerprint([b])
