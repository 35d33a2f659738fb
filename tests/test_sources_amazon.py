"""Amazon Reviews 2018 and 2023 read from tiny gzip'd JSON-lines fixtures; bad input gives one clear error."""

from __future__ import annotations

import polars as pl
import pytest

from recsys_lab.data.sources.amazon import AmazonReviews
from recsys_lab.data.sources.raw import SourceError
from tests.source_fixtures import col, write_amazon_2018, write_jsonl_gz


def test_amazon_2018(tmp_path):
    source = AmazonReviews("Video_Games", 2018, path=str(write_amazon_2018(tmp_path / "amz")))
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
    folder = write_amazon_2018(tmp_path / "amz")
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


@pytest.mark.parametrize(
    ("value", "problem"),
    [("null", "hold a spelling of a missing value"), ("NaN", "hold a spelling of a missing value"),
     ("A1 ", "have leading or trailing whitespace")],
)  # fmt: skip
def test_amazon_reviewer_id_null_spelling_or_whitespace(tmp_path, value, problem):
    """A reviewerID "null" used to become one reviewer pooling unrelated reviews; "A1 " a second A1."""
    folder = write_amazon_2018(tmp_path / "amz")
    write_jsonl_gz(
        folder / "Video_Games_5.json.gz",
        [
            {"overall": 5.0, "reviewerID": "A1", "asin": "B01", "unixReviewTime": 1},
            {"overall": 4.0, "reviewerID": value, "asin": "B02", "unixReviewTime": 2},
        ],
    )
    with pytest.raises(
        SourceError,
        match=rf"Video_Games_5.json.gz: column 'reviewerID' holds ids, but 1 of 2 rows {problem}; the first is "
        rf"data row 2 \(value '{value}'\)",
    ):
        AmazonReviews("Video_Games", 2018, path=str(folder)).load()


def test_amazon_path_that_is_not_the_folder(tmp_path):
    """fingerprint() runs before load(): a wrong data.path fails there with the reader's message."""
    with pytest.raises(
        SourceError, match=r"data.source.path=.*nope does not exist; it should be a folder holding"
    ):
        AmazonReviews("Video_Games", 2018, path=str(tmp_path / "nope")).fingerprint()
    (tmp_path / "Video_Games_5.json.gz").mkdir()
    with pytest.raises(
        SourceError,
        match=r"Video_Games_5.json.gz is a directory, but source 'amazon2018-Video_Games' reads it as a file",
    ):
        AmazonReviews("Video_Games", 2018, path=str(tmp_path / "Video_Games_5.json.gz")).fingerprint()
    folder = write_amazon_2018(tmp_path / "amz")
    (folder / "meta_Video_Games.json.gz").unlink()
    (folder / "meta_Video_Games.json.gz").mkdir()
    with pytest.raises(
        SourceError, match=r"meta_Video_Games.json.gz \(a directory, not a file\) not found in"
    ):
        AmazonReviews("Video_Games", 2018, path=str(folder)).fingerprint()
    # one of the files stands for its folder
    folder = write_amazon_2018(tmp_path / "amz2")
    assert AmazonReviews("Video_Games", 2018, path=str(folder / "Video_Games_5.json.gz")).fingerprint() == (
        AmazonReviews("Video_Games", 2018, path=str(folder)).fingerprint()
    )
