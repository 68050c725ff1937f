"""A TCP proxy on 127.0.0.1 that can turn its connections into black holes.

That is what a half-open connection looks like to a client after a failover or a lost NAT
entry: the socket stays open, writes succeed, and no byte ever comes back. ``stall()`` stops
forwarding on every open connection for good, and on every connection accepted while stalled;
``resume()`` forwards again on connections opened afterwards (the new path to the server).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class StallingProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._stalled = False
        #: One event per live connection; cleared = a black hole, never set again.
        self._flowing: set[asyncio.Event] = set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    def url(self, database_url: str) -> str:
        """*database_url* with its host and port replaced by the proxy's."""
        scheme, rest = database_url.split("://", 1)
        auth, _, path = rest.partition("@")
        return f"{scheme}://{auth}@127.0.0.1:{self.port}/{path.partition('/')[2]}"

    def stall(self) -> None:
        self._stalled = True
        for flowing in self._flowing:
            flowing.clear()

    def resume(self) -> None:
        self._stalled = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        flowing = asyncio.Event()
        if not self._stalled:
            flowing.set()
        self._flowing.add(flowing)
        try:
            if self._stalled:
                await reader.read()  # accepted, never answered
                return
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._writers.add(up_writer)
            await asyncio.gather(
                self._pipe(reader, up_writer, flowing), self._pipe(up_reader, writer, flowing)
            )
        except (OSError, asyncio.CancelledError):
            pass  # the peer went away, or the proxy is closing
        finally:
            self._flowing.discard(flowing)
            self._tasks.discard(task)
            writer.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await flowing.wait()  # a black hole holds the bytes for ever
                writer.write(data)
                await writer.drain()
        writer.close()
