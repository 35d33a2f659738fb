"""Writers of tiny source files in their real formats, shared by the tests/test_sources_*.py files.

Plain functions, not fixtures: each test says what it writes and where. Nothing here touches the network.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import numpy as np
import polars as pl

# The shared RecBole atomic copy of MovieLens-100K (tests that need it skip without it).
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


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
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
def write_ml100k(folder: Path) -> Path:
    """GroupLens 100k files: 2 users, 4 items (one without ratings), a latin-1 title, a title without year."""
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


ML100K_ATOMIC = {
    "inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "1\t10\t4\t881250949\n2\t10\t3\t881250950\n1\t20\t5\t881250951\n2\t30\t1\t881250952\n",
    "item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "10\tToy Story\t1995\tAnimation Children's Comedy\n20\tMisérables, Les\t1995\tDrama\n"
    "30\tunknown\tunkonwn\tunknown\n40\tSome Film\t1997\tDrama Western\n",
    "user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\tT8H1N\n",
}


def write_ml_atomic(
    folder: Path, stem: str = "ml-100k", tables: tuple[str, ...] = ("inter", "item", "user")
) -> Path:
    """RecBole's atomic conversion of the `write_ml100k` data (its titles carry no year), as `<stem>.<table>`."""
    for table in tables:
        write(folder / f"{stem}.{table}", ML100K_ATOMIC[table])
    return folder


def write_ml_csv(folder: Path) -> Path:
    """The csv layout of 20m / 25m / 32m / latest-small: quoted titles with commas, "(no genres listed)"."""
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
    return folder


def zip_folder(folder: Path, archive: Path, prefix: str) -> Path:
    """`archive` holding every file of `folder` under `prefix/`, as GroupLens zips unpack to `ml-100k/`."""
    with zipfile.ZipFile(archive, "w") as bundle:
        for f in folder.iterdir():
            bundle.write(f, f"{prefix}/{f.name}")
    return archive


# ---- Amazon ------------------------------------------------------------------------------------------------
def write_amazon_2018(folder: Path) -> Path:
    """Video_Games 2018: 3 reviews; metadata with messy prices, an empty brand, a repeated asin."""
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


# ---- RecBole atomic ----------------------------------------------------------------------------------------
def write_toy_atomic(folder: Path) -> Path:
    """`toy.inter/.item/.user` using every atomic type, a label, an empty token and a float_seq."""
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


# ---- downloads ---------------------------------------------------------------------------------------------
def write_archive(path: Path) -> Path:
    """A zip with `data/a.txt` ("hello") and `data/b.txt` ("world")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr("data/a.txt", "hello")
        bundle.writestr("data/b.txt", "world")
    return path


# ---- random but seeded datasets large enough to train on (end-to-end and config-grid tests) -----------------
def random_ml100k(folder: Path, rng: np.random.Generator, users: int = 30, items: int = 40) -> Path:
    """GroupLens 100k files with `users` users rating 12 random items each (enough for leave-one-out)."""
    folder.mkdir(parents=True)
    rows = []
    for u in range(1, users + 1):
        chosen = rng.choice(np.arange(1, items + 1), size=12, replace=False)
        rows += [f"{u}\t{i}\t{rng.integers(1, 6)}\t{880000000 + 1000 * u + k}" for k, i in enumerate(chosen)]
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    genres = ["0"] * 19
    lines = []
    for i in range(1, items + 1):
        g = list(genres)
        g[i % 19] = "1"
        lines.append(f"{i}|Movie {i} ({1980 + i % 15})|01-Jan-{1980 + i % 15}||http://x|" + "|".join(g))
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    (folder / "u.user").write_text(
        "\n".join(f"{u}|{20 + u}|{'MF'[u % 2]}|student|{10000 + u}" for u in range(1, users + 1)) + "\n"
    )
    return folder


def random_atomic(folder: Path, rng: np.random.Generator) -> Path:
    """RecBole atomic `toy.inter` / `toy.item`: 25 users x 8 ratings over 30 items with titles and genres."""
    folder.mkdir(parents=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(25):
        for k, i in enumerate(rng.choice(30, size=8, replace=False)):
            lines.append(f"u{u}\ti{i}\t{rng.integers(1, 6)}\t{1000 * u + k}")
    (folder / "toy.inter").write_text("\n".join(lines) + "\n")
    (folder / "toy.item").write_text(
        "item_id:token\tmovie_title:token_seq\tclass:token_seq\n"
        + "\n".join(f"i{i}\tfilm number {i}\tgenre{i % 4} genre{i % 3}" for i in range(30))
        + "\n"
    )
    return folder


def random_amazon_2023(folder: Path, rng: np.random.Generator) -> Path:
    """Amazon Reviews 2023 Video_Games: 20 users x 7 reviews over 25 products with metadata."""
    folder.mkdir(parents=True)
    reviews = [
        {
            "user_id": f"U{u}",
            "parent_asin": f"B{i:03d}",
            "rating": float(rng.integers(1, 6)),
            "timestamp": 1_600_000_000_000 + 1000 * (10 * u + k),
        }
        for u in range(20)
        for k, i in enumerate(rng.choice(25, size=7, replace=False))
    ]
    meta = [
        {
            "parent_asin": f"B{i:03d}",
            "title": f"Game {i}",
            "categories": ["Video Games", f"Genre{i % 3}"],
            "store": f"Studio{i % 4}",
            "price": None if i % 5 == 0 else 9.99 + i,
        }
        for i in range(25)
    ]
    for name, records in (("Video_Games.jsonl.gz", reviews), ("meta_Video_Games.jsonl.gz", meta)):
        with gzip.open(folder / name, "wt") as f:
            f.write("\n".join(json.dumps(r) for r in records) + "\n")
    return folder


def random_tabular(path: Path, rng: np.random.Generator) -> Path:
    """Your own CSV: 25 users x 8 clicks over 30 items, with a category and a title per item."""
    rows = [
        (f"u{u}", f"sku{i}", 1000 * u + k, f"cat{i % 4}", f"product number {i}")
        for u in range(25)
        for k, i in enumerate(rng.choice(30, size=8, replace=False))
    ]
    pl.DataFrame(rows, schema=["uid", "sku", "when", "category", "title"], orient="row").write_csv(path)
    return path


# ML-1M's occupation codes 0..20 and age-group codes (its README); the generator draws from them.
ML1M_AGES = (1, 18, 25, 35, 45, 50, 56)
ML1M_GENRES = (
    "Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir Horror Musical "
    "Mystery Romance Sci-Fi Thriller War Western"
).split()


def random_ml1m(
    folder: Path, rng: np.random.Generator, users: int = 80, items: int = 200, per_user: int = 25
) -> Path:
    """GroupLens ML-1M files in their real format, generated: `ratings.dat`
    (`UserID::MovieID::Rating::Timestamp`, sorted by user then time as GroupLens ships it, with runs of equal
    timestamps as in the real file), `movies.dat` (latin-1 `MovieID::Title (Year)::Genre|Genre`, an accented
    title, movie ids with gaps and a movie nobody rated) and `users.dat`
    (`UserID::Gender::Age::Occupation::Zip-code`).

    The defaults (80 users x 25 ratings over 200 movies) leave most movies enough raters for a 5-core and
    every user more than 100 unrated movies after it, so the sampled protocols (99 or 100 negatives per test
    item) can draw.
    """
    folder.mkdir(parents=True)
    movie_ids = np.arange(1, items + 1) * 2 + 1  # odd ids: ML-1M's ids have gaps too
    # popular movies get more ratings (Zipf-like weights), as in the real file
    weights = 1.0 / np.arange(1, items + 1) ** 0.5
    weights /= weights.sum()
    lines = []
    for u in range(1, users + 1):
        chosen = rng.choice(movie_ids, size=per_user, replace=False, p=weights)
        start = 956_703_932 + 86_400 * int(rng.integers(0, 1000))
        # several ratings in the same second (ML-1M users rate in bursts): ties broken by file order
        times = start + np.sort(rng.integers(0, per_user, size=per_user)) * 60
        stars = rng.integers(1, 6, size=per_user)
        lines += [f"{u}::{m}::{s}::{t}" for m, s, t in zip(chosen, stars, times, strict=True)]
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    movies = []
    for i, m in enumerate(movie_ids):
        genres = "|".join(ML1M_GENRES[j % len(ML1M_GENRES)] for j in (i, i + 3))
        title = "Misérables, Les" if i == 0 else f"Movie {m}"
        movies.append(f"{m}::{title} ({1950 + i % 50})::{genres}")
    movies.append(f"{2 * items + 3}::Never Rated (1999)::Drama")
    (folder / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    (folder / "users.dat").write_text(
        "\n".join(
            f"{u}::{'MF'[u % 2]}::{ML1M_AGES[u % len(ML1M_AGES)]}::{u % 21}::{10000 + 37 * u}"
            for u in range(1, users + 1)
        )
        + "\n"
    )
    return folder
