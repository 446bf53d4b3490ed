"""The hourly update rule and its Redis writes (streaming.update, streaming.hour, streaming.state),
on the real models.towers model and the real Redis, without Kafka."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.features import history_tensor
from streaming.events import Event
from streaming.hour import apply_hour
from streaming.state import StreamState, decode_row, encode_row
from streaming.update import RowUpdateArrays, hour_rows, user_targets
from streaming.version import load_version
from streaming.windows import Buffered
from tests.kafka_fixtures import BASE_MS, HOUR, publish_tiny, write_tiny_artifact
from twotower import redis_keys as rk

H0 = BASE_MS


@pytest.fixture
def version(settings, redis_client, tmp_path):
    tv = write_tiny_artifact(tmp_path / "artifacts", "v1", BASE_MS)
    publish_tiny(redis_client, settings.redis.prefix, tv)
    state = StreamState(redis_client, settings.redis.prefix)
    return load_version(settings, "v1", state.version_meta("v1"))


def buffered(events: list[Event]) -> list[Buffered]:
    return [Buffered(0, i, e, -1, 0, 0) for i, e in enumerate(events)]


def ev(i: int, user: str, item: str, ts: int, weight: float = 1.0) -> Event:
    return Event(f"e{i}", user, item, "click", ts, weight)


def reference_rows(version, rows, user_idx, hists, targets, negatives, log_correction, steps, lr) -> np.ndarray:
    """The update rule written independently: torch autograd through the model's own
    ``user_vectors_from_rows``, each user's softmax over [its positives | the negatives that are
    not among them] (logits <u, v> / tau, + log_correction on the negatives), torch.optim.Adagrad."""
    model, vectors, tau = version.model, version.item_vectors, version.model.temperature
    attrs = version.attrs_of(user_idx)
    hist = history_tensor([h.tolist() for h in hists], version.history_len)
    row = torch.tensor(rows, requires_grad=True)
    opt = torch.optim.Adagrad([row], lr=lr)
    negatives = torch.as_tensor(negatives)
    for _ in range(steps):
        u = model.user_vectors_from_rows(row, attrs, hist)
        loss = torch.zeros(())
        for b, t in enumerate(targets):
            keep = t.weights > 0
            pos, w = torch.as_tensor(t.items[keep]), torch.as_tensor(t.weights[keep])
            others = negatives[~torch.isin(negatives, pos)]
            logits = torch.cat([vectors[pos] @ u[b] / tau, vectors[others] @ u[b] / tau + log_correction])
            loss = loss - (w * torch.log_softmax(logits, 0)[: len(pos)]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return row.detach().numpy()


def hour_inputs(version, n_users: int, seed: int = 0):
    """Start rows, user_idx (the unknown user 0, one beyond the vocabulary, then vocabulary
    users), histories (with unknown items, some longer than L) and targets (1-3 positives, the
    second of weight 0) of a test hour."""
    rng = np.random.default_rng(seed)
    n_items = version.item_vectors.shape[0] - 1
    rows = rng.normal(scale=0.3, size=(n_users, version.id_dim)).astype(np.float32)
    user_idx = ([0, 55] + [int(i) for i in rng.integers(1, 51, n_users)])[:n_users]  # 50 users in the vocabulary
    hists = [rng.integers(0, n_items + 1, int(rng.integers(0, 2 * version.history_len))).astype(np.int32) for _ in range(n_users)]
    targets = []
    for _ in range(n_users):
        items = rng.choice(np.arange(1, n_items + 1), int(rng.integers(1, 4)), replace=False)
        targets.append(user_targets([int(i) for i in items], [1.0, 0.0, 2.0][: len(items)]))
    return rows, user_idx, hists, targets


@pytest.mark.parametrize("n_users", [1, 2, 5])
@pytest.mark.parametrize("negatives", [0, 7])
def test_hour_rows_are_the_sampled_softmax_update_of_torch_autograd(version, settings, n_users, negatives):
    cfg = settings.replace("incremental", negatives=negatives, steps=3, lr=0.05).incremental
    rows, user_idx, hists, targets = hour_inputs(version, n_users, seed=n_users)
    hour = H0 // HOUR + 5
    sample = version.update_arrays.negatives(negatives, hour)
    n_items = version.item_vectors.shape[0] - 1
    if negatives:
        assert len(sample.idx) == negatives and sample.log_correction == pytest.approx(np.log(n_items / negatives))
    else:
        assert sample.idx.tolist() == list(range(1, n_items + 1)) and sample.log_correction == 0.0
    got = hour_rows(version, rows, user_idx, hists, targets, hour * HOUR + 123, cfg)
    want = reference_rows(version, rows, user_idx, hists, targets, sample.idx, sample.log_correction, cfg.steps, cfg.lr)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (np.abs(got - rows).max(axis=1) > 1e-3).all()


def test_only_user_rows_move_and_the_positive_gains(version, settings):
    model = version.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    items_before = version.item_vectors.clone()
    rows = np.stack([version.model_row(1), version.model_row(2)])
    rows_before = rows.copy()
    hists = [np.array([4, 5], dtype=np.int32), np.array([], dtype=np.int32)]
    targets = [user_targets([3, 3, 7], [1.0, 1.0, 2.0]), user_targets([5], [1.0])]
    cfg = settings.replace("incremental", steps=5, lr=0.05).incremental
    new_rows = hour_rows(version, rows, [1, 2], hists, targets, H0, cfg)

    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert torch.equal(version.item_vectors, items_before)
    assert all(not p.requires_grad for p in model.parameters())
    assert np.array_equal(rows, rows_before)
    assert np.abs(new_rows - rows).max() > 1e-3

    attrs, hist = version.attrs_of([1, 2]), history_tensor([[4, 5], []], version.history_len)

    def score(r, item):
        with torch.no_grad():
            u = model.user_vectors_from_rows(torch.from_numpy(r), attrs, hist)
            return (u @ version.item_vectors.T)[:, item]

    assert score(new_rows, 5)[1] > score(rows, 5)[1]
    assert score(new_rows, 7)[0] > score(rows, 7)[0]


def test_a_rows_result_does_not_depend_on_the_other_rows_in_its_chunk(version, settings):
    rows, user_idx, hists, targets = hour_inputs(version, 4, seed=3)
    rng = np.random.default_rng(1)
    other = rows.copy()
    other[1:] = rng.normal(size=(3, version.id_dim)).astype(np.float32)  # the state after a partial write
    other_hists = hists[:1] + [rng.integers(1, 30, 7).astype(np.int32) for _ in range(3)]
    a = hour_rows(version, rows, user_idx, hists, targets, H0, settings.incremental)
    b = hour_rows(version, other, user_idx, other_hists, targets, H0, settings.incremental)
    assert np.array_equal(a[0], b[0])
    assert not np.array_equal(a[1], b[1])


def test_user_targets_merges_repeats_and_drops_unknown_items():
    t = user_targets([0, 4, 2, 4], [5.0, 1.0, 2.0, 1.0])
    assert t.items.tolist() == [2, 4] and np.allclose(t.weights, [0.5, 0.5])
    assert user_targets([0, 0], [1.0, 1.0]) is None
    assert user_targets([3], [0.0]) is None


def test_the_hours_negatives_are_windows_of_one_seeded_permutation(version):
    arrays = version.update_arrays
    n, c = arrays.n_items, 7  # 30 items
    first = arrays.negatives(c, 1000)
    again = RowUpdateArrays(version.model, version.item_vectors, version.user_attrs).negatives(c, 1000)  # a restart
    assert np.array_equal(first.idx, again.idx) and np.array_equal(first.vectors, again.vectors)
    assert np.array_equal(first.vectors, version.item_vectors.numpy()[first.idx])
    # consecutive hours sweep the permutation: over n hours every item is a negative c times
    counts = np.zeros(n + 1, dtype=int)
    for hour in range(1000, 1000 + n):
        sample = arrays.negatives(c, hour)
        assert len(set(sample.idx.tolist())) == c and sample.idx.min() >= 1 and sample.idx.max() <= n
        counts[sample.idx] += 1
        col, among = sample.columns(np.arange(1, n + 1))
        assert among.sum() == c and np.array_equal(sample.idx[col[among]], np.arange(1, n + 1)[among])
    assert counts[0] == 0 and (counts[1:] == c).all()
    assert not np.array_equal(arrays.negatives(c, 1001).idx, first.idx)
    assert arrays.negatives(n, 5).log_correction == 0.0 and len(arrays.negatives(n + 9, 5).idx) == n


def test_the_negatives_vectors_are_the_same_with_or_without_the_window_table(version, monkeypatch):
    import streaming.update as update

    with_table = version.update_arrays
    with_table.negatives(7, 0)  # makes its table
    monkeypatch.setattr(update, "WINDOW_TABLE_BYTES", 0)
    gathered = RowUpdateArrays(version.model, version.item_vectors, version.user_attrs)
    for hour in (0, 3, 4, 8):  # 30 items: hours 4 and 8 start at 28 and 26, wrapping around the end
        a, b = with_table.negatives(7, hour), gathered.negatives(7, hour)
        assert np.array_equal(a.idx, b.idx) and np.array_equal(a.vectors, b.vectors)
    assert gathered._windows == {7: None} and with_table._windows[7] is not None


def test_apply_hour_writes_rows_once_and_a_replay_changes_nothing(settings, redis_client, version):
    state = StreamState(redis_client, settings.redis.prefix)
    events = [ev(1, "u1", "i3", H0 + 60_000), ev(2, "u1", "i4", H0 + 120_000), ev(3, "u2", "i9", H0 + 5 * 60_000),
              ev(4, "u3", "i99", H0 + 6 * 60_000)]  # u3: an item the version does not know
    first = apply_hour(state, version, H0, buffered(events), settings.incremental)
    assert (first.users_updated, first.rows_written, first.events_applied, first.unknown_items, first.history_only) == (2, 2, 3, 1, 1)

    row_key = rk.user_row(settings.redis.prefix, "v1", "u1")
    stored = redis_client.hgetall(row_key)
    assert int(stored[b"w"]) == H0 and int(stored[b"n"]) == 2
    no_history = np.zeros(0, dtype=np.int32)
    expected = hour_rows(version, np.stack([version.model_row(1), version.model_row(2)]), [1, 2], [no_history, no_history],
                         [user_targets([3, 4], [1, 1]), user_targets([9], [1])], H0, settings.incremental)
    assert np.array_equal(decode_row(stored[b"e"]), expected[0])
    u3 = redis_client.hgetall(rk.user_row(settings.redis.prefix, "v1", "u3"))
    assert int(u3[b"w"]) == -1 and np.array_equal(decode_row(u3[b"e"]), version.model_row(3))  # untouched
    assert redis_client.zrange(rk.user_history(settings.redis.prefix, "u3"), 0, -1) == [b"e4\ti99"]

    snapshot = {k: redis_client.dump(k) for k in redis_client.scan_iter(match=f"{settings.redis.prefix}:*")}
    again = apply_hour(state, version, H0, buffered(events), settings.incremental)
    assert again.rows_written == 0
    assert (again.users_updated, again.events_applied) == (first.users_updated, first.events_applied)
    after = {k: redis_client.dump(k) for k in redis_client.scan_iter(match=f"{settings.redis.prefix}:*")}
    assert after == snapshot


def test_history_is_read_as_of_the_hour_start(settings, redis_client, version, tmp_path):
    state = StreamState(redis_client, settings.redis.prefix)
    hkey = rk.user_history(settings.redis.prefix, "u1")
    redis_client.zadd(hkey, {rk.history_member("old1", "i5"): H0 - 10 * HOUR, rk.history_member("old2", "i6"): H0 - HOUR})
    hour = H0 + HOUR
    events = [ev(1, "u1", "i3", hour + 60_000)]
    apply_hour(state, version, hour, buffered(events), settings.incremental)
    clean = redis_client.hget(rk.user_row(settings.redis.prefix, "v1", "u1"), "e")

    # same hour again from the nightly row, but the history already holds a LATER event
    redis_client.hset(rk.user_row(settings.redis.prefix, "v1", "u1"), mapping={"e": encode_row(version.model_row(1)), "w": -1})
    redis_client.zadd(hkey, {rk.history_member("future", "i8"): hour + 2 * HOUR})
    apply_hour(state, version, hour, buffered(events), settings.incremental)
    assert redis_client.hget(rk.user_row(settings.redis.prefix, "v1", "u1"), "e") == clean
    rows, hists, _ = state.read_users("v1", ["u1"], hour, version.history_len)
    assert hists["u1"] == ["i5", "i6"]


def test_cold_start_user_is_admitted_after_enough_events_from_the_oov_row(settings, redis_client, version):
    s = settings.replace("incremental", min_events_new_user=3)
    state = StreamState(redis_client, s.redis.prefix)
    new_row = rk.user_row(s.redis.prefix, "v1", "newbie")
    r1 = apply_hour(state, version, H0, buffered([ev(1, "newbie", "i2", H0 + 1), ev(2, "newbie", "i3", H0 + 2)]), s.incremental)
    assert r1.users_updated == 0 and r1.history_only == 1
    assert not redis_client.exists(new_row)
    assert redis_client.zcard(rk.user_history(s.redis.prefix, "newbie")) == 2

    r2 = apply_hour(state, version, H0 + HOUR, buffered([ev(3, "newbie", "i4", H0 + HOUR + 1)]), s.incremental)
    assert (r2.users_updated, r2.new_users, r2.rows_written) == (1, 1, 1)
    stored = redis_client.hgetall(new_row)
    assert int(stored[b"w"]) == H0 + HOUR and int(stored[b"n"]) == 1
    expected = hour_rows(version, version.model_row(0)[None, :], [0], [np.array([2, 3], dtype=np.int32)],
                         [user_targets([4], [1.0])], H0 + HOUR, s.incremental)
    assert np.array_equal(decode_row(stored[b"e"]), expected[0])
    # a replay of that hour still reports the admission (counts are functions of the content)
    again = apply_hour(state, version, H0 + HOUR, buffered([ev(3, "newbie", "i4", H0 + HOUR + 1)]), s.incremental)
    assert (again.users_updated, again.new_users, again.rows_written) == (1, 1, 0)


def test_history_trim_keeps_the_newest_and_the_retention_margin(settings, redis_client, version):
    s = settings.replace("incremental", history_retention_s=3 * 3600)
    state = StreamState(redis_client, s.redis.prefix)
    hkey = rk.user_history(s.redis.prefix, "u1")
    L = version.history_len
    old = {rk.history_member(f"o{i}", "i1"): H0 - 100 * HOUR + i for i in range(L + 5)}
    recent = {rk.history_member(f"r{i}", "i2"): H0 - 2 * HOUR + i for i in range(L + 5)}
    redis_client.zadd(hkey, {**old, **recent})
    apply_hour(state, version, H0, buffered([ev(1, "u1", "i3", H0 + 1)]), s.incremental)
    kept = {m.decode() for m in redis_client.zrange(hkey, 0, -1)}
    assert not any(m.startswith("o") for m in kept)  # older than the margin and beyond the newest L
    assert sum(m.startswith("r") for m in kept) == L + 5  # within the margin: all kept
    assert "e1\ti3" in kept


def test_adagrad_step_is_torch_adagrad():
    """Exactly on the first step; afterwards up to a rounding (torch fuses the accumulator's
    multiply-add)."""
    from streaming.update import adagrad_step

    gen = torch.Generator().manual_seed(3)
    start = torch.randn(5, 8, generator=gen)
    grads = [torch.randn(5, 8, generator=gen) for _ in range(4)]
    mine, acc = start.numpy().copy(), None
    ref = start.clone().requires_grad_(True)
    opt = torch.optim.Adagrad([ref], lr=0.05)
    for step, g in enumerate(grads):
        mine, acc = adagrad_step(mine, g.numpy(), acc, 0.05)
        ref.grad = g.clone()
        opt.step()
        if step == 0:
            assert np.array_equal(mine, ref.detach().numpy())
        np.testing.assert_allclose(mine, ref.detach().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(acc, opt.state[ref]["sum"].numpy(), rtol=1e-6)
    assert not np.array_equal(mine, start.numpy())


def snapshot(redis_client, prefix: str) -> dict:
    return {k.decode()[len(prefix):]: redis_client.dump(k) for k in redis_client.scan_iter(match=f"{prefix}:*")}


def test_the_user_cache_changes_nothing_in_redis_and_drops_what_it_cannot_vouch_for(settings, redis_client, version):
    """Hours applied through the write-through cache leave Redis byte for byte as hours that read
    every user from Redis; a replay, and events of a later hour already in a history, drop the
    users concerned, who are read again."""
    from streaming.user_cache import UserCache

    hours = [
        [ev(1, "u1", "i3", H0 + 60_000), ev(2, "u2", "i9", H0 + 70_000), ev(3, "new", "i4", H0 + 80_000)],
        [ev(4, "u1", "i5", H0 + HOUR + 1), ev(5, "u1", "i5", H0 + HOUR + 1), ev(6, "new", "i2", H0 + HOUR + 5)],
        [ev(7, "u1", "i7", H0 + 2 * HOUR + 1), ev(8, "u2", "i99", H0 + 2 * HOUR + 2), ev(9, "new", "i6", H0 + 2 * HOUR + 3)],
    ]
    plain = settings.redis.prefix + "-plain"
    for k in redis_client.scan_iter(match=f"{settings.redis.prefix}:*"):
        redis_client.copy(k, plain + k.decode()[len(settings.redis.prefix):])
    try:
        cached_state, plain_state = StreamState(redis_client, settings.redis.prefix), StreamState(redis_client, plain)
        cache = UserCache("v1", 100)
        # u2 already holds an event of the LAST hour (a new version replaying since its cutoff)
        for p in (settings.redis.prefix, plain):
            redis_client.zadd(rk.user_history(p, "u2"), {rk.history_member("e8", "i99"): H0 + 2 * HOUR + 2})
        for h, events in enumerate(hours):
            a = apply_hour(cached_state, version, H0 + h * HOUR, buffered(events), settings.incremental, cache)
            b = apply_hour(plain_state, version, H0 + h * HOUR, buffered(events), settings.incremental)
            assert (a.users_updated, a.rows_written, a.events_applied) == (b.users_updated, b.rows_written, b.events_applied)
            if h == 0:
                assert cache.get("u1") is not None and cache.get("u2") is None  # u2's history is not exact
        assert cache.hits > 0
        assert snapshot(redis_client, settings.redis.prefix) == snapshot(redis_client, plain)
        # a replay of the last hour: nothing written, and its users leave the cache
        again = apply_hour(cached_state, version, H0 + 2 * HOUR, buffered(hours[2]), settings.incremental, cache)
        assert again.rows_written == 0 and cache.get("u1") is None and cache.get("new") is None
    finally:
        for k in redis_client.scan_iter(match=f"{plain}:*"):
            redis_client.unlink(k)


def test_the_user_cache_is_bounded_and_dropped_whole_on_an_error(settings, redis_client, version):
    from streaming.user_cache import CachedUser, UserCache, next_history

    cache = UserCache("v1", 2)
    for u in ("a", "b", "c"):
        cache.put(u, CachedUser(None, np.zeros(0, dtype=np.int32)))
    assert len(cache) == 2 and cache.get("a") is None  # least recently used out
    assert next_history(np.array([1, 2, 3], dtype=np.int32), [4, 5], 4).tolist() == [2, 3, 4, 5]

    with pytest.raises(ValueError, match="belongs to version"):
        apply_hour(StreamState(redis_client, settings.redis.prefix), version, H0, buffered([ev(1, "u1", "i3", H0 + 1)]),
                   settings.incremental, UserCache("v2", 10))
    broken = StreamState(redis_client, settings.redis.prefix)
    broken.apply_users = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("redis went away"))
    with pytest.raises(ConnectionError):
        apply_hour(broken, version, H0, buffered([ev(1, "u1", "i3", H0 + 1)]), settings.incremental, cache)
    assert len(cache) == 0


def test_a_heavy_user_makes_the_stacks_smaller(settings, version, monkeypatch):
    """Positives are padded to the widest block of a stack ([n, block, P, d] floats): a large
    hour's blocks are sized and its stacks cut so that stays within the logit budget, and the rows
    are those of the hour in one block, within float rounding. Not bit for bit: a block of another
    size is another matrix product, which BLAS may round differently (seen on an AMD EPYC runner,
    OpenBLAS's Haswell kernels); exactly-once needs only that an hour gets the same blocks in
    every attempt (the tests of bits: test_a_batchs_passes_..., test_an_hours_blocks_...)."""
    import streaming.update as update

    seen: list[tuple[int, int, int]] = []
    real = update.update_blocks

    def spy(arrays, negatives, rows, context, items, item_w, steps, lr, one_hour=False):
        seen.append(items.shape)  # [n, block, P]
        return real(arrays, negatives, rows, context, items, item_w, steps, lr, one_hour)

    monkeypatch.setattr(update, "update_blocks", spy)
    cfg = dataclasses.replace(settings.incremental, logit_budget=8_000, negatives=10)
    d = version.item_vectors.shape[1]
    heavy = user_targets(list(range(1, 31)), [1.0] * 30)
    light = [user_targets([i % 30 + 1], [1.0]) for i in range(40)]
    targets = [heavy] + light
    rows = np.stack([version.model_row(1)] * len(targets))
    no_history = [np.zeros(0, dtype=np.int32)] * len(targets)
    out = update.hour_rows(version, rows, [1] * len(targets), no_history, targets, H0, cfg)
    assert out.shape == rows.shape and np.isfinite(out).all()
    assert len(seen) > 1 and all(n * block * p * d <= cfg.logit_budget for n, block, p in seen)
    assert max(p for _, _, p in seen) == 30 and min(p for _, _, p in seen) == 1  # the heavy user's block alone is wide
    whole = update.hour_rows(version, rows, [1] * len(targets), no_history, targets, H0, dataclasses.replace(cfg, logit_budget=10**9))
    np.testing.assert_allclose(out, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("negatives", [0, 7])
def test_a_batchs_passes_give_every_row_the_bits_it_gets_in_its_hour_alone(version, settings, negatives):
    """run_jobs over several hours at once (small hours stacked across hours, a large hour in
    chunks, a user's later hour starting from the row of the earlier one) gives each row
    exactly what hour_rows gives that hour on its own, from the same start row. With a sample
    of 7 of the 30 items every hour has a window of its own, so a stack of blocks of different
    hours must pair each block with its own hour's negatives."""
    from streaming.update import LARGE_HOUR, RowJob, run_jobs

    cfg = dataclasses.replace(settings.incremental, negatives=negatives)
    sizes = [1, 3, LARGE_HOUR + 5, 2, 1, LARGE_HOUR]
    inputs = [hour_inputs(version, n, seed=10 + h) for h, n in enumerate(sizes)]
    # the small hours' users have 9 to 16 positives: stacked together, most are padded to the
    # widest (sums over the padded slots must not change a bit)
    rng = np.random.default_rng(5)
    for h, n in enumerate(sizes):
        if n < LARGE_HOUR:
            for b in range(n):
                width = int(rng.integers(9, 17))
                inputs[h][3][b] = user_targets([int(i) for i in rng.choice(np.arange(1, 31), width, replace=False)], list(rng.random(width) + 0.1))
    hours: list[list[RowJob]] = []
    previous: RowJob | None = None
    for h, (rows, user_idx, hists, targets) in enumerate(inputs):
        jobs = [RowJob(H0 // HOUR + h, rows[b], user_idx[b], hists[b], targets[b]) for b in range(len(rows))]
        if previous is not None:
            jobs[0].start = previous  # the same user again: starts from the row the earlier hour made
        previous = jobs[-1]
        hours.append(jobs)
    run_jobs(version, hours, cfg)
    assert max(job.level for jobs in hours for job in jobs) >= 2  # several passes, hours of different sizes mixed in them
    for h, ((rows, user_idx, hists, targets), jobs) in enumerate(zip(inputs, hours)):
        starts = np.stack([job.start_row() for job in jobs])
        alone = hour_rows(version, starts, user_idx, hists, targets, H0 + h * HOUR, cfg)
        assert np.array_equal(np.stack([job.out for job in jobs]), alone), f"hour {h}"


def test_an_hours_blocks_are_cut_per_partition_so_a_rows_bits_do_not_depend_on_the_other_partitions(version, settings):
    """A consumer group may spread the partitions over its members in any way, and change it in
    a rebalance: a large hour's rows computed with all its partitions equal, bit for bit, the
    rows of each partition's users computed alone (as the member owning just that partition
    does), and no block mixes partitions."""
    from streaming.update import LARGE_HOUR, RowJob, assign_levels, run_jobs

    cfg = dataclasses.replace(settings.incremental, negatives=7)
    n = 3 * LARGE_HOUR
    rows, user_idx, hists, targets = hour_inputs(version, n, seed=3)
    partition = [b % 3 if b < 2 * LARGE_HOUR else 0 for b in range(n)]  # partition 0 large, 1 and 2 small

    def jobs_of(keep) -> list[RowJob]:
        return [RowJob(H0 // HOUR, rows[b], user_idx[b], hists[b], targets[b], partition[b]) for b in range(n) if keep(b)]

    together = jobs_of(lambda b: True)
    for blocks in assign_levels([together], version.update_arrays, cfg):
        assert all(len({job.partition for job in block}) == 1 for block in blocks)
    run_jobs(version, [together], cfg)
    for p in range(3):
        alone = jobs_of(lambda b: partition[b] == p)
        run_jobs(version, [alone], cfg)
        mine = [job for job in together if job.partition == p]
        assert np.array_equal(np.stack([j.out for j in alone]), np.stack([j.out for j in mine])), f"partition {p}"
