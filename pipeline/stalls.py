"""A PostgreSQL call that never returns, cut off so that the worker can wait it out.

A database server that stops without closing its connections (its processes frozen, a host
hung while its kernel still acknowledges the traffic) leaves a query waiting for an answer
that never comes: libpq's timeouts see a healthy connection, and the worker would wait for
ever, deaf to Ctrl-C, whose first press only asks for a stop at the next safe point.

:func:`watch` keeps an eye on every connection of a storage's engine. A statement (or a
ping, or a commit) under way for longer than the storage patience
(``PIPELINE_STORAGE_PATIENCE``), or for a few seconds once a stop is asked for, has its
socket shut down. The call then fails
as if the server had gone, and the worker waits it out like any outage (outages.Outage).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import weakref

from pipeline import interrupts

CHECK_S = 0.5  # how often the watch looks at the connections under way
STOPPING_S = 3.0  # how long a query may still run once a stop is asked for


def watch(engine, patience: float) -> None:
    """Shut down the socket of any query on ``engine`` (SQLAlchemy, psycopg 3) under way for
    longer than ``patience`` seconds (:data:`STOPPING_S` once a stop is asked for)."""
    from sqlalchemy import event

    under_way = _Calls()
    event.listen(engine, "do_connect", _connect_briefly_when_stopping)
    event.listen(engine, "connect", under_way.connected)
    event.listen(engine, "before_cursor_execute", under_way.starting)
    engine.dispose()  # the connections made so far, unseen, are replaced as they are needed
    thread = threading.Thread(target=_keep_watch, args=(weakref.ref(under_way), patience),
                              name="pipeline-stalls", daemon=True)
    thread.start()  # it lives as long as the engine's listeners hold `under_way`


def _connect_briefly_when_stopping(_dialect, _record, _args, params: dict) -> None:
    """Once a stop is asked for, a new connection waits :data:`STOPPING_S` at most: the way
    out does not wait libpq's ``connect_timeout`` for each call to a server that hangs."""
    if interrupts.requested() is not None:
        given = float(params.get("connect_timeout") or STOPPING_S)
        params["connect_timeout"] = max(1, int(min(given, STOPPING_S)))


class _Calls:
    """An engine's connections (its pool's records), each with the call it is making."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[int, list] = {}  # id(pool record) -> [record, call, seen active]

    def connected(self, _dbapi_connection, record) -> None:
        """A new connection (pre-pings, commits and statements alike are watched on it)."""
        with self.lock:
            self.records[id(record)] = [record, object(), None]

    def starting(self, connection, *_args) -> None:
        """Each statement is a new call: whatever the last one took does not count."""
        record = connection.connection._connection_record
        with self.lock:
            entry = self.records.get(id(record))
            if entry is not None:
                entry[1], entry[2] = object(), None

    def stalled(self, patience: float) -> list:
        """The psycopg connections whose query has run for longer than ``patience``."""
        now, found = time.monotonic(), []
        with self.lock:
            for key, entry in list(self.records.items()):
                connection = entry[0].dbapi_connection
                if connection is None:  # closed: the pool made or will make another record
                    del self.records[key]
                    continue
                if not _active(connection):
                    entry[2] = None
                    continue
                if entry[2] is None or entry[2][0] is not entry[1]:
                    entry[2] = (entry[1], now)  # first seen under way
                elif now - entry[2][1] >= patience:
                    found.append(connection)
                    entry[2] = None
        return found


def _keep_watch(calls_ref, patience: float) -> None:
    while (calls := calls_ref()) is not None:
        limit = STOPPING_S if interrupts.requested() is not None else patience
        for connection in calls.stalled(limit):
            cut_off(connection)
        del calls
        time.sleep(CHECK_S)


def _active(connection) -> bool:
    """Whether a psycopg connection has a query under way (sent, not yet answered)."""
    try:
        from psycopg import pq

        return connection.pgconn.transaction_status == pq.TransactionStatus.ACTIVE
    except Exception:  # closed meanwhile, or not psycopg
        return False


def cut_off(connection) -> None:
    """Shut down a psycopg connection's socket: the call waiting on it fails at once, as if
    the server had closed it; the pool then replaces the connection."""
    with contextlib.suppress(Exception):
        fd = os.dup(connection.pgconn.socket)
        with socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)
