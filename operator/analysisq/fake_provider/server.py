"""Run the fake provider: in-process for tests (``FakeProvider``) or as a server (``serve``).

``async with FakeProvider(FakeConfig(...)) as fake:`` listens on 127.0.0.1 on a free port;
point a target's ``endpoint`` at ``fake.url`` and read ``fake.stats()`` afterwards.
``serve`` is what ``analysisq fake-provider`` runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from types import TracebackType

from aiohttp import web

from analysisq.fake_provider.app import FakeApp
from analysisq.fake_provider.config import FakeConfig
from analysisq.fake_provider.stats import FakeStats, PromptCounts, prompt_key

log = logging.getLogger(__name__)

#: Seconds in-flight requests get to finish when the server stops (hangs are released).
SHUTDOWN_TIMEOUT_S = 2.0


class FakeProvider:
    """A fake OpenAI-compatible provider running in the current event loop."""

    def __init__(
        self, config: FakeConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.host = host
        self.port = port
        self._app = FakeApp(config or FakeConfig())
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on ``host:port``; port 0 picks a free one, read it from ``.port``."""
        runner = web.AppRunner(
            self._app.application(),
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Release hanging requests and close every connection."""
        if self._runner is not None:
            self._app.closing.set()
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        """Base URL for an OpenAI client, ending in ``/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        """Base URL without ``/v1``: what Anthropic's client takes."""
        return self.url.removesuffix("/v1")

    @property
    def config(self) -> FakeConfig:
        return self._app.config

    def configure(self, config: FakeConfig) -> None:
        """Change behaviour from the next request on; counters are kept."""
        self._app.configure(config)

    def stats(self) -> FakeStats:
        return self._app.recorder.snapshot()

    def prompt_counts(self, prompt: str) -> PromptCounts:
        """How often *prompt* was requested and answered successfully."""
        return self._app.recorder.counts(prompt_key(prompt))

    def histogram(self) -> list[tuple[int, int]]:
        """Requests per second since the first request, as ``(second, count)``."""
        return self._app.recorder.histogram()

    def reset(self) -> None:
        self._app.reset()


async def serve(config: FakeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the fake provider on *host*:*port* until SIGTERM/SIGINT or cancellation.

    The CLI runs ``asyncio.run(serve(config, host, port))``.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with FakeProvider(config, host=host, port=port) as fake:
            log.info(
                "fake provider listening",
                extra={
                    "url": fake.url,
                    "config": config.model_dump(mode="json", exclude={"require_api_key"}),
                },
            )
            await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
