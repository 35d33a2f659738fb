"""Shared test helpers (constants and small builders); fixtures stay in conftest.py."""

from __future__ import annotations

import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A small simulator: every test that trains uses it unless it overrides data.source.*
SMALL_DATA = [
    "data.source.n_users=300",
    "data.source.n_items=200",
    "data.source.impressions_per_user=20",
    "data.batch_size=256",
    "data.eval_batch_size=512",
]


def free_port() -> int:
    """A local TCP port nothing listens on (a rendezvous of test processes, a server that is not there)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def model_overrides(model: str, tmp_path: Path) -> list[str]:
    """Overrides that make a model config run on small data (a tiny random BERT instead of MiniLM)."""
    extra = []
    if model in ("bert_cross_encoder", "two_tower_text"):
        from recsys_lab.utils.testing_text import build_tiny_bert

        extra = [f"model.net.pretrained={build_tiny_bert(tmp_path / 'bert')}", "model.net.sha256=null"]
    if model == "llm_ranker":
        from recsys_lab.utils.testing_text import build_tiny_causal_lm

        folder = build_tiny_causal_lm(tmp_path / "llm")
        extra = [f"model.net.pretrained={folder}", "model.net.gguf_file=null", "model.net.sha256=null"]
        extra.append("model.net.answers=[yes,no]")
        # short prompts: a tiny LM on thousands of evaluation rows is still a transformer per row
        extra += ["model.net.max_length=48", "model.net.max_history_items=3", "model.net.max_item_tokens=6"]
    return [f"model={model}", "data=ecommerce", *SMALL_DATA, "logger=none", *extra]
