"""Explain a trained run's recommendations: `python scripts/explain.py <run dir | checkpoint> --user <raw id>
[--item <raw id> | --top-k 3] [--method auto|attention|occlusion] [--top 5] [--out <png>]`.

Prints, per explained item, the model's score and the history items behind it, largest weight first:

    Recommended: Liar Liar (1997) (score 1.28) — because you viewed: "Delicatessen (1991)" (0.35), …

and draws the weights as horizontal bars into a PNG (default: <run dir>/explain_<user>_<item>.png, or
explain_<user>_top<k>.png for --top-k). The history is the user's positives before the test period (--as-of
changes that), of which the model reads the most recent `data.history_len`. --method attention reads the
model's own attention (DIN, DIEN, BST); occlusion scores the history without each item (any model); auto picks
attention where the model has it. See `recsys_lab/analysis/explain.py`.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from recsys_lab.analysis.explain import METHODS, Explainer, plot_explanations
from recsys_lab.serving.runs import load_run
from recsys_lab.utils.checks import user_error_message

AS_OF_LEVELS = {"val": 0, "test": 1, "all": 2}  # the timeline level the history is read from


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/explain.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory written by train.py, or one of its checkpoints")
    parser.add_argument("--user", required=True, help="the user's raw id, as the data spell it")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--item", default=None, help="explain the score of this item (raw id)")
    which.add_argument(
        "--top-k", type=int, default=3, help="explain the user's k best unseen items (default 3)"
    )
    parser.add_argument("--method", choices=METHODS, default="auto")
    parser.add_argument("--top", type=int, default=5, help="history items shown per explained item")
    parser.add_argument(
        "--as-of", choices=list(AS_OF_LEVELS), default="test", help="history before this period"
    )
    parser.add_argument("--out", type=Path, default=None, help="the PNG to write (default: in the run dir)")
    parser.add_argument(
        "--data-dir", default=None, help="the prepared data's cache, if not where the run kept it"
    )
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top {args.top}: expected a positive number")
    if args.item is None and args.top_k < 1:
        parser.error(f"--top-k {args.top_k}: expected a positive number")
    return args


def main(argv: list[str] | None = None) -> list:
    os.environ.setdefault("WANDB_MODE", "disabled")
    args = parse_args(argv)
    try:
        run = load_run(args.run, data_dir=args.data_dir)
        explainer = Explainer(run, AS_OF_LEVELS[args.as_of])
        every = run.store.history_len  # weigh every history item; print and draw the --top largest
        if args.item is not None:
            explanations = [explainer.explain(args.user, args.item, args.method, every)]
        else:
            explanations = explainer.recommend(args.user, args.top_k, args.method, every)
        name = args.item if args.item is not None else f"top{args.top_k}"
        out = args.out if args.out is not None else run.path / f"explain_{_safe(args.user)}_{_safe(name)}.png"
        plot_explanations(explanations, out, args.top)
    except (ValueError, RuntimeError, OSError) as err:
        message = user_error_message(err)
        if message is None:
            raise
        raise SystemExit(f"scripts/explain.py: {message}") from None

    first = explanations[0]
    print(
        f"user {args.user} — {first.model}, {first.method}; history: the {len(first.history)} most recent of "
        f"{first.history_total} positives before {first.as_of}"
    )
    for e in explanations:
        print(e.summary(args.top, prefix="Recommended" if args.item is None else "Item"))
    print(f"figure: {out}")
    return explanations


def _safe(raw: str) -> str:
    """A raw id as part of a file name (ids may hold '/', spaces, ...)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(raw))


if __name__ == "__main__":
    main()
