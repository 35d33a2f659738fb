"""One contract, every model: a tiny schema and batch in, logits [B] out, gradients everywhere, eval deterministic.

Adding a model = one entry in MODELS. An entry says how to build the model from a schema and a scratch folder
(for models that load weights from disk, e.g. a tiny BERT written by `recsys_lab.utils.testing_text`), and may
bring its own schema and batch factories (a cross-encoder needs `batch.text`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.models.bert4rec import BERT4Rec
from recsys_lab.models.bert_cross_encoder import BERTCrossEncoder
from recsys_lab.models.bst import BST
from recsys_lab.models.dcnv2 import DCNv2
from recsys_lab.models.deepfm import DeepFM
from recsys_lab.models.dien import DIEN
from recsys_lab.models.din import DIN
from recsys_lab.models.ease import EASE
from recsys_lab.models.esmm import ESMM
from recsys_lab.models.gru4rec import GRU4Rec
from recsys_lab.models.hstu import HSTU
from recsys_lab.models.lightgcn import LightGCN
from recsys_lab.models.mf_bpr import MFBPR
from recsys_lab.models.mmoe import MMoE
from recsys_lab.models.neumf import GMF, NCFMLP, NeuMF
from recsys_lab.models.ple import PLE
from recsys_lab.models.popularity import Popularity
from recsys_lab.models.sasrec import SASRec
from recsys_lab.models.shared_bottom import SharedBottom
from recsys_lab.models.two_tower import TwoTower
from recsys_lab.models.two_tower_text import TextTwoTower
from recsys_lab.modules.content import (
    AttentionFusion,
    AudioEncoder,
    ConcatFusion,
    GatedFusion,
    ImageEncoder,
    ItemContent,
    TextEncoder,
    VectorEncoder,
)
from recsys_lab.utils.testing import random_batch, tiny_item_content, tiny_schema
from recsys_lab.utils.testing_text import build_tiny_bert, tiny_item_tokens


@dataclass
class Case:
    build: Callable[[Schema, Path], nn.Module]
    schema: Callable[[], Schema] = tiny_schema
    batch: Callable[[Schema], Batch] = (
        random_batch  # must give B > 1: BatchNorm-style layers need it in training
    )


def text_batch(schema: Schema) -> Batch:
    """A random batch plus cross-encoder token inputs ([CLS] ... [SEP] ... [SEP], right-padded)."""
    batch = random_batch(schema)
    g = torch.Generator().manual_seed(1)
    B, T = len(batch), 12
    lengths = torch.tensor([12, 9, 5, 12, 7, 4])[:B]
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    ids = torch.randint(5, 40, (B, T), generator=g) * mask
    types = ((torch.arange(T) >= 3) & mask.bool()).long()
    batch.text = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return batch


def content(fusion: type, text: str | None = None) -> Callable[..., ItemContent]:
    """An `ItemContent` partial over the tiny content tables (`tiny_item_content`): vector, picture (small CNN),
    sound, and a frozen tiny BERT over the item texts when `text` names one."""
    modalities = {
        "vector": partial(VectorEncoder, column="image"),
        "image": partial(ImageEncoder, column="image_rgb", backbone="cnn"),
        "audio": partial(AudioEncoder, column="audio", n_fft=64, hop=32, n_mels=8),
    }
    if text is not None:
        modalities["text"] = partial(TextEncoder, pretrained=text)
    return partial(ItemContent, modalities=modalities, fusion=fusion, dim=4)


MODELS: dict[str, Case] = {
    "din": Case(lambda schema, _: DIN(schema, embedding_dim=4, attention_hidden=[8, 4], mlp_hidden=[8, 4])),
    "dien": Case(lambda schema, _: DIEN(schema, embedding_dim=4, mlp_hidden=[8, 4], dropout=0.1)),
    "bst": Case(
        lambda schema, _: BST(
            schema, embedding_dim=4, num_heads=2, feed_forward_dim=8, mlp_hidden=[8], dropout=0.1
        )
    ),
    "deepfm": Case(lambda schema, _: DeepFM(schema, embedding_dim=4, mlp_hidden=[8, 4], dropout=0.1)),
    "dcnv2": Case(
        lambda schema, _: DCNv2(schema, embedding_dim=4, num_cross_layers=2, mlp_hidden=[8], dropout=0.1)
    ),
    "dcnv2_parallel": Case(
        lambda schema, _: DCNv2(
            schema, embedding_dim=4, num_cross_layers=2, mlp_hidden=[8], structure="parallel"
        )
    ),
    "dcnv2_mixture": Case(
        lambda schema, _: DCNv2(
            schema, embedding_dim=4, num_cross_layers=2, mlp_hidden=[8], low_rank=3, num_experts=3
        )
    ),
    "dcnv2_low_rank": Case(  # one expert: no gate
        lambda schema, _: DCNv2(schema, embedding_dim=4, num_cross_layers=1, mlp_hidden=[], low_rank=2)
    ),
    # multi-task rankers: forward_heads over the schema's labels (click, purchase), forward = the first head
    "shared_bottom": Case(
        lambda schema, _: SharedBottom(
            schema, embedding_dim=4, bottom_hidden=[8], tower_hidden=[4], dropout=0.1
        )
    ),
    "mmoe": Case(
        lambda schema, _: MMoE(
            schema, embedding_dim=4, num_experts=3, expert_hidden=[8, 6], tower_hidden=[4], dropout=0.1
        )
    ),
    "ple": Case(
        lambda schema, _: PLE(
            schema,
            embedding_dim=4,
            num_levels=2,
            num_specific_experts=1,
            num_shared_experts=2,
            expert_hidden=[6],
            tower_hidden=[4],
        )
    ),
    "esmm": Case(lambda schema, _: ESMM(schema, embedding_dim=4, tower_hidden=[8, 4], dropout=0.1)),
    "two_tower": Case(lambda schema, _: TwoTower(schema, embedding_dim=4, tower_hidden=[8], output_dim=6)),
    "bert_cross_encoder": Case(
        lambda schema, folder: BERTCrossEncoder(schema, pretrained=build_tiny_bert(folder / "bert")),
        batch=text_batch,
    ),
    # item texts ride on the schema (`schema.item_text`); the hybrid tower and the "titles" user side
    "two_tower_text": Case(
        lambda schema, folder: TextTwoTower(
            schema, pretrained=build_tiny_bert(folder / "bert"), output_dim=6, id_dropout=0.0
        ),
        schema=lambda: tiny_item_tokens(tiny_schema(), seed=0),
    ),
    "two_tower_text_titles": Case(
        lambda schema, folder: TextTwoTower(
            schema,
            pretrained=build_tiny_bert(folder / "bert"),
            output_dim=6,
            user_text="titles",
            pooling="cls",
            id_embeddings=False,
        ),
        schema=lambda: tiny_item_tokens(tiny_schema(), seed=0),
    ),
    # item content (modules/content.py): every modality, every fusion, items missing some or all modalities
    "two_tower_content": Case(
        lambda schema, _: TwoTower(
            schema,
            embedding_dim=4,
            tower_hidden=[8],
            output_dim=6,
            id_dropout=0.2,
            content=content(GatedFusion),
        ),
        schema=lambda: tiny_item_content(tiny_schema()),
    ),
    "din_content": Case(
        lambda schema, _: DIN(
            schema, embedding_dim=4, attention_hidden=[8], mlp_hidden=[8], content=content(AttentionFusion)
        ),
        schema=lambda: tiny_item_content(tiny_schema()),
    ),
    "din_content_text": Case(
        lambda schema, folder: DIN(
            schema,
            embedding_dim=4,
            attention_hidden=[8],
            mlp_hidden=[8],
            content=content(ConcatFusion, text=build_tiny_bert(folder / "bert")),
        ),
        schema=lambda: tiny_item_content(tiny_item_tokens(tiny_schema(), seed=0)),
    ),
    "popularity": Case(lambda schema, _: Popularity(schema)),
    "gru4rec": Case(lambda schema, _: GRU4Rec(schema, embedding_dim=4, hidden_dim=6, num_layers=2)),
    "gru4rec_untied": Case(
        lambda schema, _: GRU4Rec(schema, embedding_dim=4, hidden_dim=6, tie_embeddings=False)
    ),
    "sasrec": Case(lambda schema, _: SASRec(schema, embedding_dim=4, num_blocks=1, num_heads=2)),
    "sasrec_recbole": Case(
        lambda schema, _: SASRec(schema, embedding_dim=4, num_blocks=1, num_heads=2, layout="recbole")
    ),
    "bert4rec": Case(
        lambda schema, _: BERT4Rec(schema, embedding_dim=4, num_blocks=1, num_heads=2, feed_forward_dim=8)
    ),
    "hstu": Case(
        lambda schema, _: HSTU(
            schema, embedding_dim=4, num_blocks=1, num_heads=2, attention_dim=2, linear_dim=2
        )
    ),
    "mf_bpr": Case(lambda schema, _: MFBPR(schema, embedding_dim=4, item_bias=True)),
    "gmf": Case(lambda schema, _: GMF(schema, embedding_dim=4)),
    "mlp": Case(lambda schema, _: NCFMLP(schema, embedding_dim=4, hidden=[6, 3])),
    "neumf": Case(lambda schema, _: NeuMF(schema, gmf_dim=4, mlp_embedding_dim=4, mlp_hidden=[6, 3])),
    "lightgcn": Case(lambda schema, _: LightGCN(schema, embedding_dim=4, num_layers=2)),
    "ease": Case(lambda schema, _: EASE(schema, l2=2.0)),  # fitted in closed form: no parameters
}


def item_only(batch: Batch, schema: Schema) -> Batch:
    """The item-side features of `batch` and nothing else, as an item catalogue is passed to `encode_item`."""
    item = {f.name for f in schema.select(side="item")}
    return Batch(
        sparse={k: v for k, v in batch.sparse.items() if k in item},
        seq={k: v for k, v in batch.seq.items() if k in item},
        dense={k: v for k, v in batch.dense.items() if k in item},
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_model_contract(name: str, tmp_path: Path) -> None:
    case = MODELS[name]
    schema = case.schema()
    batch = case.batch(schema)
    torch.manual_seed(0)
    model = case.build(schema, tmp_path)

    # logits: one finite float per row
    model.train()
    logits = model(batch)
    assert logits.shape == (len(batch),)
    assert logits.dtype.is_floating_point
    assert torch.isfinite(logits).all()

    # every parameter is used: a finite gradient reaches it (a closed-form model has none); a multi-task model's
    # parameters are reached through all its heads, one per label of the schema
    heads = model.forward_heads(batch) if hasattr(model, "forward_heads") else {"": logits}
    if any(True for _ in model.parameters()):
        sum(h.sum() for h in heads.values()).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {param_name}"

    # eval is deterministic (dropout off, running statistics instead of batch statistics)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(batch), rtol=0, atol=0)

    # multi-task models: one (B,) head per label, in the order of `labels`, and forward is the first head
    if hasattr(model, "forward_heads"):
        assert list(heads) == model.labels == schema.labels
        with torch.no_grad():
            eval_heads = model.forward_heads(batch)
            for head in eval_heads.values():
                assert head.shape == (len(batch),) and torch.isfinite(head).all()
            torch.testing.assert_close(model(batch), eval_heads[model.labels[0]], rtol=0, atol=0)

    # a model that declares it reads no history (or nothing but the ids) gets batches without them: it must not
    # need them
    if not getattr(model, "reads_history", True):
        bare = Batch(sparse=batch.sparse, seq={}, dense=batch.dense, labels=batch.labels)
        with torch.no_grad():
            torch.testing.assert_close(model(bare), model(batch), rtol=0, atol=0)
    if not getattr(model, "reads_features", True):
        ids = {k: batch.sparse[k] for k in (schema.user_id, schema.item_id)}
        bare = Batch(sparse=ids, labels=batch.labels)
        with torch.no_grad():
            torch.testing.assert_close(model(bare), model(batch), rtol=0, atol=0)

    # retrieval models: encodings of the right shapes, and forward is their row-wise dot product
    if hasattr(model, "encode_query") and hasattr(model, "encode_item"):
        with torch.no_grad():
            query = model.encode_query(batch)
            item = model.encode_item(batch)
            assert query.dim() == 2 and query.shape[0] == len(batch)
            assert item.shape == query.shape
            torch.testing.assert_close(model(batch), (query * item).sum(dim=-1))

            # a catalogue of N != B items holding item-side features only
            catalogue = item_only(case.batch(schema), schema).select(torch.arange(len(batch) - 1))
            encoded = model.encode_item(catalogue)
            assert encoded.shape == (len(batch) - 1, query.shape[1])
            torch.testing.assert_close(encoded, item[: len(batch) - 1])
