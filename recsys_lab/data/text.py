"""Text inputs for language-model recommenders: tokenize every item once, then assemble inputs per batch.

Tokenizing a pair per row per step is where text recommenders lose their time; here the DataModule tokenizes each
item's text once (`tokenize_texts`) and every batch is assembled from that table with tensor ops only.
Cross-encoders read (history, candidate) pairs (`build_pair_inputs`: gather the tokens of the history items and
the candidate into one wide [B, W] matrix with a validity mask, then compact the valid tokens to the left and
cut/pad to `max_length`); text towers read one item's text (`item_inputs`) or the user's recent titles alone
(`build_pair_inputs` without candidates), from the per-code table `ItemTokens` that the schema carries.
`trim_padding` then cuts a batch to its longest row (dynamic padding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import chain

import torch
from torch import Tensor

from recsys_lab.data.batch import Seq


@dataclass
class TextSpec:
    """What a language model needs from the data: its tokenizer and the pair layout (config: `data.text`).

    Args:
        pretrained: tokenizer folder (or hub id) — the cross-encoder's own weights folder.
        max_length: tokens per (history, candidate) pair.
        max_item_tokens: tokens kept per item text.
        max_history_items: most recent history items whose texts are put in front of the candidate.
        allow_download: let transformers fetch a hub id (off: nothing waits on a network).
        pairs: build the cross-encoder's (history, candidate) inputs into every batch; text towers, which read
            the per-item token table from the schema (`ItemTokens`), set it off.
    """

    pretrained: str
    max_length: int = 128
    max_item_tokens: int = 24
    max_history_items: int = 5
    allow_download: bool = False
    pairs: bool = True


@dataclass
class ItemTokens:
    """Every item code's text as token ids without special tokens (code 0, unknown, is empty): what text
    towers encode. Carried by the schema (`Schema.item_text`) when `data.text` is set.

    tokens: int64 [V, T] right-padded with pad_id; lengths: int64 [V]; cls_id / sep_id / pad_id: the
    tokenizer's special tokens; history_sep_id: the token put between the titles of a history (";" when the
    tokenizer has it as one token, else [SEP]).
    """

    tokens: Tensor
    lengths: Tensor
    cls_id: int
    sep_id: int
    pad_id: int
    history_sep_id: int


@dataclass
class TextTables:
    """Item texts tokenized once (indexed by item entity); pairs are assembled per batch with tensor ops.

    item_tokens: int64 [N, T_item] right-padded; item_lengths: int64 [N]; the special token ids and the pair
    layout come from the `TextSpec`.
    """

    item_tokens: Tensor
    item_lengths: Tensor
    cls_id: int
    sep_id: int
    pad_id: int
    max_length: int
    max_history_items: int
    history_sep_id: int | None = None
    pairs: bool = True

    @classmethod
    def tokenize(cls, spec: TextSpec, texts: list[str]) -> TextTables:
        """Load the spec's tokenizer (local files unless `allow_download`) and tokenize every item text."""
        tokenizer = load_tokenizer(spec)
        tokens, lengths = tokenize_texts(tokenizer, texts, spec.max_item_tokens)
        semicolon = tokenizer(";", add_special_tokens=False)["input_ids"]
        return cls(
            item_tokens=tokens,
            item_lengths=lengths,
            cls_id=tokenizer.cls_token_id,
            sep_id=tokenizer.sep_token_id,
            pad_id=tokenizer.pad_token_id,
            max_length=spec.max_length,
            max_history_items=spec.max_history_items,
            history_sep_id=semicolon[0] if len(semicolon) == 1 else tokenizer.sep_token_id,
            pairs=spec.pairs,
        )

    def by_code(self, item_entity: Tensor) -> ItemTokens:
        """The table re-indexed by item code (`item_entity`: int64 [V], the entity of each code); code 0 is
        unknown and gets the empty text."""
        lengths = self.item_lengths[item_entity].clone()
        lengths[0] = 0
        sep = self.history_sep_id if self.history_sep_id is not None else self.sep_id
        return ItemTokens(self.item_tokens[item_entity], lengths, self.cls_id, self.sep_id, self.pad_id, sep)

    def pair_inputs(self, history: Seq, items: Tensor) -> dict[str, Tensor]:
        """Cross-encoder inputs for B (history item entities [B, L], candidate entity [B]) pairs."""
        return build_pair_inputs(
            self.item_tokens,
            self.item_lengths,
            history,
            items,
            cls_id=self.cls_id,
            sep_id=self.sep_id,
            pad_id=self.pad_id,
            max_length=self.max_length,
            max_history_items=self.max_history_items,
        )

    def to(self, device: torch.device | str) -> TextTables:
        return replace(
            self, item_tokens=self.item_tokens.to(device), item_lengths=self.item_lengths.to(device)
        )


def load_tokenizer(spec: TextSpec):
    """The spec's Hugging Face tokenizer, from local files unless `allow_download`."""
    from transformers import AutoTokenizer

    from recsys_lab.utils.pretrained import resolve_pretrained

    path = resolve_pretrained(spec.pretrained, allow_download=spec.allow_download)
    return AutoTokenizer.from_pretrained(path, local_files_only=not spec.allow_download)


def item_inputs(table: ItemTokens, codes: Tensor) -> dict[str, Tensor]:
    """Encoder inputs "[CLS] text [SEP]" of item codes [N]: "input_ids" and "attention_mask" int64 [N, T + 2],
    right-padded (cut them with `trim_padding`)."""
    tokens, lengths = table.tokens[codes], table.lengths[codes]  # (N, T), (N,)
    n = len(codes)
    ids = torch.cat(
        [tokens.new_full((n, 1), table.cls_id), tokens, tokens.new_full((n, 1), table.pad_id)], dim=1
    )  # (N, T + 2)
    ids.scatter_(1, (lengths + 1).unsqueeze(1), table.sep_id)  # [SEP] right after the text
    mask = torch.arange(ids.shape[1], device=ids.device) < (lengths + 2).unsqueeze(1)  # (N, T + 2)
    return {"input_ids": torch.where(mask, ids, table.pad_id), "attention_mask": mask.long()}


def history_inputs(table: ItemTokens, history: Seq, max_items: int, max_length: int) -> dict[str, Tensor]:
    """Encoder inputs "[CLS] title ; title ; ... [SEP]" of the `max_items` most recent history items (codes
    [B, L] with lengths), most recent first, cut to `max_length` tokens from the oldest end."""
    return build_pair_inputs(
        table.tokens,
        table.lengths,
        history,
        None,
        cls_id=table.cls_id,
        sep_id=table.sep_id,
        pad_id=table.pad_id,
        max_length=max_length,
        max_history_items=max_items,
        history_sep_id=table.history_sep_id,
    )


def trim_padding(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Dynamic padding: cut right-padded inputs to the longest row of the batch (at least one column)."""
    width = max(int(inputs["attention_mask"].sum(1).max()) if len(inputs["attention_mask"]) else 1, 1)
    return {key: value[:, :width] for key, value in inputs.items()}


def tokenize_texts(tokenizer, texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
    """Token ids of each text without special tokens, truncated to `max_tokens`.

    Args:
        tokenizer: a Hugging Face fast tokenizer (one batched call for all texts).
        texts: N strings (an empty string gives length 0).
        max_tokens: T, the width of the table.

    Returns:
        ids int64 [N, T] right-padded with `tokenizer.pad_token_id`, and lengths int64 [N] (<= T).
    """
    if max_tokens < 1:
        raise ValueError(f"tokenize_texts: max_tokens must be >= 1, got {max_tokens}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError(f"tokenize_texts: tokenizer {type(tokenizer).__name__} has no pad token")
    texts = list(texts)
    if not texts:
        return torch.full((0, max_tokens), pad_id, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    # Pad ourselves rather than through the tokenizer: the result then never depends on its padding_side.
    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        truncation=True,
        max_length=max_tokens,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)  # (N,)
    flat = torch.tensor(list(chain.from_iterable(encoded)), dtype=torch.long)  # (sum lengths,)
    ids = torch.full((len(texts), max_tokens), pad_id, dtype=torch.long)  # (N, T)
    ids[torch.arange(max_tokens).unsqueeze(0) < lengths.unsqueeze(1)] = flat  # row-major order = text order
    return ids, lengths


def build_pair_inputs(
    item_tokens: Tensor,
    item_lengths: Tensor,
    history: Seq,
    candidates: Tensor | None,
    *,
    cls_id: int,
    sep_id: int,
    pad_id: int,
    max_length: int,
    max_history_items: int,
    history_sep_id: int | None = None,
) -> dict[str, Tensor]:
    """Cross-encoder inputs "[CLS] history [SEP] candidate [SEP]" for B (user, candidate) pairs; with
    `candidates=None`, the history alone: "[CLS] history [SEP]" (a text tower's query).

    The history segment holds the token ids of the user's `max_history_items` most recent items, most recent
    first, concatenated; with `history_sep_id` set, that token follows each history item (e.g. the id of ";"),
    otherwise titles are joined with nothing in between. Truncation keeps the candidate whole (it is cut only if
    it alone exceeds `max_length - 3`) and drops history tokens from the oldest end, so the most recent items
    survive. Positions of `history` beyond its lengths contribute nothing.

    Args:
        item_tokens: int64 [N_items, T] token ids per item, right-padded (from `tokenize_texts`).
        item_lengths: int64 [N_items] valid tokens per item.
        history: item ids [B, L], right-padded, most recent item at position lengths - 1; lengths [B].
        candidates: int64 [B] candidate item ids, or None (no candidate segment).
        cls_id / sep_id / pad_id: the tokenizer's special token ids.
        max_length: output width (>= 3: [CLS] and two [SEP] always fit; >= 2 without candidates).
        max_history_items: most recent history items to read (0 reads none).
        history_sep_id: optional token appended after every history item.

    Returns:
        "input_ids", "attention_mask", "token_type_ids": int64 [B, max_length], right-padded; token_type_ids is
        0 for [CLS], the history and the first [SEP], 1 for the candidate and the last [SEP].
    """
    pair = candidates is not None
    if max_length < 2 + pair:
        raise ValueError(
            f"build_pair_inputs: max_length must be >= {2 + pair} ([CLS] + {1 + pair} x [SEP]), got {max_length}"
        )
    if max_history_items < 0:
        raise ValueError(f"build_pair_inputs: max_history_items must be >= 0, got {max_history_items}")
    device = item_tokens.device
    item_tokens = item_tokens.long()
    batch_size, history_len = history.ids.shape
    width = item_tokens.shape[1]  # T
    budget = max_length - 2 - pair  # tokens left for history + candidate after [CLS], [SEP] (, [SEP])

    # Candidate segment: kept whole unless it alone exceeds the budget (empty without candidates).
    if pair:
        cand_tokens = item_tokens[candidates]  # (B, T)
        cand_len = item_lengths[candidates].clamp(max=budget)  # (B,)
    else:
        width = 0
        cand_tokens = item_tokens.new_zeros(batch_size, 0)
        cand_len = torch.zeros(batch_size, dtype=torch.long, device=device)
    cand_valid = torch.arange(width, device=device).unsqueeze(0) < cand_len.unsqueeze(1)  # (B, T)

    # History segment, most recent first.
    hist_items, item_valid = recent_items(history, max_history_items)  # (B, K)
    num_items = hist_items.shape[1]  # K
    hist_tokens = item_tokens[hist_items]  # (B, K, T)
    hist_len = torch.where(item_valid, item_lengths[hist_items], 0)  # (B, K)
    if history_sep_id is not None:
        hist_tokens = torch.cat(
            [hist_tokens, hist_tokens.new_full((batch_size, num_items, 1), pad_id)], dim=2
        )
        hist_tokens.scatter_(2, hist_len.unsqueeze(2), history_sep_id)  # separator right after each title
        hist_len = hist_len + item_valid.long()
    item_width = hist_tokens.shape[2]  # T or T + 1
    hist_valid = torch.arange(item_width, device=device) < hist_len.unsqueeze(2)  # (B, K, T')
    hist_tokens = hist_tokens.reshape(batch_size, num_items * item_width)  # (B, K*T')
    hist_valid = hist_valid.reshape(batch_size, num_items * item_width)  # (B, K*T')
    # Recent-first order means the oldest tokens come last: keep the first (budget - candidate) valid ones.
    hist_budget = (budget - cand_len).unsqueeze(1)  # (B, 1)
    hist_valid = hist_valid & (hist_valid.cumsum(1) <= hist_budget)

    # Wide matrix [CLS] history [SEP] candidate [SEP], padded with invalid columns to at least max_length.
    col = torch.ones(batch_size, 1, dtype=torch.long, device=device)
    last = col[:, :pair]  # the closing [SEP] of the candidate (none without candidates)
    extra = max(0, max_length - (2 + pair + num_items * item_width + width))
    tokens = torch.cat(
        [
            col * cls_id,
            hist_tokens,
            col * sep_id,
            cand_tokens,
            last * sep_id,
            col.new_full((batch_size, extra), pad_id),
        ],
        dim=1,
    )  # (B, W)
    ones = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
    valid = torch.cat(
        [ones, hist_valid, ones, cand_valid, ones[:, :pair], ones.new_zeros(batch_size, extra)], dim=1
    )  # (B, W)
    segment_b = torch.zeros(tokens.shape[1], dtype=torch.long, device=device)  # (W,)
    if pair:
        segment_b[2 + num_items * item_width : 3 + num_items * item_width + width] = (
            1  # candidate + last [SEP]
        )
    types = segment_b.expand(batch_size, -1)  # (B, W)

    order, mask = compact(valid, max_length)  # (B, max_length)
    input_ids = torch.where(mask, tokens.gather(1, order), pad_id)
    token_type_ids = torch.where(mask, types.gather(1, order), 0)
    return {"input_ids": input_ids, "attention_mask": mask.long(), "token_type_ids": token_type_ids}


def recent_items(history: Seq, k: int) -> tuple[Tensor, Tensor]:
    """The k most recent items of right-padded histories (ids [B, L], the most recent at lengths - 1), most
    recent first: ids int64 [B, K] (K = min(k, L); 0 in the slots past a history's length, which may hold any
    id, even one out of range) and their validity bool [B, K]."""
    K = min(k, history.ids.shape[1])
    j = torch.arange(K, device=history.ids.device)
    valid = j.unsqueeze(0) < history.lengths.clamp(max=K).unsqueeze(1)  # (B, K)
    positions = (history.lengths.unsqueeze(1) - 1 - j.unsqueeze(0)).clamp(min=0)  # the j-th most recent
    return torch.where(valid, history.ids.gather(1, positions), 0), valid


def compact(valid: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Where the valid tokens of each row of a [B, W] validity mask go when moved left in their order: the
    gather index [B, width] and the mask of the result (width: the longest row when None). A stable sort on
    "is padding" rather than a scatter keeps this deterministic on GPUs (torch.use_deterministic_algorithms)."""
    if width is None:
        width = int(valid.sum(1).max()) if len(valid) else 0
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return order, valid.gather(1, order)
