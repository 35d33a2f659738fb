"""Text two-tower retrieval: users and items as vectors of one pretrained language model, with optional id
embeddings fused in (the hybrid tower), and a zero-shot mode that trains nothing.

An item is the encoding of its text (the source's item text: title + category, brand / genres, year); a user is
the encoding of their recent history titles written as one text, or the mean of their recent items' encodings.
Both towers share the encoder, so a zero-shot user and item live in the same space; each side has its own
projection head. Score = cosine (the loss's temperature scales it), trained with in-batch softmax + logQ like
`TwoTower`.

Item encodings are cached: the encoder's pooled output for every item code is computed once (eval mode, no
gradient) and reused until the encoder's weights change. A frozen encoder (zero-shot, `model/finetune=frozen`)
therefore costs one catalogue pass per run and its training is a table lookup; a training encoder is re-encoded
on the batch's items with gradients, and the catalogue is re-encoded for evaluation only after it has trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.data.store import history_feature
from recsys_lab.data.text import ItemTokens, history_inputs, item_inputs, recent_items
from recsys_lab.modules.attention import masked_mean
from recsys_lab.modules.content import EncodingCache, encode_item_texts, pool_hidden
from recsys_lab.modules.embeddings import UnknownItemIds
from recsys_lab.modules.finetune import FinetunePolicy, Full
from recsys_lab.utils.pretrained import load_encoder

POOLINGS = ("mean", "cls")
USER_TEXTS = ("titles", "items")


class TextTwoTower(nn.Module):
    """Two towers over a BERT-family encoder (Reimers & Gurevych, "Sentence-BERT", EMNLP 2019, for the shared
    bi-encoder with mean pooling; Yi et al., RecSys 2019, for in-batch softmax + logQ), with id embeddings fused
    by addition (the hybrid tower) and id dropout for cold-start items (Volkovs et al., "DropoutNet",
    NeurIPS 2017).

    Args:
        schema: needs `schema.item_text` (set `data.text`, as conf/model/two_tower_text.yaml does) and, for the
            user side, the history feature `hist_item_id`.
        pretrained / sha256 / allow_download: the encoder folder (see `BERTCrossEncoder`).
        pooling: "mean" (masked mean of the last hidden states: how all-MiniLM-L6-v2 was trained) or "cls".
        output_dim: width of the projection heads (one per side); None = no heads, the pooled encoder output
            itself (the zero-shot sentence embedding).
        user_text: "titles" — the user is the encoding of the text "title ; title ; ..." of their
            `max_history_items` most recent items; "items" — the mean of those items' (cached) encodings.
        max_history_items: K, recent history items the user side reads.
        max_query_tokens: token budget of the "titles" text (oldest titles are cut first).
        id_embeddings: add a learned user-id and item-id embedding to the projected text (needs `output_dim`).
            Items without a training positive (cold-start items among them) use the "unknown" row 0, which
            `id_dropout` trains: during training each item id is replaced by 0 with that probability.
        id_dropout: probability of hiding an item id during training.
        finetune: what of the encoder trains (`model/finetune`); None = Full.
        pretrained_lr: learning rate of the pretrained encoder weights that train (Full, TopK, the adapters'
            layer norms); weights created here (heads, ids, LoRA / IA3 / adapter weights) use the optimizer's.
            None: one rate for all. Pretrained weights need a far smaller step than new ones.
        chunk: texts per encoder pass when filling the item cache.

    encode_query(batch) -> (B, D) and encode_item(item batch) -> (N, D), unit norm; forward(batch) -> (B,).
    """

    def __init__(
        self,
        schema: Schema,
        pretrained: str,
        sha256: str | None = None,
        allow_download: bool = False,
        pooling: str = "mean",
        output_dim: int | None = 64,
        user_text: str = "items",
        max_history_items: int = 5,
        max_query_tokens: int = 96,
        id_embeddings: bool = True,
        id_dropout: float = 0.1,
        finetune: FinetunePolicy | None = None,
        pretrained_lr: float | None = None,
        chunk: int = 256,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"model.net.pooling='{pooling}': expected one of {POOLINGS}")
        if user_text not in USER_TEXTS:
            raise ValueError(f"model.net.user_text='{user_text}': expected one of {USER_TEXTS}")
        if id_embeddings and output_dim is None:
            raise ValueError(
                "model.net.id_embeddings=true needs model.net.output_dim (the width ids embed to)"
            )
        if schema.item_text is None:
            raise ValueError(
                "TextTwoTower needs the item texts (schema.item_text): set data.text (conf/model/two_tower_text.yaml "
                "does) on a source with an item text column"
            )
        self.history = history_feature(schema.item_id)
        if self.history not in schema:
            raise ValueError(
                f"TextTwoTower reads the history feature '{self.history}', which the schema lacks"
            )
        self.item_id, self.user_id = schema.item_id, schema.user_id
        self.pooling, self.user_text = pooling, user_text
        self.max_history_items, self.max_query_tokens, self.chunk = max_history_items, max_query_tokens, chunk
        self.pretrained_lr = pretrained_lr

        encoder = load_encoder(pretrained, sha256=sha256, allow_download=allow_download)  # no pooler
        hidden = encoder.config.hidden_size  # H
        self.query_head = nn.Linear(hidden, output_dim) if output_dim is not None else nn.Identity()
        self.item_head = nn.Linear(hidden, output_dim) if output_dim is not None else nn.Identity()
        self.user_ids = self.item_ids = None
        if id_embeddings:
            self.user_ids = nn.Embedding(schema.num_users, output_dim)
            self.item_ids = nn.Embedding(schema.num_items, output_dim)
            for table in (self.user_ids, self.item_ids):
                nn.init.normal_(table.weight, std=0.01)  # small: the text carries the signal at the start
        # Items never a training positive have an untrained id row: they read row 0 ("unknown") instead.
        self.unknown_ids = UnknownItemIds(schema, id_dropout)
        tokens: ItemTokens = schema.item_text
        # the token table as buffers (they follow the model's device); the special ids beside them
        self.register_buffer("item_tokens", tokens.tokens, persistent=False)
        self.register_buffer("item_lengths", tokens.lengths, persistent=False)
        self.special_ids = (tokens.cls_id, tokens.sep_id, tokens.pad_id, tokens.history_sep_id)
        # last, so that the heads start the same whatever the policy draws
        self._pretrained = {id(p) for p in encoder.parameters()}
        self.finetune = finetune if finetune is not None else Full()
        self.encoder = self.finetune.apply(encoder)
        self._cache = EncodingCache()  # (V, H) pooled encoder output per item code

    @property
    def cache_fills(self) -> int:
        """How often the item cache was (re)computed: tested, and printed by nothing else."""
        return self._cache.fills

    def param_groups(self) -> list[dict]:
        """Optimizer groups: the training pretrained weights at `pretrained_lr`, everything else at the
        optimizer's rate (`RecTask.configure_optimizers` reads this)."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.pretrained_lr is None:
            return [{"params": trainable}]
        old = [p for p in trainable if id(p) in self._pretrained]
        new = [p for p in trainable if id(p) not in self._pretrained]
        return [g for g in ({"params": old, "lr": self.pretrained_lr}, {"params": new}) if g["params"]]

    # ---- the encoder ---------------------------------------------------------------------------------------
    def _table(self) -> ItemTokens:
        return ItemTokens(self.item_tokens, self.item_lengths, *self.special_ids)

    def _pool(self, inputs: dict[str, Tensor]) -> Tensor:
        """Encoder inputs [N, T] -> pooled last hidden states (N, H)."""
        return pool_hidden(self.encoder, inputs, self.pooling)

    def _encoder_trains(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.encoder.parameters())

    def _states(self, codes: Tensor) -> Tensor:
        """Pooled encoder output of item codes (any shape S) -> (*S, H): from the cache unless the encoder is
        training now (then with gradients, on these items only)."""
        flat = codes.reshape(-1)
        if self._encoder_trains():
            unique, inverse = torch.unique(flat, return_inverse=True)  # a popular item is encoded once
            states = self._pool(item_inputs(self._table(), unique))[inverse]
        else:
            states = self._cached_states()[flat]
        return states.reshape(*codes.shape, -1)

    def _cached_states(self) -> Tensor:
        """(V, H), recomputed only when a weight of the encoder changed (an optimizer step, a checkpoint load:
        both write the parameters in place, which bumps their version counters) or moved device."""
        return self._cache.get(
            self.encoder.parameters(),
            self.item_tokens.device,
            lambda: encode_item_texts(self.encoder, self._table(), self.pooling, self.chunk),  # (V, H)
        )

    # ---- the towers ----------------------------------------------------------------------------------------
    def _item_vectors(self, codes: Tensor) -> Tensor:
        """Item codes (any shape S) -> projected item vectors (*S, D) before normalisation."""
        vectors = self.item_head(self._states(codes))
        if self.item_ids is not None:
            vectors = vectors + self.item_ids(self.unknown_ids(codes))
        return vectors

    def encode_query(self, batch: Batch) -> Tensor:
        """User history (and user id) of B rows -> unit-norm query encodings (B, D)."""
        history = batch.seq[self.history]
        if self.user_text == "titles":
            inputs = history_inputs(self._table(), history, self.max_history_items, self.max_query_tokens)
            query = self.query_head(self._pool(inputs))  # (B, D)
        else:  # mean of the recent items' text encodings; an empty history gives the zero vector
            items, valid = recent_items(history, self.max_history_items)  # (B, K)
            query = self.query_head(masked_mean(self._states(items), valid))  # (B, D)
        if self.user_ids is not None:
            query = query + self.user_ids(batch.sparse[self.user_id])
        return F.normalize(query, dim=-1)

    def encode_text(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Free texts as queries (serving's text search): token ids without special tokens [B, T] (the item
        tokenizer's, right-padded) with lengths [B] -> unit-norm query encodings (B, D). A text is read as the
        history of one item with that text ("[CLS] text [SEP]" through the query head): what either
        `user_text` makes of such a history, without a user id (the searcher may be anyone)."""
        table = ItemTokens(tokens, lengths, *self.special_ids)
        states = self._pool(item_inputs(table, torch.arange(len(tokens), device=tokens.device)))  # (B, H)
        return F.normalize(self.query_head(states), dim=-1)

    def encode_item(self, batch: Batch) -> Tensor:
        """Item ids of N items -> unit-norm item encodings (N, D)."""
        return F.normalize(self._item_vectors(batch.sparse[self.item_id]), dim=-1)

    def forward(self, batch: Batch) -> Tensor:
        return (self.encode_query(batch) * self.encode_item(batch)).sum(dim=-1)  # (B,)

    def merge_adapters(self) -> None:
        """Fold LoRA / IA3 weights into the encoder (export, serving): the same scores, no adapter."""
        self.encoder = self.finetune.merge(self.encoder)
        self._cache.clear()
