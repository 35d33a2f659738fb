"""Reproductions that check themselves: a published result next to this run's, with PASS or FAIL.

An experiment under `conf/experiment/repro/` states a published setup (protocol preset, model and
hyperparameters as overrides) and what the paper reports, in a top-level `repro` block:

    repro:
      paper: Kang & McAuley, Self-Attentive Sequential Recommendation, ICDM 2018
      table: Table III, ML-1M, SASRec
      url: https://arxiv.org/abs/1808.09781
      protocol: sasrec_sampled            # the protocol preset the numbers were published under
      expected:
        test/hit@10: {value: 0.8245, tolerance: 0.02}   # |obtained - value| <= tolerance
        test/ndcg@10: {range: [0.58, 0.60]}             # low <= obtained <= high (a bare [low, high] too)

A range may also carry a `tolerance`, which widens it on both sides. Bounds are inclusive (to 1e-9, so a
value exactly on a bound passes whatever the float rounding). The check FAILS when any metric is outside its
bounds, when the run did not produce a metric (the reason names what it did produce), when a metric is NaN, or
when the run's protocol preset (`protocol_preset`) is not the one the numbers were published under: the
numbers of another protocol are not comparable, typically several times apart. Likewise when a config value
the numbers depend on differs from the one named under `conditions` (e.g. `{data.max_train_rows: 256}`: the
training-set size of a few-shot result).

`check_repro_config` validates the block before training (a typo must not cost a training run);
`check_reproduction` builds the report after testing; `print_reproduction` prints it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from recsys_lab.utils.checks import ConfigError

PASS, FAIL = "PASS", "FAIL"
REQUIRED = ("paper", "expected")
OPTIONAL = ("table", "url", "doi", "protocol", "notes", "hyperparameters", "conditions")
BOUND_SLACK = 1e-9  # inclusive bounds despite float rounding (0.4 - 0.3 > 0.1 in floating point)


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain dicts and lists (interpolations resolved)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _bounds(metric: str, spec: Any) -> tuple[Any, float, float, float]:
    """(expected as printed, tolerance, low, high) of one `expected` entry; ConfigError naming its key."""
    key = f"repro.expected.{metric}"
    if isinstance(spec, (list, tuple)):
        spec = {"range": list(spec)}
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{key}={spec!r}: expected {{value: x, tolerance: y}}, {{range: [low, high]}} or [low, high]"
        )
    unknown = sorted(set(spec) - {"value", "tolerance", "range"})
    if unknown:
        raise ConfigError(f"{key}: unknown field(s) {unknown}; expected value + tolerance, or range")
    if ("value" in spec) == ("range" in spec):
        raise ConfigError(
            f"{key}: give either value (with tolerance) or range, not {sorted(spec) or 'neither'}"
        )
    tolerance = spec.get("tolerance", 0.0 if "range" in spec else None)
    if tolerance is None:
        raise ConfigError(f"{key}: value={spec['value']} needs a tolerance (e.g. tolerance: 0.01)")
    if not _number(tolerance) or tolerance < 0:
        raise ConfigError(f"{key}.tolerance={tolerance!r}: expected a non-negative number")
    if "value" in spec:
        value = spec["value"]
        if not _number(value):
            raise ConfigError(f"{key}.value={value!r}: expected a number")
        return float(value), float(tolerance), float(value) - tolerance, float(value) + tolerance
    bounds = spec["range"]
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2 or not all(_number(b) for b in bounds):
        raise ConfigError(f"{key}.range={bounds!r}: expected two numbers [low, high]")
    low, high = float(bounds[0]), float(bounds[1])
    if low > high:
        raise ConfigError(f"{key}.range={[low, high]}: low is above high")
    return [low, high], float(tolerance), low - tolerance, high + tolerance


def check_repro_config(repro: Mapping | None) -> None:
    """Validate a `repro` block (None: nothing to check); ConfigError naming the key otherwise."""
    repro = _plain(repro)
    if repro is None:
        return
    if not isinstance(repro, Mapping):
        raise ConfigError(f"repro={repro!r}: expected a mapping with {list(REQUIRED)} (or null)")
    missing = [k for k in REQUIRED if not repro.get(k)]
    if missing:
        raise ConfigError(
            f"repro: missing {missing}; a reproduction names its paper and the expected metrics"
        )
    unknown = sorted(set(repro) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ConfigError(f"repro: unknown key(s) {unknown}; allowed: {[*REQUIRED, *OPTIONAL]}")
    if not isinstance(repro["expected"], Mapping):
        raise ConfigError(f"repro.expected={repro['expected']!r}: expected a mapping metric -> expectation")
    for metric, spec in repro["expected"].items():
        if not isinstance(metric, str) or "/" not in metric:
            raise ConfigError(f"repro.expected.{metric}: metric names are logged names such as test/ndcg@10")
        _bounds(metric, spec)


def _check(metric: str, spec: Any, metrics: Mapping[str, float]) -> dict[str, Any]:
    expected, tolerance, low, high = _bounds(metric, spec)
    row: dict[str, Any] = {
        "metric": metric,
        "expected": expected,
        "tolerance": tolerance,
        "obtained": None,
        "difference": None,
        "status": FAIL,
        "reason": None,
    }
    if metric not in metrics:
        row["reason"] = f"not produced by this run (it logged {sorted(metrics)})"
        return row
    obtained = float(metrics[metric])
    row["obtained"] = obtained
    if math.isnan(obtained):
        row["reason"] = "the run produced NaN"
        return row
    if isinstance(expected, list):  # a range: how far outside it, 0 inside
        row["difference"] = (
            obtained - expected[0] if obtained < expected[0] else max(0.0, obtained - expected[1])
        )
    else:
        row["difference"] = obtained - expected
    inside = low - BOUND_SLACK <= obtained <= high + BOUND_SLACK
    row["status"] = PASS if inside else FAIL
    if not inside:
        row["reason"] = f"outside [{low:.4f}, {high:.4f}]"
    return row


def check_reproduction(
    repro: Mapping,
    metrics: Mapping[str, float],
    run_protocol: str | None = None,
    config: DictConfig | Mapping | None = None,
) -> dict[str, Any]:
    """The report of one run against its `repro` block: a row per expected metric and an overall status.

    Args:
        repro: the `repro` block (validated here too).
        metrics: the run's metrics, keyed by logged name (`test/ndcg@10`).
        run_protocol: the run's `protocol_preset` (None when the run used none).
        config: the run's config, where `repro.conditions` are looked up (dotted keys).
    """
    check_repro_config(repro)
    repro = _plain(repro)
    checks = [_check(metric, spec, metrics) for metric, spec in repro["expected"].items()]
    reasons = [f"{c['metric']}: {c['reason']}" for c in checks if c["status"] == FAIL]
    published = repro.get("protocol")
    if published is not None and published != run_protocol:
        reasons.insert(
            0,
            f"this run used protocol preset {run_protocol!r}, the numbers were published under {published!r} "
            "(not comparable)",
        )
    lookup = config if isinstance(config, DictConfig) else OmegaConf.create(dict(config or {}))
    for key, value in (repro.get("conditions") or {}).items():
        actual = OmegaConf.select(lookup, key)
        if actual != value:
            reasons.insert(
                0,
                f"this run has {key}={actual!r}, the numbers were published with {value!r} (not comparable)",
            )
    report = {key: repro[key] for key in ("paper", *OPTIONAL) if repro.get(key) is not None}
    report.update(run_protocol=run_protocol, status=FAIL if reasons else PASS, reasons=reasons, checks=checks)
    return report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return f"[{value[0]:.4f}, {value[1]:.4f}]"
    return f"{value:+.4f}" if value < 0 else f"{value:.4f}"


def print_reproduction(report: Mapping[str, Any] | None) -> None:
    """Expected against obtained, per metric, with the difference and PASS / FAIL (nothing for None)."""
    if not report:
        return
    from rich.console import Console
    from rich.table import Table

    where = ", ".join(str(report[k]) for k in ("table", "url") if report.get(k))
    table = Table(title=f"reproduction: {report['paper']}" + (f" ({where})" if where else ""))
    for column, justify in (("metric", "left"), ("expected", "right"), ("± tol", "right")):
        table.add_column(column, justify=justify)
    for column in ("obtained", "difference", "status"):
        table.add_column(column, justify="right")
    for c in report["checks"]:
        colour = "green" if c["status"] == PASS else "red"
        difference = "-" if c["difference"] is None else f"{c['difference']:+.4f}"
        table.add_row(
            c["metric"],
            _fmt(c["expected"]),
            f"{c['tolerance']:.4f}",
            _fmt(c["obtained"]),
            difference,
            f"[{colour}]{c['status']}[/{colour}]",
        )
    colour = "green" if report["status"] == PASS else "red"
    table.caption = (
        f"protocol: published {report.get('protocol')!r}, this run {report.get('run_protocol')!r} — "
        f"[{colour}]{report['status']}[/{colour}]" + "".join(f"\n{reason}" for reason in report["reasons"])
    )
    Console(width=120).print(table)
