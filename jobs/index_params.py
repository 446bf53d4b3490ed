"""Faiss index parameters from the corpus size (DESIGN §6). Pure rules, no Faiss import.

Rules (the Faiss wiki's guidelines plus the GPU limits):

* nlist: about 8·sqrt(N) (the recommended band is 4–16·sqrt(N)), but k-means needs about 39
  training points per centroid, so nlist <= N / 39; rounded down to a power of two.
* PQ: M sub-quantizers must divide d and, so that the same index also runs on a GPU, lie in
  ``GPU_PQ_M``. We take the largest such M with at least 2 dimensions per sub-quantizer
  (d=64 -> M=32, 32 bytes per item): recall@100 >= 0.95 without re-ranking needs fine codes.
* nbits 8 (the only width the GPU IVF-PQ kernels take) needs 256 codebook centroids x 39 =
  9,984 training points. A smaller corpus cannot train it.

Small corpora fall back honestly, in order, each step recorded with its reason:

    N >= 9,984                IVF-PQ, 8-bit codes                      (GPU or CPU)
    312 <= N < 9,984          IVF-PQ with fewer bits (2^nbits x 39 <= N, nbits >= 4), CPU only;
                              kept only if it reaches the recall target, else
                              IVF-Flat (exact distances inside the probed lists)
    N < 312                   Flat (exact search; fewer than 8 lists of 39 points)

MovieLens-100K (1,682 items, d=64): IVF-PQ 32x5 (nlist 32) is tried first, IVF-Flat
(nlist 32) is the fallback. Measured on a trained 12-epoch model with the 943 evaluation users
as queries: 5-bit PQ tops out at recall@100 0.914 (< 0.95, even probing all 32 lists), so
IVF-Flat is chosen; it reaches 0.974 at nprobe 8, and hit@50 through it is 0.546 against 0.545
for exact search.

1M items, d=64: IVF4096,PQ32x8 (32 bytes per item), GPU-buildable, nprobe tuned on the queries.
There the codes alone level off at recall@100 0.908 (the 8-bit codes cannot order the 100
nearest of 1M clustered items well enough, whatever nprobe), so the 8-bit plan may add an exact
re-ranking stage (``refine``, faiss.IndexRefineFlat): the PQ scan returns ``k_factor x k``
candidates and their stored float vectors re-rank them by exact inner product. It costs
``4 x d`` bytes per item (256 at d=64, 8x the codes) but is touched for only ``k_factor x k``
items per query; the scan over the lists stays on 32-byte codes. Low-bit PQ plans of small
corpora never refine: IVF-Flat after them is exact in its lists for the same float memory.
Measured (benchmarks.index_scale, 2 cores): re-ranking 2x100 candidates at nprobe 32 gives
held-out recall@100 0.955 at 10.8k batch QPS, against 0.908 at nprobe 128 and 2.0k QPS for the
codes alone. For comparison (not a candidate here), IVF4096,Flat at nprobe 32 gives 0.955 at
11.9k QPS with 264 bytes per item against 304: at d=64 on a CPU the re-ranking stage wins recall,
not speed or memory over exact lists; what it keeps small is the data each probe scans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
"""Sub-quantizer counts the Faiss GPU IVF-PQ implementation accepts."""
MIN_POINTS_PER_CENTROID = 39
"""Faiss warns below this many training points per k-means centroid."""
PQ_NBITS = 8
"""Code width of the standard (GPU-capable) IVF-PQ."""
PQ8_MIN_TRAIN = (1 << PQ_NBITS) * MIN_POINTS_PER_CENTROID  # 9,984
"""Training points an 8-bit PQ codebook needs."""
MIN_PQ_NBITS = 4
"""Narrowest PQ code tried for small corpora (16 centroids per sub-space)."""
MIN_NLIST = 8
"""Fewer inverted lists than this is not worth an IVF structure: exact search instead."""
NLIST_PER_SQRT_N = 8.0
"""Middle of the recommended 4–16·sqrt(N) band."""
GPU_MAX_K = 2048
"""Largest k and nprobe the Faiss GPU search kernels accept."""
MAX_DIMS_PER_SUBQUANTIZER = 16
"""Coarser PQ splits than this lose too much recall to be worth trying."""
ID_BYTES = 8
"""Bytes per item of an int64 label: the inverted lists store positions, the IDMap their ids."""


@dataclass(frozen=True)
class IndexPlan:
    """One candidate index structure.

    type: ``IVF-PQ``, ``IVF-Flat`` or ``Flat``; nlist, m, nbits: 0 where they do not apply.
    fallback: None for the preferred structure, else why a simpler one is used.
    refine: whether the builder may add exact re-ranking on stored float vectors when the codes
    alone stay below the recall target (the 8-bit IVF-PQ plan only).
    """

    type: str
    nlist: int = 0
    m: int = 0
    nbits: int = 0
    fallback: str | None = None
    refine: bool = False

    @property
    def factory(self) -> str:
        """Faiss ``index_factory`` description of the structure built over positions 0..n-1 (the
        builder wraps it, and its re-ranking stage if any, in an IDMap that answers item ids)."""
        if self.type == "IVF-PQ":
            return f"IVF{self.nlist},PQ{self.m}x{self.nbits}"
        if self.type == "IVF-Flat":
            return f"IVF{self.nlist},Flat"
        return "Flat"

    @property
    def gpu_ok(self) -> bool:
        """Whether the Faiss GPU cloner and kernels take this structure."""
        if self.type == "IVF-PQ":
            return self.nbits == PQ_NBITS and self.m in GPU_PQ_M
        return self.type == "IVF-Flat"

    @property
    def is_ivf(self) -> bool:
        return self.type.startswith("IVF")


def pow2_floor(x: float) -> int:
    """Largest power of two <= x (x >= 1)."""
    if x < 1:
        raise ValueError(f"pow2_floor needs x >= 1, got {x}")
    return 1 << int(math.floor(math.log2(x)))


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: pow2 <= min(8·sqrt(n), n / 39); 0 when below MIN_NLIST."""
    if n < MIN_NLIST * MIN_POINTS_PER_CENTROID:
        return 0
    return pow2_floor(min(NLIST_PER_SQRT_N * math.sqrt(n), n / MIN_POINTS_PER_CENTROID))


def pq_m_for(d: int) -> int:
    """PQ sub-quantizers for dimension ``d``: the largest GPU-allowed divisor of d with >= 2 dims
    per sub-quantizer; 0 when every allowed split is coarser than MAX_DIMS_PER_SUBQUANTIZER."""
    fits = [m for m in GPU_PQ_M if d % m == 0 and d // m >= 2]
    if not fits or d // max(fits) > MAX_DIMS_PER_SUBQUANTIZER:
        return 0
    return max(fits)


def small_pq_nbits(n: int) -> int:
    """Widest code (< 8 bits) whose 2^nbits codebook centroids get 39 training points from n."""
    if n < (1 << MIN_PQ_NBITS) * MIN_POINTS_PER_CENTROID:
        return 0
    return min(PQ_NBITS - 1, int(math.floor(math.log2(n / MIN_POINTS_PER_CENTROID))))


def plan_candidates(n: int, d: int) -> list[IndexPlan]:
    """Index structures to try, best first, for ``n`` vectors of dimension ``d``.

    The builder takes the first candidate whose tuned recall reaches the target; the last
    candidate is always exact or exact within its probed lists, so it can reach any target.
    """
    if n <= 0 or d <= 0:
        raise ValueError(f"cannot index {n} vectors of dimension {d}")
    nlist = nlist_for(n)
    if nlist == 0:
        reason = (
            f"{n} items are too few for an inverted file ({MIN_NLIST} lists x {MIN_POINTS_PER_CENTROID} "
            f"training points = {MIN_NLIST * MIN_POINTS_PER_CENTROID} needed): exact Flat search"
        )
        return [IndexPlan("Flat", fallback=reason)]
    m = pq_m_for(d)
    if m == 0:
        reason = f"dimension {d} has no PQ split in the GPU-allowed set {GPU_PQ_M}: IVF-Flat"
        return [IndexPlan("IVF-Flat", nlist=nlist, fallback=reason)]
    if n >= PQ8_MIN_TRAIN:
        return [IndexPlan("IVF-PQ", nlist=nlist, m=m, nbits=PQ_NBITS, refine=True)]
    short = f"{n} items < {PQ8_MIN_TRAIN:,} training points needed for 8-bit PQ codebooks"
    plans = []
    nbits = small_pq_nbits(n)
    if nbits:
        plans.append(IndexPlan("IVF-PQ", nlist=nlist, m=m, nbits=nbits, fallback=f"{short}: {nbits}-bit PQ codes (CPU only)"))
    plans.append(IndexPlan("IVF-Flat", nlist=nlist, fallback=f"{short}: IVF-Flat"))
    return plans


def nprobe_schedule(nlist: int, max_nprobe: int = GPU_MAX_K) -> list[int]:
    """Increasing nprobe values to try: 1, 2, 3, 4, 6, 8, 12, 16, ... up to min(nlist, max_nprobe),
    which is always the last value."""
    top = min(nlist, max_nprobe)
    if top < 1:
        return []
    out: list[int] = []
    p = 1
    while p < top:
        out.append(p)
        if p >= 2 and p * 3 // 2 < top and (p & (p - 1)) == 0:
            out.append(p * 3 // 2)
        p *= 2
    out.append(top)
    return sorted(set(out))


def k_factor_schedule(k: int, max_k: int = GPU_MAX_K) -> list[int]:
    """Re-ranking depths to try: 2, 4, 8, ... while ``k_factor x k`` candidates stay <= ``max_k``
    (what a GPU copy of the codes could return in one search); [] when even 2k would not."""
    out: list[int] = []
    f = 2
    while f * k <= max_k:
        out.append(f)
        f *= 2
    return out


def bytes_per_item(plan: IndexPlan, d: int, refine: bool) -> dict[str, int]:
    """Memory of one indexed item, by part: ``codes`` (PQ code, or the float vector for Flat and
    IVF-Flat), ``ids`` (list position + IDMap id, int64 each; Flat: the id only), ``refine``
    (the float vector kept for re-ranking, ``4 x d``; 0 without), ``total``. Excludes the
    coarse centroids and PQ codebooks, which do not grow with the corpus."""
    codes = (plan.m * plan.nbits + 7) // 8 if plan.type == "IVF-PQ" else 4 * d
    ids = 2 * ID_BYTES if plan.is_ivf else ID_BYTES
    extra = 4 * d if refine else 0
    return {"codes": codes, "ids": ids, "refine": extra, "total": codes + ids + extra}


def choose_device(use_gpu: str, n_gpus: int, plan: IndexPlan) -> str:
    """``gpu`` or ``cpu`` for building ``plan``.

    ``use_gpu``: ``auto`` (GPU when Faiss sees one and the plan runs there), ``yes`` (same, but
    an error when no GPU is visible), ``no``. Plans the GPU does not take build on the CPU.
    """
    if use_gpu not in ("auto", "yes", "no"):
        raise ValueError(f"index.use_gpu must be auto, yes or no, got {use_gpu!r}")
    if use_gpu == "yes" and n_gpus == 0:
        raise RuntimeError("index.use_gpu=yes but Faiss sees no GPU (is faiss-gpu installed and a GPU visible?)")
    if use_gpu == "no" or n_gpus == 0 or not plan.gpu_ok:
        return "cpu"
    return "gpu"


def search_k(k: int, n_excluded: int, n_items: int) -> int:
    """Neighbours to fetch so that ``k`` remain after removing up to ``n_excluded`` seen items."""
    return max(1, min(k + n_excluded, n_items))
