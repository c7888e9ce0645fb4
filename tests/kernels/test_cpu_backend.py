"""The compiled CPU kernel (decodes and short chunks) against the torch reference backend."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_build
from kernels.cpu_backend import KERNEL_MAX_QUERY_LEN, CpuBackend
from kernels.metadata import KVLayer
from kernels.torch_backend import TorchBackend
from tests.kernels.batches import quantize_cache, random_batch

SHAPES = [(1, 1), (1, 17), (1, 300), (3, 40), (KERNEL_MAX_QUERY_LEN, 50), (20, 20), (40, 90), (1, 64)]


@pytest.fixture(scope="module")
def cpu_backend() -> CpuBackend:
    module = cpu_build.load()
    assert module is not None, "the CPU kernel must build on these machines (g++ is present)"
    return CpuBackend(module)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(6, 2, 16), (9, 3, 64), (4, 4, 128), (8, 1, 24)])
def test_matches_torch_backend(
    cpu_backend: CpuBackend, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    batch = random_batch(SHAPES, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    reference = TorchBackend()
    meta = batch.meta
    cache_copy = [KVLayer(layer.k.clone(), layer.v.clone()) for layer in meta.kv_caches]
    reference.prepare(meta)
    expected = reference.forward(batch.query, batch.key, batch.value, 0, meta, head_dim**-0.5)
    meta.kv_caches = cache_copy
    cpu_backend.prepare(meta)
    assert meta.backend_state.rows.numel() > 0 and meta.backend_state.long_seqs  # both paths ran
    out = cpu_backend.forward(batch.query, batch.key, batch.value, 0, meta, head_dim**-0.5)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_block_sizes(cpu_backend: CpuBackend) -> None:
    for block_size in (8, 32, 64):
        batch = random_batch([(1, 130), (2, 65)], block_size=block_size)
        ref = TorchBackend()
        ref.prepare(batch.meta)
        expected = ref.forward(batch.query, batch.key, batch.value, 0, batch.meta, 0.3)
        cpu_backend.prepare(batch.meta)
        torch.testing.assert_close(
            cpu_backend.forward(batch.query, batch.key, batch.value, 0, batch.meta, 0.3),
            expected,
            rtol=1e-12,
            atol=1e-12,
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_int8_cache_matches_torch_backend(cpu_backend: CpuBackend, dtype: torch.dtype) -> None:
    """Reading an int8 cache with its scales in the kernel equals dequantise-then-SDPA.

    (A sequence with nothing cached is attended from its fresh, unquantized K/V by SDPA but from the
    cache by the kernel; both are fine, they are just not the same numbers, so none is used here.)
    """
    shapes = [(n, length) for n, length in SHAPES if not (n == length and n <= KERNEL_MAX_QUERY_LEN)]
    batch = quantize_cache(random_batch(shapes, heads=9, kv_heads=3, head_dim=64, dtype=dtype))
    meta = batch.meta
    layer = meta.kv_caches[0]
    cache_copy = [KVLayer(*(t.clone() for t in layer.tensors()))]
    reference = TorchBackend()
    reference.prepare(meta)
    expected = reference.forward(batch.query, batch.key, batch.value, 0, meta, 0.125)
    meta.kv_caches = cache_copy
    cpu_backend.prepare(meta)
    out = cpu_backend.forward(batch.query, batch.key, batch.value, 0, meta, 0.125)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    assert meta.kv_caches[0].k.dtype == torch.int8
