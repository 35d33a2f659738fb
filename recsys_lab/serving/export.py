"""Export of a trained run for serving without the training code: the query tower or the ranker as an ONNX (or
`torch.export`) graph, the item catalogue's encodings with their ids and a FAISS index, and a manifest.

Models read a `Batch`, which neither ONNX nor `torch.export` can carry, so the exported graph is a small wrapper
(`FlatInputs`) that takes the features the method reads as flat tensors in a recorded order
(`sparse.user_id`, `seq.hist_item_id.ids`, `seq.hist_item_id.lengths`, `dense.price`, ...) and rebuilds the
Batch. Which features a method reads is found by running it once on a real batch whose feature dicts note every
key read (`read_inputs`), so the graph has no unused input. The batch dimension B is dynamic, and so are the
history length L (shared by the `hist_*` features, which are parallel columns of one history) and the token
length T of text inputs.

Before export the model is made servable (`servable`): a copy with LoRA / IA3 weights merged into the encoder
(`merge_adapters`, peft's `merge_and_unload`), and every eval-mode BatchNorm folded into the affine map it
computes, (x - running mean) / sqrt(running var + eps) * weight + bias. The fold is exact; it is there because
DIN's Dice normalises the real history positions only, a data-dependent count on which `torch.export` cannot
trace BatchNorm's empty-input check.

Parity is measured at export time: the exported graph, run by ONNX Runtime (or the reloaded `.pt2`), scores a
batch of the run's test rows and the export fails unless every score is within `PARITY_ATOL` of the trained
module's. int8 (`quantize_onnx`, `quantize_eager`) is dynamic quantisation: int8 weights, activations quantised
per batch at run time; its change is measured and recorded, not bounded, since it is an accuracy trade.
"""

from __future__ import annotations

import copy
import json
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch, Seq
from recsys_lab.serving.runs import encode_items
from recsys_lab.utils.checks import ConfigError
from recsys_lab.utils.run import package_versions

PARITY_ATOL = 1e-4  # float32: exported scores equal the trained module's within this
FORMATS = ("onnx", "torch_export")
PARTS = {"query_tower": ("encode_query", "query"), "ranker": ("forward", "logits")}  # part: method, output
SUFFIX = {"onnx": ".onnx", "torch_export": ".pt2"}
ENCODE_CHUNK = 4096  # items per encode_item call when encoding the catalogue


class ExportError(RuntimeError):
    """A model the exporter cannot trace, or an export that does not reproduce it (parity above tolerance)."""


# ---- which features a method reads -------------------------------------------------------------------------
class _NotedDict(dict):
    """A feature dict that notes the keys read from it (iterating over it reads every key)."""

    def __init__(self, values: dict, group: str, noted: set[str]) -> None:
        super().__init__(values)
        self._group, self._noted = group, noted

    def __getitem__(self, key):
        self._noted.add(f"{self._group}.{key}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def _all(self) -> None:
        self._noted.update(f"{self._group}.{key}" for key in super().keys())

    def __iter__(self):
        self._all()
        return super().__iter__()

    def items(self):
        self._all()
        return super().items()

    def values(self):
        self._all()
        return super().values()


class _NotedSeq(Seq):
    """A Seq that notes whether its `times` are read (only time-aware models take them as an input)."""

    def __getattribute__(self, name: str):
        if name == "times":
            noted, key = object.__getattribute__(self, "_noted"), object.__getattribute__(self, "_key")
            noted.add(f"seq.{key}.times")
        return object.__getattribute__(self, name)


def read_inputs(net: nn.Module, method: str, batch: Batch) -> list[str]:
    """The flat input names `method` reads from `batch`, in the batch's field order: `sparse.<name>`,
    `seq.<name>.ids` / `.lengths` (/ `.times` if read), `dense.<name>`, `text.<name>`."""
    noted: set[str] = set()
    seqs = {}
    for name, seq in batch.seq.items():
        probe = _NotedSeq(seq.ids, seq.lengths, seq.times)
        probe._noted, probe._key = noted, name
        seqs[name] = probe
    probe_batch = Batch(
        sparse=_NotedDict(batch.sparse, "sparse", noted),
        seq=_NotedDict(seqs, "seq", noted),
        dense=_NotedDict(batch.dense, "dense", noted),
        text=_NotedDict(batch.text, "text", noted),
    )
    with torch.no_grad():
        getattr(net, method)(probe_batch)
    names = []
    for group in ("sparse", "seq", "dense", "text"):
        for key, value in getattr(batch, group).items():
            if f"{group}.{key}" not in noted:
                continue
            if group != "seq":
                names.append(f"{group}.{key}")
                continue
            names += [f"seq.{key}.ids", f"seq.{key}.lengths"]
            if value.times is not None and f"seq.{key}.times" in noted:
                names.append(f"seq.{key}.times")
    return names


def flatten(batch: Batch, names: list[str]) -> list[Tensor]:
    """The tensors of `batch` named `names` (see `read_inputs`), in that order."""
    tensors = []
    for name in names:
        group, key, *field = name.split(".")
        value = getattr(batch, group).get(key)
        if value is not None and field:
            value = getattr(value, field[0])
        if value is None:
            raise ConfigError(
                f"export input '{name}': the batch has no such feature (it has {_batch_names(batch)})"
            )
        tensors.append(value)
    return tensors


def unflatten(names: list[str], tensors: tuple[Tensor, ...] | list[Tensor]) -> Batch:
    """The Batch that `flatten` took `tensors` from (only the named features)."""
    batch, seqs = Batch(), {}
    for name, tensor in zip(names, tensors, strict=True):
        group, key, *field = name.split(".")
        if group == "seq":
            seqs.setdefault(key, {})[field[0]] = tensor
        else:
            getattr(batch, group)[key] = tensor
    batch.seq = {key: Seq(parts["ids"], parts["lengths"], parts.get("times")) for key, parts in seqs.items()}
    return batch


def _batch_names(batch: Batch) -> list[str]:
    return [f"{g}.{k}" for g in ("sparse", "seq", "dense", "text") for k in getattr(batch, g)]


class FlatInputs(nn.Module):
    """One method of a model, called with flat tensors: forward(*tensors in `names` order) -> the method's output
    (query encodings (B, D) or logits (B,))."""

    def __init__(self, net: nn.Module, method: str, names: list[str]) -> None:
        super().__init__()
        self.net, self.method, self.names = net, method, list(names)

    def forward(self, *tensors: Tensor) -> Tensor:
        return getattr(self.net, self.method)(unflatten(self.names, tensors))


def input_dims(names: list[str]) -> list[dict[int, str]]:
    """The dynamic dimensions of each input: 0 is the batch B; the history length L is shared by the `hist_*`
    sequences (parallel columns of one history, which models stack); token inputs share T."""
    dims = []
    for name in names:
        group, key, *field = name.split(".")
        dim = {0: "B"}
        if group == "seq" and field[0] in ("ids", "times"):
            dim[1] = "L" if key.startswith("hist_") else f"L_{key}"
        elif group == "text":
            dim[1] = "T"
        dims.append(dim)
    return dims


def describe_inputs(names: list[str], tensors: list[Tensor]) -> list[dict]:
    """Name, dtype and shape (dynamic dims by their letter) of every input, for the manifest."""
    described = []
    for name, tensor, dims in zip(names, tensors, input_dims(names), strict=True):
        shape = [dims.get(d, size) for d, size in enumerate(tensor.shape)]
        described.append({"name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": shape})
    return described


# ---- the servable copy --------------------------------------------------------------------------------------
class FoldedBatchNorm(nn.Module):
    """An eval-mode BatchNorm as the affine map it computes: x * scale + shift per channel (dim 1)."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        scale = torch.rsqrt(norm.running_var + norm.eps)
        shift = -norm.running_mean * scale
        if norm.affine:
            scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)  # channels in dim 1: (N, C) or (N, C, L)
        return x * self.scale.view(shape) + self.shift.view(shape)


def servable(net: nn.Module) -> nn.Module:
    """An eval-mode copy of `net` with adapters merged and batch norms folded (the same function)."""
    net = copy.deepcopy(net).eval()
    if hasattr(net, "merge_adapters"):
        net.merge_adapters()
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.track_running_stats:
                setattr(module, name, FoldedBatchNorm(child))
    return net


class PinnedCache:
    """An `EncodingCache` whose value no longer depends on the parameters' identities: the item states a text
    tower caches (V, H) become a constant of the exported graph. (The cache is keyed on `id(param)`, and the
    exporter swaps every parameter for a traced stand-in, so an unpinned cache would recompute the whole
    catalogue inside the graph.)"""

    def __init__(self, value: Tensor | None) -> None:
        self.value = value

    def get(self, params, device, compute) -> Tensor:
        if self.value is None:
            self.value = compute()
        return self.value

    def clear(self) -> None:
        self.value = None


def pin_caches(net: nn.Module) -> None:
    """Replace every encoding cache of `net`'s modules by a `PinnedCache` of its current value (call it after
    one eager call of the exported method has filled them)."""
    from recsys_lab.modules.content import EncodingCache

    for module in net.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, EncodingCache):
                setattr(module, name, PinnedCache(value.value))


def check_part(net: nn.Module, part: str | None) -> str:
    """The part to export: `part`, or the query tower of a model with encoders, else the ranker. ConfigError
    when the model lacks the part's method."""
    if part is None:
        part = "query_tower" if hasattr(net, "encode_query") and hasattr(net, "encode_item") else "ranker"
    if part not in PARTS:
        raise ConfigError(f"--part {part}: expected one of {list(PARTS)}")
    name = type(net).__name__
    if part == "query_tower" and not (hasattr(net, "encode_query") and hasattr(net, "encode_item")):
        raise ConfigError(
            f"--part query_tower: {name} has no encode_query / encode_item (it scores (query, item) rows): "
            "export it with --part ranker"
        )
    if part == "ranker" and type(net).forward is nn.Module.forward:
        raise ConfigError(f"--part ranker: {name} has no forward(batch) -> logits")
    return part


def sample_batch(run, part: str, rows: int, seed: int = 0) -> Batch:
    """`rows` random interactions of the run's test split, as the part reads them: the user side (histories,
    unknown context) for a query tower, whole impressions for a ranker."""
    store = run.store
    test = (store.split == 2).nonzero().squeeze(1)
    if len(test) == 0:
        raise ConfigError(f"run {run.path}: its data has no test rows to measure the export's parity on")
    pick = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:rows]]
    return store.histories(pick) if part == "query_tower" else store.impressions(pick)


# ---- writing and running the graph ---------------------------------------------------------------------------
def export_graph(module: FlatInputs, sample: list[Tensor], path: Path, fmt: str, output: str) -> None:
    """Write `module` as ONNX (torch's dynamo exporter, one self-contained file) or a `torch.export` .pt2."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = []
    for named in input_dims(module.names):
        shapes.append(
            {d: dims.setdefault(letter, torch.export.Dim(letter, min=1)) for d, letter in named.items()}
        )
    dynamic = (tuple(shapes),)  # one entry: FlatInputs.forward takes *tensors
    try:
        _export(module, sample, path, fmt, output, dynamic)
    except Exception as err:  # the exporters' own message is pages long: name the model and the first cause
        cause = str(err).split("## Exception summary")[-1].strip().split("\n")[0]
        raise ExportError(
            f"{type(module.net).__name__}.{module.method} cannot be traced by torch.export for {fmt}: {cause}"
        ) from err  # chained: the exporter's full report stays one traceback away


def _export(module: FlatInputs, sample: list[Tensor], path: Path, fmt: str, output: str, dynamic) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and axis-renaming notices
        if fmt == "onnx":
            torch.onnx.export(
                module,
                tuple(sample),
                str(path),
                input_names=module.names,
                output_names=[output],
                dynamo=True,
                dynamic_shapes=dynamic,
                external_data=False,
                verbose=False,
            )
        else:
            torch.export.save(torch.export.export(module, tuple(sample), dynamic_shapes=dynamic), str(path))


class Exported:
    """An exported graph, run from its file alone: `Exported(path, names)(batch)` -> float32 scores as numpy.

    ONNX files run in ONNX Runtime (one thread unless `threads`), `.pt2` files as the reloaded
    `torch.export` program. `names` is the manifest's input order."""

    def __init__(self, path: str | Path, names: list[str], threads: int = 1) -> None:
        self.path, self.names = Path(path), list(names)
        if self.path.suffix == ".onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = threads
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            self.program = None
        else:
            self.session = None
            self.program = torch.export.load(str(self.path)).module()

    @classmethod
    def from_dir(cls, out: str | Path, int8: bool = False, threads: int = 1) -> Exported:
        """The graph an export folder's manifest names (its int8 version if `int8`)."""
        manifest = read_manifest(out)
        graph = manifest["graph"]
        key = "int8_file" if int8 else "file"
        if graph.get(key) is None:
            raise ConfigError(f"{out}: the export has no {'int8 ' if int8 else ''}graph (export with --int8)")
        return cls(Path(out) / graph[key], [i["name"] for i in graph["inputs"]], threads)

    def __call__(self, batch: Batch) -> np.ndarray:
        return self.run(flatten(batch, self.names))

    def run(self, tensors: list[Tensor]) -> np.ndarray:
        if self.session is not None:
            feed = {name: t.numpy() for name, t in zip(self.names, tensors, strict=True)}
            return self.session.run(None, feed)[0]
        with torch.no_grad():
            return self.program(*tensors).numpy()


# ---- int8 ---------------------------------------------------------------------------------------------------
def quantize_onnx(src: str | Path, dst: str | Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation of an exported graph: int8 weights of its matrix products and
    embedding tables, activations quantised per batch (the ONNX analogue of `quantize_eager`).

    Weights use 7 bits (`reduce_range`): on x86 CPUs without VNNI (AVX2 / AVX-512BW `vpmaddubsw`) the sum of two
    uint8 x int8 products saturates int16, which moved the served DIN's logits by up to 0.65 and the two-tower's
    unit-norm query encodings by 0.04 on such a machine (2-core Intel Xeon @ 2.00GHz with AVX-512 but no VNNI, onnxruntime 1.32.0); with 7-bit weights
    the change is back within the bounds of `tests/test_export.py` (logits < 0.5, cosine > 0.998), as torch's
    fbgemm does it for `quantize_eager`."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it warns, per tensor, about shapes it cannot infer and leaves in float
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, reduce_range=True)
    finally:
        root.setLevel(level)


def quantize_eager(net: nn.Module) -> nn.Module:
    """A copy of `net` with every nn.Linear dynamically quantised to int8 (`torch.ao.quantization.quantize_dynamic`;
    deprecated in favour of torchao, which the lab does not depend on, and still shipped by torch 2.13). Eager
    only: torch.export cannot carry its packed weights, so the portable int8 model is `quantize_onnx`'s."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(net).eval(), {nn.Linear}, dtype=torch.qint8
        )


def score_change(reference: np.ndarray, other: np.ndarray) -> dict:
    """How far `other` moved from `reference` (scores (B,) or encodings (B, D)): max and mean absolute change."""
    diff = np.abs(np.asarray(other, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}


# ---- the item catalogue --------------------------------------------------------------------------------------
def catalogue(run, net: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every rankable item (codes 1..V-1; 0 is "unknown"): codes (N,), raw item ids (N,) and `encode_item`
    encodings float32 (N, D), in code order."""
    import polars as pl

    items = run.datamodule.prepared().items.filter(pl.col("item_id_code") > 0).sort("item_id_code")
    codes = torch.as_tensor(items["item_id_code"].to_numpy().astype(np.int64))
    vectors = encode_items(net, run.store, codes, ENCODE_CHUNK)  # (N, D)
    return codes.numpy(), items["item_id"].to_numpy(), vectors


def index_recall(index, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Mean recall of the exact inner-product top-k (brute force over `vectors`) by `index.search`."""
    k = min(k, len(vectors))
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]  # (B, k) rows
    found = index.search(queries, k)[1]  # (B, k) codes
    exact_codes = index.codes[exact]
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact_codes, strict=True)]))


# ---- the whole export ----------------------------------------------------------------------------------------
def export_run(
    run,
    out: str | Path,
    fmt: str = "onnx",
    part: str | None = None,
    int8: bool = False,
    index: str = "flat",
    rows: int = 256,
) -> dict:
    """Export a loaded run (`recsys_lab.serving.runs.load_run`) into folder `out`; returns the manifest.

    Args:
        run: the loaded run.
        out: output folder (created).
        fmt: "onnx" or "torch_export".
        part: "query_tower" (encode_query, plus the item catalogue and its index) or "ranker" (forward);
            None: the query tower when the model has encoders, else the ranker.
        int8: also write the graph dynamically quantised to int8 (ONNX only) and measure its change.
        index: the FAISS index kind over the item encodings (`ItemIndex` kinds).
        rows: test rows the parity is measured on.
    """
    from recsys_lab.serving.index import KINDS, ItemIndex

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: expected one of {FORMATS}")
    if int8 and fmt != "onnx":
        raise ConfigError(
            "--int8 writes ONNX Runtime's int8 graph: use --format onnx (torch.export cannot carry "
            "dynamically quantised weights)"
        )
    if index not in KINDS:
        raise ConfigError(f"--index {index}: expected one of {KINDS}")
    part = check_part(run.net, part)
    method, output = PARTS[part]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    net = servable(run.net)
    batch = sample_batch(run, part, rows)
    names = read_inputs(net, method, batch)  # runs the method once, which fills the model's caches
    pin_caches(net)
    tensors = flatten(batch, names)
    path = out / f"{part}{SUFFIX[fmt]}"
    export_graph(FlatInputs(net, method, names), tensors, path, fmt, output)

    with torch.no_grad():
        trained = getattr(run.net, method)(batch).numpy()  # the trained module itself, adapters unmerged
    exported = Exported(path, names).run(tensors)
    parity = {**score_change(trained, exported), "rows": len(batch), "tolerance": PARITY_ATOL}
    if parity["max_abs_diff"] > PARITY_ATOL:
        raise ExportError(
            f"{path}: exported {output} differ from the trained model's by up to {parity['max_abs_diff']:.3g} "
            f"(tolerance {PARITY_ATOL}) on {len(batch)} test rows"
        )
    graph: dict[str, Any] = {
        "part": part,
        "method": method,
        "format": fmt,
        "file": path.name,
        "inputs": describe_inputs(names, tensors),
        "output": {"name": output, "dtype": "float32", "shape": ["B", *exported.shape[1:]]},
        "parity": parity,
        "int8_file": None,
    }
    if int8:
        int8_path = out / f"{part}.int8.onnx"
        quantize_onnx(path, int8_path)
        graph["int8_file"] = int8_path.name
        graph["int8_change"] = score_change(trained, Exported(int8_path, names).run(tensors))

    manifest = {"run": run.describe(), "graph": graph, "versions": versions()}
    if part == "query_tower":
        manifest["items"] = export_items(run, net, out, index, queries=exported, item_index=ItemIndex)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def export_items(run, net: nn.Module, out: Path, kind: str, queries: np.ndarray, item_index) -> dict:
    """Write the catalogue's encodings (item_encodings.npy), their ids (items.parquet: row, item_code,
    item_id) and a FAISS index (index.faiss, rows = encoding rows); returns the manifest's "items" entry."""
    import faiss
    import polars as pl

    codes, ids, vectors = catalogue(run, net)
    np.save(out / "item_encodings.npy", vectors)
    pl.DataFrame({"row": np.arange(len(codes)), "item_code": codes, "item_id": ids}).write_parquet(
        out / "items.parquet"
    )
    index = item_index(vectors, codes, kind=kind, **_index_options(kind, vectors.shape[1]))
    faiss.write_index(index.index, str(out / "index.faiss"))
    return {
        "count": len(codes),
        "dim": int(vectors.shape[1]),
        "encodings": "item_encodings.npy",
        "ids": "items.parquet",
        "index": {
            "file": "index.faiss",
            "kind": kind,
            "recall@50_of_exact": index_recall(index, vectors, queries, 50),
        },
    }


def _index_options(kind: str, dim: int) -> dict:
    """IVF-PQ's sub-quantisers must divide the width: the largest of 16, 8, 4, 2, 1 that does."""
    if kind != "ivfpq":
        return {}
    return {"pq_m": next(m for m in (16, 8, 4, 2, 1) if dim % m == 0)}


def read_manifest(out: str | Path) -> dict:
    path = Path(out) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{out}: no manifest.json (not a folder written by scripts/export.py)")
    return json.loads(path.read_text())


def versions() -> dict:
    """The library versions an export was written with (ONNX opsets and FAISS formats change with them)."""
    libraries = {p: p for p in ("torch", "onnx", "onnxruntime", "numpy")} | {"faiss": "faiss-cpu"}
    return {"python": platform.python_version(), **package_versions(libraries)}


__all__ = [
    "PARITY_ATOL",
    "Exported",
    "ExportError",
    "FlatInputs",
    "export_run",
    "quantize_eager",
    "quantize_onnx",
    "read_inputs",
    "servable",
]
