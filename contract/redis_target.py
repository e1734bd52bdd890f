"""Where Redis is: one server (BLIPQ_REDIS_URL), or a primary found through Redis Sentinel (BLIPQ_REDIS_SENTINELS).

With Sentinel, failover is Redis's own: the sentinels elect a new primary when the old one is unreachable, and each
client asks them where the primary is whenever it (re)connects. blipq only hands the same addresses to the three
clients it runs, each through its library's own Sentinel support:
- the job store and the fleet's keys: redis-py's `Sentinel.master_for`, whose connections rediscover the primary
  (and drop a connection to a primary that was demoted to a replica: redis-py turns its READONLY error into a
  connection error);
- Celery's broker: kombu's `sentinel://` transport, with the master name in its transport options;
- the API's rate limits: the `limits` library's `redis+sentinel://` storage (with the database and credentials as
  options: its URI carries neither a database nor an unquoted password).
While no primary is reachable, every call fails with a connection error, which the API answers 503.

BLIPQ_REDIS_URL still gives the database number and the password (the primary's, and the sentinels' too: the three
libraries send it to both); its host and port are not used with Sentinel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelManagedConnection

DEFAULT_MASTER = "blipq"
SENTINEL_TIMEOUT_S = 1.0  # a sentinel that does not answer this fast is skipped for the next one


class PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary that asks the sentinels where it is each time it (re)connects.

    redis-py's own asks in `connect()`; but a command whose connection dropped reconnects through
    `connect_check_health()`, to the address it had: after a failover, the old primary, for as long as the command's
    retries last (a worker recording an answer then gave up after a minute, in the failover test).
    """

    def _connect(self) -> Any:
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()


@dataclass(frozen=True)
class RedisTarget:
    """The Redis every blipq process talks to, and how to reach it from each library."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()  # none: `url` names the server itself
    master: str = DEFAULT_MASTER

    def client(self, **options: Any) -> redis.Redis:
        """A redis-py client with these connection `options` (timeouts, retry, decode_responses...)."""
        if not self.sentinels:
            return redis.Redis.from_url(self.url, **options)
        sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=self._sentinel_options())
        return sentinel.master_for(self.master, connection_class=PrimaryConnection, **self._credentials(), **options)

    @property
    def broker_url(self) -> str:
        """The broker URL for kombu: the server's URL, or one `sentinel://` address per sentinel."""
        if not self.sentinels:
            return self.url
        db = urlsplit(self.url).path or "/0"
        return ";".join(f"sentinel://{self._auth()}{url_address(host, port)}{db}" for host, port in self.sentinels)

    @property
    def broker_options(self) -> dict[str, Any]:
        """kombu's transport options that the target needs (the master's name, with Sentinel)."""
        if not self.sentinels:
            return {}
        return {"master_name": self.master, "sentinel_kwargs": self._sentinel_options()}

    @property
    def limits_uri(self) -> str:
        """The storage URI for the `limits` library (the API's rate limits); with Sentinel, `limits_options` too."""
        if not self.sentinels:
            return self.url
        addresses = ",".join(url_address(host, port) for host, port in self.sentinels)
        return f"redis+sentinel://{addresses}/{self.master}"

    @property
    def limits_options(self) -> dict[str, Any]:
        """The options the `limits` library's storage needs besides its URI: with Sentinel, the database and the
        credentials, which its `redis+sentinel://` URI cannot carry (it takes no database, and it would send a
        password as quoted in the URI) and which it sends to the primary and to the sentinels alike."""
        return self._credentials() if self.sentinels else {}

    def _auth(self) -> str:
        """The password of BLIPQ_REDIS_URL as a URL's `:password@` (quoted), or "" without one."""
        password = self._credentials().get("password")
        return f":{quote(password, safe='')}@" if password else ""

    def _sentinel_options(self) -> dict[str, Any]:
        """How to talk to the sentinels: short timeouts, and the primary's password (as `limits` sends it too)."""
        options: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S}
        if password := self._credentials().get("password"):
            options["password"] = password
        return options

    def _credentials(self) -> dict[str, Any]:
        """The database and credentials that BLIPQ_REDIS_URL gives, for connections to the primary."""
        parts = urlsplit(self.url)
        options: dict[str, Any] = {"db": int(parts.path.strip("/") or 0)}
        if parts.username:
            options["username"] = unquote(parts.username)
        if parts.password:
            options["password"] = unquote(parts.password)
        if parts.scheme == "rediss":
            options["ssl"] = True
        return options


def url_address(host: str, port: int) -> str:
    """`host:port` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def as_target(where: RedisTarget | str) -> RedisTarget:
    """A target from a target, or from a plain redis:// URL (one server)."""
    return where if isinstance(where, RedisTarget) else RedisTarget(where)
