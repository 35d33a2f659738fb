"""An LLM as ranker in the style of TALLRec: a causal language model reads a prompt listing the user's recent
items and the candidate, and its next-token log-odds of "Yes" over "No" is the score.

The prompt is built from token ids, not strings, per batch: every item text is tokenized once at construction
(with the LM's own tokenizer, from `schema.item_texts`), and so is every fixed piece of the template (with the
tokenizer's chat template around it, when it has one). A batch then gathers the titles of each row's recent
history and candidate and compacts "prefix, titles, middle, candidate, suffix" to the left with tensor ops.
Only the hidden state at each prompt's last token is read, against one direction initialised from the LM's own
output embeddings (w_Yes - w_No): at the start the score is exactly the LM's zero-shot log-odds, and training
(binary cross-entropy under `CTRTask`) adapts the LM through `model/finetune` (LoRA by default, as in TALLRec)
and that direction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch, Seq
from recsys_lab.data.schema import Schema
from recsys_lab.data.store import history_feature
from recsys_lab.data.text import compact, recent_items, tokenize_texts
from recsys_lab.modules.finetune import FinetunePolicy, Full
from recsys_lab.utils.pretrained import resolve_pretrained

HISTORY, ITEM = "{history}", "{item}"
DEFAULT_TEMPLATE = (
    "Given the items the user liked, most recent first, answer whether the user will like the target item "
    'with "Yes" or "No".\nThe user liked: {history}\nWill the user like {item}?'
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMRanker(nn.Module):
    """TALLRec (Bao et al., RecSys 2023, arXiv:2305.00447): instruction-tuned causal LM + LoRA as a yes/no
    recommender. Differences from the paper, on purpose: the score is the next-token log-odds of Yes over No
    (the paper's softmax over the two tokens ranks items the same), read by a trainable direction rather than
    by the whole vocabulary head; the loss is binary cross-entropy on that score rather than language-model loss
    on the answer; the history is the user's liked items (the lab's histories hold positives).

    Args:
        schema: needs `schema.item_texts` (a source with an item text column) and the history `hist_item_id`.
        pretrained: a local causal-LM folder (or a folder holding `gguf_file`), e.g. `${smollm2_path:}`.
        gguf_file: a GGUF file in that folder: config, tokenizer and weights in one (needs `gguf`; quantised
            weights are dequantised to `dtype`).
        sha256: expected sha256 of the weights file (model.safetensors or the GGUF file).
        allow_download: let transformers fetch a hub id.
        template: the user message, with "{history}" before "{item}" (each exactly once).
        chat_template: wrap the message in the tokenizer's chat template (instruct models) when it has one.
        history_separator: text between two history titles.
        answers: the positive and negative answer words; each must be one token of the tokenizer.
        max_history_items: K, most recent history items listed.
        max_item_tokens: tokens kept per item text.
        max_length: tokens per prompt; the oldest history titles are cut first.
        dtype: "float32" (CPU) or "bfloat16" / "float16" (GPU).
        finetune: what of the LM trains (`model/finetune`); None = Full.

    Input: batch.sparse["item_id"] [B], batch.seq["hist_item_id"] [B, L]. Output: logits [B] (log-odds of Yes).
    """

    def __init__(
        self,
        schema: Schema,
        pretrained: str,
        gguf_file: str | None = None,
        sha256: str | None = None,
        allow_download: bool = False,
        template: str = DEFAULT_TEMPLATE,
        chat_template: bool = True,
        history_separator: str = ";",
        answers: tuple[str, str] | list[str] = ("Yes", "No"),
        max_history_items: int = 10,
        max_item_tokens: int = 24,
        max_length: int = 320,
        dtype: str = "float32",
        finetune: FinetunePolicy | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if schema.item_texts is None:
            raise ValueError(
                "LLMRanker needs item texts (schema.item_texts): use a source with an item text column"
            )
        if dtype not in DTYPES:
            raise ValueError(f"model.net.dtype='{dtype}': expected one of {sorted(DTYPES)}")
        self.item_id, self.history = schema.item_id, history_feature(schema.item_id)
        self.max_history_items, self.max_length = max_history_items, max_length
        folder = resolve_pretrained(
            pretrained, sha256=sha256, allow_download=allow_download, gguf_file=gguf_file
        )
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=not allow_download, **extra)
        lm = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=not allow_download, dtype=DTYPES[dtype], **extra
        )
        lm.train()
        if tokenizer.pad_token is None:  # causal LMs often have none; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id

        # fixed pieces of the prompt, tokenized once
        prefix, middle, suffix = self._split_template(tokenizer, template, chat_template)
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        bos = tokenizer.bos_token_id
        prefix_ids = encode(prefix)
        if bos is not None and getattr(tokenizer, "add_bos_token", False) and prefix_ids[:1] != [bos]:
            prefix_ids = [bos, *prefix_ids]
        for name, ids in (("prefix", prefix_ids), ("middle", encode(middle)), ("suffix", encode(suffix))):
            self.register_buffer(name, torch.tensor(ids, dtype=torch.long), persistent=False)
        self.register_buffer(
            "separator", torch.tensor(encode(history_separator), dtype=torch.long), persistent=False
        )
        # every item text once, with a leading space as it reads after a separator or a word
        texts = [" " + t if t else "" for t in schema.item_texts]
        tokens, lengths = tokenize_texts(tokenizer, texts, max_item_tokens)
        self.register_buffer("item_tokens", tokens, persistent=False)  # (V, T)
        self.register_buffer("item_lengths", lengths, persistent=False)  # (V,)

        # the answer direction: the LM's output embeddings of the two answer tokens
        ids = [encode(word) for word in answers]
        if len(answers) != 2 or any(len(i) != 1 for i in ids):
            raise ValueError(
                f"model.net.answers={list(answers)}: expected two words that are one token each; the tokenizer "
                f"splits them into {ids}"
            )
        head = lm.get_output_embeddings().weight.detach()  # (vocab, H)
        self.answer = nn.Parameter((head[ids[0][0]] - head[ids[1][0]]).float().clone())  # (H,)
        self.bias = nn.Parameter(torch.zeros(()))
        decoder = lm.base_model  # the transformer without its vocabulary head
        self.finetune = finetune if finetune is not None else Full()
        self.decoder = self.finetune.apply(decoder)

    @staticmethod
    def _split_template(tokenizer, template: str, chat: bool) -> tuple[str, str, str]:
        if (
            template.count(HISTORY) != 1
            or template.count(ITEM) != 1
            or template.index(HISTORY) > template.index(ITEM)
        ):
            raise ValueError(
                f"model.net.template must hold {HISTORY} then {ITEM}, each exactly once; got {template!r}"
            )
        if chat and getattr(tokenizer, "chat_template", None):
            template = tokenizer.apply_chat_template(
                [{"role": "user", "content": template}], tokenize=False, add_generation_prompt=True
            )
        prefix, rest = template.split(HISTORY)
        middle, suffix = rest.split(ITEM)
        return prefix, middle, suffix

    # ---- prompts ------------------------------------------------------------------------------------------
    def prompts(self, history: Seq, candidates: Tensor) -> dict[str, Tensor]:
        """Token ids of B prompts, right-padded to the longest: "input_ids" int64 [B, T], "attention_mask".

        history: item codes [B, L], most recent at lengths - 1; candidates: item codes [B]."""
        device = candidates.device
        items, item_valid = recent_items(history, self.max_history_items)  # (B, K), most recent first
        B, K = items.shape
        T = self.item_tokens.shape[1]
        k = torch.arange(K, device=device)
        # each listed title followed by the separator, except the last one listed
        S = len(self.separator)
        title_valid = torch.arange(T, device=device) < torch.where(
            item_valid, self.item_lengths[items], 0
        ).unsqueeze(2)
        n_listed = item_valid.sum(1, keepdim=True)  # (B, 1)
        sep_valid = (item_valid & (k.unsqueeze(0) < n_listed - 1)).unsqueeze(2).expand(B, K, S)
        hist_tokens = torch.cat([self.item_tokens[items], self.separator.expand(B, K, S)], dim=2).reshape(
            B, -1
        )
        hist_valid = torch.cat([title_valid, sep_valid], dim=2).reshape(B, -1)  # (B, K * (T + S))
        cand_tokens = self.item_tokens[candidates]  # (B, T)
        fixed = len(self.prefix) + len(self.middle) + len(self.suffix)
        cand_len = self.item_lengths[candidates].clamp(max=max(self.max_length - fixed, 0))
        cand_valid = torch.arange(T, device=device) < cand_len.unsqueeze(1)
        # most recent first, so the tokens beyond the budget are the oldest
        budget = (self.max_length - fixed - cand_len).unsqueeze(1)  # (B, 1)
        hist_valid = hist_valid & (hist_valid.cumsum(1) <= budget)

        def const(ids: Tensor) -> tuple[Tensor, Tensor]:
            return ids.expand(B, -1), torch.ones(B, len(ids), dtype=torch.bool, device=device)

        parts = [const(self.prefix), (hist_tokens, hist_valid), const(self.middle), (cand_tokens, cand_valid)]
        parts.append(const(self.suffix))
        tokens = torch.cat([t for t, _ in parts], dim=1)  # (B, W)
        valid = torch.cat([v for _, v in parts], dim=1)  # (B, W)
        order, mask = compact(valid)  # valid tokens moved left, right-padded to the longest prompt
        return {
            "input_ids": torch.where(mask, tokens.gather(1, order), self.pad_id),
            "attention_mask": mask.long(),
        }

    # ---- scoring ----------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> Tensor:
        inputs = self.prompts(batch.seq[self.history], batch.sparse[self.item_id])
        hidden = self.decoder(**inputs).last_hidden_state  # (B, T, H)
        last = inputs["attention_mask"].sum(1) - 1  # (B,) right padding: the prompt's last token
        state = hidden[torch.arange(len(last), device=last.device), last].float()  # (B, H)
        return state @ self.answer + self.bias  # (B,) log-odds of Yes over No

    def merge_adapters(self) -> None:
        """Fold LoRA / IA3 weights into the LM (export, serving): the same scores, no adapter."""
        self.decoder = self.finetune.merge(self.decoder)
