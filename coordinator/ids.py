"""Ids of new rows: 32 hex digits, as `uuid.uuid4().hex` gave, but in the order they were made.

A run's and a job's id is the key of several B-trees: the runs' and jobs' primary keys, the jobs' index by
run, the records' primary key. A random id lands each insert on a random leaf of each, so once a queue is
deeper than the page cache holds, every submitted run dirties (and the WAL, then the checkpoint, writes) a
page per index: measured, 9 KiB written per run into an empty queue and 48 KiB at 90,000 queued. An id that
starts with the time appends to the right edge of every one of those trees instead, whatever the depth.

48 bits of milliseconds since the epoch, then 80 random bits (secrets: not guessable, as before): two ids
made in the same millisecond collide with probability 2**-80. A clock stepped back only costs locality; order
is never relied on for correctness (listings order by submitted_at, then rowid).
"""

from __future__ import annotations

import secrets
import time


def new_id() -> str:
    return f"{time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF:012x}{secrets.token_hex(10)}"
