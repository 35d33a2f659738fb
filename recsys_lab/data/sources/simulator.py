"""The embedded default dataset: a seeded e-commerce simulator with ground truth.

Every impression is drawn from a known click model, so the best achievable AUC of any split (the *oracle AUC*,
scoring impressions with their true click probability) is known and is reported next to each model's AUC.

The click model has the signals the model zoo is built to find:

* long-term taste: user and item latent factors (`u . v`), items' factors come from their category and brand;
* short-term interest: the mean factor of the user's last few clicks, and a bonus for the category of a recent
  click, so target attention over the behaviour sequence (DIN) and sequence models have something to learn;
* context: time-of-day x top-category, weekend x top-category and device x price effects;
* content: item titles are built from words tied to the item's factors, brand and category (text models can read
  taste from them), and a small dense "image" embedding is a noisy projection of the same factors;
* Zipf-like popularity of both exposure and appeal, and a share of items that are only released late
  (cold-start items, described by their content features alone).

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


class EcommerceSimulator:
    """A seeded generator of a realistic shop's impression log (users, items, impressions with clicks).

    Args:
        n_users, n_items: population sizes. The defaults give ~250k impressions, on which DIN trains to a stable
            result in about a minute on 2 CPU cores; `n_users=300_000, impressions_per_user=80` gives ~24M.
        n_days: length of the log; splits are cut by time downstream.
        impressions_per_user: mean impressions per user (log-normal activity, so a few users are very active).
        latent_dim: width of the latent taste factors (at most len(FACTOR_WORDS)).
        zipf_exponent: exposure and appeal follow item popularity rank ** -zipf_exponent.
        cold_item_fraction: share of items released only in the last quarter of the log.
        n_brands: brands, each belonging to one top category.
        image_dim: width of the dense "image" embedding.
        recent_window: clicks that make up the short-term interest.
        base_logit: click-logit intercept; sets the overall click rate (about 10% by default).
        seed: everything is a deterministic function of the parameters.
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
    ) -> None:
        checks = {
            "n_users": n_users >= 2,
            "n_items": n_items >= 2 * len(CATEGORY_TREE),
            "n_days": n_days >= 3,
            "impressions_per_user": impressions_per_user >= 1,
            "latent_dim": 1 <= latent_dim <= len(FACTOR_WORDS),
            "zipf_exponent": zipf_exponent >= 0,
            "cold_item_fraction": 0 <= cold_item_fraction < 1,
            "n_brands": n_brands >= len(CATEGORY_TREE),
            "image_dim": image_dim >= 1,
            "recent_window": recent_window >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"data.source: invalid simulator parameter(s) {bad} "
                f"(need n_users>=2, n_items>={2 * len(CATEGORY_TREE)}, n_days>=3, impressions_per_user>=1, "
                f"1<=latent_dim<={len(FACTOR_WORDS)}, zipf_exponent>=0, 0<=cold_item_fraction<1, "
                f"n_brands>={len(CATEGORY_TREE)}, image_dim>=1, recent_window>=1)"
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
        )

    name = "ecommerce"

    def fingerprint(self) -> str:
        """Cache key: the parameters and the generator's version."""
        blob = json.dumps({"simulator": SIMULATOR_VERSION, **asdict(self.params)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> dict:
        params = asdict(self.params)
        params["simulator_seed"] = params.pop("seed")
        return {"source": self.name, "simulator_version": SIMULATOR_VERSION, **params}

    # ------------------------------------------------------------------------------------------------------
    def load(self) -> RawData:
        p = self.params
        rng = np.random.default_rng(p.seed)
        K = p.latent_dim
        n_top = len(CATEGORY_TREE)
        leaves = [(top, leaf) for top, ls in CATEGORY_TREE.items() for leaf in ls]
        n_leaf = len(leaves)
        leaf_top = np.array([list(CATEGORY_TREE).index(top) for top, _ in leaves])

        # ---- items: category tree, brand, factors, price, popularity, title, image ------------------------
        top_center = rng.normal(0, 1.0, (n_top, K))
        leaf_center = top_center[leaf_top] + rng.normal(0, 0.6, (n_leaf, K))
        brand_top = np.arange(p.n_brands) % n_top  # every top category gets brands
        brand_center = rng.normal(0, 0.5, (p.n_brands, K))
        brand_names = self._brand_names(rng, p.n_brands)

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
        price = np.round(np.exp(log_price), 2)
        price_z = (log_price - log_price.mean()) / log_price.std()

        # Zipf popularity: exposure share and appeal both follow the rank, so "popular" is a real signal.
        rank = rng.permutation(p.n_items) + 1
        exposure = rank**-p.zipf_exponent
        exposure /= exposure.sum()
        appeal = 0.25 * np.log(exposure * p.n_items) + rng.normal(0, 0.3, p.n_items)

        is_cold = rng.random(p.n_items) < p.cold_item_fraction
        horizon = p.n_days * SECONDS_PER_DAY
        release_ts = np.where(is_cold, rng.uniform(0.75, 0.95, p.n_items) * horizon, 0.0).astype(np.int64)

        titles = self._titles(v, item_brand, item_leaf, brand_names, leaves)
        image_proj = rng.normal(0, 1, (K, p.image_dim)) / np.sqrt(K)
        top_proj = rng.normal(0, 0.5, (n_top, p.image_dim))
        image = (
            v @ image_proj * np.sqrt(K) + top_proj[item_top] + rng.normal(0, 0.5, (p.n_items, p.image_dim))
        )

        # ---- users: demographics drive category taste, so user features carry signal ---------------------
        n_age, n_gender, n_region = 6, 3, 8
        age = rng.integers(0, n_age, p.n_users)
        gender = rng.choice(n_gender, p.n_users, p=[0.48, 0.48, 0.04])
        region = rng.integers(0, n_region, p.n_users)
        pref_device = rng.choice(len(DEVICES), p.n_users, p=[0.55, 0.25, 0.20])
        age_taste = rng.normal(0, 1.0, (n_age, n_top))
        gender_taste = rng.normal(0, 1.0, (n_gender, n_top))
        top_logits = age_taste[age] + gender_taste[gender]
        top_prob = np.exp(top_logits - top_logits.max(1, keepdims=True))
        top_prob /= top_prob.sum(1, keepdims=True)
        # two favourite leaves per user, their tops drawn from the demographic taste
        fav_top = np.stack([_sample_rows(rng, top_prob) for _ in range(2)], 1)
        leaves_of_top = np.arange(n_leaf).reshape(n_top, -1)
        fav_leaf = leaves_of_top[fav_top, rng.integers(0, leaves_of_top.shape[1], fav_top.shape)]
        u = leaf_center[fav_leaf].mean(1) + rng.normal(0, 0.5, (p.n_users, K))
        u /= np.sqrt(K)
        price_sensitivity = 0.3 + 0.15 * (age < 2) + 0.1 * (region % 3 == 0) + rng.gamma(2.0, 0.1, p.n_users)

        # context effects
        hour_effect = rng.normal(0, 0.4, (n_top, 4))  # four six-hour day parts
        weekend_effect = rng.normal(0, 0.3, n_top)
        device_price = np.array([0.4, -0.1, 0.1])  # mobile shoppers shy away from expensive items

        # ---- activity and timestamps ---------------------------------------------------------------------
        n_imp = np.clip(
            rng.lognormal(np.log(p.impressions_per_user) - 0.32, 0.8, p.n_users).astype(np.int64),
            3,
            int(20 * p.impressions_per_user),
        )
        order = np.argsort(
            -n_imp, kind="stable"
        )  # most active first: at step k the active users are a prefix
        n_sorted = n_imp[order]
        offsets = np.concatenate([[0], np.cumsum(n_sorted)])
        total = int(offsets[-1])
        # day uniform, hour from a diurnal profile (evening peak), seconds uniform; then sorted per user
        diurnal = 1.0 + 0.8 * np.sin((np.arange(24) - 14) / 24 * 2 * np.pi) ** 2
        diurnal[:6] *= 0.3
        diurnal /= diurnal.sum()
        ts = (
            rng.integers(0, p.n_days, total) * SECONDS_PER_DAY
            + rng.choice(24, total, p=diurnal) * 3600
            + rng.integers(0, 3600, total)
        )
        owner = np.repeat(np.arange(p.n_users), n_sorted)  # position in `order`
        ts = ts[np.lexsort((ts, owner))]
        # strictly increasing within a user (a tie would make "before" ambiguous for history features)
        within = np.arange(total) - np.repeat(offsets[:-1], n_sorted)
        block = owner * (10 * horizon)  # keeps users apart inside one running maximum
        ts = np.maximum.accumulate(ts - within + block) - block + within
        users_of_row = order[owner]
        device = np.where(rng.random(total) < 0.7, pref_device[users_of_row], rng.integers(0, 3, total))
        hour = (ts % SECONDS_PER_DAY) // 3600
        weekday = (ts // SECONDS_PER_DAY + 3) % 7  # day 0 is a Thursday

        # ---- exposure samplers ---------------------------------------------------------------------------
        warm_cdf = np.cumsum(np.where(is_cold, 0.0, exposure))
        all_cdf = np.cumsum(exposure)
        by_leaf = np.argsort(item_leaf, kind="stable")  # items grouped by leaf
        leaf_cum = np.cumsum(exposure[by_leaf])
        leaf_bounds = np.searchsorted(item_leaf[by_leaf], np.arange(n_leaf + 1))
        leaf_lo = np.concatenate([[0.0], leaf_cum])[leaf_bounds[:-1]]
        leaf_hi = np.concatenate([[0.0], leaf_cum])[leaf_bounds[1:]]

        def sample_in_leaf(leaf: np.ndarray) -> np.ndarray:
            x = leaf_lo[leaf] + rng.random(len(leaf)) * (leaf_hi[leaf] - leaf_lo[leaf])
            pos = np.minimum(np.searchsorted(leaf_cum, x, side="right"), leaf_bounds[leaf + 1] - 1)
            out = by_leaf[np.minimum(np.maximum(pos, leaf_bounds[leaf]), p.n_items - 1)]
            # a leaf may hold no item (small catalogues): show a popular item instead, as for unreleased ones
            empty = leaf_bounds[leaf] == leaf_bounds[leaf + 1]
            if empty.any():
                out[empty] = np.searchsorted(
                    all_cdf, rng.random(int(empty.sum())) * all_cdf[-1], side="right"
                ).clip(0, p.n_items - 1)
            return out

        # ---- the history-dependent simulation, vectorised over users -------------------------------------
        R = p.recent_window
        recent = np.zeros(
            (p.n_users, R), dtype=np.int64
        )  # ring buffer of clicked items, by position in order
        n_clicks = np.zeros(p.n_users, dtype=np.int64)
        item_out = np.empty(total, dtype=np.int64)
        p_out = np.empty(total)
        click_out = np.zeros(total, dtype=np.int8)
        purchase_out = np.zeros(total, dtype=np.int8)
        u_o, sens_o, fav_o = u[order], price_sensitivity[order], fav_leaf[order]
        for k in range(int(n_sorted[0])):
            m = int(np.searchsorted(-n_sorted, -k, side="left"))  # users with more than k impressions
            rows = offsets[:m] + k
            t = ts[rows]
            has_hist = n_clicks[:m] > 0
            # exposure policy of the logging recommender: popularity, retargeting of a recent click's leaf,
            # or a favourite leaf
            mode = rng.random(m)
            window = np.minimum(n_clicks[:m], R)
            back = rng.integers(0, np.maximum(window, 1))  # one of the recent clicks, uniformly
            last = recent[np.arange(m), (n_clicks[:m] - 1 - back) % R]
            retarget = (mode < 0.30) & has_hist
            personal = (mode >= 0.30) & (mode < 0.55) | ((mode < 0.30) & ~has_hist)
            cand = np.searchsorted(all_cdf, rng.random(m) * all_cdf[-1], side="right").clip(0, p.n_items - 1)
            cand[retarget] = sample_in_leaf(item_leaf[last[retarget]])
            cand[personal] = sample_in_leaf(fav_o[:m][personal, rng.integers(0, 2, personal.sum())])
            # not yet released -> the logging system shows a released popular item instead
            unreleased = release_ts[cand] > t
            if unreleased.any():
                cand[unreleased] = np.searchsorted(
                    warm_cdf, rng.random(unreleased.sum()) * warm_cdf[-1], side="right"
                ).clip(0, p.n_items - 1)

            # click model (ground truth)
            valid = np.arange(R)[None, :] < window[:, None]  # (m, R)
            rv = (v[recent[:m]] * valid[..., None]).sum(1) / np.maximum(window, 1)[:, None]  # (m, K)
            recent_leaf_hit = ((item_leaf[recent[:m]] == item_leaf[cand][:, None]) & valid).any(1)
            logit = (
                p.base_logit
                + appeal[cand]
                + 0.8 * (u_o[:m] * v[cand]).sum(1)
                + 1.0 * (rv * v[cand]).sum(1)
                + 0.5 * recent_leaf_hit
                + hour_effect[item_top[cand], hour[rows] // 6]
                + weekend_effect[item_top[cand]] * (weekday[rows] >= 5)
                - 0.7 * (sens_o[:m] + device_price[device[rows]]) * price_z[cand]
            )
            prob = 1.0 / (1.0 + np.exp(-logit))
            click = rng.random(m) < prob
            buy_logit = (
                -1.8 + 0.8 * appeal[cand] - 0.8 * sens_o[:m] * price_z[cand] + (u_o[:m] * v[cand]).sum(1)
            )
            purchase = click & (rng.random(m) < 1.0 / (1.0 + np.exp(-buy_logit)))

            item_out[rows], p_out[rows], click_out[rows], purchase_out[rows] = cand, prob, click, purchase
            idx = np.flatnonzero(click)
            recent[idx, n_clicks[idx] % R] = cand[idx]
            n_clicks[idx] += 1

        interactions = pl.DataFrame(
            {
                "user_id": users_of_row,
                "item_id": item_out,
                "timestamp": ts,
                "hour": hour,
                "weekday": weekday,
                "device": device,
                "click": click_out,
                "purchase": purchase_out,
                "true_click_prob": p_out,
            }
        ).sort(["timestamp", "user_id"])
        users = pl.DataFrame(
            {
                "user_id": np.arange(p.n_users),
                "age": age,
                "gender": gender,
                "region": region,
                "pref_device": pref_device,
            }
        )
        items = pl.DataFrame(
            {
                "item_id": np.arange(p.n_items),
                "cat1": item_top,
                "cat2": item_leaf,
                "brand": item_brand,
                "price": price,
                "image": image.astype(np.float32),
                "title": titles,
                "release_ts": release_ts,
            }
        )
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
            users=users,
            items=items,  # release_ts is no feature: it stays out of the encoded tables
            features={
                **dict.fromkeys(categorical, "categorical"),
                "price": "numeric",
                "image": "dense_vector",
                "title": "text",
            },
            labels=["click", "purchase"],
            item_text="title",
            oracle="true_click_prob",
        )

    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _brand_names(rng: np.random.Generator, n: int) -> list[str]:
        names: set[str] = set()
        out = []
        while len(out) < n:
            name = "".join(rng.choice(SYLLABLES, rng.integers(2, 4))).capitalize()
            if name not in names:
                names.add(name)
                out.append(name)
        return out

    @staticmethod
    def _titles(v, item_brand, item_leaf, brand_names, leaves) -> list[str]:
        # the two strongest factors of the item, each as the word of its sign
        top2 = np.argsort(-np.abs(v), axis=1)[:, :2]
        titles = []
        for i in range(len(v)):
            words = [FACTOR_WORDS[d][0 if v[i, d] > 0 else 1] for d in top2[i]]
            top, leaf = leaves[item_leaf[i]]
            titles.append(f"{brand_names[item_brand[i]]} {words[0]} {words[1]} {leaf} ({top})")
        return titles


def _sample_rows(rng: np.random.Generator, prob: np.ndarray) -> np.ndarray:
    """One categorical draw per row of a (n, c) probability matrix."""
    return (prob.cumsum(1) > rng.random((len(prob), 1))).argmax(1)
