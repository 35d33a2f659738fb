"""`compile=true`: the model's training methods compiled with `torch.compile`, the task left eager.

Only the plain `nn.Module` is compiled, method by method: the task's `training_step` — `self.log`, metric
updates, the loss bookkeeping — stays outside compiled code, where graph breaks would cost most. The compiled
functions replace the methods on the instance, so the state dict keeps its keys (no `_orig_mod.` prefix as
`torch.compile(module)` would add): checkpoints, warm starts and exports read a compiled run's weights as any
other's.

Which methods: every one a task calls per training step (`recsys_lab.tasks`), where the model has it:
`forward` (CTR, multi-task's shared path), `forward_with_auxiliary_loss` (DIEN), `forward_heads` (multi-task),
`encode_query` / `encode_item` (retrieval, pairwise), `encode_sequence` (next-item). Evaluation calls the same
methods, so validation runs compiled too; the catalogue encoding and the metric reductions stay eager.

Variable history lengths change tensor shapes from batch to batch: `dynamic=None` (the default) lets
`torch.compile` recompile once with symbolic shapes after it sees a second shape, instead of once per shape.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

COMPILED_METHODS = (
    "forward",
    "forward_with_auxiliary_loss",
    "forward_heads",
    "encode_query",
    "encode_item",
    "encode_sequence",
)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(value: bool | dict | DictConfig | None) -> dict | None:
    """The `compile` config as `torch.compile` keywords, None when off. `compile=true` is the defaults;
    `compile={mode: max-autotune, dynamic: true, fullgraph: false}` sets them."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict | DictConfig):
        raise ValueError(f"compile={value!r}: expected true, false or {{mode, dynamic, fullgraph}}")
    options = dict(value)
    unknown = set(options) - {"mode", "dynamic", "fullgraph"}
    if unknown:
        raise ValueError(f"compile: unknown keys {sorted(unknown)}; expected mode, dynamic, fullgraph")
    if options.get("mode") not in (None, *MODES):
        raise ValueError(f"compile.mode={options['mode']!r}: expected one of {list(MODES)}")
    return options


def compile_net(net: nn.Module, **options) -> list[str]:
    """Replace the model's training methods by compiled ones (in place); returns the names compiled."""
    compiled = []
    for name in COMPILED_METHODS:
        method = getattr(type(net), name, None)
        if not callable(method) or (name == "forward" and method is nn.Module.forward):
            continue
        # the bound method, compiled; an instance attribute shadows the class's method (nn.Module's __call__
        # reads `self.forward`), and the parameters stay registered where they were
        object.__setattr__(net, name, torch.compile(getattr(net, name), **options))
        compiled.append(name)
    if not compiled:
        raise ValueError(f"compile: {type(net).__name__} has none of the methods {list(COMPILED_METHODS)}")
    return compiled
