"""Export a trained run for serving: `python scripts/export.py <run dir | checkpoint> [--out DIR] [--format onnx|torch_export]
[--part query_tower|ranker] [--int8] [--index flat|hnsw|ivfpq|sq8]`.

Writes into --out (default: <run dir>/export):

- `query_tower.onnx` (models with encode_query / encode_item) or `ranker.onnx` (CTR models' forward), or the
  `.pt2` of `torch.export` with --format torch_export: flat named inputs, dynamic batch and history length;
- `query_tower.int8.onnx` / `ranker.int8.onnx` with --int8: ONNX Runtime's dynamic int8 quantisation;
- for a query tower, the item catalogue: `item_encodings.npy` (N, D) float32, `items.parquet` (row, item_code,
  item_id: the raw id of each encoding row) and `index.faiss` (the FAISS index over those rows);
- `manifest.json`: the run, the graph's inputs (name, dtype, shape) and output, the parity measured at export
  (the export fails unless it is within 1e-4 of the trained model), the int8 change, the index's recall, and
  the library versions.

See `recsys_lab/serving/export.py` for how the graph is built.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from recsys_lab.serving.export import FORMATS, PARTS, ExportError, export_run
from recsys_lab.serving.index import KINDS
from recsys_lab.utils.checks import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/export.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory written by train.py, or one of its checkpoints")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run dir>/export)")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument(
        "--part", choices=list(PARTS), default=None, help="default: query_tower if the model has one"
    )
    parser.add_argument("--int8", action="store_true", help="also write the int8 graph (ONNX only)")
    parser.add_argument(
        "--index", choices=KINDS, default="flat", help="FAISS index kind over the item encodings"
    )
    parser.add_argument("--rows", type=int, default=256, help="test rows the parity is measured on")
    parser.add_argument(
        "--data-dir", default=None, help="the prepared data's cache, if not where the run kept it"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("WANDB_MODE", "disabled")
    args = parse_args(argv)
    from recsys_lab.serving.runs import load_run  # after argparse: --help needs no torch import

    try:
        run = load_run(args.run, data_dir=args.data_dir)
        out = args.out if args.out is not None else run.path / "export"
        manifest = export_run(run, out, args.format, args.part, args.int8, args.index, args.rows)
    except (ConfigError, ExportError) as err:
        raise SystemExit(f"scripts/export.py: error: {err}") from None
    graph = manifest["graph"]
    print(f"exported {manifest['run']['model']} ({graph['part']}, {graph['format']}) to {out}")
    print(f"parity on {graph['parity']['rows']} test rows: max |diff| {graph['parity']['max_abs_diff']:.2e}")
    if graph.get("int8_change"):
        print(f"int8 change: max |diff| {graph['int8_change']['max_abs_diff']:.3g}")
    if "items" in manifest:
        print(f"items: {json.dumps(manifest['items'])}")
    return manifest


if __name__ == "__main__":
    main()
