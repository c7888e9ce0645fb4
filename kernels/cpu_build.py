"""Builds (once, cached) and loads tokenrelay's C++ CPU kernels; `python -m kernels.cpu_build` prebuilds."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

_SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "bindings.cpp",
        "paged_attention_cpu.cpp",
        "prefill_attention_cpu.cpp",
        "int8_linear_cpu.cpp",
        "gguf_linear_cpu.cpp",
        "fused_ops_cpu.cpp",
    )
]
_HEADERS = [Path(__file__).parent / "csrc" / name for name in ("vec_math.h", "packed_matmul.h")]
_NAME = "tokenrelay_cpu_kernels"
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]


def _cpu_signature() -> str:
    """-march=native ties the binary to this CPU's instruction set, so the cache key includes it."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def build_dir() -> Path:
    root = Path(os.environ.get("TOKENRELAY_CACHE_DIR", Path.home() / ".cache" / "tokenrelay"))
    key = hashlib.sha256(
        b"\0".join(
            [
                *(s.read_bytes() for s in (*_SOURCES, *_HEADERS)),
                torch.__version__.encode(),
                " ".join(_CFLAGS).encode(),
                _cpu_signature().encode(),
            ]
        )
    ).hexdigest()[:16]
    return root / "kernels" / f"{_NAME}-{key}"


_loaded: ModuleType | None = None


def load(build: bool = True) -> ModuleType | None:
    """The compiled module, building it if needed (and allowed); None when it cannot be had."""
    global _loaded
    if _loaded is None:
        _loaded = _import_or_build(build)
    return _loaded


def _import_or_build(build: bool) -> ModuleType | None:
    directory = build_dir()
    built = sorted(directory.glob(f"{_NAME}*.so"))
    if built:
        loader = importlib.machinery.ExtensionFileLoader(_NAME, str(built[0]))
        spec = importlib.util.spec_from_file_location(_NAME, built[0], loader=loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    if not build:
        return None
    from torch.utils.cpp_extension import load as jit_load

    directory.mkdir(parents=True, exist_ok=True)
    return jit_load(
        name=_NAME,
        sources=[str(source) for source in _SOURCES],
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )


if __name__ == "__main__":
    module = load()
    print(f"cpu kernels ready in {build_dir()}" if module else "cpu kernels unavailable")
