"""Call record delivery: a spool on the pod's volume, and a delivery loop in the main process.

Where a record waits. The call's job process builds the record when the call ends and writes it
to the spool (`<spool>/pending/<recordId>.json`, written to a temporary name and renamed, so a
reader never sees half a record). The job process then exits; from there the record is the
worker main process's: its delivery loop looks at the spool every POLL_SECONDS and POSTs each
record to the tenant's webhook. The spool is VOICEFLEET_SPOOL_DIR, an emptyDir volume in the
worker pod: it outlives the job process and a restart of the worker container; it goes away with
the pod.

Delivery. One POST per record, the record's bytes as the body, signed (see callrecords.py).
  2xx                                 delivered: removed from the spool
  timeout, connection error, 408,     retried with exponential backoff (1 s doubling to 60 s,
  429, 5xx                            +-20 % jitter) until the record is retryForSeconds old
                                      (default 3600 s); then failed
  any other answer (3xx, 4xx)         failed at once, logged with the status and the start of
                                      the receiver's answer: retrying cannot fix it
A failed record is moved to `<spool>/failed/` (the newest FAILED_KEPT are kept for inspection)
and logged at ERROR with its recordId. Delivery is at least once: a receiver that stores a record
but answers too late gets it again, with the same recordId.

Shutdown. SIGTERM drains the worker: calls go on (their records are spooled as they end and the
loop keeps delivering). When the last call is done, or the drain timeout has passed, the worker
delivers what is left before it exits, for the rest of the drain timeout but at least
FLUSH_MIN_SECONDS (the pod's grace period is the drain timeout plus 30 s). Records still not
delivered then (receiver down) stay in the spool and are logged at ERROR with their ids; a
restarted container delivers them on start.

Metrics: voicefleet_call_records_total{result=delivered|retried|failed} (retried counts
attempts that will be repeated), voicefleet_call_records_pending (records in the spool) and
voicefleet_call_record_delivery_delay_seconds (spooled to delivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from voicefleet_runtime import metrics
from voicefleet_runtime.callrecords import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    CallRecord,
    serialize,
    sign,
)
from voicefleet_runtime.config import CallRecordWebhook, RuntimeConfig

logger = logging.getLogger("voicefleet.runtime.delivery")

SPOOL_DIR_ENV = "VOICEFLEET_SPOOL_DIR"
"""Directory of the record spool; the operator points it at an emptyDir volume."""
POLL_SECONDS = 0.5
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
FLUSH_MIN_SECONDS = 15.0
FAILED_KEPT = 100
RETRIED_STATUSES = frozenset({408, 429})
USER_AGENT = "voicefleet-runtime"


def spool_directory(config: RuntimeConfig, environ: Mapping[str, str] | None = None) -> Path:
    """VOICEFLEET_SPOOL_DIR, else a stable per-VoiceAgent directory under the temp dir (so a
    worker restarted on the same machine finds what its predecessor left)."""
    environ = os.environ if environ is None else environ
    configured = environ.get(SPOOL_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / "voicefleet-spool" / f"{config.tenant}.{config.name}"


class Spool:
    """Records waiting for delivery, one file each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pending_dir = root / "pending"
        self.failed_dir = root / "failed"

    def ensure(self) -> Spool:
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        return self

    def put(self, record: CallRecord) -> Path:
        """Write a record atomically (job process); returns its path."""
        self.ensure()
        body = serialize(record)
        final = self.pending_dir / f"{record.record_id}.json"
        temporary = self.pending_dir / f".{record.record_id}.tmp"
        with open(temporary, "wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, final)
        return final

    def pending(self) -> list[Path]:
        """Spooled records, oldest first."""
        try:
            entries = [p for p in self.pending_dir.iterdir() if p.suffix == ".json"]
        except FileNotFoundError:
            return []
        stamped = []
        for path in entries:
            with contextlib.suppress(FileNotFoundError):
                stamped.append((path.stat().st_mtime, path.name, path))
        return [path for _, _, path in sorted(stamped)]

    def done(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def give_up(self, path: Path) -> None:
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, self.failed_dir / path.name)
        kept = sorted(self.failed_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in kept[:-FAILED_KEPT]:
            old.unlink(missing_ok=True)


@dataclass
class _Attempts:
    count: int = 0
    next_at: float = 0.0


def backoff_seconds(attempt: int, initial: float, maximum: float) -> float:
    """Delay before retry number `attempt` (1-based): initial * 2^(attempt-1), capped."""
    return min(maximum, initial * 2 ** max(0, attempt - 1))


class RecordDelivery:
    """Delivers the spool's records to one webhook (worker main process)."""

    def __init__(
        self,
        webhook: CallRecordWebhook,
        signing_key: bytes,
        spool: Spool,
        labels: dict[str, str],
        *,
        backoff_initial: float = BACKOFF_INITIAL_SECONDS,
        backoff_max: float = BACKOFF_MAX_SECONDS,
        poll_seconds: float = POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.webhook = webhook
        self._key = signing_key
        self.spool = spool
        self.labels = labels
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.poll_seconds = poll_seconds
        self._clock = clock
        self._wall = wall_clock
        self._attempts: dict[str, _Attempts] = {}
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _count(self, result: str) -> None:
        metrics.CALL_RECORDS.labels(**self.labels, result=result).inc()

    async def run(self) -> None:
        """Deliver for as long as the worker runs."""
        while True:
            try:
                await self.deliver_due()
            except Exception:
                logger.exception("call record delivery pass failed; trying again")
            await asyncio.sleep(self.poll_seconds)

    async def deliver_due(self) -> int:
        """One attempt for each spooled record that is due; returns the records still pending."""
        pending = self.spool.pending()
        names = {path.name for path in pending}
        for name in [n for n in self._attempts if n not in names]:
            del self._attempts[name]
        for path in pending:
            state = self._attempts.setdefault(path.name, _Attempts())
            if state.next_at <= self._clock():
                await self._attempt(path, state)
        remaining = len(self.spool.pending())
        metrics.CALL_RECORDS_PENDING.labels(**self.labels).set(remaining)
        return remaining

    async def flush(self, budget_seconds: float) -> list[str]:
        """Deliver until the spool is empty or the budget is spent; returns the ids left."""
        deadline = self._clock() + budget_seconds
        while True:
            await self.deliver_due()
            pending = self.spool.pending()
            now = self._clock()
            if not pending or now >= deadline:
                return [path.stem for path in pending]
            due = min(self._attempts.get(p.name, _Attempts()).next_at for p in pending)
            await asyncio.sleep(max(0.05, min(due - now, deadline - now, self.poll_seconds)))

    @staticmethod
    def _load(path: Path) -> tuple[bytes, float] | None:
        """The record's bytes and when it was spooled (a few kB from the local volume)."""
        try:
            return path.read_bytes(), path.stat().st_mtime
        except FileNotFoundError:
            return None

    async def _attempt(self, path: Path, state: _Attempts) -> None:
        loaded = self._load(path)
        if loaded is None:
            return
        body, spooled_at = loaded
        record_id = path.stem
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, self._key),
            DELIVERY_HEADER: record_id,
        }
        status: int | None = None
        answer = ""
        problem = ""
        try:
            async with asyncio.timeout(self.webhook.timeout_seconds):
                async with self._http().post(
                    self.webhook.url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    answer = (await response.text(errors="replace"))[:200]
        except TimeoutError:
            problem = f"no answer within {self.webhook.timeout_seconds}s"
        except aiohttp.ClientError as error:
            problem = f"{type(error).__name__}: {error}"

        state.count += 1
        if status is not None and 200 <= status < 300:
            self.spool.done(path)
            self._attempts.pop(path.name, None)
            self._count("delivered")
            delay = max(0.0, self._wall() - spooled_at)
            metrics.CALL_RECORD_DELIVERY_DELAY.labels(**self.labels).observe(delay)
            logger.info(
                "call record %s delivered (HTTP %d, attempt %d, %.1fs after the call)",
                record_id,
                status,
                state.count,
                delay,
            )
            return
        if status is not None and not (status >= 500 or status in RETRIED_STATUSES):
            self._fail(path, f"the receiver answered HTTP {status}: {answer!r}; not retried")
            return
        what = problem or f"HTTP {status}: {answer!r}"
        age = self._wall() - spooled_at
        if age >= self.webhook.retry_for_seconds:
            self._fail(
                path,
                f"{what}; still failing after {state.count} attempts over {age:.0f}s "
                f"(retryForSeconds {self.webhook.retry_for_seconds})",
            )
            return
        delay = backoff_seconds(state.count, self.backoff_initial, self.backoff_max)
        delay *= random.uniform(0.8, 1.2)
        state.next_at = self._clock() + delay
        self._count("retried")
        logger.warning(
            "call record %s not delivered to %s (%s); attempt %d, retrying in %.1fs",
            record_id,
            self.webhook.url,
            what,
            state.count,
            delay,
        )

    def _fail(self, path: Path, why: str) -> None:
        self.spool.give_up(path)
        self._attempts.pop(path.name, None)
        self._count("failed")
        logger.error(
            "call record %s FAILED, not delivered to %s: %s (kept in %s)",
            path.stem,
            self.webhook.url,
            why,
            self.spool.failed_dir,
        )


def signing_key(webhook: CallRecordWebhook, environ: Mapping[str, str] | None = None) -> bytes:
    """The HMAC key: the bytes of the Secret key, as the pod's environment carries it."""
    environ = os.environ if environ is None else environ
    return environ[webhook.signing_key_from_env].encode()
