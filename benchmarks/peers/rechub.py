"""torch-rechub's DSSM and YoutubeDNN (PyPI ``torch-rechub``) trained on the shared Split.

The models, feature classes and trainer are the library's own (``torch_rechub.models.matching``,
``torch_rechub.basic.features``, ``torch_rechub.trainers.MatchTrainer``); only the data feeding
is ours, so that the library sees exactly the Split every other model sees. The recipes follow
the library's MovieLens examples (examples/matching/run_ml_dssm.py, run_ml_youtube_dnn.py):

    features   user: user_id, user attribute tokens (mean), history of the previous 50 train
               items (mean, sharing the item_id table); item: item_id (+ item attribute tokens
               for DSSM; YoutubeDNN's item side is the item_id embedding only, as in the paper)
    DSSM       towers [256, 128, dim] with PReLU; trained with the library's in-batch negatives
               (``in_batch_neg=True``: softmax over the other items of the batch) or, as in the
               example, point-wise BCE on popularity^0.75-sampled negatives (``loss="pointwise"``)
    YoutubeDNN user tower [256, dim]; list-wise softmax over the positive and ``negatives``
               items sampled by popularity^0.75 (the example's sample_method=1), temperature 0.02

Shapes: N train interactions, L history slots, d = ``RechubConfig.dim``.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from benchmarks.peers.protocol import TOP_K, Split, eval_histories, histories, topk_from_vectors

ARCHS = ("dssm", "youtubednn")


@dataclass(frozen=True)
class RechubConfig:
    """Training recipe of a torch-rechub peer."""

    dim: int = 64
    """Embedding width of every feature and the tower output."""
    epochs: int = 12
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-6
    history_len: int = 50
    negatives: int = 20
    """Sampled negatives per positive (YoutubeDNN list-wise; DSSM point-wise)."""
    temperature: float = 0.02
    """YoutubeDNN's logit temperature (DSSM's forward ignores it in torch-rechub 0.9.0)."""
    dssm_loss: str = "inbatch"
    """``inbatch`` (MatchTrainer in_batch_neg) or ``pointwise`` (BCE on sampled negatives)."""


class _Batches(torch.utils.data.Dataset):
    """A dict of equal-length tensors, indexed by a whole batch of rows at once (one gather per
    feature instead of one Python call per sample); yields (x_dict, y) as MatchTrainer expects."""

    def __init__(self, x: dict[str, torch.Tensor], y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, rows):
        rows = torch.as_tensor(rows)
        return {k: v[rows] for k, v in self.x.items()}, self.y[rows]


def loader(x: dict[str, torch.Tensor], y: torch.Tensor, batch_size: int, seed: int, drop_last: bool) -> torch.utils.data.DataLoader:
    """Shuffled batches in a seeded order (a fresh permutation each epoch)."""
    data = _Batches(x, y)
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data, generator=generator), batch_size, drop_last)
    return torch.utils.data.DataLoader(data, sampler=sampler, batch_size=None)


def popularity_negatives(counts: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """item_idx drawn with probability ∝ count^0.75 (torch-rechub's sample_method=1); ``counts``
    int [n_items + 1] with row 0 = padding (never drawn)."""
    p = counts[1:].astype(np.float64) ** 0.75
    p /= p.sum()
    return rng.choice(np.arange(1, len(counts)), size=shape, p=p).astype(np.int64)


def features(split: Split, cfg: RechubConfig, arch: str):
    """(user_features, item_features, neg_item_feature or None) as torch-rechub Feature objects."""
    from torch_rechub.basic.features import SequenceFeature, SparseFeature

    d = cfg.dim
    user = [
        SparseFeature("user_id", vocab_size=split.n_users + 1, embed_dim=d),
        SequenceFeature("user_attrs", vocab_size=split.n_attrs + 1, embed_dim=d, pooling="mean", padding_idx=0),
        SequenceFeature("hist_item_id", vocab_size=split.n_items + 1, embed_dim=d, pooling="mean", shared_with="item_id", padding_idx=0),
    ]
    item = [SparseFeature("item_id", vocab_size=split.n_items + 1, embed_dim=d, padding_idx=0)]
    if arch == "dssm":
        item.append(SequenceFeature("item_attrs", vocab_size=split.n_attrs + 1, embed_dim=d, pooling="mean", padding_idx=0))
        return user, item, None
    neg = [SequenceFeature("neg_items", vocab_size=split.n_items + 1, embed_dim=d, pooling="concat", shared_with="item_id")]
    return user, item, neg


def build_model(split: Split, cfg: RechubConfig, arch: str) -> torch.nn.Module:
    """A fresh torch-rechub DSSM or YoutubeDNN over the Split's vocabularies."""
    from torch_rechub.models.matching import DSSM, YoutubeDNN

    user, item, neg = features(split, cfg, arch)
    if arch == "dssm":
        tower = {"dims": [256, 128, cfg.dim], "activation": "prelu"}
        return DSSM(user, item, user_params=tower, item_params=tower, temperature=cfg.temperature)
    if arch == "youtubednn":
        return YoutubeDNN(user, item, neg, user_params={"dims": [256, cfg.dim]}, temperature=cfg.temperature)
    raise ValueError(f"unknown torch-rechub arch {arch!r}; expected one of {ARCHS}")


def user_inputs(split: Split, users: np.ndarray, hist: np.ndarray) -> dict[str, torch.Tensor]:
    """User-side input columns for rows of ``users[B]`` with histories ``hist[B, L]``."""
    return {
        "user_id": torch.from_numpy(users),
        "user_attrs": torch.from_numpy(split.user_attrs[users]),
        "hist_item_id": torch.from_numpy(hist),
    }


def item_inputs(split: Split, items: np.ndarray) -> dict[str, torch.Tensor]:
    """Item-side input columns for ``items[B]``."""
    return {"item_id": torch.from_numpy(items), "item_attrs": torch.from_numpy(split.item_attrs[items])}


def training_data(split: Split, cfg: RechubConfig, arch: str, rng: np.random.Generator) -> tuple[dict, torch.Tensor]:
    """(x, y) over the train interactions in the layout the arch's MatchTrainer mode expects."""
    hist = histories(split.train_users, split.train_items, cfg.history_len)
    x = {**user_inputs(split, split.train_users, hist), **item_inputs(split, split.train_items)}
    n = len(split.train_items)
    if arch == "youtubednn":  # list-wise: label 0 = the positive is the first logit
        x["neg_items"] = torch.from_numpy(popularity_negatives(split.item_counts(), (n, cfg.negatives), rng))
        return x, torch.zeros(n, dtype=torch.long)
    if cfg.dssm_loss == "inbatch":
        return x, torch.ones(n)
    if cfg.dssm_loss != "pointwise":
        raise ValueError(f"unknown dssm_loss {cfg.dssm_loss!r}; expected 'inbatch' or 'pointwise'")
    negatives = popularity_negatives(split.item_counts(), (n * cfg.negatives,), rng)
    rows = np.tile(np.arange(n), cfg.negatives)
    neg = {k: v[torch.from_numpy(rows)] for k, v in x.items()}
    neg.update(item_inputs(split, negatives))
    y = torch.cat([torch.ones(n), torch.zeros(len(rows))])
    return {k: torch.cat([x[k], neg[k]]) for k in x}, y


def train(split: Split, cfg: RechubConfig, arch: str, seed: int, threads: int) -> tuple[torch.nn.Module, float, int]:
    """Train with the library's MatchTrainer; returns (model in eval mode, seconds, rows seen)."""
    from torch_rechub.trainers import MatchTrainer

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x, y = training_data(split, cfg, arch, np.random.default_rng(seed))
            model = build_model(split, cfg, arch)
            in_batch = arch == "dssm" and cfg.dssm_loss == "inbatch"
            mode = 2 if arch == "youtubednn" else 0
            data = loader(x, y, cfg.batch_size, seed, drop_last=in_batch)
            with tempfile.TemporaryDirectory(prefix="rechub-") as tmp:
                trainer = MatchTrainer(
                    model, mode=mode, in_batch_neg=in_batch, sampler_seed=seed if in_batch else None,
                    optimizer_params={"lr": cfg.lr, "weight_decay": cfg.weight_decay},
                    n_epoch=cfg.epochs, device="cpu", model_path=tmp,
                )  # fmt: skip
                t0 = time.perf_counter()
                # MatchTrainer prints a line per epoch and a progress bar per batch; logs stay
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    trainer.fit(data)
                seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)
    rows = (len(y) // cfg.batch_size * cfg.batch_size if in_batch else len(y)) * cfg.epochs
    return model.eval(), seconds, rows


@torch.no_grad()
def embeddings(model: torch.nn.Module, split: Split, cfg: RechubConfig) -> tuple[np.ndarray, np.ndarray]:
    """(user vectors of the eval queries [U, d], item vectors [n_items + 1, d]) from the towers."""
    model.eval()
    model.mode = "user"
    users = model.user_tower(user_inputs(split, split.eval_users, eval_histories(split, cfg.history_len)))
    model.mode = "item"
    items = model.item_tower(item_inputs(split, np.arange(split.n_items + 1, dtype=np.int64)))
    model.mode = None
    return users.numpy().astype(np.float32), items.numpy().astype(np.float32)


def rechub_topk(split: Split, cfg: RechubConfig, arch: str, seed: int, threads: int, k: int = TOP_K) -> tuple[np.ndarray, dict]:
    """Top-``k`` ``[U, k]`` of a torch-rechub model trained on ``split``, and what was run."""
    model, seconds, rows = train(split, cfg, arch, seed, threads)
    users, items = embeddings(model, split, cfg)
    info = {"config": asdict(cfg), "fit_seconds": round(seconds, 2), "rows_per_s": round(rows / seconds) if seconds else None}
    return topk_from_vectors(users, items, split, k), info
