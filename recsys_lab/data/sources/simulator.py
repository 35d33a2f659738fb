"""The embedded default dataset: a seeded e-commerce simulator with ground truth.

Every impression is drawn from a known click model, so the best achievable AUC of any split (the *oracle AUC*,
scoring impressions with their true click probability) is known and is reported next to each model's AUC.

The click model (`ClickModel`, the part to read or change) has the signals the model zoo is built to find:

* long-term taste: user and item latent factors (`u . v`), items' factors come from their category and brand;
* short-term interest: the mean factor of the user's last few clicks, and a bonus for the category of a recent
  click, so target attention over the behaviour sequence (DIN) and sequence models have something to learn;
* context: time-of-day x top-category, weekend x top-category and device x price effects;
* content: item titles are built from words tied to the item's factors, brand and category (text models can read
  taste from them), and a small dense "image" embedding is a noisy projection of the same factors;
  optionally (`render_images`, `render_audio`) each item also gets a small rendered picture and a short sound
  whose colours, stripes and pitches come from its category and factors, so that image and audio encoders have
  something to learn (`Media`), drawn from their own generator so the log is the same with or without them;
* Zipf-like popularity of both exposure and appeal, and a share of items that are only released late
  (cold-start items, described by their content features alone).

`EcommerceSimulator.simulate` runs the steps in order, all drawing from one seeded generator: the catalogue
(`Items`), the users (`Users`), the click model's context effects (`ClickModel`), who is active when
(`Activity`), then the log itself, where a `LoggingPolicy` picks what is shown and the click model decides
what is clicked and bought. Reordering steps or draws changes every log (and must bump `SIMULATOR_VERSION`).

The simulation is vectorised over users: step k draws the k-th impression of every user that has one, so a
history-dependent process over tens of millions of impressions costs a few hundred numpy steps, not a Python
loop per row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

from recsys_lab.data.sources.raw import RawData

# 2: an empty favourite leaf shows a popular item (version 1 crashed, or repeated one item of another leaf)
SIMULATOR_VERSION = 2
SECONDS_PER_DAY = 86_400
AUDIO_RATE = 8000  # Hz, of the rendered item sounds
MEDIA_PARAMS = ("render_images", "image_size", "render_audio", "audio_samples", "missing_media_fraction")

# Category tree: top category -> leaf nouns. Real words, so a pretrained text encoder can use them.
CATEGORY_TREE: dict[str, list[str]] = {
    "electronics": ["headphones", "laptop", "camera", "speaker", "smartwatch"],
    "fashion": ["sneakers", "dress", "jacket", "handbag", "sunglasses"],
    "home": ["sofa", "lamp", "blender", "cookware", "bedding"],
    "sports": ["bicycle", "yoga mat", "tent", "running shoes", "dumbbells"],
    "beauty": ["perfume", "lipstick", "moisturizer", "shampoo", "hair dryer"],
    "toys": ["puzzle", "doll", "building blocks", "board game", "drone"],
    "books": ["novel", "cookbook", "comic", "biography", "travel guide"],
    "garden": ["lawn mower", "planter", "hose", "grill", "garden chair"],
}
# (top, leaf) pairs; a leaf's index is its `cat2` code. Every top has the same number of leaves.
LEAVES: list[tuple[str, str]] = [(top, leaf) for top, leaves in CATEGORY_TREE.items() for leaf in leaves]
# One word pair per latent dimension: an item's title carries the words of its strongest factors, so titles
# say something about taste (the cross-encoder and text towers can learn it) without revealing it exactly.
FACTOR_WORDS: list[tuple[str, str]] = [
    ("premium", "budget"),
    ("sporty", "elegant"),
    ("compact", "spacious"),
    ("wireless", "classic"),
    ("colorful", "minimalist"),
    ("vintage", "modern"),
    ("durable", "lightweight"),
    ("organic", "synthetic"),
]
SYLLABLES = ["ka", "lo", "mi", "ra", "to", "ve", "zu", "ne", "sa", "bi", "do", "fe", "gu", "pa", "ri", "xo"]
DEVICES = ["mobile", "desktop", "app"]


@dataclass(frozen=True)
class SimulatorParams:
    n_users: int
    n_items: int
    n_days: int
    impressions_per_user: float
    latent_dim: int
    zipf_exponent: float
    cold_item_fraction: float
    n_brands: int
    image_dim: int
    recent_window: int
    base_logit: float
    seed: int
    render_images: bool = False
    image_size: int = 32
    render_audio: bool = False
    audio_samples: int = 4000
    missing_media_fraction: float = 0.0


class EcommerceSimulator:
    """A seeded generator of a realistic shop's impression log (users, items, impressions with clicks).

    Args:
        n_users, n_items: population sizes. The defaults give ~250k impressions, on which DIN trains to a stable
            result in about a minute on 2 CPU cores; `n_users=300_000, impressions_per_user=80` gives ~24M.
        n_days: length of the log; splits are cut by time downstream.
        impressions_per_user: mean impressions per user (log-normal activity, so a few users are very active).
        latent_dim: width of the latent taste factors (2..len(FACTOR_WORDS): titles name the two strongest).
        zipf_exponent: exposure and appeal follow item popularity rank ** -zipf_exponent.
        cold_item_fraction: share of items released only in the last quarter of the log.
        n_brands: brands, each belonging to one top category.
        image_dim: width of the dense "image" embedding.
        recent_window: clicks that make up the short-term interest.
        base_logit: click-logit intercept; sets the overall click rate (about 10% by default).
        seed: everything is a deterministic function of the parameters.
        render_images: add an item column `image_rgb` (kind "image"): an image_size x image_size RGB picture
            per item (see `render_media`).
        image_size: side of the rendered pictures in pixels.
        render_audio: add an item column `audio` (kind "audio"): `audio_samples` samples of a sound at
            AUDIO_RATE Hz per item.
        audio_samples: length of each sound.
        missing_media_fraction: share of items whose picture (and, drawn apart, whose sound) is missing
            (null): the missing-modality case content models must handle.
    """

    def __init__(
        self,
        n_users: int = 5000,
        n_items: int = 2000,
        n_days: int = 28,
        impressions_per_user: float = 50.0,
        latent_dim: int = 8,
        zipf_exponent: float = 1.0,
        cold_item_fraction: float = 0.1,
        n_brands: int = 80,
        image_dim: int = 16,
        recent_window: int = 5,
        base_logit: float = -4.3,
        seed: int = 0,
        render_images: bool = False,
        image_size: int = 32,
        render_audio: bool = False,
        audio_samples: int = 4000,
        missing_media_fraction: float = 0.0,
    ) -> None:
        checks = {
            "n_users": n_users >= 2,
            "n_items": n_items >= 2 * len(CATEGORY_TREE),
            "n_days": n_days >= 3,
            "impressions_per_user": impressions_per_user >= 1,
            "latent_dim": 2 <= latent_dim <= len(FACTOR_WORDS),  # a title names the two strongest factors
            "zipf_exponent": zipf_exponent >= 0,
            "cold_item_fraction": 0 <= cold_item_fraction < 1,
            "n_brands": n_brands >= len(CATEGORY_TREE),
            "image_dim": image_dim >= 1,
            "recent_window": recent_window >= 1,
            "image_size": image_size >= 8,
            "audio_samples": audio_samples >= 256,
            "missing_media_fraction": 0 <= missing_media_fraction < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"data.source: invalid simulator parameter(s) {bad} "
                f"(need n_users>=2, n_items>={2 * len(CATEGORY_TREE)}, n_days>=3, impressions_per_user>=1, "
                f"2<=latent_dim<={len(FACTOR_WORDS)}, zipf_exponent>=0, 0<=cold_item_fraction<1, "
                f"n_brands>={len(CATEGORY_TREE)}, image_dim>=1, recent_window>=1, image_size>=8, "
                f"audio_samples>=256, 0<=missing_media_fraction<1)"
            )
        self.params = SimulatorParams(
            n_users=n_users,
            n_items=n_items,
            n_days=n_days,
            impressions_per_user=float(impressions_per_user),
            latent_dim=latent_dim,
            zipf_exponent=float(zipf_exponent),
            cold_item_fraction=float(cold_item_fraction),
            n_brands=n_brands,
            image_dim=image_dim,
            recent_window=recent_window,
            base_logit=float(base_logit),
            seed=seed,
            render_images=bool(render_images),
            image_size=int(image_size),
            render_audio=bool(render_audio),
            audio_samples=int(audio_samples),
            missing_media_fraction=float(missing_media_fraction),
        )

    name = "ecommerce"

    def fingerprint(self) -> str:
        """Cache key: the parameters and the generator's version."""
        blob = json.dumps({"simulator": SIMULATOR_VERSION, **self._params()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _params(self) -> dict:
        """The parameters that make the data: without media, the media options are left out, so media-free
        data keeps the cache key and description it had before media existed."""
        params = asdict(self.params)
        if not (self.params.render_images or self.params.render_audio):
            for name in MEDIA_PARAMS:
                params.pop(name)
        return params

    def describe(self) -> dict:
        params = self._params()
        params["simulator_seed"] = params.pop("seed")
        return {"source": self.name, "simulator_version": SIMULATOR_VERSION, **params}

    def load(self) -> RawData:
        sim = self.simulate()
        media = (
            render_media(sim.items, self.params)
            if self.params.render_images or self.params.render_audio
            else None
        )
        return _to_raw_data(sim, media)

    def simulate(self) -> Simulation:
        """Every step, in order, with the latent tables kept (for analysis and tests).

        All steps draw from one generator, so the order of the steps and of the draws inside them is part of
        the data: changing it changes every log and must bump SIMULATOR_VERSION.
        """
        p = self.params
        rng = np.random.default_rng(p.seed)
        items = _draw_items(rng, p)
        users = _draw_users(rng, p, items.leaf_center)
        click_model = _draw_click_model(rng, p.base_logit)
        activity = _draw_activity(rng, p, users.pref_device)
        log = _simulate_log(rng, p.recent_window, items, users, activity, LoggingPolicy(items), click_model)
        return Simulation(items=items, users=users, click_model=click_model, activity=activity, log=log)


# ---- the click model: the ground truth every impression is drawn from ---------------------------------------
@dataclass(frozen=True, eq=False)
class ClickInputs:
    """What the click model sees of m impressions: the shown item, the user, the context and the recent clicks.

    Args:
        item_factors: (m, K) latent factors `v` of the shown items.
        item_appeal: (m,) the items' popularity appeal.
        item_top, item_leaf: (m,) the items' top and leaf categories.
        item_price_z: (m,) standardised log price.
        user_taste: (m, K) latent taste `u` of the users.
        price_sensitivity: (m,) the users' price sensitivity (positive).
        hour: (m,) hour of day, 0..23.
        weekday: (m,) day of week, 0 = Monday; 5 and 6 are the weekend.
        device: (m,) index into DEVICES.
        recent_factors: (m, R, K) factors of the user's recent clicked items, in any order.
        recent_leaves: (m, R) their leaf categories.
        recent_valid: (m, R) which of the R slots hold a click (False while a user has fewer than R clicks).
    """

    item_factors: np.ndarray
    item_appeal: np.ndarray
    item_top: np.ndarray
    item_leaf: np.ndarray
    item_price_z: np.ndarray
    user_taste: np.ndarray
    price_sensitivity: np.ndarray
    hour: np.ndarray
    weekday: np.ndarray
    device: np.ndarray
    recent_factors: np.ndarray
    recent_leaves: np.ndarray
    recent_valid: np.ndarray


@dataclass(frozen=True, eq=False)
class ClickModel:
    """The true click and purchase logits of an impression.

    The weights are deliberately not simulator parameters: a new default changes the data of every parameter
    set, so it must bump SIMULATOR_VERSION (the cache key). The term order in `click_logit` is part of the
    data too (floating-point sums are not associative).

    Args:
        hour_effect: (n_top, 4) logit shift of a top category in each six-hour day part (drawn per seed).
        weekend_effect: (n_top,) logit shift of a top category on Saturdays and Sundays (drawn per seed).
        base_logit: intercept; sets the overall click rate.
        appeal_weight: weight of the item's popularity appeal.
        taste_weight: weight of long-term taste, the dot product `u . v`.
        short_term_weight: weight of short-term interest, the dot product of `v` with the mean factor of the
            user's recent clicks.
        recent_leaf_bonus: added when the item's leaf is the leaf of one of the recent clicks.
        price_weight: weight of `-(price_sensitivity + device_price[device]) * price_z`.
        device_price: extra price sensitivity per device (mobile shoppers shy away from expensive items).
        purchase_intercept, purchase_appeal_weight, purchase_price_weight, purchase_taste_weight: the
            purchase logit given a click, `intercept + appeal - price_sensitivity * price_z + u . v` weighted.
    """

    hour_effect: np.ndarray
    weekend_effect: np.ndarray
    base_logit: float
    appeal_weight: float = 1.0
    taste_weight: float = 0.8
    short_term_weight: float = 1.0
    recent_leaf_bonus: float = 0.5
    price_weight: float = 0.7
    device_price: tuple[float, float, float] = (0.4, -0.1, 0.1)
    purchase_intercept: float = -1.8
    purchase_appeal_weight: float = 0.8
    purchase_price_weight: float = 0.8
    purchase_taste_weight: float = 1.0

    def click_logit(self, x: ClickInputs) -> np.ndarray:
        """(m,) click logits."""
        n_recent = x.recent_valid.sum(1)  # (m,)
        # (m, K): short-term interest, the mean factor of the recent clicks
        recent_mean = (x.recent_factors * x.recent_valid[..., None]).sum(1) / np.maximum(n_recent, 1)[:, None]
        recent_leaf_hit = ((x.recent_leaves == x.item_leaf[:, None]) & x.recent_valid).any(1)  # (m,)
        device_price = np.asarray(self.device_price)[x.device]  # (m,)
        return (
            self.base_logit
            + self.appeal_weight * x.item_appeal
            + self.taste_weight * (x.user_taste * x.item_factors).sum(1)
            + self.short_term_weight * (recent_mean * x.item_factors).sum(1)
            + self.recent_leaf_bonus * recent_leaf_hit
            + self.hour_effect[x.item_top, x.hour // 6]
            + self.weekend_effect[x.item_top] * (x.weekday >= 5)
            - self.price_weight * (x.price_sensitivity + device_price) * x.item_price_z
        )

    def purchase_logit(self, x: ClickInputs) -> np.ndarray:
        """(m,) logits of a purchase, given a click."""
        return (
            self.purchase_intercept
            + self.purchase_appeal_weight * x.item_appeal
            - self.purchase_price_weight * x.price_sensitivity * x.item_price_z
            + self.purchase_taste_weight * (x.user_taste * x.item_factors).sum(1)
        )

    def click_prob(self, x: ClickInputs) -> np.ndarray:
        """(m,) true click probabilities: the oracle."""
        return sigmoid(self.click_logit(x))

    def purchase_prob(self, x: ClickInputs) -> np.ndarray:
        """(m,) probabilities of a purchase, given a click."""
        return sigmoid(self.purchase_logit(x))


def sigmoid(logit: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logit))


def _draw_click_model(rng: np.random.Generator, base_logit: float) -> ClickModel:
    """The click model with this seed's context effects; its weights are the class defaults."""
    n_top = len(CATEGORY_TREE)
    hour_effect = rng.normal(0, 0.4, (n_top, 4))  # four six-hour day parts
    weekend_effect = rng.normal(0, 0.3, n_top)
    return ClickModel(hour_effect=hour_effect, weekend_effect=weekend_effect, base_logit=base_logit)


# ---- items: category tree, brand, factors, price, popularity, cold-start release, title, image ---------------
@dataclass(frozen=True, eq=False)
class Items:
    """The catalogue; row i is item i.

    Args:
        leaf_center: (n_leaf, K) latent centre of each leaf (users' tastes are drawn around their favourites).
        top, leaf, brand: (n_items,) top category, leaf category and brand codes.
        factors: (n_items, K) latent factors `v`, scaled so that `u . v` is of order one.
        price: (n_items,) price in currency units, rounded to cents.
        price_z: (n_items,) standardised log price.
        exposure: (n_items,) share of the logging policy's popularity exposure (sums to one).
        appeal: (n_items,) popularity appeal in the click model.
        release_ts: (n_items,) release time in seconds; 0 for items there from the start.
        title: the items' titles (brand, two factor words, leaf and top category).
        image: (n_items, image_dim) dense "image" embedding.
    """

    leaf_center: np.ndarray
    top: np.ndarray
    leaf: np.ndarray
    brand: np.ndarray
    factors: np.ndarray
    price: np.ndarray
    price_z: np.ndarray
    exposure: np.ndarray
    appeal: np.ndarray
    release_ts: np.ndarray
    title: list[str]
    image: np.ndarray


def _draw_items(rng: np.random.Generator, p: SimulatorParams) -> Items:
    K, n_top, n_leaf = p.latent_dim, len(CATEGORY_TREE), len(LEAVES)
    leaf_top = np.array([list(CATEGORY_TREE).index(top) for top, _ in LEAVES])
    top_center = rng.normal(0, 1.0, (n_top, K))
    leaf_center = top_center[leaf_top] + rng.normal(0, 0.6, (n_leaf, K))
    brand_top = np.arange(p.n_brands) % n_top  # every top category gets brands
    brand_center = rng.normal(0, 0.5, (p.n_brands, K))
    brand_names = _brand_names(rng, p.n_brands)

    leaf_share = rng.dirichlet(np.full(n_leaf, 2.0))
    item_leaf = rng.choice(n_leaf, size=p.n_items, p=leaf_share)
    item_top = leaf_top[item_leaf]
    # brand drawn among the brands of the item's top category
    brands_of_top = [np.flatnonzero(brand_top == t) for t in range(n_top)]
    item_brand = np.array([brands_of_top[t][rng.integers(len(brands_of_top[t]))] for t in item_top])
    v = leaf_center[item_leaf] + brand_center[item_brand] + rng.normal(0, 0.5, (p.n_items, K))
    v /= np.sqrt(K)  # keeps u . v of order one whatever K is

    leaf_log_price = rng.normal(3.5, 1.0, n_leaf)
    log_price = leaf_log_price[item_leaf] + 0.4 * v[:, 0] * np.sqrt(K) + rng.normal(0, 0.3, p.n_items)

    # Zipf popularity: exposure share and appeal both follow the rank, so "popular" is a real signal.
    rank = rng.permutation(p.n_items) + 1
    exposure = rank**-p.zipf_exponent
    exposure /= exposure.sum()
    appeal = 0.25 * np.log(exposure * p.n_items) + rng.normal(0, 0.3, p.n_items)

    is_cold = rng.random(p.n_items) < p.cold_item_fraction
    horizon = p.n_days * SECONDS_PER_DAY
    release_ts = np.where(is_cold, rng.uniform(0.75, 0.95, p.n_items) * horizon, 0.0).astype(np.int64)

    image_proj = rng.normal(0, 1, (K, p.image_dim)) / np.sqrt(K)
    top_proj = rng.normal(0, 0.5, (n_top, p.image_dim))
    image = v @ image_proj * np.sqrt(K) + top_proj[item_top] + rng.normal(0, 0.5, (p.n_items, p.image_dim))
    return Items(
        leaf_center=leaf_center,
        top=item_top,
        leaf=item_leaf,
        brand=item_brand,
        factors=v,
        price=np.round(np.exp(log_price), 2),
        price_z=(log_price - log_price.mean()) / log_price.std(),
        exposure=exposure,
        appeal=appeal,
        release_ts=release_ts,
        title=_titles(v, item_brand, item_leaf, brand_names),
        image=image,
    )


def _brand_names(rng: np.random.Generator, n: int) -> list[str]:
    names: set[str] = set()
    out = []
    while len(out) < n:
        name = "".join(rng.choice(SYLLABLES, rng.integers(2, 4))).capitalize()
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def _titles(
    v: np.ndarray, item_brand: np.ndarray, item_leaf: np.ndarray, brand_names: list[str]
) -> list[str]:
    # the two strongest factors of the item, each as the word of its sign
    top2 = np.argsort(-np.abs(v), axis=1)[:, :2]
    titles = []
    for i in range(len(v)):
        words = [FACTOR_WORDS[d][0 if v[i, d] > 0 else 1] for d in top2[i]]
        top, leaf = LEAVES[item_leaf[i]]
        titles.append(f"{brand_names[item_brand[i]]} {words[0]} {words[1]} {leaf} ({top})")
    return titles


# ---- users: demographics drive category taste, so user features carry signal -------------------------------
@dataclass(frozen=True, eq=False)
class Users:
    """The user population; row j is user j.

    Args:
        age, gender, region, pref_device: (n_users,) demographic codes (6, 3 and 8 values; pref_device indexes
            DEVICES).
        fav_leaf: (n_users, 2) two favourite leaves, their tops drawn from the demographic taste.
        taste: (n_users, K) latent taste `u`, around the centres of the favourite leaves.
        price_sensitivity: (n_users,) higher for the young and some regions.
    """

    age: np.ndarray
    gender: np.ndarray
    region: np.ndarray
    pref_device: np.ndarray
    fav_leaf: np.ndarray
    taste: np.ndarray
    price_sensitivity: np.ndarray


def _draw_users(rng: np.random.Generator, p: SimulatorParams, leaf_center: np.ndarray) -> Users:
    n_top, n_leaf, K = len(CATEGORY_TREE), len(LEAVES), p.latent_dim
    n_age, n_gender, n_region = 6, 3, 8
    age = rng.integers(0, n_age, p.n_users)
    gender = rng.choice(n_gender, p.n_users, p=[0.48, 0.48, 0.04])
    region = rng.integers(0, n_region, p.n_users)
    pref_device = rng.choice(len(DEVICES), p.n_users, p=[0.55, 0.25, 0.20])
    age_taste = rng.normal(0, 1.0, (n_age, n_top))
    gender_taste = rng.normal(0, 1.0, (n_gender, n_top))
    top_logits = age_taste[age] + gender_taste[gender]  # (n_users, n_top)
    top_prob = np.exp(top_logits - top_logits.max(1, keepdims=True))
    top_prob /= top_prob.sum(1, keepdims=True)
    fav_top = np.stack([_sample_rows(rng, top_prob) for _ in range(2)], 1)  # (n_users, 2)
    leaves_of_top = np.arange(n_leaf).reshape(n_top, -1)  # (n_top, leaves per top)
    fav_leaf = leaves_of_top[fav_top, rng.integers(0, leaves_of_top.shape[1], fav_top.shape)]
    u = leaf_center[fav_leaf].mean(1) + rng.normal(0, 0.5, (p.n_users, K))
    u /= np.sqrt(K)
    price_sensitivity = 0.3 + 0.15 * (age < 2) + 0.1 * (region % 3 == 0) + rng.gamma(2.0, 0.1, p.n_users)
    return Users(
        age=age,
        gender=gender,
        region=region,
        pref_device=pref_device,
        fav_leaf=fav_leaf,
        taste=u,
        price_sensitivity=price_sensitivity,
    )


def _sample_rows(rng: np.random.Generator, prob: np.ndarray) -> np.ndarray:
    """One categorical draw per row of a (n, c) probability matrix."""
    return (prob.cumsum(1) > rng.random((len(prob), 1))).argmax(1)


# ---- activity: how many impressions each user gets, and when ------------------------------------------------
@dataclass(frozen=True, eq=False)
class Activity:
    """Every impression's user, time and context, before anything is shown.

    Rows are grouped by user, the most active users first and each user's rows in time order, so the users
    with a k-th impression are a prefix of `order` and their k-th rows are `offsets[:m] + k`.

    Args:
        order: (n_users,) user ids, most active first.
        counts: (n_users,) impressions of each user of `order` (non-increasing).
        offsets: (n_users + 1,) first row of each user of `order`; the last entry is the number of rows.
        user, timestamp, hour, weekday, device: (rows,) per impression; timestamps strictly increase within a
            user, weekday 0 is Monday.
    """

    order: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    user: np.ndarray
    timestamp: np.ndarray
    hour: np.ndarray
    weekday: np.ndarray
    device: np.ndarray


def _draw_activity(rng: np.random.Generator, p: SimulatorParams, pref_device: np.ndarray) -> Activity:
    n_imp = np.clip(
        rng.lognormal(np.log(p.impressions_per_user) - 0.32, 0.8, p.n_users).astype(np.int64),
        3,
        int(20 * p.impressions_per_user),
    )
    order = np.argsort(-n_imp, kind="stable")  # most active first: at step k the active users are a prefix
    counts = n_imp[order]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ts = _draw_timestamps(rng, p.n_days, counts, offsets)
    total = int(offsets[-1])
    user = order[np.repeat(np.arange(p.n_users), counts)]
    device = np.where(rng.random(total) < 0.7, pref_device[user], rng.integers(0, 3, total))
    return Activity(
        order=order,
        counts=counts,
        offsets=offsets,
        user=user,
        timestamp=ts,
        hour=(ts % SECONDS_PER_DAY) // 3600,
        weekday=(ts // SECONDS_PER_DAY + 3) % 7,  # day 0 is a Thursday
        device=device,
    )


def _draw_timestamps(
    rng: np.random.Generator, n_days: int, counts: np.ndarray, offsets: np.ndarray
) -> np.ndarray:
    """(rows,) seconds, strictly increasing within each user's block of rows."""
    total = int(offsets[-1])
    # day uniform, hour from a diurnal profile (evening peak), seconds uniform; then sorted per user
    diurnal = 1.0 + 0.8 * np.sin((np.arange(24) - 14) / 24 * 2 * np.pi) ** 2
    diurnal[:6] *= 0.3
    diurnal /= diurnal.sum()
    ts = (
        rng.integers(0, n_days, total) * SECONDS_PER_DAY
        + rng.choice(24, total, p=diurnal) * 3600
        + rng.integers(0, 3600, total)
    )
    owner = np.repeat(np.arange(len(counts)), counts)  # position in `order`
    ts = ts[np.lexsort((ts, owner))]
    # strictly increasing within a user (a tie would make "before" ambiguous for history features)
    within = np.arange(total) - np.repeat(offsets[:-1], counts)
    block = owner * (10 * n_days * SECONDS_PER_DAY)  # keeps users apart inside one running maximum
    return np.maximum.accumulate(ts - within + block) - block + within


# ---- exposure: the logging recommender that picks what is shown ---------------------------------------------
class LoggingPolicy:
    """The recommender that logged the data: retargets a recent click's leaf (30%), shows a favourite leaf
    (25%, and whenever a user to retarget has no click yet) or a popular item (45%), all weighted by exposure.
    An item not yet released is replaced by a popular released one.

    Args:
        items: the catalogue; its exposure shares weight every draw.
    """

    def __init__(self, items: Items) -> None:
        self.leaf = items.leaf
        self.release_ts = items.release_ts
        self.popular_cdf = np.cumsum(items.exposure)  # (n_items,)
        self.released_cdf = np.cumsum(np.where(items.release_ts > 0, 0.0, items.exposure))
        # the exposure cdf with items grouped by leaf; leaf l owns [leaf_lo[l], leaf_hi[l]) of it
        self.by_leaf = np.argsort(items.leaf, kind="stable")
        self.leaf_cum = np.cumsum(items.exposure[self.by_leaf])
        self.leaf_bounds = np.searchsorted(items.leaf[self.by_leaf], np.arange(len(LEAVES) + 1))
        self.leaf_lo = np.concatenate([[0.0], self.leaf_cum])[self.leaf_bounds[:-1]]
        self.leaf_hi = np.concatenate([[0.0], self.leaf_cum])[self.leaf_bounds[1:]]

    def show(
        self,
        rng: np.random.Generator,
        recent: np.ndarray,
        n_clicks: np.ndarray,
        fav_leaf: np.ndarray,
        t: np.ndarray,
    ) -> np.ndarray:
        """(m,) the items shown to m users.

        Args:
            recent: (m, R) ring buffer of each user's clicked items (the n-th click is in slot n % R).
            n_clicks: (m,) clicks so far.
            fav_leaf: (m, 2) favourite leaves.
            t: (m,) time of the impression.
        """
        m, R = recent.shape
        has_hist = n_clicks > 0
        mode = rng.random(m)
        window = np.minimum(n_clicks, R)
        back = rng.integers(0, np.maximum(window, 1))  # one of the recent clicks, uniformly
        last = recent[np.arange(m), (n_clicks - 1 - back) % R]
        retarget = (mode < 0.30) & has_hist
        personal = ((mode >= 0.30) & (mode < 0.55)) | ((mode < 0.30) & ~has_hist)
        shown = self._popular(rng, self.popular_cdf, m)
        shown[retarget] = self._in_leaf(rng, self.leaf[last[retarget]])
        shown[personal] = self._in_leaf(rng, fav_leaf[personal, rng.integers(0, 2, personal.sum())])
        unreleased = self.release_ts[shown] > t
        if unreleased.any():
            shown[unreleased] = self._popular(rng, self.released_cdf, unreleased.sum())
        return shown

    @staticmethod
    def _popular(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
        """(n,) items drawn by the weights whose cumulative sum is `cdf`."""
        return np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").clip(0, len(cdf) - 1)

    def _in_leaf(self, rng: np.random.Generator, leaf: np.ndarray) -> np.ndarray:
        """One item of each given leaf, drawn by exposure."""
        n_items = len(self.by_leaf)
        lo, hi, bounds = self.leaf_lo[leaf], self.leaf_hi[leaf], self.leaf_bounds
        x = lo + rng.random(len(leaf)) * (hi - lo)
        pos = np.minimum(np.searchsorted(self.leaf_cum, x, side="right"), bounds[leaf + 1] - 1)
        out = self.by_leaf[np.minimum(np.maximum(pos, bounds[leaf]), n_items - 1)]
        # a leaf may hold no item (small catalogues): show a popular item instead, as for unreleased ones
        empty = bounds[leaf] == bounds[leaf + 1]
        if empty.any():
            out[empty] = self._popular(rng, self.popular_cdf, int(empty.sum()))
        return out


# ---- the log: the history-dependent simulation, vectorised over users ---------------------------------------
@dataclass(frozen=True, eq=False)
class ImpressionLog:
    """What happened at each row of `Activity`.

    Args:
        item: (rows,) the shown item.
        click_prob: (rows,) its true click probability (the oracle).
        click, purchase: (rows,) int8 outcomes; a purchase implies a click.
    """

    item: np.ndarray
    click_prob: np.ndarray
    click: np.ndarray
    purchase: np.ndarray


def _simulate_log(
    rng: np.random.Generator,
    recent_window: int,
    items: Items,
    users: Users,
    activity: Activity,
    policy: LoggingPolicy,
    click_model: ClickModel,
) -> ImpressionLog:
    # Step k draws the k-th impression of every user who has one; users are indexed by position in `order`.
    R, counts = recent_window, activity.counts
    n_users, total = len(counts), int(activity.offsets[-1])
    recent = np.zeros((n_users, R), dtype=np.int64)  # ring buffer of clicked items
    n_clicks = np.zeros(n_users, dtype=np.int64)
    taste, sensitivity = users.taste[activity.order], users.price_sensitivity[activity.order]
    fav_leaf = users.fav_leaf[activity.order]
    shown = np.empty(total, dtype=np.int64)
    click_prob = np.empty(total)
    click = np.zeros(total, dtype=np.int8)
    purchase = np.zeros(total, dtype=np.int8)
    for k in range(int(counts[0])):
        m = int(np.searchsorted(-counts, -k, side="left"))  # users with more than k impressions
        rows = activity.offsets[:m] + k
        item = policy.show(rng, recent[:m], n_clicks[:m], fav_leaf[:m], activity.timestamp[rows])
        x = ClickInputs(
            item_factors=items.factors[item],
            item_appeal=items.appeal[item],
            item_top=items.top[item],
            item_leaf=items.leaf[item],
            item_price_z=items.price_z[item],
            user_taste=taste[:m],
            price_sensitivity=sensitivity[:m],
            hour=activity.hour[rows],
            weekday=activity.weekday[rows],
            device=activity.device[rows],
            recent_factors=items.factors[recent[:m]],
            recent_leaves=items.leaf[recent[:m]],
            recent_valid=np.arange(R)[None, :] < np.minimum(n_clicks[:m], R)[:, None],
        )
        prob = click_model.click_prob(x)
        clicked = rng.random(m) < prob
        bought = clicked & (rng.random(m) < click_model.purchase_prob(x))

        shown[rows], click_prob[rows], click[rows], purchase[rows] = item, prob, clicked, bought
        idx = np.flatnonzero(clicked)
        recent[idx, n_clicks[idx] % R] = item[idx]
        n_clicks[idx] += 1
    return ImpressionLog(item=shown, click_prob=click_prob, click=click, purchase=purchase)


# ---- the result -----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Simulation:
    """One run: the latent tables and the click model behind the log, and the log itself."""

    items: Items
    users: Users
    click_model: ClickModel
    activity: Activity
    log: ImpressionLog


# ---- media: a picture and a sound per item, from the item's category and factors --------------------------
@dataclass(frozen=True, eq=False)
class Media:
    """Rendered item media; row i is item i, None where the item has none (`missing_media_fraction`).

    images: (n_items, S, S, 3) uint8 pictures (height, width, RGB), or None without `render_images`;
    audio: (n_items, T) float32 sounds at AUDIO_RATE Hz, or None without `render_audio`;
    image_missing / audio_missing: (n_items,) bool.
    """

    images: np.ndarray | None
    audio: np.ndarray | None
    image_missing: np.ndarray
    audio_missing: np.ndarray


def render_media(items: Items, p: SimulatorParams) -> Media:
    """A picture and a sound per item that carry its top category, leaf and latent factors, the way a product
    photo carries colour and shape: content encoders can learn taste from them, imperfectly.

    Picture (S x S RGB): a background colour of the top category; a sine grating whose orientation, spatial
    frequency and colour are functions of the factors; a centred disc in the leaf's colour whose radius is
    another function of the factors; pixel noise. Sound: a tone of the top category's pitch and two tones
    whose pitches and loudness are functions of the factors, plus noise. Drawn from a generator of its own
    (seeded by `seed`), after the log: rendering changes no impression.
    """
    rng = np.random.default_rng([p.seed, 1])  # never the log's generator
    n, K = len(items.top), p.latent_dim
    n_top, n_leaf = len(CATEGORY_TREE), len(LEAVES)
    v = items.factors * np.sqrt(K)  # factors back at unit scale

    def squash(proj: np.ndarray) -> np.ndarray:  # (n, ...) in (0, 1): a smooth function of the factors
        return 1.0 / (1.0 + np.exp(-(v @ proj)))

    images = audio = None
    image_missing = np.zeros(n, dtype=bool)
    audio_missing = np.zeros(n, dtype=bool)
    if p.render_images:
        S = p.image_size
        top_colour = rng.uniform(30, 225, (n_top, 3))
        leaf_colour = rng.uniform(0, 255, (n_leaf, 3))
        angle = np.pi * squash(rng.normal(0, 1, K))  # (n,) grating orientation
        freq = 1.5 + 3.0 * squash(rng.normal(0, 1, K))  # (n,) cycles per picture
        stripe_colour = 255 * squash(rng.normal(0, 1, (K, 3)))  # (n, 3)
        radius = 0.15 + 0.35 * squash(rng.normal(0, 1, K))  # (n,) of the half-width
        phase = rng.uniform(0, 2 * np.pi, n)
        grid = np.linspace(-1, 1, S)
        y, x = np.meshgrid(grid, grid, indexing="ij")  # (S, S)
        along = np.cos(angle)[:, None, None] * x + np.sin(angle)[:, None, None] * y  # (n, S, S)
        stripes = 0.5 + 0.5 * np.sin(np.pi * freq[:, None, None] * along + phase[:, None, None])
        bg = top_colour[items.top][:, None, None, :]  # (n, 1, 1, 3)
        img = bg + stripes[..., None] * (stripe_colour[:, None, None, :] - bg)  # (n, S, S, 3)
        disc = (x**2 + y**2)[None] < radius[:, None, None] ** 2  # (n, S, S)
        img = np.where(disc[..., None], leaf_colour[items.leaf][:, None, None, :], img)
        img = img + rng.normal(0, 12, img.shape)
        images = np.clip(np.round(img), 0, 255).astype(np.uint8)
        image_missing = rng.random(n) < p.missing_media_fraction
    if p.render_audio:
        t = np.arange(p.audio_samples) / AUDIO_RATE  # (T,)
        pitch = np.stack(
            [
                200.0 * 2.0 ** (3.0 * items.top / n_top),  # the top category's tone, 200..1600 Hz
                300.0 * 2.0 ** (3.0 * squash(rng.normal(0, 1, K))),  # 300..2400 Hz
                300.0 * 2.0 ** (3.0 * squash(rng.normal(0, 1, K))),
            ],
            axis=1,
        )  # (n, 3)
        loud = np.concatenate([np.full((n, 1), 0.5), 0.2 + 0.6 * squash(rng.normal(0, 1, (K, 2)))], axis=1)
        phase = rng.uniform(0, 2 * np.pi, (n, 3))
        tones = loud[:, :, None] * np.sin(2 * np.pi * pitch[:, :, None] * t + phase[:, :, None])  # (n, 3, T)
        audio = (tones.sum(axis=1) + rng.normal(0, 0.1, (n, len(t)))).astype(np.float32)
        audio_missing = rng.random(n) < p.missing_media_fraction
    return Media(images=images, audio=audio, image_missing=image_missing, audio_missing=audio_missing)


def _media_column(values: np.ndarray, missing: np.ndarray, name: str) -> pl.Series:
    """(n, ...) arrays as a list column of the flattened values, null where missing."""
    column = pl.Series(name, values.reshape(len(values), -1))  # (n, d) -> Array, built without a Python loop
    column = column.cast(pl.List(column.dtype.inner))
    return pl.select(pl.when(pl.Series(~missing)).then(column).alias(name)).to_series()


def _to_raw_data(sim: Simulation, media: Media | None = None) -> RawData:
    items, users, activity, log = sim.items, sim.users, sim.activity, sim.log
    interactions = pl.DataFrame(
        {
            "user_id": activity.user,
            "item_id": log.item,
            "timestamp": activity.timestamp,
            "hour": activity.hour,
            "weekday": activity.weekday,
            "device": activity.device,
            "click": log.click,
            "purchase": log.purchase,
            "true_click_prob": log.click_prob,
        }
    ).sort(["timestamp", "user_id"])
    user_table = pl.DataFrame(
        {
            "user_id": np.arange(len(users.age)),
            "age": users.age,
            "gender": users.gender,
            "region": users.region,
            "pref_device": users.pref_device,
        }
    )
    item_table = pl.DataFrame(
        {
            "item_id": np.arange(len(items.top)),
            "cat1": items.top,
            "cat2": items.leaf,
            "brand": items.brand,
            "price": items.price,
            "image": items.image.astype(np.float32),
            "title": items.title,
            "release_ts": items.release_ts,
        }
    )
    media_kinds = {}
    if media is not None and media.images is not None:
        item_table = item_table.with_columns(_media_column(media.images, media.image_missing, "image_rgb"))
        media_kinds["image_rgb"] = "image"
    if media is not None and media.audio is not None:
        item_table = item_table.with_columns(_media_column(media.audio, media.audio_missing, "audio"))
        media_kinds["audio"] = "audio"
    categorical = [
        "age",
        "gender",
        "region",
        "pref_device",
        "cat1",
        "cat2",
        "brand",
        "hour",
        "weekday",
        "device",
    ]
    return RawData(
        interactions=interactions,
        users=user_table,
        items=item_table,  # release_ts is no feature: it stays out of the encoded tables
        features={
            **dict.fromkeys(categorical, "categorical"),
            "price": "numeric",
            "image": "dense_vector",
            "title": "text",
            **media_kinds,
        },
        labels=["click", "purchase"],
        item_text="title",
        oracle="true_click_prob",
    )
