"""Redis key layout (DESIGN §3). Pure key builders; no client here.

Every key starts with the deployment prefix. Per-user keys wrap the user id in a hash tag
``{u:<id>}`` so one user's row and history live in one Redis Cluster slot and can be written in
one MULTI/EXEC. Every key that belongs to one model version carries the version.

    <p>:pointer                 hash  current, previous, switched_at_ms   (one key: the switch is atomic)
    <p>:versions                zset  version -> published_at_ms
    <p>:version:<v>             string JSON metadata of a fully written version
    <p>:row:<v>:{u:<uid>}       hash  e = float32 little-endian bytes of the user-ID row (id_dim),
                                      w = last event-time window applied (hour start, epoch ms;
                                          -1 = straight from the nightly model),
                                      n = events absorbed by incremental updates
    <p>:hist:{u:<uid>}          zset  member "<event_id>\\t<item_id>", score = ts (epoch ms);
                                      adding the same event twice is a no-op (idempotent to replays)
    <p>:runs                    list  JSON run records, newest first (nightly jobs, DAG runs)
    <p>:incr:*                  incremental consumer state (watermark, counters, offsets)
    <p>:archive                 string JSON: the archiver's last landing (streaming.archiver.archive_status)
"""

from __future__ import annotations

HIST_SEP = "\t"


def pointer(prefix: str) -> str:
    return f"{prefix}:pointer"


def versions(prefix: str) -> str:
    return f"{prefix}:versions"


def version_meta(prefix: str, version: str) -> str:
    return f"{prefix}:version:{version}"


def user_tag(user_id: str) -> str:
    """Hash tag that pins every key of one user to one cluster slot."""
    return "{u:" + user_id + "}"


def user_row(prefix: str, version: str, user_id: str) -> str:
    return f"{prefix}:row:{version}:{user_tag(user_id)}"


def user_row_pattern(prefix: str, version: str) -> str:
    """SCAN pattern matching every user row of one version (for deleting old versions)."""
    return f"{prefix}:row:{version}:*"


def user_history(prefix: str, user_id: str) -> str:
    return f"{prefix}:hist:{user_tag(user_id)}"


def history_member(event_id: str, item_id: str) -> str:
    """Sorted-set member of one history event; unique per event so replays are no-ops."""
    return f"{event_id}{HIST_SEP}{item_id}"


def history_item(member: str | bytes) -> str:
    """Item id from a history member."""
    if isinstance(member, bytes):
        member = member.decode()
    return member.split(HIST_SEP, 1)[1]


def runs(prefix: str) -> str:
    return f"{prefix}:runs"


def archive(prefix: str) -> str:
    return f"{prefix}:archive"


def incremental(prefix: str, name: str) -> str:
    """Keys of the incremental consumer's state, e.g. ``incremental(p, "watermark")``."""
    return f"{prefix}:incr:{name}"
