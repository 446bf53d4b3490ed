"""Index parameter rules (pure): nlist, PQ split, fallbacks, nprobe schedule, device choice."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.index_params import (
    GPU_MAX_K,
    GPU_PQ_M,
    MIN_POINTS_PER_CENTROID,
    PQ8_MIN_TRAIN,
    IndexPlan,
    bytes_per_item,
    choose_device,
    k_factor_schedule,
    nlist_for,
    nprobe_schedule,
    plan_candidates,
    pq_m_for,
    search_k,
    small_pq_nbits,
)


def test_known_corpus_sizes():
    # MovieLens-100K: 1,682 items -> at most 43 lists of 39 points -> 32
    assert nlist_for(1682) == 32
    assert nlist_for(20_000) == 512  # 8*sqrt = 1131 but 20000/39 = 512.8
    assert nlist_for(1_000_000) == 4096  # 8*sqrt = 8000 -> 4096 (4.1*sqrt(N))
    assert nlist_for(100_000_000) == 65536
    assert nlist_for(311) == 0 and nlist_for(312) == 8


def test_pq_split_for_common_dimensions():
    assert pq_m_for(64) == 32
    assert pq_m_for(32) == 16
    assert pq_m_for(48) == 24
    assert pq_m_for(128) == 64
    assert pq_m_for(768) == 96
    assert pq_m_for(67) == 0  # prime: only M=1 divides it, 67 dims per sub-quantizer is useless


def test_movielens_plan_is_low_bit_pq_then_ivf_flat():
    plans = plan_candidates(1682, 64)
    assert [(p.type, p.nlist, p.m, p.nbits) for p in plans] == [("IVF-PQ", 32, 32, 5), ("IVF-Flat", 32, 0, 0)]
    assert all("9,984" in p.fallback for p in plans)
    assert plans[0].factory == "IVF32,PQ32x5" and not plans[0].gpu_ok
    assert plans[1].factory == "IVF32,Flat" and plans[1].gpu_ok


def test_large_corpus_plan_is_gpu_ready_ivf_pq():
    (plan,) = plan_candidates(1_000_000, 64)
    assert plan == IndexPlan("IVF-PQ", nlist=4096, m=32, nbits=8, fallback=None, refine=True)
    assert plan.factory == "IVF4096,PQ32x8" and plan.gpu_ok


def test_tiny_corpus_is_exact_flat():
    (plan,) = plan_candidates(30, 8)
    assert plan.type == "Flat" and plan.factory == "Flat" and "too few" in plan.fallback


def test_unsplittable_dimension_falls_back_to_ivf_flat():
    (plan,) = plan_candidates(50_000, 67)
    assert plan.type == "IVF-Flat" and "67" in plan.fallback


@given(n=st.integers(1, 10**9), d=st.sampled_from([8, 16, 24, 32, 48, 64, 96, 128, 256, 384, 512, 768, 1024]))
def test_plan_invariants(n, d):
    plans = plan_candidates(n, d)
    assert plans[-1].type in ("Flat", "IVF-Flat") or plans[-1].nbits == 8
    for p in plans:
        if p.is_ivf:
            assert p.nlist & (p.nlist - 1) == 0  # power of two
            assert n / p.nlist >= MIN_POINTS_PER_CENTROID
            assert p.nlist <= 16 * math.sqrt(n)
        if p.type == "IVF-PQ":
            assert d % p.m == 0 and p.m in GPU_PQ_M
            assert (1 << p.nbits) * MIN_POINTS_PER_CENTROID <= n  # every codebook centroid gets 39 points
            assert (p.nbits == 8) == (n >= PQ8_MIN_TRAIN)
        assert (p.fallback is None) == (p.type == "IVF-PQ" and p.nbits == 8)
        assert p.refine == (p.fallback is None)  # only the 8-bit plan may re-rank; fallbacks have an exact successor


def test_small_pq_bits():
    assert small_pq_nbits(1682) == 5  # 32 * 39 = 1248 <= 1682 < 64 * 39
    assert small_pq_nbits(623) == 0 and small_pq_nbits(624) == 4
    assert small_pq_nbits(9983) == 7


def test_nprobe_schedule():
    assert nprobe_schedule(32) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert nprobe_schedule(1) == [1]
    assert nprobe_schedule(0) == []
    big = nprobe_schedule(65536)
    assert big[-1] == GPU_MAX_K and big == sorted(set(big))


def test_k_factor_schedule_is_bounded_by_the_gpu_k():
    assert k_factor_schedule(100) == [2, 4, 8, 16]  # 1,600 candidates <= 2,048
    assert k_factor_schedule(1024) == [2]
    assert k_factor_schedule(1025) == []
    assert all(f * 10 <= GPU_MAX_K for f in k_factor_schedule(10))


def test_bytes_per_item():
    pq = IndexPlan("IVF-PQ", nlist=4096, m=32, nbits=8, refine=True)
    assert bytes_per_item(pq, 64, refine=False) == {"codes": 32, "ids": 16, "refine": 0, "total": 48}
    assert bytes_per_item(pq, 64, refine=True) == {"codes": 32, "ids": 16, "refine": 256, "total": 304}
    assert bytes_per_item(IndexPlan("IVF-PQ", nlist=32, m=32, nbits=5), 64, refine=False)["codes"] == 20  # packed bits
    assert bytes_per_item(IndexPlan("IVF-Flat", nlist=32), 64, refine=False)["codes"] == 256
    assert bytes_per_item(IndexPlan("Flat"), 8, refine=False) == {"codes": 32, "ids": 8, "refine": 0, "total": 40}


def test_device_choice():
    pq8 = IndexPlan("IVF-PQ", nlist=4096, m=32, nbits=8)
    pq5 = IndexPlan("IVF-PQ", nlist=32, m=32, nbits=5)
    assert choose_device("auto", 1, pq8) == "gpu"
    assert choose_device("auto", 0, pq8) == "cpu"
    assert choose_device("no", 2, pq8) == "cpu"
    assert choose_device("auto", 1, pq5) == "cpu"  # GPU IVF-PQ kernels take 8-bit codes only
    assert choose_device("auto", 1, IndexPlan("Flat")) == "cpu"
    with pytest.raises(RuntimeError, match="no GPU"):
        choose_device("yes", 0, pq8)
    with pytest.raises(ValueError, match="auto, yes or no"):
        choose_device("maybe", 0, pq8)


def test_search_k_leaves_room_for_exclusions():
    assert search_k(10, 5, 1682) == 15
    assert search_k(100, 2000, 1682) == 1682
    assert search_k(10, 0, 3) == 3
