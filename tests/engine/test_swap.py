"""Swap space and the preemption cost model."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.request import Request
from engine.swap import HostBlockPool, PreemptionMode, SwapPolicy, default_costs


def _request(blocks: int, computed: int) -> Request:
    r = Request("r", [1] * computed, SamplingParams())
    r.block_ids = list(range(blocks))
    r.num_computed_tokens = computed
    return r


def _costs(device: str):  # noqa: ANN202
    # SmolLM2-135M's shape: 135M parameters, 30 layers, 9 heads of 64; 16-token fp32 blocks.
    return default_costs(device, 135_000_000, 30, 9, 64, 737_280)


def test_host_pool_hands_out_and_takes_back() -> None:
    pool = HostBlockPool(4)
    ids = pool.allocate(3)
    assert len(set(ids)) == 3 and pool.num_free == 1
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    pool.release(ids)
    assert pool.num_free == 4


def test_cost_model_swaps_on_cpu_and_recomputes_short_sequences_on_gpu() -> None:
    cpu, gpu = _costs("cpu"), _costs("cuda")
    assert cpu.swap_seconds(2) < cpu.recompute_seconds(32)  # a CPU recomputes slowly: swap even short ones
    assert gpu.recompute_seconds(32) < gpu.swap_seconds(2)  # a GPU recomputes 32 tokens faster than PCIe
    # ...but the attention term grows with the square of the length: long sequences swap.
    assert gpu.swap_seconds(4096) < gpu.recompute_seconds(65536)


def test_policy_modes() -> None:
    request = _request(blocks=4, computed=64)
    assert SwapPolicy(PreemptionMode.SWAP, HostBlockPool(8), None).should_swap(request)
    assert not SwapPolicy(PreemptionMode.RECOMPUTE, HostBlockPool(8), None).should_swap(request)
    assert not SwapPolicy(PreemptionMode.SWAP, HostBlockPool(3), None).should_swap(request)  # no room
    assert not SwapPolicy(PreemptionMode.SWAP, None, None).should_swap(request)
    assert SwapPolicy(PreemptionMode.AUTO, HostBlockPool(8), _costs("cpu")).should_swap(request)
    assert not SwapPolicy(PreemptionMode.AUTO, HostBlockPool(8), _costs("cuda")).should_swap(request)


def test_swap_config_is_validated() -> None:
    with pytest.raises(ValueError, match="preemption_mode"):
        EngineConfig(preemption_mode="swap")  # no swap space
    with pytest.raises(ValueError, match="swap_space_gb"):
        EngineConfig(swap_space_gb=-1)


def test_aborting_a_swapped_request_frees_its_host_blocks(tiny_llama: Path) -> None:
    llm = LLM(model=str(tiny_llama), dtype="float64", num_kv_blocks=12, swap_space_gb=0.1, preemption_mode="swap")
    engine = llm.engine
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", [5 + i] * 40, params)
    swapped = None
    for _ in range(200):
        engine.step()
        swapped = next((r for r in engine.scheduler.requests.values() if r.host_block_ids), None)
        if swapped:
            break
    assert swapped is not None, "the pool was meant to be too small for all four"
    pool = engine.scheduler.swap.pool
    assert pool is not None and pool.num_free < pool.num_blocks
    engine.abort(swapped.request_id)
    for r in list(engine.scheduler.requests):
        engine.abort(r)
    assert pool.num_free == pool.num_blocks and engine.kv.pool.num_used == 0


def test_offloaded_weights_give_identical_output(tiny_llama: Path) -> None:
    """Layers kept in host memory and fetched for each forward: the same tokens as without."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8] * 10, [100, 200, 300]]
    plain = LLM(model=str(tiny_llama), dtype="float64").generate(prompts, params)
    offloading = LLM(model=str(tiny_llama), dtype="float64", cpu_offload_gb=0.01)
    offloaded = offloading.engine.offloaded
    assert offloaded and all(o.fetches == 0 for o in offloaded)  # nothing ran yet
    got = offloading.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert all(o.fetches > 0 for o in offloaded)
