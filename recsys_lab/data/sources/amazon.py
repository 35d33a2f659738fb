"""Amazon product reviews (McAuley lab), 2018 and 2023 releases, as ratings with product metadata.

Formats (gzip'd JSON lines, one object per line):

* 2018 (https://nijianmo.github.io/amazon/): the 5-core reviews `<Category>_5.json.gz` with `reviewerID`,
  `asin`, `overall` (1-5) and `unixReviewTime` (seconds); metadata `meta_<Category>.json.gz` with `asin`,
  `title`, `category` (list), `brand` and `price` (a string such as "$12.99", "$1,299.00" or "$10.99 - $15.99";
  often empty or scraped HTML).
* 2023 (https://amazon-reviews-2023.github.io/): reviews `<Category>.jsonl.gz` with `user_id`, `parent_asin`
  (the product, used as item id; `asin` is a variant), `rating` and `timestamp` in milliseconds; metadata
  `meta_<Category>.jsonl.gz` with `parent_asin`, `title`, `categories` (list), `store`, `details` (an object,
  or its JSON text, that may hold "Brand") and `price` (a number or null).

Output: interactions `user_id`, `item_id` (strings), `timestamp` (int64 seconds), `rating` (float64); items
`item_id`, `title` (text: "<title>. Categories: a, b. Brand: x"), `categories` (List[str]), `brand`
(2023: details' "Brand", else the store; empty = null) and `price` (float64; a price range gives its lower
end; anything else that is not a price is null). Nothing is filtered: metadata rows without reviews stay, and
only exact repeats of an item id in the metadata (which the 2018 files contain) are collapsed to their first
row, with a logged count.

The files are read whole into memory (decompressed, then `pl.read_ndjson` with the needed fields only).
McAuley lab publishes no checksums, so this source never downloads: fetch the files by hand.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import zlib
from pathlib import Path

import polars as pl

from recsys_lab.data.sources import validate
from recsys_lab.data.sources.files import file_fingerprint, resolve_files
from recsys_lab.data.sources.raw import FeatureKind, RawData, SourceError

log = logging.getLogger(__name__)

SOURCE_VERSION = 1
YEARS = (2018, 2023)
_URLS = {
    2018: "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2",
    2023: "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw",
}
FEATURES: dict[str, FeatureKind] = {
    "title": "text",
    "categories": "multi_categorical",
    "brand": "categorical",
    "price": "numeric",
}
_NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?"
# "$12.99", "12.99", "$1,299.00" or a range "$10.99 - $15.99" (-> 10.99); the number is group 1.
_PRICE = rf"^\$?\s*({_NUMBER})(?:\s*-\s*\$?\s*{_NUMBER})?$"


def parse_price(price: pl.Expr) -> pl.Expr:
    """Price strings (or numbers) as float64; anything that is not a price is null."""
    text = price.cast(pl.String).str.strip_chars()
    return text.str.extract(_PRICE, 1).str.replace_all(",", "").cast(pl.Float64, strict=False)


def _read_jsonl(path: Path, fields: dict[str, pl.DataType]) -> pl.DataFrame:
    """The named fields of a gzip'd JSON-lines file (absent fields are null; validators check the ids)."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as err:
        raise SourceError(f"{path}: not a readable gzip file ({err})") from err
    try:
        return pl.read_ndjson(io.BytesIO(data), schema=fields)
    except pl.exceptions.PolarsError as err:
        raise SourceError(
            f"{path}: cannot be read as JSON lines with fields {list(fields)} ({str(err).splitlines()[0]})"
        ) from err


class AmazonReviews:
    """Amazon reviews of one category as ratings, with product titles, categories, brands and prices.

    Args:
        category: the file's category name, e.g. "Video_Games" (2018: `Video_Games_5.json.gz`; 2023:
            `Video_Games.jsonl.gz`).
        year: 2018 (5-core reviews) or 2023 (all reviews).
        path: the folder holding the reviews and metadata files (or one sub-folder of it); None looks in
            `<cache_dir>/raw/amazon<year>-<category>/`.
        cache_dir: the data cache root (`paths.data_dir`).
        allow_download: accepted for symmetry with the other sources; with no published checksums nothing is
            downloaded, and the error names the URLs to fetch by hand.
    """

    def __init__(
        self,
        category: str,
        year: int = 2018,
        path: str | None = None,
        cache_dir: str = "data",
        allow_download: bool = False,
    ) -> None:
        if str(year) not in {str(y) for y in YEARS}:
            raise SourceError(f"data.source.year={year!r} is unknown; expected one of {list(YEARS)}")
        if not category or "/" in category:
            raise SourceError(
                f"data.source.category={category!r} must be a category file name, e.g. 'Video_Games'"
            )
        self.category = category
        self.year = int(year)
        self.path = path
        self.cache_dir = cache_dir
        self.allow_download = allow_download
        self._folder: Path | None = None

    @property
    def name(self) -> str:
        return f"amazon{self.year}-{self.category}"

    @property
    def file_names(self) -> tuple[str, str]:
        """(reviews, metadata) file names."""
        if self.year == 2018:
            return f"{self.category}_5.json.gz", f"meta_{self.category}.json.gz"
        return f"{self.category}.jsonl.gz", f"meta_{self.category}.jsonl.gz"

    def _resolve(self) -> Path:
        if self._folder is None:
            reviews, meta = self.file_names
            base = _URLS[self.year]
            urls = (
                {reviews: f"{base}/categoryFilesSmall/{reviews}", meta: f"{base}/metaFiles2/{meta}"}
                if self.year == 2018
                else {reviews: f"{base}/review_categories/{reviews}", meta: f"{base}/meta_categories/{meta}"}
            )
            self._folder = resolve_files(
                self.name,
                [reviews, meta],
                self.path,
                self.cache_dir,
                downloads={name: (url, None) for name, url in urls.items()},
                allow_download=self.allow_download,
            )
        return self._folder

    def fingerprint(self) -> str:
        """Cache key: the source version, category, release year and the files."""
        folder = self._resolve()
        blob = {
            "source": "amazon",
            "source_version": SOURCE_VERSION,
            "category": self.category,
            "year": self.year,
            "files": file_fingerprint([folder / f for f in self.file_names]),
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "source": self.name,
            "source_version": SOURCE_VERSION,
            "category": self.category,
            "year": self.year,
            "path": self.path,
        }

    # ---- reading -------------------------------------------------------------------------------------------
    def _interactions(self, path: Path) -> pl.DataFrame:
        S = pl.String
        if self.year == 2018:
            user, item, rating, ts, scale = "reviewerID", "asin", "overall", "unixReviewTime", 1
        else:
            user, item, rating, ts, scale = "user_id", "parent_asin", "rating", "timestamp", 1000
        frame = _read_jsonl(path, {user: S, item: S, rating: S, ts: S})
        validate.check_ids(frame, [user, item], path)
        return pl.DataFrame(
            [
                frame.get_column(user).alias("user_id"),
                frame.get_column(item).alias("item_id"),
                validate.to_timestamp(frame, ts, path, scale=scale).alias("timestamp"),
                validate.to_float(frame, rating, path).alias("rating"),
            ]
        )

    def _items(self, path: Path) -> pl.DataFrame:
        S = pl.String
        if self.year == 2018:
            fields = {"asin": S, "title": S, "category": pl.List(S), "brand": S, "price": S}
            frame = _read_jsonl(path, fields).rename({"asin": "item_id", "category": "categories"})
            brand = pl.col("brand")
        else:
            fields = {
                "parent_asin": S,
                "title": S,
                "categories": pl.List(S),
                "store": S,
                "details": S,
                "price": S,
            }
            frame = _read_jsonl(path, fields).rename({"parent_asin": "item_id"})
            in_details = pl.col("details").str.json_path_match("$.Brand").str.strip_chars().replace("", None)
            brand = pl.coalesce(in_details, pl.col("store"))
        validate.check_ids(frame, ["item_id"], path)
        repeats = frame.height - frame.get_column("item_id").n_unique()
        if repeats:
            log.warning("%s: %d repeated item ids; kept the first row of each", path, repeats)
            frame = frame.unique("item_id", keep="first", maintain_order=True)
        categories = validate.to_list(frame.get_column("categories"), path, "|").fill_null([])
        frame = frame.with_columns(
            categories.alias("categories"),
            brand.str.strip_chars().replace("", None).alias("brand"),
            parse_price(pl.col("price")).alias("price"),
            pl.col("title").str.strip_chars().replace("", None),
        )
        text = pl.concat_str(
            [
                pl.col("title"),
                pl.when(pl.col("categories").list.len() > 0).then(
                    pl.lit("Categories: ") + pl.col("categories").list.join(", ")
                ),
                pl.when(pl.col("brand").is_not_null()).then(pl.lit("Brand: ") + pl.col("brand")),
            ],
            separator=". ",
            ignore_nulls=True,
        )
        return frame.select("item_id", text.alias("title"), "categories", "brand", "price")

    def load(self) -> RawData:
        folder = self._resolve()
        reviews, meta = (folder / f for f in self.file_names)
        return RawData(
            interactions=self._interactions(reviews),
            items=self._items(meta),
            features=dict(FEATURES),
            labels=[],
            item_text="title",
            files=[str(reviews), str(meta)],
        )
