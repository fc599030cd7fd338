"""What the ledger's queries run on, as the type checker sees it.

asyncpg's Connection, Pool and a pool's connection (PoolConnectionProxy)
share no base class, yet the ledger's reads and writes are called with each
of them: these Protocols name the few methods a function really uses, so that
any of the three (or a test's stand-in) fits structurally.
"""

from __future__ import annotations

from typing import Any, Protocol

from asyncpg import Record
from asyncpg.transaction import Transaction


class Queryable(Protocol):
    """A connection, a pool's connection or a pool: one statement at a time."""

    async def execute(self, query: str, *args: object, timeout: float | None = ...) -> str: ...

    async def fetch(self, query: str, *args: object, timeout: float | None = ...) -> list[Record]: ...

    async def fetchrow(self, query: str, *args: object, timeout: float | None = ...) -> Record | None: ...

    async def fetchval(self, query: str, *args: object, column: int = ..., timeout: float | None = ...) -> Any: ...


class Transactional(Queryable, Protocol):
    """A connection of its own or a pool's (not a pool): statements in one transaction."""

    def transaction(self) -> Transaction: ...
