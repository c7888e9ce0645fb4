"""xformers backend: its attention biases, checked on CPU through materialize(); the kernels on CUDA."""

from __future__ import annotations

import pytest
import torch

from kernels.metadata import KVLayer
from kernels.torch_backend import TorchBackend
from kernels.xformers_backend import XformersBackend, build_groups, xformers_available
from tests.kernels.batches import random_batch

pytestmark = pytest.mark.skipif(not xformers_available(), reason="xformers is not installed")

# Decodes and prefill chunks of mixed lengths, as one step sees them; (5, 133) is a decode verifying
# four speculative drafts (a multi-token query over its cached sequence: the gathered path).
SHAPES = [(1, 70), (1, 1), (1, 129), (5, 5), (3, 67), (12, 140), (1, 64), (5, 133)]


def _torch_reference(batch, scale: float) -> torch.Tensor:  # noqa: ANN001
    backend = TorchBackend()
    backend.prepare(batch.meta)
    return backend.forward(batch.query, batch.key, batch.value, 0, batch.meta, scale)


def _attend_with_materialized_bias(batch, paged: bool, scale: float) -> torch.Tensor:  # noqa: ANN001
    """What xformers computes, done densely on CPU: softmax(q k^T * scale + bias) v, per group."""
    meta = batch.meta
    k_cache, v_cache = meta.kv_caches[0].k, meta.kv_caches[0].v  # already hold the new K/V (the reference wrote them)
    kv_heads, dim = k_cache.shape[2:]
    heads = batch.query.shape[1]
    flat_k, flat_v = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    out = torch.full(batch.query.shape, float("nan"), dtype=batch.query.dtype)
    for group in build_groups(meta, paged_decodes=paged, device=torch.device("cpu")):
        q = batch.query[group.rows]
        if group.gather_index is None:
            # The paged bias materialises from its logical (padded, per-sequence) layout.
            keys, values = flat_k, flat_v
            logical = len(group.seqs) * group.bias.block_tables.shape[1] * meta.block_size
            bias = group.bias.materialize((q.shape[0], logical), dtype=q.dtype)
        else:
            keys, values = flat_k[group.gather_index], flat_v[group.gather_index]
            bias = group.bias.materialize((q.shape[0], keys.shape[0]), dtype=q.dtype)
        keys = keys[: bias.shape[-1]].repeat_interleave(heads // kv_heads, dim=1)
        values = values[: bias.shape[-1]].repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale + bias
        out[group.rows] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize(("paged", "block_size"), [(True, 64), (False, 16), (False, 64)])
def test_biases_match_the_torch_backend(paged: bool, block_size: int) -> None:
    batch = random_batch(SHAPES, heads=6, kv_heads=2, head_dim=16, block_size=block_size)
    expected = _torch_reference(batch, 0.25)
    got = _attend_with_materialized_bias(batch, paged, 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_decodes_take_the_paged_path_only_with_64_multiple_pages() -> None:
    batch = random_batch(SHAPES, block_size=64)
    assert XformersBackend(64).paged_decodes and not XformersBackend(16).paged_decodes
    groups = build_groups(batch.meta, paged_decodes=True, device=torch.device("cpu"))
    assert [len(g.seqs) for g in groups] == [4, 4]
    assert groups[0].gather_index is None and groups[1].gather_index is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels run only on CUDA; no GPU on this machine")
@pytest.mark.parametrize("block_size", [16, 64])
def test_cuda_kernels_match_the_torch_backend(block_size: int) -> None:
    batch = random_batch(SHAPES, heads=8, kv_heads=2, head_dim=64, block_size=block_size, dtype=torch.float32)
    expected = _torch_reference(batch, 0.125)
    meta = batch.meta
    dev = torch.device("cuda")
    meta.kv_caches = [KVLayer(c.k.to(dev, torch.bfloat16), c.v.to(dev, torch.bfloat16)) for c in meta.kv_caches]
    meta.slot_mapping = meta.slot_mapping.to(dev)
    backend = XformersBackend(block_size)
    backend.prepare(meta)
    out = backend.forward(
        batch.query.to(dev, torch.bfloat16),
        batch.key.to(dev, torch.bfloat16),
        batch.value.to(dev, torch.bfloat16),
        0,
        meta,
        0.125,
    )
    torch.testing.assert_close(out.float().cpu(), expected, rtol=3e-2, atol=3e-2)
