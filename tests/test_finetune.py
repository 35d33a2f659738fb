"""Freezing policies and adapters (`model/finetune`) on the cross-encoder over a tiny random BERT: what trains,
what stays bit-identical after a step, LoRA / IA3 merge parity, and the config group end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys_lab.models.bert_cross_encoder import BERTCrossEncoder
from recsys_lab.modules.finetune import (
    IA3,
    Adapter,
    Frozen,
    Full,
    LoRA,
    TopK,
    parameter_counts,
    transformer_layers,
)
from recsys_lab.train import train
from recsys_lab.utils.testing import tiny_schema
from recsys_lab.utils.testing_text import build_tiny_bert
from tests.helpers import model_overrides
from tests.test_bert_cross_encoder import text_batch

peft = pytest.importorskip("peft")  # in the dev and lm extras; CI installs it


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def build(folder: str, policy) -> BERTCrossEncoder:
    torch.manual_seed(0)
    return BERTCrossEncoder(schema=tiny_schema(), pretrained=folder, finetune=policy)


def one_step(model: BERTCrossEncoder, folder: str) -> dict[str, torch.Tensor]:
    """Weights before an Adam step on the BCE of one batch (the step itself changes the model in place)."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = text_batch(folder)
    loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels["click"])
    loss.backward()
    optimizer.step()
    return before


def changed(model: BERTCrossEncoder, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}


def test_full_trains_everything_and_frozen_only_the_head(tiny_bert):
    full = build(tiny_bert, Full())
    trainable, total = parameter_counts(full)
    assert trainable == total
    frozen = build(tiny_bert, Frozen())
    head = sum(p.numel() for p in frozen.head.parameters())
    assert parameter_counts(frozen) == (head, total)
    before = one_step(frozen, tiny_bert)
    # the encoder's weights are bit-identical after the step; the head moved
    assert changed(frozen, before) == {"head.weight", "head.bias"}


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_trains_only_the_top_layers(tiny_bert, k):
    model = build(tiny_bert, TopK(k))
    layers = transformer_layers(model.encoder)
    assert len(layers) == 2
    top = sum(p.numel() for layer in list(layers)[2 - k :] for p in layer.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert parameter_counts(model)[0] == top + head
    moved = changed(model, one_step(model, tiny_bert))
    allowed = {f"encoder.encoder.layer.{i}." for i in range(2 - k, 2)}
    assert moved and all(name.startswith(tuple(allowed)) or name.startswith("head.") for name in moved)
    assert not any(name.startswith("encoder.embeddings") for name in moved)


def test_lora_trains_only_its_matrices_and_merges_to_the_same_scores(tiny_bert):
    model = build(tiny_bert, LoRA(r=4, alpha=8, dropout=0.0))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in name or name.startswith("head.") for name in names)
    # two layers x (query, value) x (A: r x 32, B: 32 x r)
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert lora == 2 * 2 * (4 * 32 + 32 * 4)
    # B = 0 at the start: the adapted encoder starts as the pretrained function
    plain = build(tiny_bert, Full()).eval()
    batch = text_batch(tiny_bert)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch), plain(batch), rtol=0, atol=1e-6)
    model.train()
    moved = changed(model, one_step(model, tiny_bert))
    assert moved and all("lora_" in name or name.startswith("head.") for name in moved)
    model.eval()
    with torch.no_grad():
        adapted = model(batch)
        assert not torch.allclose(adapted, plain(batch))  # the step changed the function
        model.merge_adapters()
        assert not any("lora_" in name for name, _ in model.named_parameters())
        torch.testing.assert_close(model(batch), adapted, rtol=1e-5, atol=1e-6)


def test_ia3_trains_only_its_vectors_and_merges(tiny_bert):
    model = build(tiny_bert, IA3())
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all("ia3_" in name or name.startswith("head.") for name in names)
    one_step(model, tiny_bert)
    model.eval()
    batch = text_batch(tiny_bert)
    with torch.no_grad():
        adapted = model(batch)
        model.merge_adapters()
        torch.testing.assert_close(model(batch), adapted, rtol=1e-5, atol=1e-6)


def test_bottleneck_adapters_start_as_the_pretrained_encoder_and_train_alone(tiny_bert):
    model = build(tiny_bert, Adapter(size=4))
    plain = build(tiny_bert, Full()).eval()
    batch = text_batch(tiny_bert)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(batch), plain(batch), rtol=0, atol=1e-6
        )  # up = 0 at the start
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".down." in n or ".up." in n}
    # two layers x two adapters x (down 32x4 + 4, up 4x32 + 32)
    assert sum(p.numel() for n, p in model.named_parameters() if n in adapters) == 2 * 2 * (
        32 * 4 + 4 + 4 * 32 + 32
    )
    assert trainable - adapters == {n for n in trainable if "LayerNorm" in n or n.startswith("head.")}
    assert not any("embeddings" in n for n in trainable)
    model.train()
    moved = changed(model, one_step(model, tiny_bert))
    assert moved and moved <= trainable  # frozen weights are bit-identical after the step
    with pytest.raises(ValueError, match=r"model.net.finetune.size: expected an integer >= 1"):
        Adapter(size=0)


def test_policy_errors_name_the_key(tiny_bert):
    with pytest.raises(ValueError, match=r"model.net.finetune.k: expected an integer >= 0"):
        TopK(-1)
    with pytest.raises(ValueError, match=r"model.net.finetune.r: expected an integer >= 1"):
        LoRA(r=0)
    with pytest.raises(ValueError, match=r"top_k: Linear has no transformer layer stack"):
        TopK(1).apply(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("policy", ["frozen", "top_k", "lora", "ia3", "adapter"])
def test_config_group_selects_the_policy_and_the_run_prints_the_counts(policy, make_cfg, tmp_path):
    cfg = make_cfg(
        [*model_overrides("bert_cross_encoder", tmp_path), f"model/finetune={policy}", "debug=fast_dev_run"]
    )
    results = train(cfg)
    trainable, total = results["training"]["trainable_parameters"], results["training"]["total_parameters"]
    assert 0 < trainable < total
    full = train(
        make_cfg([*model_overrides("bert_cross_encoder", tmp_path), "debug=fast_dev_run"], tmp_path / "f")
    )
    assert full["training"]["trainable_parameters"] == full["training"]["total_parameters"]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_bert):
    grads = {}
    for flag in (False, True):
        model = build(tiny_bert, Full(gradient_checkpointing=flag)).train()
        assert model.encoder.is_gradient_checkpointing == flag
        batch = text_batch(tiny_bert)
        torch.manual_seed(1)  # the same dropout masks; checkpointing replays them when it recomputes
        F.binary_cross_entropy_with_logits(model(batch), batch.labels["click"]).backward()
        grads[flag] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)
