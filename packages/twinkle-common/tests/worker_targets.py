"""Targets for ``ProcessWorker`` tests: imported by name in a spawned child (the test puts this folder on
``sys.path`` before the child starts)."""

from __future__ import annotations

import asyncio
import os

from twinkle.common.wire import UserError


class Echo:
    def __init__(self, prefix: str, *, fail: bool = False) -> None:
        if fail:
            raise UserError("cannot start", field="prefix", status=422)
        self.prefix = prefix
        self.seen: list[int] = []

    def echo(self, value: str, *, suffix: str = "") -> str:
        return f"{self.prefix}{value}{suffix}"

    async def later(self, value: int) -> int:
        await asyncio.sleep(0)
        return value * 2

    def record(self, n: int) -> list[int]:
        self.seen.append(n)
        return list(self.seen)

    def refuse(self) -> None:
        raise UserError("not today", field="when", status=409)

    def env(self, name: str) -> str | None:
        return os.environ.get(name)

    def pid(self) -> int:
        return os.getpid()

    def exit(self) -> None:
        os._exit(3)
