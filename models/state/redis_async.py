"""The asyncio Redis clients of the stores on the batch path, and how they call their Lua scripts.

Three costs redis-py adds to every batch, cut here (issue 15, measured with ``promo bench pipeline``):

* **Command packing.** redis-py's asyncio connection packs commands in pure Python (an encode, a join and a
  length per argument); a batch's commits, loads and item reads are thousands of arguments. :func:`async_client`
  gives connections that pack with hiredis' C ``pack_command``, as redis-py's synchronous client already does
  when hiredis is installed; the bytes on the wire are the same.
* **A round trip per pipeline for its scripts.** A pipeline that holds a ``register_script`` call asks ``SCRIPT
  EXISTS`` before it runs, every time: one more round trip on the commit, the contributions and the budget calls.
  :class:`Scripts` queues ``EVALSHA`` itself instead. The scripts are loaded on every new connection (a Redis
  that restarted has an empty script cache, and every connection to it is new); a ``NOSCRIPT`` reply all the
  same (``SCRIPT FLUSH`` by an operator, a client made elsewhere) loads them and runs those calls again: an
  ``EVALSHA`` that fails with ``NOSCRIPT`` ran nothing, so nothing is applied twice.
* **A timer per reply.** A pipeline reads its replies one by one, each inside an asyncio timeout (a timer
  scheduled and cancelled). Replies the C reader already holds whole are returned without one (about 15 % of a
  pipeline's client CPU); a read that has to wait for the socket keeps its timeout.

>>> s = Scripts("reindex", "clock")
>>> sorted(s.sha) == ["clock", "reindex"] and all(len(v) == 40 for v in s.sha.values())
True
"""

from __future__ import annotations

import asyncio
import hashlib

from models.state.scripts import lua

try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is a dependency of the project
    hiredis = None

# redis-py's hiredis parser and its "reply incomplete" marker (redis is pinned in pyproject.toml: these are not
# public, so a new redis-py is checked against _HiredisPacking.read_response)
from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA, _AsyncHiredisParser  # noqa: E402
from redis.exceptions import (  # noqa: E402
    ConnectionError as _ConnectionError,
    DataError as _DataError,
    ResponseError as _ResponseError,
)

__all__ = ["Scripts", "async_client", "connection_class"]


class Scripts:
    """Named Lua scripts of ``models/state/lua/``, called by their SHA1 (``EVALSHA``) without the per-pipeline
    ``SCRIPT EXISTS`` of redis-py's ``Script``.

    Parameters
    ----------
    names
        The scripts' file names without ``.lua``.
    """

    def __init__(self, *names: str) -> None:
        if not names:
            raise ValueError("Scripts needs at least one script name")
        self.source = {n: lua(n) for n in names}
        self.sha = {n: hashlib.sha1(src.encode("utf-8")).hexdigest() for n, src in self.source.items()}

    def queue(self, pipe, name: str, keys: list, args: list) -> None:
        """Queue ``name`` on the pipeline ``pipe`` (its reply comes back with the pipeline's)."""
        pipe.evalsha(self.sha[name], len(keys), *keys, *args)

    async def call(self, client, name: str, keys: list, args: list):
        """Run ``name`` now (a pipeline of one call: one round trip, ``NOSCRIPT`` handled as :meth:`execute`)."""
        pipe = client.pipeline(transaction=False)
        self.queue(pipe, name, keys, args)
        return (await self.execute(client, pipe))[0]

    async def execute(self, client, pipe, raise_on_error: bool = True) -> list:
        """``pipe.execute()`` for a pipeline of queued scripts. Calls the server answered ``NOSCRIPT`` (they ran
        nothing) are run again, in their order, once the scripts are loaded: a pipeline of one script's calls
        keeps its order whether the cache was empty from the start or flushed in its middle. Error replies stay
        in place (``raise_on_error=False``) or the first is raised."""
        from redis.exceptions import NoScriptError

        calls = [args for args, _options in pipe.command_stack]  # the pipeline forgets them when it runs
        replies = await pipe.execute(raise_on_error=False)
        missing = [i for i, x in enumerate(replies) if isinstance(x, NoScriptError)]
        if missing:
            await self.load(client)
            again = client.pipeline(transaction=False)
            for i in missing:
                again.execute_command(*calls[i])
            for i, x in zip(missing, await again.execute(raise_on_error=False)):
                replies[i] = x
        if raise_on_error:
            for x in replies:
                if isinstance(x, Exception):
                    raise x
        return replies

    async def load(self, client) -> None:
        """``SCRIPT LOAD`` every script on ``client``'s server."""
        pipe = client.pipeline(transaction=False)
        for src in self.source.values():
            pipe.script_load(src)
        await pipe.execute()


class _HiredisPacking:
    """Connection mixin: pack commands with hiredis (C), and load :attr:`preload` scripts on connect."""

    preload: tuple[str, ...] = ()

    def pack_command(self, *args):
        if hiredis is None:  # a dependency; without it, redis-py's own packing
            return super().pack_command(*args)
        # as redis-py: a command name with spaces ("SCRIPT LOAD") is several words (hiredis encodes str as UTF-8,
        # as redis-py does, so other names go as they are: this runs for every command of every batch)
        first = args[0]
        if isinstance(first, str):
            if " " in first:
                args = tuple(first.encode().split()) + args[1:]
        elif b" " in first:
            args = tuple(first.split()) + args[1:]
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # hiredis takes str, int, float and bytes: a bytearray is copied (rare, off the hot path)
            args = tuple(bytes(a) if isinstance(a, (bytearray, memoryview)) else a for a in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # what redis-py raises for an argument it cannot encode
            raise _DataError(str(exc)) from exc

    async def read_response(self, disable_decoding: bool = False, timeout: float | None = None, **kwargs):
        # A pipeline reads its replies one at a time, and redis-py enters an asyncio timeout for each: a timer
        # scheduled and cancelled per reply, most of the cost of a reply already in the buffer (the first read
        # brings a pipeline's replies in together). A reply the C reader already holds completely is returned
        # here without one; whatever needs the socket (the reply is incomplete, or nothing is buffered) goes the
        # usual way, with its timeout. A buffered reply is handled as redis-py's hiredis parser and connection
        # handle it: a connection error raised (the connection is not reused), a push notification handed to
        # its handler and the next reply read, an error reply raised.
        parser = self._parser
        if not isinstance(parser, _AsyncHiredisParser) or kwargs.get("push_request") or not parser._connected:
            return await super().read_response(disable_decoding=disable_decoding, timeout=timeout, **kwargs)
        response = parser._reader.gets(False) if disable_decoding else parser._reader.gets()
        if response is _NOT_ENOUGH_DATA:
            return await super().read_response(disable_decoding=disable_decoding, timeout=timeout, **kwargs)
        if isinstance(response, _ConnectionError) or (
                isinstance(response, list) and response and isinstance(response[0], _ConnectionError)):
            if kwargs.get("disconnect_on_error", True):
                await self.disconnect(nowait=True)
            raise response if isinstance(response, _ConnectionError) else response[0]
        push = parser._hiredis_PushNotificationType
        if push is not None and isinstance(response, push):
            await parser.handle_push_response(response)
            return await self.read_response(disable_decoding=disable_decoding, timeout=timeout, **kwargs)
        if self.health_check_interval:
            self.next_health_check = asyncio.get_running_loop().time() + self.health_check_interval
        if isinstance(response, _ResponseError):
            raise response from None
        return response

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health=check_health)  # hello, auth, select the db
        if self.preload:  # one round trip for all: send every SCRIPT LOAD, then read the replies
            await self.send_packed_command(
                b"".join(p for src in self.preload for p in self.pack_command("SCRIPT", "LOAD", src)),
                check_health=False)
            for _ in self.preload:
                await self.read_response()


def async_client(url: str, scripts: Scripts | None = None, **kwargs):
    """A ``redis.asyncio.Redis`` on ``url`` (``kwargs`` as ``Redis.from_url``'s: timeouts, TLS) whose connections
    pack with hiredis when it is installed, and load ``scripts`` when they connect."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, **kwargs)
    pool = client.connection_pool
    pool.connection_class = connection_class(pool.connection_class, scripts)
    return client


def connection_class(base: type, scripts: Scripts | None = None) -> type:
    """``base`` (a ``redis.asyncio`` connection class: TCP, TLS or Unix socket) packing with hiredis and loading
    ``scripts`` on connect."""
    attrs = {"preload": tuple(scripts.source.values()) if scripts is not None else ()}
    return type(f"Hiredis{base.__name__}", (_HiredisPacking, base), attrs)
