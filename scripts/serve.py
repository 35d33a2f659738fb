"""Serve recommendations over HTTP: `python scripts/serve.py retrieval_run=<run> ranking_run=<run> port=8000`.

Loads the runs (their models and data, `recsys_lab.serving.runs`), builds the retrieve → rank → diversify
pipeline (`recsys_lab.serving.pipeline`) and serves it with uvicorn (`recsys_lab.serving.app`: /recommend,
/events, /health, /metadata, /reload). Settings are in conf/serve.yaml.
"""

from __future__ import annotations

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from recsys_lab.serving.pipeline import IndexConfig, Pipeline
from recsys_lab.train import CONFIG_DIR
from recsys_lab.utils.checks import user_error_message


def build_pipeline(cfg: DictConfig):
    """`build(retrieval_run=, ranking_run=, online=)`: the pipeline of the config's stage settings for given
    runs (the service's start and every `/reload`)."""
    index = IndexConfig(cfg.index.kind, OmegaConf.to_container(cfg.index.options) or {})

    def build(retrieval_run=None, ranking_run=None, online=None) -> Pipeline:
        return Pipeline.from_runs(
            retrieval_run,
            ranking_run,
            data_dir=cfg.data_dir,
            candidates=cfg.candidates,
            index=index,
            diversity=cfg.diversity,
            exclude_seen=cfg.exclude_seen,
            explain=cfg.explain,
            online=online,
            ranking_export=cfg.ranking_export,
            ranking_int8=cfg.ranking_int8,
        )

    return build


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    import uvicorn

    from recsys_lab.serving.app import create_app

    torch.set_num_threads(cfg.threads)
    import faiss  # its OpenMP pool too: one request's search on `threads` cores, not all of them

    faiss.omp_set_num_threads(cfg.threads)
    build = build_pipeline(cfg)
    try:
        pipeline = build(cfg.retrieval_run, cfg.ranking_run)
    except (ValueError, RuntimeError, OSError, InstantiationException) as err:
        message = user_error_message(err)
        if message is None:
            raise
        raise SystemExit(message) from None
    app = create_app(pipeline, build, cfg.events_path, max_concurrent=cfg.max_concurrent)
    print(f"serving {pipeline.describe()} on http://{cfg.host}:{cfg.port}", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


if __name__ == "__main__":
    main()
