"""The text two-tower (recsys_lab/models/two_tower_text.py): its text inputs, fine-tuning policies, encoding cache
and zero-shot retrieval. Its cold-start evaluation is in test_ranking_evaluation.py and test_protocols.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from recsys_lab.data.batch import Batch, Seq
from recsys_lab.data.text import ItemTokens, history_inputs, item_inputs, tokenize_texts, trim_padding
from recsys_lab.models.two_tower_text import TextTwoTower
from recsys_lab.modules.finetune import Frozen, LoRA, TopK, parameter_counts
from recsys_lab.modules.losses import SampledSoftmaxLoss
from recsys_lab.tasks.retrieval import RetrievalTask
from recsys_lab.utils.testing import random_batch, tiny_schema
from recsys_lab.utils.testing_text import _fast_bert_tokenizer, build_tiny_bert, tiny_item_tokens


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture
def schema():
    return tiny_item_tokens(tiny_schema(), seed=0)


def table(rows: list[list[int]]) -> ItemTokens:
    """An ItemTokens of hand-written token rows (ids >= 10), cls=2, sep=3, pad=0, history separator 9."""
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return ItemTokens(
        tokens, torch.tensor([len(r) for r in rows]), cls_id=2, sep_id=3, pad_id=0, history_sep_id=9
    )


# ---- text inputs ------------------------------------------------------------------------------------------
def test_item_inputs_wrap_each_text_and_trim_to_the_longest():
    t = table([[], [11, 12, 13], [14]])
    inputs = item_inputs(t, torch.tensor([2, 1, 0]))
    assert inputs["input_ids"].tolist() == [[2, 14, 3, 0, 0], [2, 11, 12, 13, 3], [2, 3, 0, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    trimmed = trim_padding(item_inputs(t, torch.tensor([2, 0])))  # dynamic padding: longest row is 3
    assert trimmed["input_ids"].tolist() == [[2, 14, 3], [2, 3, 0]]


def test_history_inputs_put_the_most_recent_title_first_and_cut_the_oldest():
    t = table([[], [11, 12], [13], [14, 15, 16]])
    history = Seq(torch.tensor([[1, 2, 3], [3, 0, 0]]), torch.tensor([3, 1]))  # most recent at lengths - 1
    inputs = history_inputs(t, history, max_items=3, max_length=20)
    valid = inputs["attention_mask"].bool()
    assert inputs["input_ids"][0][valid[0]].tolist() == [2, 14, 15, 16, 9, 13, 9, 11, 12, 9, 3]
    assert inputs["input_ids"][1][valid[1]].tolist() == [2, 14, 15, 16, 9, 3]
    assert (inputs["token_type_ids"] == 0).all()  # one segment: no candidate
    short = history_inputs(t, history, max_items=3, max_length=8)  # 6 tokens left: the oldest title goes
    assert short["input_ids"][0].tolist() == [2, 14, 15, 16, 9, 13, 9, 3]


# ---- the model ---------------------------------------------------------------------------------------------
def test_missing_item_texts_name_data_text(bert):
    with pytest.raises(ValueError, match="data.text"):
        TextTwoTower(tiny_schema(), pretrained=bert)


def test_bad_options_name_their_key(bert, schema):
    with pytest.raises(ValueError, match="model.net.pooling"):
        TextTwoTower(schema, pretrained=bert, pooling="max")
    with pytest.raises(ValueError, match="model.net.user_text"):
        TextTwoTower(schema, pretrained=bert, user_text="bio")
    with pytest.raises(ValueError, match="model.net.output_dim"):
        TextTwoTower(schema, pretrained=bert, output_dim=None, id_embeddings=True)


def make_task(model, schema, lr=0.05) -> RetrievalTask:
    return RetrievalTask(
        model,
        schema,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr),
        loss=SampledSoftmaxLoss(temperature=0.1),
    )


def one_step(task: RetrievalTask, batch: Batch) -> None:
    optimizer = task.configure_optimizers()
    task.train()
    loss = task.loss(
        task.net.encode_query(batch), task.net.encode_item(batch), batch.sparse["item_id"], task.log_q
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize(
    "policy, encoder_trains",
    [(Frozen(), set()), (TopK(k=1), {"encoder.encoder.layer.1."}), (LoRA(r=2, alpha=4), {"lora_"})],
)
def test_policies_train_what_they_say_and_leave_the_rest_bit_identical(bert, schema, policy, encoder_trains):
    torch.manual_seed(0)
    model = TextTwoTower(schema, pretrained=bert, output_dim=6, finetune=policy, user_text="titles")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if n.startswith(("query_head", "item_head", "user_ids", "item_ids"))}
    assert heads == {f"{m}.{w}" for m in ("query_head", "item_head") for w in ("weight", "bias")} | {
        "user_ids.weight",
        "item_ids.weight",
    }
    in_encoder = trainable - heads
    assert all(any(key in n for key in encoder_trains) for n in in_encoder)
    assert bool(in_encoder) == bool(encoder_trains)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_step(make_task(model, schema), random_batch(schema))
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        if n not in trainable:
            assert not moved, f"frozen {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in in_encoder) == bool(
        encoder_trains
    )
    counted, total = parameter_counts(model)
    assert counted == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert total == sum(p.numel() for p in model.parameters())


def test_pretrained_weights_get_their_own_learning_rate(bert, schema):
    model = TextTwoTower(
        schema, pretrained=bert, output_dim=6, finetune=LoRA(r=2, alpha=4), pretrained_lr=1e-5
    )
    assert len(model.param_groups()) == 1  # LoRA: no pretrained weight trains, adapters are new weights
    full = TextTwoTower(schema, pretrained=bert, output_dim=6, pretrained_lr=1e-5)
    optimizer = make_task(full, schema, lr=0.1).configure_optimizers()
    slow, fast = optimizer.param_groups
    assert slow["lr"] == 1e-5 and fast["lr"] == 0.1
    encoder = {id(p) for p in full.encoder.parameters()}
    assert {id(p) for p in slow["params"]} == encoder
    assert not encoder & {id(p) for p in fast["params"]}


def test_nothing_to_train_is_a_clear_error(bert, schema):
    model = TextTwoTower(schema, pretrained=bert, output_dim=None, id_embeddings=False, finetune=Frozen())
    with pytest.raises(ValueError, match="train=false"):
        make_task(model, schema).configure_optimizers()


def test_lora_merge_gives_the_same_scores(bert, schema):
    torch.manual_seed(0)
    model = TextTwoTower(
        schema, pretrained=bert, output_dim=6, finetune=LoRA(r=2, alpha=4), user_text="titles"
    )
    one_step(make_task(model, schema, lr=0.5), random_batch(schema))  # B != 0: the adapter changes the scores
    batch = random_batch(schema, seed=3)
    model.eval()
    with torch.no_grad():
        before = model(batch)
        model.merge_adapters()
        after = model(batch)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_item_cache_is_refreshed_exactly_when_the_encoder_changed(bert, schema):
    torch.manual_seed(0)
    model = TextTwoTower(schema, pretrained=bert, output_dim=6)
    catalogue = Batch(sparse={"item_id": torch.arange(schema.num_items)})
    model.eval()
    with torch.no_grad():
        first = model.encode_item(catalogue)
        model.encode_item(catalogue)
    assert model.cache_fills == 1  # evaluated twice, encoded once
    # the cache holds what the encoder computes now, in eval mode
    direct = model.item_head(model._pool(item_inputs(model._table(), torch.arange(schema.num_items))))
    direct = torch.nn.functional.normalize(
        direct
        + model.item_ids(
            torch.where(
                model.unknown_ids.trained[torch.arange(schema.num_items)], torch.arange(schema.num_items), 0
            )
        ),
        dim=-1,
    )
    torch.testing.assert_close(first, direct)

    # a training step of the heads only (encoder frozen for it) keeps the cache
    model.encoder.requires_grad_(False)
    one_step(make_task(model, schema), random_batch(schema))
    model.eval()
    with torch.no_grad():
        model.encode_item(catalogue)
    assert model.cache_fills == 1
    # a step that moves the encoder invalidates it: the next evaluation re-encodes, once
    model.encoder.requires_grad_(True)
    one_step(make_task(model, schema), random_batch(schema))
    model.eval()
    with torch.no_grad():
        changed = model.encode_item(catalogue)
        model.encode_item(catalogue)
    assert model.cache_fills == 2
    assert not torch.allclose(changed, first)
    # so does loading weights (a checkpoint), even identical ones
    model.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_item(catalogue), changed)
    assert model.cache_fills == 3


def test_a_frozen_encoder_trains_from_the_cache(bert, schema):
    model = TextTwoTower(schema, pretrained=bert, output_dim=6, finetune=Frozen(), user_text="items")
    for seed in range(3):
        one_step(make_task(model, schema), random_batch(schema, seed=seed))
    assert model.cache_fills == 1  # one catalogue pass for all training steps


# ---- zero-shot on a planted signal ----------------------------------------------------------------------------
def test_zero_shot_retrieval_beats_random_on_planted_topics(bert):
    """Items are texts about one of four topics; a user's history and target share a topic. Untrained, the
    pretrained (here: random) encoder's mean-pooled sentence vectors already put same-topic texts together."""
    topics = [["red", "shoe"], ["blue", "lamp"], ["green", "book"], ["black", "phone"]]
    texts = [""] + [
        " ".join(topics[i % 4] + [topics[i % 4][i % 2]]) + f" {chr(97 + i % 26)}" for i in range(40)
    ]
    tokenizer = _fast_bert_tokenizer(f"{bert}/vocab.txt")
    tokens, lengths = tokenize_texts(tokenizer, texts, max_tokens=8)
    lengths[0] = 0
    base = tiny_schema(num_items=41)
    schema = dataclasses.replace(base, item_text=ItemTokens(tokens, lengths, 2, 3, 0, 3))
    model = TextTwoTower(schema, pretrained=bert, output_dim=None, id_embeddings=False, finetune=Frozen())
    model.eval()
    g = torch.Generator().manual_seed(0)
    users = 200
    topic = torch.randint(0, 4, (users,), generator=g)
    members = torch.arange(1, 41).reshape(10, 4)  # item code c has topic (c - 1) % 4
    picks = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(users)])  # (U, 4) distinct rows
    items = members[picks, topic.unsqueeze(1)]  # (U, 4): 3 history items + 1 target, all of the user's topic
    history, target = items[:, :3], items[:, 3]
    batch = Batch(
        sparse={"user_id": torch.zeros(users, dtype=torch.long)},
        seq={"hist_item_id": Seq(history, torch.full((users,), 3))},
    )
    with torch.no_grad():
        scores = model.encode_query(batch) @ model.encode_item(Batch(sparse={"item_id": torch.arange(41)})).T
    scores[:, 0] = -math.inf
    scores.scatter_(1, history, -math.inf)  # seen items are masked, as in evaluation
    rank = (scores > scores.gather(1, target.unsqueeze(1))).sum(1)  # 0-based
    hit10 = (rank < 10).float().mean().item()
    assert hit10 > 0.5  # random: 10 / 37 = 0.27


# ---- through train.py -------------------------------------------------------------------------------------------
def test_zero_shot_experiment_trains_nothing_and_reports_the_cold_slice(make_cfg, tmp_path):
    from recsys_lab.train import train
    from tests.helpers import model_overrides

    cfg = make_cfg(
        [*model_overrides("two_tower_text", tmp_path), "experiment=text_zero_shot", "data.cold_items=true"]
    )
    results = train(cfg)
    assert results["training"]["trainable_parameters"] == 0 and not results["best_checkpoint"]
    metrics = results["metrics"]
    assert 0 <= metrics["test/cold/recall@50"] <= 1 and 0 <= metrics["test/recall@50"] <= 1
    assert 0 <= metrics["val/ndcg@10"] <= 1  # validated too: a sweep over zero-shot options selects on it
    assert results["protocol"]["cold_items"] is True and results["protocol"]["test_targets_cold_item"] > 0
