"""The small tables of the prepare job, built on the driver: pure functions on Arrow tables.

Vocabularies, attribute tables and item frequencies have one row per id (thousands to a few
million), never one per event, so the job collects their inputs (first-seen timestamps, the
attribute snapshots, per-item counts) and builds them here, where ordering rules are plain
Python and easy to test. Event-level work stays in Spark (jobs.prepare_transform).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyarrow as pa

from jobs.prepare_schema import PREPARED_SCHEMAS

VOCAB_KEYS = {"vocab_users": "user_id", "vocab_items": "item_id", "vocab_attrs": "token"}
"""Vocabulary table -> its key column."""


def empty_vocab(name: str) -> pa.Table:
    """A vocabulary without entries (no earlier partition)."""
    return PREPARED_SCHEMAS[name].empty_table()


def extend_vocab(
    base: pa.Table,
    name: str,
    first_seen: Mapping[str, int] | None = None,
    catalog: Iterable[str] = (),
) -> pa.Table:
    """A stable vocabulary: ``base`` unchanged, then new ids appended; sorted by idx.

    base:       the previous partition's vocabulary (key string, idx int32 >= 1), may be empty.
    first_seen: {id: first ts in the window (ms)}; ids not in base are appended first, ordered
                by (first ts, id).
    catalog:    ids known only from an attribute table; those in neither base nor first_seen
                come last, ordered by id.
    New indices continue after the largest base index, so an id keeps its index forever.
    Returns PREPARED_SCHEMAS[name]. Raises ValueError when base repeats an id or an index.
    """
    key = VOCAB_KEYS[name]
    base = base.select([key, "idx"]).sort_by("idx")
    ids = base[key].to_pylist()
    idx = base["idx"].to_pylist()
    if len(set(ids)) != len(ids) or len(set(idx)) != len(idx) or (idx and idx[0] < 1):
        raise ValueError(f"base {name} is not a vocabulary: repeated ids or indices, or an index below 1")
    known = set(ids)
    seen = first_seen or {}
    new = sorted((ts, i) for i, ts in seen.items() if i not in known)
    extra = sorted({i for i in catalog if i} - known - set(seen))
    appended = [i for _, i in new] + extra
    start = (idx[-1] if idx else 0) + 1
    return pa.table(
        {key: ids + appended, "idx": pa.array(idx + list(range(start, start + len(appended))), pa.int32())},
        schema=PREPARED_SCHEMAS[name],
    )


def clean_attrs(table: pa.Table, key: str) -> dict[str, list[str]]:
    """{id: tokens} from a raw attribute table (``key``, ``attrs`` list<string>).

    Null and empty tokens are dropped, a token repeated in a row is kept once (first occurrence),
    and several rows of one id are merged in sorted row order, so file order never matters.
    """
    rows: dict[str, list[list[str]]] = {}
    for ident, tokens in zip(table[key].to_pylist(), table["attrs"].to_pylist()):
        if ident is None:
            continue
        rows.setdefault(ident, []).append([t for t in (tokens or []) if t])
    return {ident: list(dict.fromkeys(t for row in sorted(lists) for t in row)) for ident, lists in rows.items()}


def attr_tokens(*attr_maps: Mapping[str, list[str]]) -> set[str]:
    """Every token of the given {id: tokens} maps (user and item attributes share one vocabulary)."""
    return {t for attrs in attr_maps for tokens in attrs.values() for t in tokens}


def entity_table(vocab: pa.Table, attrs: Mapping[str, list[str]], attr_vocab: pa.Table, name: str) -> pa.Table:
    """``users`` or ``items`` (``name``): every vocabulary id, sorted by idx, with its attribute
    tokens as attr indices in the table's token order ([] for an id without attributes)."""
    schema = PREPARED_SCHEMAS[name]
    idx_col, key = schema.names[0], schema.names[1]
    token_idx = dict(zip(attr_vocab["token"].to_pylist(), attr_vocab["idx"].to_pylist()))
    vocab = vocab.sort_by("idx")
    ids = vocab[key].to_pylist()
    lists = [[token_idx[t] for t in attrs.get(i, ())] for i in ids]
    return pa.table({idx_col: vocab["idx"], key: ids, "attrs": pa.array(lists, pa.list_(pa.int32()))}, schema=schema)


def item_freq(vocab_items: pa.Table, train_counts: Mapping[int, int]) -> pa.Table:
    """``item_idx, count, prob`` for every vocabulary item, sorted by item_idx.

    count: train interactions of the item (0 for an item without any);
    prob:  count / all train interactions; 0.0 for an item without any. Such an item is never an
           in-batch positive, so a logQ correction only takes log(prob) where prob > 0 (callers
           that score every item floor it first).
    """
    items = vocab_items.sort_by("idx")["idx"].to_pylist()
    counts = [int(train_counts.get(i, 0)) for i in items]
    total = sum(counts)
    probs = [c / total if total else 0.0 for c in counts]
    return pa.table(
        {"item_idx": pa.array(items, pa.int32()), "count": pa.array(counts, pa.int64()), "prob": pa.array(probs, pa.float64())},
        schema=PREPARED_SCHEMAS["item_freq"],
    )
