"""How much of a pretrained encoder trains: freezing policies and parameter-efficient adapters (through `peft`).

A policy is chosen in config (`model/finetune=frozen|top_k|full|lora|ia3|adapter`, the group `conf/model/finetune/`,
packaged at `model.net.finetune`) and applied by the model to its pretrained encoder right after loading:
`encoder = policy.apply(encoder)`. The model's own heads always train. The run prints trainable and total
parameters (`training.trainable_parameters`, `training.total_parameters`).

- `Full`: every encoder weight trains (plain fine-tuning).
- `Frozen`: no encoder weight trains; the encoder is a fixed feature extractor (its dropout still follows
  train / eval mode, as in any module).
- `TopK(k)`: only the top k transformer layers train (embeddings and lower layers frozen), the usual
  compromise when the lower layers' general features should stay.
- `LoRA(r, alpha, dropout, target_modules)`: Hu et al., ICLR 2022 (arXiv:2106.09685): each targeted projection
  W gets a trainable low-rank update (alpha / r) · B A (A: r x in, B: out x r, B = 0 at the start, so training
  starts from the pretrained function); W stays frozen. `merge(encoder)` folds B A into W for serving: the same
  function with no adapter left.
- `Adapter(size)`: Houlsby et al., ICML 2019 (arXiv:1902.00751): a residual bottleneck MLP (D -> size -> D,
  starting as the identity) after the attention and feed-forward outputs of every layer; adapters and
  LayerNorms train.
- `IA3(target_modules, feedforward_modules)`: Liu et al., NeurIPS 2022 (arXiv:2205.05638): learned vectors
  rescale the keys, values and the feed-forward activations; fewer parameters than LoRA.

`gradient_checkpointing: true` on any policy trades compute for memory (recomputes activations in backward).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

# where BERT-family encoders keep their stack of transformer layers (BERT / MiniLM / RoBERTa, DistilBERT)
_LAYER_PATHS = ("encoder.layer", "transformer.layer", "layers")


class FinetunePolicy:
    """Base: `apply(encoder) -> encoder` sets what trains (and may wrap the encoder); `describe()` for the results."""

    name = "full"

    def __init__(self, gradient_checkpointing: bool = False) -> None:
        self.gradient_checkpointing = bool(gradient_checkpointing)

    def apply(self, encoder: nn.Module) -> nn.Module:
        if self.gradient_checkpointing:
            if not hasattr(encoder, "gradient_checkpointing_enable"):
                raise ValueError(
                    f"model.net.finetune.gradient_checkpointing: {type(encoder).__name__} has no "
                    f"gradient_checkpointing_enable()"
                )
            encoder.gradient_checkpointing_enable()
        return self._apply(encoder)

    def _apply(self, encoder: nn.Module) -> nn.Module:
        return encoder

    def merge(self, encoder: nn.Module) -> nn.Module:
        """The encoder with any adapter folded into its weights (the same function); unchanged otherwise."""
        return encoder

    def describe(self) -> dict:
        return {"policy": self.name, "gradient_checkpointing": self.gradient_checkpointing}


class Full(FinetunePolicy):
    name = "full"


class Frozen(FinetunePolicy):
    name = "frozen"

    def _apply(self, encoder: nn.Module) -> nn.Module:
        encoder.requires_grad_(False)
        return encoder


class TopK(FinetunePolicy):
    """Only the top `k` transformer layers train (k = 0 is `Frozen`; k >= the depth is `Full` less the
    embeddings)."""

    name = "top_k"

    def __init__(self, k: int = 2, gradient_checkpointing: bool = False) -> None:
        super().__init__(gradient_checkpointing)
        self.k = _integer("k", k, minimum=0)

    def _apply(self, encoder: nn.Module) -> nn.Module:
        layers = transformer_layers(encoder)
        encoder.requires_grad_(False)
        for layer in list(layers)[len(layers) - self.k :] if self.k else []:
            layer.requires_grad_(True)
        return encoder

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k}


class _Peft(FinetunePolicy):
    """An adapter method of `peft` (an optional dependency: `pip install -e ".[lm]"`)."""

    def _config(self):
        raise NotImplementedError

    def _apply(self, encoder: nn.Module) -> nn.Module:
        try:
            import peft
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f'model/finetune={self.name} needs the `peft` package: pip install -e ".[lm]"'
            ) from err
        # peft freezes the base weights and adds the adapter's trainable ones
        return peft.get_peft_model(encoder, self._config())

    def merge(self, encoder: nn.Module) -> nn.Module:
        return encoder.merge_and_unload() if hasattr(encoder, "merge_and_unload") else encoder


class LoRA(_Peft):
    name = "lora"

    def __init__(
        self,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.1,
        target_modules: Sequence[str] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(gradient_checkpointing)
        self.r = _integer("r", r, minimum=1)
        # None: peft's default for the architecture, the attention's query and value projections (BERT: query,
        # value; Llama: q_proj, v_proj), so one config serves encoders and causal LMs
        self.alpha, self.dropout = alpha, dropout
        self.target_modules = list(target_modules) if target_modules is not None else None

    def _config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules
        )

    def describe(self) -> dict:
        return {**super().describe(), "r": self.r, "alpha": self.alpha, "target_modules": self.target_modules}


class IA3(_Peft):
    name = "ia3"

    def __init__(
        self,
        target_modules: Sequence[str] = ("key", "value", "output.dense"),
        feedforward_modules: Sequence[str] = ("output.dense",),
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(gradient_checkpointing)
        self.target_modules, self.feedforward_modules = list(target_modules), list(feedforward_modules)

    def _config(self):
        from peft import IA3Config

        return IA3Config(target_modules=self.target_modules, feedforward_modules=self.feedforward_modules)

    def describe(self) -> dict:
        return {**super().describe(), "target_modules": self.target_modules}


class Bottleneck(nn.Module):
    """A residual bottleneck adapter after a sub-layer's output projection: y = h + up(GELU(down(h))), with
    `up` zero-initialised so that the adapted layer starts as the pretrained one (Houlsby et al., ICML 2019,
    arXiv:1902.00751, fig. 2).

    forward(x (..., in)) -> (..., out): the wrapped projection, then the adapter on its output.
    """

    def __init__(self, projection: nn.Linear, size: int) -> None:
        super().__init__()
        self.projection = projection
        width = projection.out_features
        self.down, self.act, self.up = nn.Linear(width, size), nn.GELU(), nn.Linear(size, width)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = self.projection(x)  # (..., D)
        return h + self.up(self.act(self.down(h)))  # (..., D)


class Adapter(FinetunePolicy):
    """Houlsby bottleneck adapters (arXiv:1902.00751): one after the attention output projection and one after
    the feed-forward output projection of every transformer layer, each a residual D -> `size` -> D MLP that
    starts as the identity; the adapters and the layers' LayerNorms train (as in the paper), the rest is frozen.
    The adapter is non-linear, so `merge` leaves it in place (there is nothing to fold)."""

    name = "adapter"

    def __init__(self, size: int = 64, gradient_checkpointing: bool = False) -> None:
        super().__init__(gradient_checkpointing)
        self.size = _integer("size", size, minimum=1)

    def _apply(self, encoder: nn.Module) -> nn.Module:
        layers = transformer_layers(encoder)
        encoder.requires_grad_(False)
        for layer in layers:
            outputs = [
                getattr(getattr(layer, "attention", None), "output", None),
                getattr(layer, "output", None),
            ]
            if any(o is None or not isinstance(getattr(o, "dense", None), nn.Linear) for o in outputs):
                raise ValueError(
                    f"model/finetune=adapter: {type(layer).__name__} has no attention.output.dense / output.dense "
                    "projections (a BERT-family layer is expected)"
                )
            for output in outputs:
                output.dense = Bottleneck(output.dense, self.size)  # new modules: trainable
                if isinstance(getattr(output, "LayerNorm", None), nn.LayerNorm):
                    output.LayerNorm.requires_grad_(True)
        return encoder

    def describe(self) -> dict:
        return {**super().describe(), "size": self.size}


def _integer(key: str, value, minimum: int) -> int:
    """`value` if it is an integer >= minimum (bool is not), else one error naming `model.net.finetune.<key>`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"model.net.finetune.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def transformer_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers (BERT-family layouts); a clear error for other encoders."""
    for path in _LAYER_PATHS:
        module = encoder
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(
        f"model/finetune=top_k: {type(encoder).__name__} has no transformer layer stack at any of {_LAYER_PATHS}"
    )


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of `module`; the total includes the frozen feature extractors that content
    encoders keep outside their registered modules (`ModalityEncoder._frozen`)."""
    params = list(module.parameters())
    frozen = [p for m in module.modules() for f in getattr(m, "_frozen", []) for p in f.parameters()]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params + frozen)
