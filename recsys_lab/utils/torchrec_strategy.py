"""`trainer=torchrec`: the TorchRec tables of a model (`data.torchrec_tables`) sharded across processes with
`DistributedModelParallel`, the rest of the task data parallel, as under `trainer=ddp`.

TorchRec is an optional extra (`recsys_lab.modules.embeddings.TORCHREC_INSTALL`). What differs from DDP:

* Sharded tables are trained by a fused optimizer that updates the rows a batch looked up inside the backward
  pass (`apply_optimizer_in_backward`): the task's optimizer class and its lr / eps / betas / weight_decay
  (`model.optimizer`), mapped to FBGEMM's kernel: SGD (exact), Adagrad (exact when a step looks a table up
  once; one update per lookup otherwise) and, on GPU only, Adam (row-sparse: only the rows looked up move,
  unlike torch.optim.Adam, whose moments move every row); FBGEMM's CPU kernels have no Adam. Gradients are
  averaged over the processes, as DDP averages the dense ones. The task's `configure_optimizers` trains everything else; its
  scheduler does not reach the tables, whose fused optimizer state is not checkpointed either (resume restores
  the tables, not their Adam moments).
* Every lookup of a sharded table is a collective: every process must run as many (same steps, same number of
  evaluation batches), and models may only read such tables through lookups, not their `.weight`.
* Tables start from rank 0's unsharded init (built whole on every process, broadcast, then loaded into the
  shards by TorchRec), so a seeded run starts where a single process does; checkpoints hold whole tables
  (gathered for saving, scattered for loading), so evaluate/export read them as any checkpoint.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn

from recsys_lab.modules.embeddings import TorchRecEmbedding, import_torchrec

# explicit sharding types (trainer.strategy.sharding_type); None lets TorchRec's planner choose per table
SHARDING_TYPES = ("table_wise", "column_wise", "row_wise", "data_parallel")
# the torch.optim keywords the fused kernels take (TorchRec renames lr; betas become beta1/beta2 below); any
# other keyword the task's optimizer sets is refused rather than silently dropped
FUSED_KWARGS = ("lr", "eps", "weight_decay")


class TorchRecStrategy(DDPStrategy):
    """DDP whose module is wrapped by TorchRec's `DistributedModelParallel`: `TorchRecEmbedding` tables sharded
    (`sharding_type`, or TorchRec's planner when None), every other parameter replicated and all-reduced.

    Args:
        sharding_type: "table_wise" (each table whole on one process), "column_wise" (each table's columns
            split over the processes), "row_wise" (rows split; a hand-written plan, which also works on CPU
            where the planner offers no row-wise kernel) or "data_parallel" (replicated); None: the planner's
            choice (GPU).
        **kwargs: DDPStrategy's (process_group_backend, timeout, ...).
    """

    strategy_name = "torchrec"

    def __init__(self, sharding_type: str | None = "table_wise", **kwargs: Any) -> None:
        import_torchrec()  # the install line, before any process is launched
        if sharding_type is not None and sharding_type not in SHARDING_TYPES:
            raise ValueError(
                f"trainer.strategy.sharding_type={sharding_type!r}: expected one of {SHARDING_TYPES} or null "
                "(TorchRec's planner)"
            )
        super().__init__(**kwargs)
        self.sharding_type = sharding_type
        self._dmp: nn.Module | None = None
        self._sharded: pl.LightningModule | None = None  # the module whose tables `_dmp` sharded (in place)

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        # Shard once: the test stage after fitting reuses the tables sharded in place (DDPStrategy would skip
        # wrapping outside fitting and broadcast rank 0's state, rank 0's shards included, over every process)
        if self._sharded is not self.lightning_module:
            self._dmp = self._shard(self.lightning_module)
            self._sharded = self.lightning_module
        self.model = self._dmp
        if fitting:
            self.setup_optimizers(trainer)  # after sharding: the dense optimizer never holds a sharded table
        self.setup_precision_plugin()

    def _shard(self, module: pl.LightningModule) -> nn.Module:
        """`module` wrapped by DistributedModelParallel, its TorchRec tables sharded in place, holding rank 0's
        initial values and trained by the task's optimizer fused into the backward pass."""
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        tables = {path: m for path, m in module.named_modules() if isinstance(m, TorchRecEmbedding)}
        if not tables:
            raise ValueError(
                "trainer=torchrec shards TorchRec tables and this model has none: set data.torchrec_tables "
                "(e.g. [item_id, user_id]) for a model whose tables are FeatureEmbedding's, or use trainer=ddp"
            )
        narrow = sorted(
            {f"{m.name} (D={m.weight.shape[1]})" for m in tables.values() if m.weight.shape[1] % 4}
        )
        if narrow:  # FBGEMM's kernels assert it deep inside sharding
            raise ValueError(f"trainer=torchrec: TorchRec shards tables of width D a multiple of 4; {narrow}")
        # the sharded collections load the unsharded weights they replace: rank 0's, as DDP starts the dense ones
        with torch.no_grad():
            for m in tables.values():
                dist.broadcast(m.weight, src=0)
        optimizer, kwargs = _fused_optimizer(
            getattr(module, "optimizer_factory", None), self.root_device.type
        )
        for m in tables.values():
            apply_optimizer_in_backward(optimizer, m.collection.parameters(), kwargs)
        sharders = [EmbeddingCollectionSharder()]
        # Lightning's DDP keywords (find_unused_parameters, ...); DMP sets its own device and bucket options.
        # static_graph off, as under trainer=ddp: not every model uses every parameter every step
        ddp = {
            k: v for k, v in self._ddp_kwargs.items() if k not in ("find_unused_parameters", "static_graph")
        }
        wrapper = DefaultDataParallelWrapper(
            static_graph=False,
            find_unused_parameters=bool(self._ddp_kwargs.get("find_unused_parameters", False)),
            ddp_kwargs=ddp,
        )
        return DistributedModelParallel(
            module,
            device=self.root_device,
            plan=self._plan(module, tables, sharders),
            sharders=sharders,
            data_parallel_wrapper=wrapper,
        )

    def _plan(self, module: nn.Module, tables: dict[str, TorchRecEmbedding], sharders: list) -> Any:
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
        from torchrec.distributed.types import ShardingPlan

        world, device = self.world_size, self.root_device.type
        if self.sharding_type == "row_wise":  # the planner proposes no row-wise kernel on CPU: plan by hand
            return ShardingPlan(
                {
                    f"{path}.collection": construct_module_sharding_plan(
                        m.collection,
                        per_param_sharding={m.name: row_wise()},
                        local_size=self.num_processes,
                        world_size=world,
                        device_type=device,
                    )
                    for path, m in tables.items()
                }
            )
        constraints = None
        if self.sharding_type is not None:
            # column-wise shards are `min_partition` columns wide (default 32, wider than our tables): D / world
            def options(m: TorchRecEmbedding) -> dict[str, int]:
                if self.sharding_type != "column_wise":
                    return {}
                return {"min_partition": max(1, m.collection.embedding_dim() // world)}

            constraints = {
                m.name: ParameterConstraints(sharding_types=[self.sharding_type], **options(m))
                for m in tables.values()
            }
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world, local_world_size=self.num_processes, compute_device=device),
            constraints=constraints,
        )
        return planner.collective_plan(module, sharders, dist.GroupMember.WORLD)

    # ---- checkpoints: whole tables in the file ---------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The state dict with every sharded table gathered whole (a collective: Lightning calls it on every
        process; rank 0 writes it)."""
        assert self.lightning_module is not None
        return {key: _whole(value) for key, value in self.lightning_module.state_dict().items()}

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        """Whole tables from the checkpoint copied into this process's shards; the rest loaded as usual."""
        assert self.lightning_module is not None
        module, saved = self.lightning_module, checkpoint["state_dict"]
        state = module.state_dict()
        sharded = {k for k, v in state.items() if _is_sharded(v)}
        if not sharded:  # not sharded yet (a test-only run): setup shards what this loads
            module.load_state_dict(saved, strict=strict)
            return
        _load_whole_tables(state, {k: saved[k] for k in sharded if k in saved})
        # the sharded modules' load hooks expect their own (sharded) values, which now hold the checkpoint's
        module.load_state_dict({**saved, **{k: state[k] for k in sharded if k in saved}}, strict=strict)

    def teardown(self) -> None:
        # Not DDPStrategy's: it would move the (sharded) module to the CPU, and the test stage that follows
        # fitting runs on the same shards
        self.model = self.lightning_module
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def _fused_optimizer(factory: Any, device_type: str = "cpu") -> tuple[type, dict[str, Any]]:
    """The task's optimizer (a `functools.partial` of a torch.optim class, `model.optimizer`) as the class and
    FBGEMM keywords of the tables' fused optimizer; FBGEMM's CPU kernels have SGD and Adagrad only."""
    if not isinstance(factory, partial) or not isinstance(factory.func, type):
        raise ValueError(
            "trainer=torchrec trains the sharded tables with the task's optimizer: model.optimizer must be a "
            f"torch.optim class with _partial_: true, got {factory!r}"
        )
    cls, given = factory.func, dict(factory.keywords)
    fused = (torch.optim.SGD, torch.optim.Adagrad) + ((torch.optim.Adam,) if device_type != "cpu" else ())
    if cls not in fused:
        raise ValueError(
            f"trainer=torchrec: model.optimizer={cls.__module__}.{cls.__name__} has no fused TorchRec kernel on "
            f"{device_type}; use {' or '.join(f'torch.optim.{c.__name__}' for c in fused)}"
        )
    kwargs = {k: float(v) for k, v in given.items() if k in FUSED_KWARGS}
    if "betas" in given:
        kwargs["beta1"], kwargs["beta2"] = (float(b) for b in given.pop("betas"))
    refused = {k: v for k, v in given.items() if k not in FUSED_KWARGS and v not in (0, 0.0, False, None)}
    if refused:
        raise ValueError(f"trainer=torchrec: the tables' fused {cls.__name__} takes no {refused}")
    return cls, kwargs


def _is_sharded(value: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(value, ShardedTensor)


def _whole(value: Any) -> Any:
    """A sharded table as one tensor on every process (shards are disjoint: their all-reduced sum); any other
    value as it is."""
    if not _is_sharded(value):
        return value
    shards = value.local_shards()
    device = shards[0].tensor.device if shards else torch.device("cpu")
    whole = torch.zeros(value.size(), dtype=value.dtype, device=device)
    for shard in shards:
        (row, col), (h, w) = shard.metadata.shard_offsets, shard.tensor.shape
        whole[row : row + h, col : col + w] = shard.tensor
    dist.all_reduce(whole)
    return whole


@torch.no_grad()
def _load_whole_tables(state: dict[str, Any], tables: dict[str, Tensor]) -> None:
    """Copy whole tables into a sharded module's state (`module.state_dict()`, whose shards view the weights)."""
    for key, value in tables.items():
        target = state[key]
        if not _is_sharded(target):  # data_parallel: replicated whole
            target.copy_(value)
            continue
        for shard in target.local_shards():
            (row, col), (h, w) = shard.metadata.shard_offsets, shard.tensor.shape
            shard.tensor.copy_(value[row : row + h, col : col + w])
