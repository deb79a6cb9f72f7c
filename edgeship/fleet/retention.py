"""Raw records are kept for a retention period; rollups (what decisions read) for a longer one.

PostgreSQL: `telemetry_records` is partitioned by day of `window_end` (`telemetry_records_pYYYYMMDD`, plus a
default partition for windows outside [today - 366 days, today + 2 days], a device clock gone wrong): retention
drops whole partitions, which costs nothing like deleting 144 million rows a day at 100,000 devices. A store
created before partitioning (an ordinary table) and SQLite are pruned with DELETE.

    >>> store.prune(keep_records_s=7 * 86400, keep_rollups_s=90 * 86400)
    {'records': 1200, 'partitions': 1, 'events': 3, 'class_rollups': 0, 'device_rollups': 0}
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import date, datetime, timedelta, timezone

from sqlalchemy import delete, text
from sqlalchemy.exc import DBAPIError

from edgeship.fleet.tables import ClassRollupRow, DeviceRollupRow, EventRow, RecordRow

logger = logging.getLogger(__name__)
PARENT = RecordRow.__tablename__
DEFAULT_PARTITION = f"{PARENT}_default"
_PAST_DAYS, _FUTURE_DAYS = 366, 2


def partition_name(day: date) -> str:
    return f"{PARENT}_p{day:%Y%m%d}"


class Partitions:
    """The day partitions of the raw records on PostgreSQL: created before a batch needs them."""

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        with engine.begin() as connection:
            self.enabled = bool(connection.execute(text(
                "SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
                "WHERE c.relname = :name AND pg_table_is_visible(c.oid)"), {"name": PARENT}).first())
            if not self.enabled:
                logger.info("%s is not partitioned (created by an older edgeship): retention deletes rows", PARENT)
                self.days: set[date] = set()
                return
            connection.execute(text(f"CREATE TABLE IF NOT EXISTS {DEFAULT_PARTITION} PARTITION OF {PARENT} DEFAULT"))
            self.days = set(self._existing(connection))
        today = datetime.now(timezone.utc).date()
        self.ensure_days([today + timedelta(days=i) for i in range(_FUTURE_DAYS + 1)])

    def _existing(self, connection) -> list[date]:
        names = connection.execute(text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = :name"), {"name": PARENT}).scalars()
        return [datetime.strptime(n.rsplit("_p", 1)[1], "%Y%m%d").date() for n in names if n != DEFAULT_PARTITION]

    def ensure(self, window_ends: Iterable[datetime]) -> None:
        """Create the day partitions these windows fall in (those within the range kept in partitions)."""
        if self.enabled:
            self.ensure_days({w.astimezone(timezone.utc).date() if w.tzinfo else w.date() for w in window_ends})

    def ensure_days(self, days: Iterable[date]) -> None:
        today = datetime.now(timezone.utc).date()
        wanted = sorted(d for d in set(days) - self.days
                        if today - timedelta(days=_PAST_DAYS) <= d <= today + timedelta(days=_FUTURE_DAYS))
        if not wanted:
            return
        with self._lock:
            for day in wanted:
                if day in self.days:
                    continue
                start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
                try:
                    with self.engine.begin() as connection:
                        connection.execute(text(
                            f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF {PARENT} "
                            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{(start + timedelta(days=1)).isoformat()}')"))
                except DBAPIError as error:
                    # Another collector created it meanwhile, or the default partition already holds that day
                    # (a clock that ran ahead): that day's records stay in the default partition.
                    logger.info("partition for %s not created: %s", day, error.orig)
                self.days.add(day)

    def drop_before(self, cutoff: datetime) -> int:
        """Drop the day partitions wholly before `cutoff`; their number."""
        dropped = 0
        with self.engine.begin() as connection:
            for day in sorted(self._existing(connection)):
                end = datetime(day.year, day.month, day.day, tzinfo=timezone.utc) + timedelta(days=1)
                if end <= cutoff:
                    connection.execute(text(f"DROP TABLE IF EXISTS {partition_name(day)}"))
                    self.days.discard(day)
                    dropped += 1
        return dropped


def prune(store, keep_records_s: float, keep_rollups_s: float, now: datetime) -> dict[str, int]:
    """Raw records and events past `keep_records_s`, rollups past `keep_rollups_s` (see the module docstring)."""
    records_cutoff = now - timedelta(seconds=keep_records_s)
    rollups_cutoff = now - timedelta(seconds=keep_rollups_s)
    counts = {"partitions": 0}
    partitions = store.partitions
    if partitions is not None and partitions.enabled:
        counts["partitions"] = partitions.drop_before(records_cutoff)
    with store.engine.begin() as connection:
        raw = RecordRow.__table__
        counts["records"] = connection.execute(delete(raw).where(raw.c.window_end < records_cutoff)).rowcount
        counts["events"] = connection.execute(delete(EventRow.__table__).where(
            EventRow.__table__.c.at < records_cutoff)).rowcount
        counts["class_rollups"] = connection.execute(delete(ClassRollupRow.__table__).where(
            ClassRollupRow.__table__.c.bucket < rollups_cutoff)).rowcount
        counts["device_rollups"] = connection.execute(delete(DeviceRollupRow.__table__).where(
            DeviceRollupRow.__table__.c.last_seen < rollups_cutoff)).rowcount
    return counts
