"""API keys of several tenants: who sent a request, what the key may still use, which prefix cache it reads.

- Keys: `--api-key KEY` (repeatable; named key-0, key-1, ...), `--api-key-file PATH` (one key per line:
  `name key [max_in_flight=N] [tokens_per_minute=N]`; blank lines and lines starting with # are skipped), or
  `$PAGELLM_API_KEY` when neither flag is given. Only a SHA-256 digest of each `Bearer <key>` header is kept;
  a request's header is hashed and compared with every key's digest (hmac.compare_digest, no early exit), so
  neither the time taken nor its length tells which key matched, or how much of one.
- Cache salt: each key's requests carry a salt of their own (an HMAC of the key's name under a secret drawn at
  start-up, never the key), which the engine core mixes into every prefix-cache block hash and the data-parallel
  router into its prefix-affinity hashes: one tenant cannot find another's prompts by timing cache hits.
  `--shared-prefix-cache` (all keys are one tenant) sends no salt.
- Limits, answered with 429 and Retry-After before anything reaches the engine:
  max_in_flight: HTTP requests of the key being answered at once (a stream until its last event).
  tokens_per_minute: a token bucket of N tokens that refills at N per minute (as Anthropic's rate limits do).
  A request reserves its prompt tokens plus n x max_tokens (max_tokens unset: the room the prompt leaves to
  max_model_len) before it is sent to the engine; when its response is done, what it did not use (it stopped
  early, or failed before it ran) goes back to the bucket. So a key never runs past its bucket, and is charged
  what it used in the end. A key idle for a minute can spend N at once, then N a minute (at most 2N in any
  one minute).
- The numbers live in shared memory (Ledger), so the API processes of `--api-server-count N` draw on the
  same limits; the KeyRing, ledger included, is made once and handed to each API process when it starts.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import multiprocessing
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from pagellm.entrypoints.openai.serving_engine import APIError

# Key names become metric labels and log words: short, and nothing a label or a log line must escape.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LIMITS = ("max_in_flight", "tokens_per_minute")
WINDOW_S = 60.0  # tokens_per_minute: the bucket refills fully in this many seconds
IN_FLIGHT_RETRY_AFTER_S = 1  # max_in_flight: when to try again (a slot frees when some response ends)


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes = field(repr=False)  # sha256 of b"Bearer <key>"; the key itself is not kept
    max_in_flight: Optional[int] = None
    tokens_per_minute: Optional[int] = None

    @property
    def limit_names(self) -> tuple[str, ...]:
        return tuple(name for name in _LIMITS if getattr(self, name) is not None)


def _digest(key: str) -> bytes:
    return hashlib.sha256(b"Bearer " + key.encode()).digest()


def parse_key_file(text: str, source: str = "api_key_file") -> list[ApiKey]:
    """The keys of a key file (format: the module's docstring). Errors name the line, never its key."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{source}: line {number}"
        if len(words) < 2:
            raise ValueError(f"{where}: expected `name key [max_in_flight=N] [tokens_per_minute=N]`")
        name, key, options = words[0], words[1], words[2:]
        if not _NAME.fullmatch(name):
            raise ValueError(f"{where}: a key name is 1-64 letters, digits, '_', '.' or '-' (starting with a "
                             "letter or digit)")
        if not key.isascii():
            raise ValueError(f"{where}: the key must be ASCII (it travels in an HTTP header)")
        limits: dict[str, int] = {}
        for option in options:
            option_name, _, value = option.partition("=")
            if option_name not in _LIMITS:
                raise ValueError(f"{where}: unknown option {option_name!r} (expected {' or '.join(_LIMITS)})")
            if option_name in limits:
                raise ValueError(f"{where}: {option_name} given twice")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{where}: {option_name} must be a positive integer")
            limits[option_name] = int(value)
        keys.append(ApiKey(name, _digest(key), **limits))
    return keys


def load_keys(api_keys: Optional[Sequence[str]], key_file: Optional[str],
              env: Mapping[str, str] = os.environ) -> list[ApiKey]:
    """The server's keys: the --api-key ones (key-0, key-1, ...) and the file's; $PAGELLM_API_KEY when neither
    flag is given; none (an open server) when that is unset too."""
    keys = []
    plain = list(api_keys or [])
    if not plain and key_file is None and env.get("PAGELLM_API_KEY"):
        plain = [env["PAGELLM_API_KEY"]]
    for i, key in enumerate(plain):
        if not key:
            raise ValueError("api_key: must not be empty")
        keys.append(ApiKey(f"key-{i}", _digest(key)))
    if key_file is not None:
        with open(key_file, encoding="utf-8") as f:
            keys += parse_key_file(f.read(), key_file)
        if not keys:
            raise ValueError(f"api_key_file: {key_file} holds no key")
    names: set[str] = set()
    digests: set[bytes] = set()
    for k in keys:
        if k.name in names:
            raise ValueError(f"api_key_file: the key name {k.name!r} is used twice")
        if k.digest in digests:
            raise ValueError(f"api_key: the key named {k.name!r} is also another key's (each key once)")
        names.add(k.name)
        digests.add(k.digest)
    return keys


class RateLimited(APIError):
    """429 rate_limit_error; `code` names the limit; `retry_after`: whole seconds until it may pass (None: it
    never will, e.g. a request larger than the whole token budget)."""

    def __init__(self, message: str, limit: str, retry_after: Optional[int]) -> None:
        super().__init__(message, 429, "rate_limit_error", code=limit)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [] if self.retry_after is None else [(b"retry-after", str(self.retry_after).encode())]

    def response(self) -> Any:
        response = super().response()
        for name, value in self.headers():
            response.headers[name.decode()] = value.decode()
        return response


class Ledger:
    """Per key: HTTP requests in flight and a token bucket (level, and the clock time of that level), in
    shared memory under one lock, so that every API process of a server counts against the same limits."""

    _FIELDS = 3

    def __init__(self, keys: Sequence[ApiKey], clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = list(keys)
        self.clock = clock  # time.monotonic: one clock for every process of the machine
        self._array = multiprocessing.get_context("spawn").Array("d", self._FIELDS * max(1, len(keys)))
        now = clock()
        with self._array.get_lock():
            for i, k in enumerate(self.keys):
                self._array[self._FIELDS * i + 1] = float(k.tokens_per_minute or 0)  # a full bucket
                self._array[self._FIELDS * i + 2] = now

    def enter(self, i: int) -> None:
        """One more request of key i in flight, or RateLimited(max_in_flight)."""
        limit = self.keys[i].max_in_flight
        with self._array.get_lock():
            a = self._array.get_obj()
            if limit is not None and a[self._FIELDS * i] >= limit:
                raise RateLimited(f"too many requests in flight for this API key ({limit} at most); retry when "
                                  "one has finished", "max_in_flight", IN_FLIGHT_RETRY_AFTER_S)
            a[self._FIELDS * i] += 1

    def leave(self, i: int) -> None:
        with self._array.get_lock():
            self._array.get_obj()[self._FIELDS * i] -= 1

    def in_flight(self, i: int) -> int:
        return int(self._array[self._FIELDS * i])

    def _level(self, a: Any, i: int, budget: int) -> float:
        """Key i's bucket now (refilled since last time); the caller holds the lock."""
        now = self.clock()
        level = min(float(budget), a[self._FIELDS * i + 1] + (now - a[self._FIELDS * i + 2]) * budget / WINDOW_S)
        a[self._FIELDS * i + 1] = level
        a[self._FIELDS * i + 2] = now
        return level

    def reserve(self, i: int, tokens: int) -> None:
        """Take `tokens` from key i's bucket, or RateLimited(tokens_per_minute) with the seconds until they
        are there."""
        budget = self.keys[i].tokens_per_minute
        if budget is None:
            return
        if tokens > budget:
            raise RateLimited(f"this request needs up to {tokens} tokens (prompt + n x max_tokens), more than "
                              f"this API key's {budget} tokens per minute; lower max_tokens", "tokens_per_minute",
                              None)
        with self._array.get_lock():
            a = self._array.get_obj()
            level = self._level(a, i, budget)
            if level < tokens:
                wait = math.ceil((tokens - level) * WINDOW_S / budget)
                raise RateLimited(f"this API key's budget of {budget} tokens per minute is spent: this request "
                                  f"needs up to {tokens} (prompt + n x max_tokens); retry in {wait} s",
                                  "tokens_per_minute", max(1, wait))
            a[self._FIELDS * i + 1] = level - tokens

    def refund(self, i: int, tokens: int) -> None:
        """Give back what a request reserved and did not use."""
        budget = self.keys[i].tokens_per_minute
        if budget is None or tokens <= 0:
            return
        with self._array.get_lock():
            a = self._array.get_obj()
            a[self._FIELDS * i + 1] = min(float(budget), self._level(a, i, budget) + tokens)

    def level(self, i: int) -> float:
        budget = self.keys[i].tokens_per_minute
        with self._array.get_lock():
            return self._level(self._array.get_obj(), i, budget or 0)


def reserved_tokens(prompt_lens: Sequence[int], n: int, max_tokens: Optional[int], max_model_len: int) -> int:
    """What a request may use at most: each prompt, plus n x max_tokens new tokens for it (max_tokens unset:
    the room the prompt leaves to max_model_len)."""
    total = 0
    for length in prompt_lens:
        room = max(0, max_model_len - length)
        total += length + n * (room if max_tokens is None else min(max_tokens, room))
    return total


class KeyRing:
    """The server's keys, their cache salts and their ledger. `metrics` (pagellm.metrics.Metrics, set by the
    server) counts each key's requests and 429s."""

    def __init__(self, keys: Sequence[ApiKey], shared_prefix_cache: bool = False, secret: Optional[bytes] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not keys:
            raise ValueError("api_key: a key ring needs at least one key")
        self.keys = list(keys)
        self._digests = [k.digest for k in self.keys]
        secret = secret if secret is not None else os.urandom(32)
        self.salts: list[Optional[str]] = [
            None if shared_prefix_cache else hmac.new(secret, k.name.encode(), hashlib.sha256).hexdigest()[:32]
            for k in self.keys]
        self.ledger = Ledger(self.keys, clock)
        self.metrics: Any = None

    def authenticate(self, authorization: bytes) -> Optional[int]:
        """The index of the key whose `Bearer <key>` is this Authorization header's value, or None."""
        given = hashlib.sha256(authorization).digest()
        found = 0
        for i, digest in enumerate(self._digests):  # every key, whichever matches
            found |= (i + 1) * hmac.compare_digest(given, digest)
        return found - 1 if found else None

    def admit(self, i: int) -> "Ticket":
        """Key i's request, counted in flight until its Ticket is closed; RateLimited over max_in_flight."""
        if self.metrics is not None:
            self.metrics.record_key_request(self.keys[i].name)
        try:
            self.ledger.enter(i)
        except RateLimited as e:
            self.refused(i, e)
            raise
        return Ticket(self, i)

    def refused(self, i: int, e: RateLimited) -> None:
        if self.metrics is not None:
            self.metrics.record_key_rate_limited(self.keys[i].name, e.code)


class Ticket:
    """One admitted request of one key, from the guard middleware (which closes it once the response is sent)
    to the handler (which reserves its tokens and tracks its engine requests)."""

    def __init__(self, ring: KeyRing, index: int) -> None:
        self.ring = ring
        self.index = index
        self.name = ring.keys[index].name
        self.cache_salt = ring.salts[index]
        self.reserved = 0
        self._streams: list[Any] = []
        self._closed = False

    def reserve_for(self, prompt_lens: Sequence[int], params: Any, max_model_len: int) -> None:
        """Reserve what prompts of these lengths may use with these SamplingParams (reserved_tokens)."""
        self.reserve(reserved_tokens(prompt_lens, params.n, params.max_tokens, max_model_len))

    def reserve(self, tokens: int) -> None:
        """Reserve `tokens`, or RateLimited(tokens_per_minute)."""
        try:
            self.ring.ledger.reserve(self.index, tokens)
        except RateLimited as e:
            self.ring.refused(self.index, e)
            raise
        self.reserved += tokens

    def track(self, streams: Sequence[Any]) -> None:
        """The engine requests (RequestStreams) of this HTTP request: their tokens are what the key is charged."""
        self._streams.extend(streams)

    def used_tokens(self) -> int:
        return sum(len(s.prompt.prompt_token_ids) + s.num_generation_tokens for s in self._streams)

    def close(self) -> None:
        """The response is done: out of flight, and what was reserved and not used back to the bucket."""
        if self._closed:
            return
        self._closed = True
        ledger = self.ring.ledger
        ledger.leave(self.index)
        if self.reserved:
            ledger.refund(self.index, self.reserved - min(self.reserved, self.used_tokens()))


def engine_kwargs(ticket: Optional[Ticket]) -> dict[str, Any]:
    """AsyncLLM.add_request's arguments for the request's key: its cache salt and name (none without a key)."""
    return {} if ticket is None else {"cache_salt": ticket.cache_salt, "key_name": ticket.name}
