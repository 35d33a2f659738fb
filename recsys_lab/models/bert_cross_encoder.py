"""BERT cross-encoder ranker: one transformer reads the user's history titles and the candidate's text together."""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.finetune import FinetunePolicy, Full
from recsys_lab.utils.pretrained import load_encoder

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class BERTCrossEncoder(nn.Module):
    """BERT (Devlin et al., arXiv:1810.04805) as a cross-encoder reranker (Nogueira & Cho, arXiv:1901.04085).

    The DataModule builds "[CLS] history titles [SEP] candidate text [SEP]" (`recsys_lab.data.text`); the pair is
    scored from the [CLS] hidden state -> dropout -> Linear(hidden, 1).

    Args:
        schema: the dataset schema (shared constructor contract; the text inputs are read from `batch.text`).
        pretrained: a local Hugging Face model folder (e.g. `${minilm_path:}`) or, with `allow_download`, a hub id.
        sha256: expected sha256 of the folder's model.safetensors; checked before loading.
        allow_download: let `from_pretrained` fetch a hub id (needs network). Off: strictly local files.
        dropout: dropout on the [CLS] vector before the scoring layer.
        finetune: what of the encoder trains (`recsys_lab.modules.finetune`: Full, Frozen, TopK, LoRA, IA3;
            config group `model/finetune`); None = Full. The scoring head always trains.

    Input: batch.text "input_ids", "attention_mask", "token_type_ids", int64 [B, T]. Output: logits [B].
    """

    def __init__(
        self,
        schema: Schema,
        pretrained: str,
        sha256: str | None = None,
        allow_download: bool = False,
        dropout: float = 0.1,
        finetune: FinetunePolicy | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(schema, Schema):
            raise TypeError(f"BERTCrossEncoder: schema must be a Schema, got {type(schema).__name__}")
        # scoring reads the [CLS] hidden state: the encoder comes without BERT's NSP pooler, in training mode
        self.encoder = load_encoder(pretrained, sha256=sha256, allow_download=allow_download)
        # Some BERT-family encoders (DistilBERT) have no segment embeddings.
        self._uses_token_types = "token_type_ids" in inspect.signature(self.encoder.forward).parameters
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.config.hidden_size, 1)
        # last, so that the head starts the same whatever the policy draws (LoRA's A matrices are random)
        self.finetune = finetune if finetune is not None else Full()
        self.encoder = self.finetune.apply(self.encoder)  # may wrap it (peft adapters)

    def forward(self, batch: Batch) -> Tensor:
        missing = [key for key in TEXT_KEYS if key not in batch.text]
        if missing:
            raise KeyError(
                f"BERTCrossEncoder needs batch.text {list(TEXT_KEYS)} but {missing} are missing (batch.text has "
                f"{sorted(batch.text)}): the DataModule must be configured with data.text to build "
                f"cross-encoder inputs"
            )
        inputs = {"input_ids": batch.text["input_ids"], "attention_mask": batch.text["attention_mask"]}
        if self._uses_token_types:
            inputs["token_type_ids"] = batch.text["token_type_ids"]
        hidden = self.encoder(**inputs).last_hidden_state  # (B, T, D)
        cls = self.dropout(hidden[:, 0])  # (B, D)
        return self.head(cls).squeeze(-1)  # (B,)

    def merge_adapters(self) -> None:
        """Fold LoRA / IA3 weights into the encoder (for export and serving): the same scores, no adapter."""
        self.encoder = self.finetune.merge(self.encoder)
