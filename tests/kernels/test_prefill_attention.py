"""The C++ prefill kernel (float32 chunks of more than KERNEL_MAX_QUERY_LEN tokens) against float64 attention."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kernels import cpu_backend as cpu_backend_module
from kernels.cpu_backend import KERNEL_MAX_QUERY_LEN, CpuBackend
from kernels.torch_backend import TorchBackend
from tests.kernels.batches import Batch, as_float64, dense_reference, poison_unused_slots, quantize_cache, random_batch

FRESH = [(9, 9), (15, 15), (16, 16), (17, 17), (33, 33), (64, 64), (100, 100), (250, 250)]
# Chunked-prefill continuations (the start of the sequence cached by earlier steps) and prefix-cache
# hits (a whole number of cached blocks, the rest of the prompt new).
CONTINUED = [(40, 90), (100, 300), (9, 200), (64, 129)]
PREFIX_HITS = [(30, 126), (17, 113), (48, 64)]
DECODES = [(1, 1), (1, 17), (3, 40), (KERNEL_MAX_QUERY_LEN, 50)]
SHAPES = FRESH[:4] + DECODES[:2] + CONTINUED + FRESH[4:] + DECODES[2:] + PREFIX_HITS


@pytest.fixture(scope="module")
def backend(kernels: Any) -> CpuBackend:  # noqa: ANN401 - the compiled module
    if not kernels.prefill_head_dims():
        pytest.skip("this build has no prefill kernel (no AVX2/FMA): long chunks take SDPA")
    return CpuBackend(kernels)


@pytest.fixture
def calls(backend: CpuBackend, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts the prefill kernel's and SDPA's calls (the backend instance and module are patched)."""
    counts = {"kernel": 0, "sdpa": 0}
    kernel, sdpa = backend._prefill, cpu_backend_module.attend_sequence

    def counted_kernel(*args: Any) -> None:  # noqa: ANN401
        counts["kernel"] += 1
        kernel(*args)

    def counted_sdpa(*args: Any) -> None:  # noqa: ANN401
        counts["sdpa"] += 1
        sdpa(*args)

    monkeypatch.setattr(backend, "_prefill", counted_kernel)
    monkeypatch.setattr(cpu_backend_module, "attend_sequence", counted_sdpa)
    yield counts


def _forward(backend: CpuBackend, batch: Batch, scale: float) -> torch.Tensor:
    backend.prepare(batch.meta)
    return backend.forward(batch.query, batch.key, batch.value, 0, batch.meta, scale)


def _check(out: torch.Tensor, batch64: Batch, scale: float) -> None:
    """Against float64 attention of the same inputs: fp32 rounding, relative to the outputs' size."""
    expected = dense_reference(batch64, scale)
    assert not out.isnan().any()
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (9, 3, 128), (4, 4, 64), (4, 4, 128), (8, 2, 64), (16, 1, 64)],
)
def test_prefill_kernel_matches_float64(
    backend: CpuBackend, calls: dict[str, int], engine_threading: None, heads: int, kv_heads: int, head_dim: int
) -> None:
    """Fresh prompts around the block and tile sizes, continuations, prefix hits and decodes in one
    batch, over shuffled blocks whose unused slots hold NaN; GQA ratios 3, 1, 4 and 16 (more heads
    than a tile has rows: one token per tile)."""
    batch = poison_unused_slots(random_batch(SHAPES, heads, kv_heads, head_dim, dtype=torch.float32))
    table = batch.meta.block_tables[SHAPES.index((250, 250))]
    assert (table[1:16] - table[:15]).ne(1).any()  # the blocks are scattered, not in order
    batch64 = as_float64(batch)
    scale = head_dim**-0.5
    out = _forward(backend, batch, scale)
    assert calls == {"kernel": 1, "sdpa": 0}
    assert batch.meta.backend_state.rows.numel() == sum(n for n, _ in SHAPES if n <= KERNEL_MAX_QUERY_LEN)
    _check(out, batch64, scale)


@pytest.mark.parametrize("block_size", [8, 32, 64, 5])
def test_block_sizes(backend: CpuBackend, calls: dict[str, int], engine_threading: None, block_size: int) -> None:
    """The block size comes from the cache; one of 5 leaves key groups of 4 with a remainder."""
    shapes = [(70, 70), (20, 133), (9, 9), (2, 30)]
    batch = poison_unused_slots(random_batch(shapes, 9, 3, 64, block_size=block_size, dtype=torch.float32, seed=1))
    batch64 = as_float64(batch)
    out = _forward(backend, batch, 0.125)
    assert calls["kernel"] == 1
    _check(out, batch64, 0.125)


def test_same_result_with_any_thread_count(backend: CpuBackend) -> None:
    """Tiles are independent, handed out in any order: the output is the same bits with 1 or 2 threads."""
    batch = random_batch([(200, 260), (33, 33), (12, 12)], 9, 3, 64, dtype=torch.float32, seed=2)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(_forward(backend, batch, 0.125))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("case", ["float64", "int8", "head_dim_16", "switched_off"])
def test_other_chunks_keep_sdpa(backend: CpuBackend, calls: dict[str, int], case: str) -> None:
    """float64, int8 caches, head sizes the kernel is not built for, and prefill_kernel=False: SDPA,
    with the torch backend's numbers."""
    shapes = [(20, 20), (40, 90), (1, 30)]
    dtype = torch.float64 if case == "float64" else torch.float32
    batch = random_batch(shapes, 6, 2, 16 if case == "head_dim_16" else 64, dtype=dtype)
    if case == "int8":
        batch = quantize_cache(batch)
    layer = batch.meta.kv_caches[0]
    copies = [type(layer)(*(t.clone() for t in layer.tensors()))]  # the reference writes its own cache
    backend.prefill_kernel = case != "switched_off"
    try:
        out = _forward(backend, batch, 0.25)
    finally:
        backend.prefill_kernel = True
    assert calls == {"kernel": 0, "sdpa": 2}
    batch.meta.kv_caches = copies
    reference = TorchBackend()
    reference.prepare(batch.meta)
    expected = reference.forward(batch.query, batch.key, batch.value, 0, batch.meta, 0.25)
    tol = 1e-12 if dtype == torch.float64 else 2e-5  # the decode row takes the decode kernel here
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_kernel_checks_its_inputs(kernels: Any) -> None:  # noqa: ANN401
    batch = random_batch([(20, 20)], 9, 3, 64, dtype=torch.float32)
    layer, meta = batch.meta.kv_caches[0], batch.meta
    out = torch.empty(batch.query.shape)
    tables = meta.block_tables.to(torch.int32).contiguous()
    seqs = torch.tensor([[0, 0, 20, 20]])
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.prefill_attention(out, batch.query, layer.k, layer.v, torch.tensor([[0, 0, 20, 2000]]), tables, 0.1)
    with pytest.raises(RuntimeError, match="block out of range"):
        kernels.prefill_attention(out, batch.query, layer.k, layer.v, seqs, tables + 1000, 0.1)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.prefill_attention(
            out.double(), batch.query.double(), layer.k.double(), layer.v.double(), seqs, tables, 0.1
        )
