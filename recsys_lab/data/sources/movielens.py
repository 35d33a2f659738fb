"""MovieLens ratings (GroupLens, https://grouplens.org/datasets/movielens/) in their original formats.

Formats read (as described in each archive's README):

* 100k — `u.data`: tab-separated `user id | item id | rating | timestamp`; `u.item` (latin-1): `|`-separated
  `movie id | title | release date | video release date | IMDb URL |` then 19 0/1 genre flags in the order of
  `u.genre`; `u.user`: `|`-separated `user id | age | gender | occupation | zip code`.
* 1m — `ratings.dat` `UserID::MovieID::Rating::Timestamp`, `movies.dat` (latin-1) `MovieID::Title::Genres` with
  `|`-separated genres, `users.dat` `UserID::Gender::Age::Occupation::Zip-code` (age and occupation are the
  README's codes, kept as given).
* 20m, 25m, 32m, latest-small — `ratings.csv` (`userId,movieId,rating,timestamp`) and `movies.csv`
  (`movieId,title,genres`, a title with commas is double-quoted, "(no genres listed)" means none); no users.
* the RecBole atomic conversion of any version (`ml-<version>.inter/.item/.user`, as shipped with RecBole):
  used when the folder holds `ml-<version>.inter`, e.g. `data.source.path=../shared/data/ml-100k`. Like the
  GroupLens files, it must then include the items (`.item`) and, for 100k and 1m, the users (`.user`).

Output (the same columns whichever format was read):

* interactions: `user_id`, `item_id` (int64, as in the files), `timestamp` (int64 seconds), `rating` (float64);
* items: `item_id`, `title` (text for language models: "Toy Story (1995). Genres: Animation, Children's,
  Comedy"), `genres` (List[str]), `year` (string; the "(1995)" at the end of the title, else the release
  date's year, else "unknown");
* users (100k, 1m): `user_id`, `age`, `gender`, `occupation`, `zip_prefix` (the zip code's first character:
  a coarse region; the full zip code is left out as it narrows users down too far).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys_lab.data.sources import validate
from recsys_lab.data.sources.atomic import load_atomic
from recsys_lab.data.sources.files import file_fingerprint, find_folder, name_missing, resolve_files
from recsys_lab.data.sources.raw import FeatureKind, RawData, SourceError

SOURCE_VERSION = 1
BASE_URL = "https://files.grouplens.org/datasets/movielens"

# ml-100k u.genre, in the order of u.item's flag columns.
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
NO_GENRES = "(no genres listed)"


@dataclass(frozen=True)
class Release:
    layout: str  # "100k" | "1m" | "csv"
    files: tuple[str, ...]
    # md5 of the zip as GroupLens publishes it next to the zip (`<zip>.md5`); None = never downloaded.
    md5: str | None


_CSV = ("ratings.csv", "movies.csv")
# Pinned checksums, and where they were found (each quotes GroupLens' own `<zip>.md5`):
# - 100k, 1m, 20m, 25m: eli-osherovich/papers_with_code, datasets/movielens/dl_config.py; 1m and 25m also in
#   numericalalgorithmsgroup/MLFirstSteps_Azure, ncf/verify_dataset.sh ("From: curl -O
#   http://files.grouplens.org/datasets/movielens/ml-25m.zip.md5").
# - 32m: several public download scripts, e.g. one commented "Official checksum from
#   https://files.grouplens.org/datasets/movielens/ml-32m.zip.md5", and pooch.retrieve(known_hash="md5:...").
# - latest-small: none. It is a moving "latest" snapshot whose md5 changes with each regeneration, so it is
#   never downloaded; fetch it by hand and set data.source.path.
RELEASES: dict[str, Release] = {
    "100k": Release("100k", ("u.data", "u.item", "u.user"), "0e33842e24a9c977be4e0107933c0723"),
    "1m": Release("1m", ("ratings.dat", "movies.dat", "users.dat"), "c4d9eecfca2ab87c1945afe126590906"),
    "20m": Release("csv", _CSV, "cd245b17a1ae2cc31bb14903e1204af3"),
    "25m": Release("csv", _CSV, "6b51fb2759a8657d3bfcbfc42b592ada"),
    "32m": Release("csv", _CSV, "d472be332d4daa821edc399621853b57"),
    "latest-small": Release("csv", _CSV, None),
}

FEATURES: dict[str, FeatureKind] = {
    "title": "text",
    "genres": "multi_categorical",
    "year": "categorical",
    "age": "categorical",
    "gender": "categorical",
    "occupation": "categorical",
    "zip_prefix": "categorical",
}


# ---- reading -----------------------------------------------------------------------------------------------
def _read_delimited(
    path: Path, columns: dict[str, pl.DataType], separator: str, encoding: str = "utf-8"
) -> pl.DataFrame:
    """A header-less delimited file with the given columns.

    The fast path parses with the column types; when that fails the file is read again as strings, so that
    the validators can name the offending row and value.
    """
    data = path.read_bytes()
    if encoding != "utf-8":
        data = data.decode(encoding).encode("utf-8")
    if len(separator) > 1:  # polars splits on one byte: "::" becomes the unit separator, absent from the data
        data = data.replace(separator.encode(), b"\x1f")
    sep = separator if len(separator) == 1 else "\x1f"
    read = dict(separator=sep, has_header=False, quote_char=None)
    try:
        return pl.read_csv(io.BytesIO(data), schema=columns, **read)
    except (pl.exceptions.ComputeError, pl.exceptions.SchemaError):
        pass
    expected = f"{len(columns)} fields separated by {separator!r} ({', '.join(columns)})"
    try:
        frame = pl.read_csv(io.BytesIO(data), infer_schema=False, **read)
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError) as err:
        if encoding == "utf-8":  # the usual cause: name the line
            validate.check_utf8(path)
        raise SourceError(f"{path}: cannot be read; expected {expected} per line ({err})") from err
    if frame.width != len(columns):
        raise SourceError(f"{path}: found {frame.width} fields per line; expected {expected}")
    return frame.rename(dict(zip(frame.columns, columns, strict=True)))


def _read_csv(path: Path, columns: dict[str, pl.DataType]) -> pl.DataFrame:
    """A csv with a header; the named columns must be present (others are ignored)."""
    try:
        frame = pl.read_csv(path, schema_overrides=columns, columns=list(columns))
    except pl.exceptions.ColumnNotFoundError:
        frame = pl.read_csv(path, n_rows=0)
        validate.require_columns(frame, columns, path, expected=f"a header {','.join(columns)}")
        raise
    except pl.exceptions.ComputeError:  # a value of the wrong type: strings, so the validators can name it
        frame = pl.read_csv(path, infer_schema=False, columns=list(columns))
    return frame


def _int_ids(frame: pl.DataFrame, column: str, path: validate.File) -> pl.Series:
    """MovieLens ids are integers: check and cast."""
    validate.check_ids(frame, [column], path)
    series = frame.get_column(column)
    if series.dtype == pl.Int64:
        return series
    ids = series.cast(pl.Int64, strict=False)
    bad = ids.is_null()
    if bad.any():
        row = int(bad.arg_true()[0])
        raise SourceError(
            f"{path}: column {column!r} must hold integer ids; {validate.at(path, row + 1)} has "
            f"{series[row]!r}"
        )
    return ids


def _interactions(
    frame: pl.DataFrame, path: validate.File, user: str, item: str, rating: str, ts: str
) -> pl.DataFrame:
    return pl.DataFrame(
        [
            _int_ids(frame, user, path).alias("user_id"),
            _int_ids(frame, item, path).alias("item_id"),
            validate.to_timestamp(frame, ts, path).alias("timestamp"),
            validate.to_float(frame, rating, path).alias("rating"),
        ]
    )


def _items(frame: pl.DataFrame, path: validate.File, year_hint: str | None = None) -> pl.DataFrame:
    """Items from `item_id`, `title` (raw), `genres` (List[str]) and an optional year hint column."""
    item_id = _int_ids(frame, "item_id", path)
    validate.check_unique(frame.with_columns(item_id), "item_id", path)
    raw = pl.col("title").str.strip_chars()
    in_title = raw.str.extract(r"\((\d{4})\)$", 1)
    hint = pl.col(year_hint).str.extract(r"(\d{4})\s*$", 1) if year_hint else pl.lit(None, pl.String)
    year = pl.coalesce(in_title, hint)
    name = raw.str.replace(r"\s*\(\d{4}\)$", "")
    named = pl.when(year.is_null()).then(name).otherwise(pl.format("{} ({})", name, year))
    genres = pl.when(pl.col("genres").list.len() > 0).then(
        pl.lit("Genres: ") + pl.col("genres").list.join(", ")
    )
    return frame.with_columns(item_id).select(
        "item_id",
        pl.concat_str([named, genres], separator=". ", ignore_nulls=True).alias("title"),
        pl.col("genres").cast(pl.List(pl.String)),
        year.fill_null("unknown").alias("year"),
    )


def _users(frame: pl.DataFrame, path: validate.File) -> pl.DataFrame:
    """Users from `user_id`, `age`, `gender`, `occupation`, `zip` (strings)."""
    user_id = _int_ids(frame, "user_id", path)
    validate.check_unique(frame.with_columns(user_id), "user_id", path)
    return frame.with_columns(user_id).select(
        "user_id",
        *[
            pl.col(c).cast(pl.String).str.strip_chars().replace("", None)
            for c in ("age", "gender", "occupation")
        ],
        pl.col("zip").cast(pl.String).str.strip_chars().str.slice(0, 1).replace("", None).alias("zip_prefix"),
    )


def _load_100k(folder: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    # GroupLens files have no header and no quoting: data row r is line r
    S, I64 = pl.String, pl.Int64
    path = validate.TextFile(folder / "u.data", header=0)
    cols = {"user_id": I64, "item_id": I64, "rating": pl.Float64, "timestamp": I64}
    inter = _interactions(
        _read_delimited(path.path, cols, "\t"), path, "user_id", "item_id", "rating", "timestamp"
    )

    path = validate.TextFile(folder / "u.item", header=0)
    flags = [f"g{i}" for i in range(len(GENRES_100K))]
    cols = {"item_id": I64, "title": S, "release": S, "video_release": S, "url": S} | dict.fromkeys(flags, S)
    frame = _read_delimited(path.path, cols, "|", encoding="latin-1")
    genre_list = pl.concat_list(
        [
            pl.when(pl.col(f).str.strip_chars() == "1").then(pl.lit(g))
            for f, g in zip(flags, GENRES_100K, strict=True)
        ]
    ).list.drop_nulls()
    items = _items(frame.with_columns(genre_list.alias("genres")), path, year_hint="release")

    path = validate.TextFile(folder / "u.user", header=0)
    cols = {"user_id": I64, "age": S, "gender": S, "occupation": S, "zip": S}
    users = _users(_read_delimited(path.path, cols, "|", encoding="latin-1"), path)
    return inter, items, users


def _split_genres(frame: pl.DataFrame, path: validate.File) -> pl.DataFrame:
    genres = validate.to_list(frame.get_column("genres").replace(NO_GENRES, ""), path, "|")
    return frame.with_columns(genres.fill_null([]).alias("genres"))


def _load_1m(folder: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    S, I64 = pl.String, pl.Int64
    path = validate.TextFile(folder / "ratings.dat", header=0)
    cols = {"user_id": I64, "item_id": I64, "rating": pl.Float64, "timestamp": I64}
    inter = _interactions(
        _read_delimited(path.path, cols, "::"), path, "user_id", "item_id", "rating", "timestamp"
    )
    path = validate.TextFile(folder / "movies.dat", header=0)
    frame = _read_delimited(path.path, {"item_id": I64, "title": S, "genres": S}, "::", encoding="latin-1")
    items = _items(_split_genres(frame, path), path)
    path = validate.TextFile(folder / "users.dat", header=0)
    cols = {"user_id": I64, "gender": S, "age": S, "occupation": S, "zip": S}
    users = _users(_read_delimited(path.path, cols, "::", encoding="latin-1"), path)
    return inter, items, users


def _load_csv(folder: Path) -> tuple[pl.DataFrame, pl.DataFrame, None]:
    path = validate.TextFile(folder / "ratings.csv", quote='"')
    cols = {"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64}
    inter = _interactions(_read_csv(path.path, cols), path, "userId", "movieId", "rating", "timestamp")
    path = validate.TextFile(folder / "movies.csv", quote='"')
    frame = _read_csv(path.path, {"movieId": pl.Int64, "title": pl.String, "genres": pl.String})
    items = _items(_split_genres(frame.rename({"movieId": "item_id"}), path), path)
    return inter, items, None


def _load_atomic(folder: Path, stem: str) -> tuple[pl.DataFrame, pl.DataFrame | None, pl.DataFrame | None]:
    """RecBole's conversion: `.inter` user_id/item_id/rating/timestamp, `.item` movie_title/release_year/class,
    `.user` age/gender/occupation/zip_code."""
    raw = load_atomic(folder, stem)
    path = validate.TextFile(folder / f"{stem}.inter")
    fields = {"inter": ("rating", "timestamp"), "item": ("movie_title", "class"), "user": ("age", "zip_code")}

    def need(frame: pl.DataFrame, table: str) -> None:
        validate.require_columns(frame, fields[table], folder / f"{stem}.{table}", "RecBole's ml-* fields")

    need(raw.interactions, "inter")
    inter = _interactions(raw.interactions, path, "user_id", "item_id", "rating", "timestamp")
    items = users = None
    if raw.items is not None:
        need(raw.items, "item")
        frame = raw.items.rename({"movie_title": "title", "class": "genres"})
        items = _items(
            frame,
            validate.TextFile(folder / f"{stem}.item"),
            "release_year" if "release_year" in frame.columns else None,
        )
    if raw.users is not None:
        need(raw.users, "user")
        users = _users(raw.users.rename({"zip_code": "zip"}), validate.TextFile(folder / f"{stem}.user"))
    return inter, items, users


# ---- source ------------------------------------------------------------------------------------------------
class MovieLens:
    """MovieLens ratings with movie titles, genres and years (and user demographics for 100k and 1m).

    Args:
        version: "100k", "1m", "20m", "25m", "32m" or "latest-small".
        path: a folder with the GroupLens files (or the RecBole atomic conversion), one of the files, or the
            GroupLens zip; None looks in `<cache_dir>/raw/movielens-<version>/`.
        cache_dir: the data cache root (`paths.data_dir`).
        allow_download: fetch the GroupLens zip into the cache when it is not there, verified against the md5
            pinned in this module (never for latest-small, which has no stable checksum).
    """

    def __init__(
        self,
        version: str = "100k",
        path: str | None = None,
        cache_dir: str = "data",
        allow_download: bool = False,
    ) -> None:
        version = str(version)
        if version not in RELEASES:
            raise SourceError(f"data.source.version={version!r} is unknown; expected one of {list(RELEASES)}")
        self.version = version
        self.path = path
        self.cache_dir = cache_dir
        self.allow_download = allow_download
        self._located: tuple[str, Path] | None = None

    @property
    def name(self) -> str:
        return f"movielens-{self.version}"

    def _locate(self) -> tuple[str, Path]:
        """(layout, folder): the RecBole atomic files when present, else the GroupLens files."""
        if self._located is None:
            release = RELEASES[self.version]
            stem = f"ml-{self.version}"
            where = Path(self.path).expanduser() if self.path else Path(self.cache_dir) / "raw" / self.name
            if where.is_file() and where.name == f"{stem}.inter":
                where = where.parent
            atomic = find_folder(where, [f"{stem}.inter"])
            if atomic is not None:
                self._check_atomic(atomic, stem)
                self._located = ("atomic", atomic)
            else:
                archive = f"ml-{self.version}.zip"
                md5 = f"md5:{release.md5}" if release.md5 else None
                folder = resolve_files(
                    self.name,
                    list(release.files),
                    self.path,
                    self.cache_dir,
                    downloads={archive: (f"{BASE_URL}/{archive}", md5)},
                    allow_download=self.allow_download,
                    hint=f"RecBole's atomic {stem}.inter/.item/.user are read too",
                )
                self._located = (release.layout, folder)
        return self._located

    def _check_atomic(self, folder: Path, stem: str) -> None:
        """An atomic folder must hold what the GroupLens files of the version hold: without `.item` the
        titles, genres and years would be missing (and `data.history_features` would fail much later, far
        from the cause); 100k and 1m also have users."""
        needed = [f"{stem}.item"] + ([f"{stem}.user"] if RELEASES[self.version].layout != "csv" else [])
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise SourceError(
                f"source {self.name!r}: {folder} holds RecBole's {stem}.inter but not "
                f"{name_missing(folder, missing)}; "
                f"MovieLens {self.version} in atomic form is {stem}.inter + {' + '.join(needed)}. Put "
                f"{', '.join(missing)} next to {stem}.inter, or set data.path=<folder holding the GroupLens "
                f"files {', '.join(RELEASES[self.version].files)}>"
            )

    def _files(self) -> list[Path]:
        layout, folder = self._locate()
        if layout == "atomic":
            stem = f"ml-{self.version}"
            return [p for p in (folder / f"{stem}.{s}" for s in ("inter", "item", "user")) if p.is_file()]
        return [folder / f for f in RELEASES[self.version].files]

    def fingerprint(self) -> str:
        """Cache key: the source version, the MovieLens version, the layout read and the files."""
        blob = {
            "source": "movielens",
            "source_version": SOURCE_VERSION,
            "version": self.version,
            "layout": self._locate()[0],
            "files": file_fingerprint(self._files()),
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "source": self.name,
            "source_version": SOURCE_VERSION,
            "version": self.version,
            "path": self.path,
        }

    def load(self) -> RawData:
        layout, folder = self._locate()
        if layout == "atomic":
            inter, items, users = _load_atomic(folder, f"ml-{self.version}")
        else:
            inter, items, users = {"100k": _load_100k, "1m": _load_1m, "csv": _load_csv}[layout](folder)
        columns = set(inter.columns) | set(items.columns if items is not None else ())
        columns |= set(users.columns if users is not None else ())
        return RawData(
            interactions=inter,
            users=users,
            items=items,
            features={k: v for k, v in FEATURES.items() if k in columns},
            labels=[],
            item_text="title" if items is not None else None,
            files=[str(p) for p in self._files()],
        )
