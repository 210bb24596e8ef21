"""Which backend a storage URL names: one ``open_*`` per kind of state.

Each kind of state has one interface module and its backends:

* greylist: :mod:`mxguard.store.base` (:class:`GreylistStore`), backends
  :mod:`mxguard.store.sqlite` and :mod:`mxguard.store.redis`;
* Bayes tokens: :mod:`mxguard.store.bayes_store` (:class:`BayesStore`, with
  the SQLite and in-memory backends), backend :mod:`mxguard.store.redis_bayes`;
* DMARC results: :mod:`mxguard.store.results` (:class:`ResultsStore`, with the
  SQLite backend), backend :mod:`mxguard.store.redis_results`;
* received DMARC aggregate reports: :mod:`mxguard.store.received_reports`
  (:class:`ReceivedReportsStore`, with the SQLite backend), backend
  :mod:`mxguard.store.redis_received`.

The choice by URL lives here, above them all, so no interface module imports
its backends (which import it). Redis backends are imported only when a Redis
URL asks for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mxguard.store.base import GreylistStore, StoreError, sqlite_path
from mxguard.store.bayes_store import BayesStore, SqliteBayesStore, bayes_sqlite_path
from mxguard.store.history import HistoryStore, SqliteHistoryStore, history_path
from mxguard.store.received_reports import (
    ReceivedReportsStore,
    SqliteReceivedReports,
    received_path,
)
from mxguard.store.results import ResultsStore, SqliteResultsStore, results_path

if TYPE_CHECKING:
    from mxguard.config import Config


def open_store(cfg: Config, *, connect: bool = True) -> GreylistStore:
    """The store named by ``cfg.storage_url``: ``sqlite:///PATH`` or, for several MX
    hosts sharing one greylist, ``redis://``, ``rediss://`` or ``redis+sentinel://``
    (see :mod:`mxguard.store.redis`).

    No backend connects in here but SQLite with ``connect`` (the default: a CLI
    command fails at once on a file it cannot open); with ``connect=False`` an
    unusable file raises StoreError on first use instead, so the daemon starts
    and serves its fail mode. A Redis store connects on first use either way."""
    url = cfg.storage_url
    if url.startswith("sqlite:///"):
        from mxguard.store.sqlite import SqliteGreylistStore

        return SqliteGreylistStore(sqlite_path(url), busy_timeout=cfg.storage.busy_timeout,
                                   connect=connect)
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        try:
            from mxguard.store.redis import RedisGreylistStore
        except ImportError:  # pragma: no cover - redis is installed with mxguard
            raise StoreError(f"storage.url {url.split('://')[0]}://...: the 'redis' Python "
                             "package is not installed") from None
        return RedisGreylistStore(url, timeout=cfg.storage.redis_timeout)
    raise StoreError(f"storage.url {url!r}: unsupported store (expected sqlite:///PATH, "
                     "redis://, rediss:// or redis+sentinel://)")


def open_bayes_store(cfg: Config) -> BayesStore:
    """The Bayes store for ``cfg.storage_url``: for ``sqlite:///PATH`` a SQLite file
    next to PATH (:func:`~mxguard.store.bayes_store.bayes_sqlite_path`); for ``redis://``,
    ``rediss://`` and ``redis+sentinel://`` the shared
    :class:`~mxguard.store.redis_bayes.RedisBayesStore`."""
    url = cfg.storage_url
    if url.startswith("sqlite:///"):
        return SqliteBayesStore(bayes_sqlite_path(sqlite_path(url)),
                                busy_timeout=cfg.storage.busy_timeout,
                                cache_mb=cfg.bayes.sqlite_cache_mb)
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        try:
            from mxguard.store.redis_bayes import RedisBayesStore
        except ImportError:  # pragma: no cover - redis is installed with mxguard
            raise StoreError(f"storage.url {url.split('://')[0]}://...: the 'redis' Python "
                             "package is not installed") from None
        return RedisBayesStore(url, timeout=cfg.storage.redis_timeout,
                               token_ttl=cfg.bayes.token_ttl)
    raise StoreError(f"storage.url {url.split('://')[0]}://...: no Bayes store for this URL "
                     "(supported: sqlite:///PATH, redis://, rediss://, redis+sentinel://)")


def open_results_store(cfg: Config) -> ResultsStore:
    """The results store of ``cfg.storage_url``: for a Redis URL the shared Redis
    (:class:`~mxguard.store.redis_results.RedisResultsStore`), else a SQLite file
    next to the greylist database."""
    url = cfg.storage_url
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        from mxguard.store.redis_results import RedisResultsStore

        return RedisResultsStore(url, timeout=cfg.storage.redis_timeout,
                                 log_interval=cfg.storage.fail_open_log_interval)
    return SqliteResultsStore(results_path(cfg.storage_url),
                              busy_timeout=cfg.storage.busy_timeout)


def open_received_reports(cfg: Config) -> ReceivedReportsStore:
    """The store of received aggregate reports for ``cfg.storage_url``: for a Redis
    URL the shared Redis (:class:`~mxguard.store.redis_received.RedisReceivedReports`),
    else a SQLite file next to the greylist database
    (:func:`~mxguard.store.received_reports.received_path`). Kept
    ``[dmarc] received_max_age_days``."""
    url = cfg.storage_url
    age = cfg.dmarc.received_max_age_days
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        from mxguard.store.redis_received import RedisReceivedReports

        return RedisReceivedReports(url, max_age_days=age, timeout=cfg.storage.redis_timeout)
    return SqliteReceivedReports(received_path(url), max_age_days=age,
                                 busy_timeout=cfg.storage.busy_timeout)


def open_history_store(cfg: Config, *, readonly: bool = False) -> HistoryStore:
    """The message history of ``cfg.storage_url``: for a Redis URL the shared Redis
    (:class:`~mxguard.store.redis_history.RedisHistoryStore`), else a SQLite file
    next to the greylist database (:func:`~mxguard.store.history.history_path`).
    ``readonly`` (the CLI): a missing SQLite file raises StoreError, nothing is created."""
    url = cfg.storage_url
    h = cfg.history
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        from mxguard.store.redis_history import RedisHistoryStore

        return RedisHistoryStore(url, privacy=h.privacy, timeout=cfg.storage.redis_timeout,
                                 max_age=h.max_age_days * 86400.0,
                                 keep_messages=cfg.web.keep_messages,
                                 raw_max_size=cfg.milter.max_scan_size, readonly=readonly)
    return SqliteHistoryStore(history_path(url), privacy=h.privacy,
                              busy_timeout=cfg.storage.busy_timeout,
                              keep_messages=cfg.web.keep_messages,
                              raw_max_size=cfg.milter.max_scan_size, readonly=readonly)


__all__ = ["open_bayes_store", "open_history_store", "open_received_reports",
           "open_results_store", "open_store"]
