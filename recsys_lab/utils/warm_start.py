"""Warm start (`init_from=<checkpoint or run dir>`): a new model begins from an earlier model's weights.

Incremental training continues from the model of the previous time window on the next window's data
(`protocol=window`), whose vocabularies grew (`data.vocab_from`): ids the previous model knew keep their codes
and new ids get codes after them. So every tensor of the new model is either

- the same shape as the earlier one: copied as it is;
- an embedding table (an `nn.Embedding` weight, [V, D]) whose first dimension grew: the earlier V_old rows are
  copied to the same indices (the same ids) and rows V_old.. keep the new model's fresh initialisation;

and anything else — another shape, a table that shrank, a tensor only one of the two models has — is an error
naming the tensor and both shapes, since the two models are then not the same architecture over the same
features. Only weights are carried: the optimizer starts afresh (new state for every parameter), as does the
learning-rate schedule; `ckpt_path` is the way to resume an identical run with its optimizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from recsys_lab.utils.checks import ConfigError, find_checkpoint, load_checkpoint


class WarmStartError(ConfigError):
    """The earlier model's weights do not fit the new model (`init_from`); the message names the tensor."""


def grown_tables(model: nn.Module) -> set[str]:
    """state_dict keys of every embedding table of `model` (the tensors that may grow with a vocabulary)."""
    return {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
    }


def warm_start(model: nn.Module, earlier: dict[str, Tensor]) -> dict[str, list[str]]:
    """Copy `earlier` (a state_dict) into `model` in place, as the module docstring says.

    Returns which keys were copied whole ("copied") and which tables grew ("grown", as
    "key: V_old -> V_new rows"); raises WarmStartError on the first tensor that fits neither rule, before
    anything is changed."""
    current = model.state_dict()
    tables = grown_tables(model)
    missing, extra = sorted(set(current) - set(earlier)), sorted(set(earlier) - set(current))
    if missing or extra:
        raise WarmStartError(
            f"init_from: the earlier model is another architecture: tensors only in the new model {missing[:5]}, "
            f"only in the earlier one {extra[:5]}"
        )
    copied, grown = [], []
    for key, new in current.items():
        old = earlier[key]
        if old.shape == new.shape:
            copied.append(key)
        elif (
            key in tables and old.dim() == 2 and old.shape[1] == new.shape[1] and old.shape[0] < new.shape[0]
        ):
            grown.append(f"{key}: {old.shape[0]} -> {new.shape[0]} rows")
        else:
            what = "embedding table" if key in tables else "tensor"
            raise WarmStartError(
                f"init_from: {what} '{key}' has shape {tuple(old.shape)} in the earlier model and "
                f"{tuple(new.shape)} in the new one; only embedding tables may differ, and only by growing "
                "(new ids appended by data.vocab_from)"
            )
    with torch.no_grad():
        for key, new in current.items():  # state_dict tensors share storage with the model's parameters
            old = earlier[key].to(dtype=new.dtype, device=new.device)
            target = new[: old.shape[0]] if old.dim() else new  # a grown table: its first V_old rows
            target.copy_(old)
    return {"copied": copied, "grown": grown}


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint `init_from` names: a file as it is, a run directory's best (else last) checkpoint."""
    try:
        return find_checkpoint(path)
    except ConfigError as err:
        raise WarmStartError(f"init_from={path}: {err}") from None


def init_from(task: nn.Module, path: str | Path) -> dict:
    """Warm-start `task` (its whole state_dict, net and task-level tensors) from a checkpoint or run directory;
    returns what was done, for the results."""
    file = checkpoint_file(path)
    state = load_checkpoint(str(file)).get("state_dict")
    if state is None:
        raise WarmStartError(f"init_from={path}: {file} holds no model weights (no state_dict)")
    report = warm_start(task, state)
    return {"checkpoint": str(file), "copied": len(report["copied"]), "grown": report["grown"]}
