"""The single-process service on uvicorn, bounded in time and stopped gracefully.

uvicorn has no header timeout (h11's ``max_incomplete_event_size`` bounds
the size of a request head, not how long it may take), so a client that
sends half a request line, or nothing, held a connection, and with
``--limit-concurrency`` of them every other client got 503, for ever. The
protocol class made here closes a connection whose request line and headers
are not complete ``header_timeout`` seconds after it opened or after it
started a request (idle keep-alive connections are closed by uvicorn's own
``timeout_keep_alive``). It subclasses uvicorn's protocol (httptools if
installed, else h11) rather than moving to another server: one timer per
connection, armed only while a head is incomplete, and uvicorn's parsing,
flow control and limits stay as they are.

On SIGTERM or SIGINT (:class:`_GracefulServer`): ``/ready`` answers 503 at
once; connections the kernel accepted before the signal (the listen backlog)
are still taken for a moment; then the listener closes, idle keep-alive
connections close once any request already sent on them has been read,
every accepted request is answered (with ``connection: close``) within
``drain_timeout`` seconds, and the process exits 0. A start that fails (a
store or base that cannot be loaded, a ``--pin``/``--preload`` adapter that
does not load) stops the server with exit code 1 and the reason on stderr.
"""

import asyncio
import contextlib
import logging
import signal
import sys

import uvicorn

__all__ = ["run"]


log = logging.getLogger("lora_ckpt.serving.server")

ACCEPT_GRACE = 0.3
"""Seconds the listener keeps accepting after SIGTERM: the connections the
kernel queued before the signal are answered instead of reset."""
IDLE_GRACE = 0.5
"""Seconds an idle keep-alive connection stays open after SIGTERM, so a
request its client sent just before is read and answered, not reset."""


def _base_protocol():
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # httptools is optional for uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def _guarded_protocol(header_timeout: float, base=None):
    """uvicorn's HTTP protocol class with a header timeout and a gentle shutdown.

    Args:
        header_timeout: Seconds a connection may take to complete a request's
            line and headers (from its opening, or from the first byte of a
            later request on it); then it is closed.
        base: The uvicorn protocol class to extend (default: httptools', else h11's).

    Returns:
        A protocol class for ``uvicorn.Config(http=...)``.
    """
    base = base or _base_protocol()

    class GuardedProtocol(base):
        _header_timer = None
        _draining = False

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._between_requests():
                self._arm()  # a head is arriving: it has header_timeout to complete
            else:
                self._disarm()
                if self._draining:
                    self.cycle.keep_alive = False  # answered, then closed

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # idle now: uvicorn's keep-alive timeout applies

        def shutdown(self) -> None:
            self._draining = True
            if self._between_requests() and not self.transport.is_closing():
                self.loop.call_later(IDLE_GRACE, self._close_if_idle)
            else:
                super().shutdown()

        def _close_if_idle(self) -> None:
            if self._between_requests():
                super().shutdown()
            else:
                self.cycle.keep_alive = False

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(header_timeout, self._head_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _head_too_slow(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                log.info("closed a connection: no complete request head in %g s", header_timeout)
                self.transport.close()

    return GuardedProtocol


class _GracefulServer(uvicorn.Server):
    """uvicorn's server that drains on SIGTERM/SIGINT, exits 0 after a
    drain, and stops with exit code 1 if the service fails to start.

    Args:
        config: The uvicorn config.
        state: The :class:`~.service.ServiceState` (``error``, ``draining``).

    Attributes:
        exit_code: 0, or 1 after a failed start.
    """

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state
        self.exit_code = 0

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal after its shutdown, so the process
        # dies of SIGTERM (exit -15); a drained shutdown is a clean exit.
        signals = (signal.SIGINT, signal.SIGTERM)
        saved = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        self.state.draining = True  # /ready says 503 from now on
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop now
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.state.error is not None and not self.should_exit:
            print(f"lora-ckpt serve: {self.state.error}", file=sys.stderr, flush=True)
            self.exit_code = 1
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        self.state.draining = True
        if self.exit_code == 0 and not self.force_exit:
            await asyncio.sleep(ACCEPT_GRACE)  # the listener still accepts meanwhile
        await super().shutdown(sockets)


def run(app, options, sock) -> int:
    """Serves ``app`` on the bound socket ``sock`` until SIGTERM/SIGINT or a failed start.

    Args:
        app: The service's ASGI app (``app.state.service`` is its ServiceState).
        options: The service's options (``log_level``, ``timeout_keep_alive``,
            ``limit_concurrency``, ``header_timeout``, ``drain_timeout``).
        sock: A bound listening socket.

    Returns:
        The exit code: 0 after a drain, 1 if the service failed to start.
    """
    config = uvicorn.Config(
        app,
        http=_guarded_protocol(options.header_timeout),
        log_config=None,  # the logs module set the loggers up
        log_level=options.log_level,
        access_log=False,  # the app's AccessLog writes one line per request
        timeout_keep_alive=options.timeout_keep_alive,
        limit_concurrency=options.limit_concurrency,
        timeout_graceful_shutdown=options.drain_timeout,
    )
    server = _GracefulServer(config, app.state.service)
    server.run(sockets=[sock])
    return server.exit_code
