"""The reference torch backend against attention written out by hand."""

from __future__ import annotations

import pytest
import torch

from kernels.torch_backend import TorchBackend
from tests.kernels.batches import dense_reference, random_batch

SHAPES = [(1, 1), (1, 17), (5, 5), (3, 40), (32, 32), (7, 100), (1, 64), (16, 49)]


@pytest.mark.parametrize("block_size", [8, 16])
def test_matches_dense_reference(block_size: int) -> None:
    batch = random_batch(SHAPES, block_size=block_size)
    expected = dense_reference(batch, 0.25)
    backend = TorchBackend()
    backend.prepare(batch.meta)
    out = backend.forward(batch.query, batch.key, batch.value, 0, batch.meta, 0.25)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_writes_new_kv_at_the_slots() -> None:
    batch = random_batch([(3, 10)])
    backend = TorchBackend()
    backend.prepare(batch.meta)
    backend.forward(batch.query, batch.key, batch.value, 0, batch.meta, 1.0)
    k_cache = batch.meta.kv_caches[0].k
    stored = k_cache.view(-1, *k_cache.shape[2:])[batch.meta.slot_mapping]
    torch.testing.assert_close(stored, batch.key)


def test_sliding_window_limits_the_keys() -> None:
    batch = random_batch([(4, 12)])
    backend = TorchBackend()
    backend.prepare(batch.meta)
    windowed = backend.forward(batch.query, batch.key, batch.value, 0, batch.meta, 0.5, sliding_window=3)
    full = backend.forward(batch.query, batch.key, batch.value, 0, batch.meta, 0.5)
    assert not torch.allclose(windowed, full)


def test_int8_cache_stays_close_to_float() -> None:
    """An int8 cache (per slot and head scales) changes attention output by well under 1 %."""
    from tests.kernels.batches import quantize_cache

    batch = random_batch(SHAPES, dtype=torch.float32)
    backend = TorchBackend()
    backend.prepare(batch.meta)
    full = backend.forward(batch.query, batch.key, batch.value, 0, batch.meta, 0.25)
    quantized = quantize_cache(random_batch(SHAPES, dtype=torch.float32))
    backend.prepare(quantized.meta)
    out = backend.forward(quantized.query, quantized.key, quantized.value, 0, quantized.meta, 0.25)
    assert quantized.meta.kv_caches[0].k_scale is not None
    assert (out - full).abs().max() / full.abs().max() < 0.01
