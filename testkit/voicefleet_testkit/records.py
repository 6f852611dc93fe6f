"""A tenant's call-record receiver, as a tenant would write one: it keeps the raw body, checks
`X-VoiceFleet-Signature` against the signing key, keeps one record per `recordId` (delivery is at
least once) and answers 2xx once it has it.

In tests (`RecordReceiver`, in-process) it can also answer scripted statuses and go down and come
back. As a process (the demo: `python -m voicefleet_testkit.records --host H --port P --out DIR`,
the key in VOICEFLEET_RECORDS_KEY) it writes each verified record to DIR/<recordId>.json and
answers 401 to a body whose signature does not verify.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from voicefleet_runtime.callrecords import CallRecord, verify

from voicefleet_testkit.net import free_port

PATH = "/records"
KEY_ENV = "VOICEFLEET_RECORDS_KEY"


class RecordReceiver:
    """POST `PATH` on host:port. `script` holds statuses for the next requests (then 200); with
    a `key`, a delivery whose signature does not verify is answered 401 and not kept."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        key: bytes | None = None,
        out: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}{PATH}"
        self.key = key
        self.out = out
        self.deliveries: list[dict[str, Any]] = []
        self.script: list[int] = []
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.script.pop(0) if self.script else 200
        signature = request.headers.get("X-VoiceFleet-Signature", "")
        if status == 200 and self.key is not None and not verify(body, self.key, signature):
            status = 401
        self.deliveries.append(
            {"at": time.time(), "headers": dict(request.headers), "body": body, "status": status}
        )
        if status == 200 and self.out is not None:
            record = json.loads(body)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / f"{record['recordId']}.json").write_bytes(body)  # a retry overwrites
        return web.Response(status=status, text="ok" if status == 200 else "not taken")

    async def up(self) -> RecordReceiver:
        app = web.Application()
        app.router.add_post(PATH, self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def accepted(self) -> list[dict[str, Any]]:
        """Deliveries answered 200, each parsed: {at, headers, body, status, record}."""
        return [
            {**d, "record": json.loads(d["body"])} for d in self.deliveries if d["status"] == 200
        ]

    def record_of(self, room: str) -> tuple[CallRecord, dict[str, Any]] | None:
        """The first accepted record of `room`, parsed with the contract's model, and its
        delivery; None while none arrived."""
        for delivery in self.accepted():
            if delivery["record"]["room"] == room:
                return CallRecord.model_validate_json(delivery["body"]), delivery
        return None

    def records_for(self, room: str) -> dict[str, dict[str, Any]]:
        """The accepted records of one room by recordId (what a receiver keeps)."""
        kept: dict[str, dict[str, Any]] = {}
        for delivery in self.accepted():
            if delivery["record"]["room"] == room:
                kept.setdefault(delivery["record"]["recordId"], delivery)
        return kept


async def _serve(host: str, port: int, key: bytes, out: Path) -> None:
    receiver = await RecordReceiver(host, port, key=key, out=out).up()
    logging.getLogger("voicefleet.records").info("receiving call records on %s", receiver.url)
    try:
        await asyncio.Event().wait()
    finally:
        await receiver.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m voicefleet_testkit.records", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="directory for <recordId>.json")
    args = parser.parse_args(argv)
    key = os.environ.get(KEY_ENV)
    if not key:
        parser.error(f"{KEY_ENV} must hold the signing key (the tenant's Secret's value)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args.host, args.port, key.encode(), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
