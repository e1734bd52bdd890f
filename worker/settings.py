"""Typed settings for the worker, read from BLIPQ_* environment variables, and the parsers the API shares."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.contract.errors import SettingsError
from worker.contract.redis_target import DEFAULT_MASTER, RedisTarget
from worker.contract.states import JobTask

# Defaults shared by the API and the worker: both read these variables and must agree.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "blipq"
DEFAULT_CAPTION_QUEUE = "blipq-caption"  # captioning jobs (`"task": "caption"`) and the workers that serve them
DEFAULT_JOB_TTL_S = 24 * 3600  # job records, uploads and results expire a day after submission
DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024  # one image, uploaded or downloaded
DEFAULT_TIME_LIMIT_S = 300  # the hard limit of one job (a 20 s fetch and a generate, with room); sets the visibility

# The model that ships in the repository: what `blipq up` and `blipq worker` serve when BLIPQ_MODEL is unset.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model" / "blip-vqa-easy"

# The captioning model that ships beside it: what a worker with BLIPQ_TASK=caption serves when BLIPQ_MODEL is unset
# (production sets Salesforce/blip-image-captioning-base).
DEMO_CAPTION_MODEL_DIR = DEMO_MODEL_DIR.parent / "blip-caption-easy"

# What a worker serves when BLIPQ_MODEL is unset, by BLIPQ_TASK.
TASKS = tuple(task.value for task in JobTask)
DEFAULT_QUEUES = {JobTask.VQA: DEFAULT_QUEUE, JobTask.CAPTION: DEFAULT_CAPTION_QUEUE}
DEFAULT_MODELS = {JobTask.VQA: str(DEMO_MODEL_DIR), JobTask.CAPTION: str(DEMO_CAPTION_MODEL_DIR)}

DEVICES = ("auto", "cpu", "cuda")
LOG_FORMATS = ("json", "text")  # json: one object per line, for log collectors; text: for people at a terminal
DEFAULT_METRICS_PORT = 9808  # a worker's Prometheus endpoint (0: none)
DTYPES = ("auto", "float32", "float16", "bfloat16")


def env_str(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...] = ()) -> str:
    """Read a string variable; with `choices`, refuse anything else."""
    value = env.get(name, "").strip() or default
    if choices and value not in choices:
        raise SettingsError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    """Read an integer variable that must be at least `minimum`."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def env_float(
    env: Mapping[str, str], name: str, default: float, minimum: float = 0.0, *, inclusive: bool = False
) -> float:
    """Read a number variable that must be above `minimum` (or equal to it, when `inclusive`)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not (value > minimum or (inclusive and value == minimum)):  # NaN passes neither
        raise SettingsError(f"{name}={value} must be {'at least' if inclusive else 'greater than'} {minimum}")
    return value


def env_networks(env: Mapping[str, str], name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Read a comma-separated list of networks in CIDR notation (a bare address is a network of one)."""
    networks = []
    for item in filter(None, (part.strip() for part in env.get(name, "").split(","))):
        try:
            networks.append(ipaddress.ip_network(item))  # strict: 10.0.0.5/8 is a typo, not 10.0.0.0/8
        except ValueError as exc:
            raise SettingsError(f"{name}: {item!r} is not a network in CIDR notation ({exc})") from None
    return tuple(networks)


def env_ports(env: Mapping[str, str], name: str) -> tuple[range, ...]:
    """Read a comma-separated list of TCP ports and port ranges, such as `8080,9000-9099`."""
    ports = []
    for item in filter(None, (part.strip() for part in env.get(name, "").split(","))):
        low_text, dash, high_text = (part.strip() for part in item.partition("-"))
        if not low_text.isdecimal() or (dash and not high_text.isdecimal()):
            raise SettingsError(f"{name}: {item!r} is not a port (8080) or a port range (9000-9099)")
        low, high = int(low_text), int(high_text or low_text)
        if not 1 <= low <= high <= 65535:
            raise SettingsError(f"{name}: {item!r} is not within 1-65535, low to high")
        ports.append(range(low, high + 1))
    return tuple(ports)


def env_port(env: Mapping[str, str], name: str, default: int) -> int:
    """Read a TCP port to listen on; 0 means none."""
    port = env_int(env, name, default)
    if port > 65535:
        raise SettingsError(f"{name}={port} is not a TCP port (0-65535)")
    return port


def env_redis_url(env: Mapping[str, str]) -> str:
    """Read BLIPQ_REDIS_URL, which must be a redis:// or rediss:// URL."""
    url = env_str(env, "BLIPQ_REDIS_URL", DEFAULT_REDIS_URL)
    if not url.startswith(("redis://", "rediss://")):
        raise SettingsError(f"BLIPQ_REDIS_URL={url!r} must start with redis:// or rediss://")
    return url


def env_redis_sentinels(env: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    """Read BLIPQ_REDIS_SENTINELS: the sentinels' `host:port` addresses, comma-separated; none: no Sentinel."""
    sentinels = []
    for item in filter(None, (part.strip() for part in env.get("BLIPQ_REDIS_SENTINELS", "").split(","))):
        host, _, port = item.rpartition(":")
        if not host or not port.isdecimal() or not 1 <= int(port) <= 65535:
            raise SettingsError(f"BLIPQ_REDIS_SENTINELS: {item!r} is not a host:port address (sentinel-1:26379)")
        sentinels.append((host.strip("[]"), int(port)))
    return tuple(sentinels)


def env_redis_target(env: Mapping[str, str]) -> RedisTarget:
    """Read where Redis is: BLIPQ_REDIS_URL, and BLIPQ_REDIS_SENTINELS with BLIPQ_REDIS_MASTER for Sentinel."""
    return RedisTarget(env_redis_url(env), env_redis_sentinels(env), env_str(env, "BLIPQ_REDIS_MASTER", DEFAULT_MASTER))


def env_device(env: Mapping[str, str]) -> str:
    """Read BLIPQ_DEVICE: auto, cpu, cuda or cuda:N."""
    value = env_str(env, "BLIPQ_DEVICE", "auto")
    base, _, index = value.partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
        raise SettingsError(f"BLIPQ_DEVICE={value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


WEBHOOK_SECRET_MIN_CHARS = 16  # a signing key short enough to guess signs nothing


def env_webhook_secret(env: Mapping[str, str]) -> str:
    """Read BLIPQ_WEBHOOK_SECRET, the key that signs webhooks: unset (no webhooks) or at least 16 characters."""
    secret = env.get("BLIPQ_WEBHOOK_SECRET", "").strip()
    if secret and len(secret) < WEBHOOK_SECRET_MIN_CHARS:
        # The value itself is never in the message: errors end up in logs.
        raise SettingsError(f"BLIPQ_WEBHOOK_SECRET must be at least {WEBHOOK_SECRET_MIN_CHARS} characters long")
    return secret


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs, from BLIPQ_* variables."""

    redis_url: str = DEFAULT_REDIS_URL
    redis_sentinels: tuple[tuple[str, int], ...] = ()  # Sentinel's addresses: the primary is found through them
    redis_master: str = DEFAULT_MASTER  # the name the sentinels know the primary by
    task: JobTask = JobTask.VQA  # picks the default model and queue; the model's architecture decides what it does
    queue: str = DEFAULT_QUEUE
    job_ttl_s: int = DEFAULT_JOB_TTL_S
    model: str = str(DEMO_MODEL_DIR)
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = 20
    num_beams: int = 1
    torch_threads: int = 0  # 0: torch's own default
    batch_max_size: int = 32  # texts (questions, caption prompts) answered by one generate call, at most
    batch_max_wait_ms: float = 5.0  # a batch's first text waits this long for others to join it, at most
    concurrency: int = 64  # messages held at once, at most: one thread each
    intake: int = 64  # answers held at once (messages received, not finished): about two model batches
    fetch_threads: int = 8  # threads that fetch and decode the images of a batch's chunk
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = 40_000_000  # far below Pillow's 89M default: a 40 MP photo is plenty for a 384 px model
    fetch_connect_timeout_s: float = 5.0
    fetch_timeout_s: float = 20.0  # the whole download, not one read
    fetch_allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # fetched although private
    fetch_allow_ports: tuple[range, ...] = ()  # besides 80 and 443
    job_time_limit_s: int = DEFAULT_TIME_LIMIT_S  # hard; the soft limit (job fails `timeout`) is 10 s earlier
    max_attempts: int = 3  # starts of one job whose worker died each time, before it fails `worker_lost`
    shutdown_grace_s: float = 30.0  # on SIGTERM, the jobs held have this long to finish, then go to other workers
    reaper_interval_s: float = 5.0  # between two looks for jobs whose message was lost (worker/reaper.py); 0: never
    log_format: str = "json"
    metrics_port: int = DEFAULT_METRICS_PORT  # the worker serves /metrics here; 0: no endpoint
    metrics_addr: str = "0.0.0.0"  # all interfaces: Prometheus scrapes each worker from elsewhere
    announce_interval_s: float = 5.0  # between two refreshes of the worker's record that /readyz reads
    webhook_secret: str = field(default="", repr=False)  # signs webhooks; "": this worker delivers none
    webhook_max_attempts: int = 6  # tries of one webhook delivery (retried on timeouts, connection errors, 5xx, 429)
    webhook_timeout_s: float = 10.0  # to connect to a webhook receiver, and again for its answer
    webhook_backoff_s: float = 20.0  # the wait before the 2nd try, doubled before each next one (6 tries: ~10 min)
    answer_cache: bool = True  # give an answer again without the model for the same image bytes and text
    answer_cache_ttl_s: int = 7 * 24 * 3600  # how long a cached answer is kept
    answer_cache_max: int = 1_000_000  # cached answers at most (about 200 bytes of Redis each), the oldest go first

    @property
    def redis(self) -> RedisTarget:
        """Where Redis is (worker/contract/redis_target.py)."""
        return RedisTarget(self.redis_url, self.redis_sentinels, self.redis_master)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Build settings from the environment; raises SettingsError naming the variable at fault."""
        env = os.environ if env is None else env
        task = JobTask(env_str(env, "BLIPQ_TASK", "vqa", TASKS))
        batch_max_size = env_int(env, "BLIPQ_BATCH_MAX_SIZE", 32, minimum=1)
        target = env_redis_target(env)
        return cls(
            redis_url=target.url,
            redis_sentinels=target.sentinels,
            redis_master=target.master,
            task=task,
            queue=env_str(env, "BLIPQ_QUEUE", DEFAULT_QUEUES[task]),
            job_ttl_s=env_int(env, "BLIPQ_JOB_TTL_S", DEFAULT_JOB_TTL_S, minimum=60),
            model=env_str(env, "BLIPQ_MODEL", DEFAULT_MODELS[task]),
            device=env_device(env),
            dtype=env_str(env, "BLIPQ_DTYPE", "auto", DTYPES),
            max_new_tokens=env_int(env, "BLIPQ_MAX_NEW_TOKENS", 20, minimum=1),
            num_beams=env_int(env, "BLIPQ_NUM_BEAMS", 1, minimum=1),
            torch_threads=env_int(env, "BLIPQ_TORCH_THREADS", 0),
            batch_max_size=batch_max_size,
            batch_max_wait_ms=env_float(env, "BLIPQ_BATCH_MAX_WAIT_MS", 5.0, inclusive=True),
            # Threads enough for the single jobs of two model batches (a chunk is one message of many texts)...
            concurrency=env_int(env, "BLIPQ_WORKER_CONCURRENCY", 2 * batch_max_size, minimum=1),
            # ...and answers enough to fill the next model batch while one runs: the rest waits on the queue.
            intake=env_int(env, "BLIPQ_WORKER_INTAKE", 2 * batch_max_size, minimum=1),
            fetch_threads=env_int(env, "BLIPQ_FETCH_THREADS", 8, minimum=1),
            max_image_bytes=env_int(env, "BLIPQ_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, minimum=1024),
            max_image_pixels=env_int(env, "BLIPQ_MAX_IMAGE_PIXELS", 40_000_000, minimum=1),
            fetch_connect_timeout_s=env_float(env, "BLIPQ_FETCH_CONNECT_TIMEOUT_S", 5.0),
            fetch_timeout_s=env_float(env, "BLIPQ_FETCH_TIMEOUT_S", 20.0),
            fetch_allow_networks=env_networks(env, "BLIPQ_FETCH_ALLOW_NETWORKS"),
            fetch_allow_ports=env_ports(env, "BLIPQ_FETCH_ALLOW_PORTS"),
            job_time_limit_s=env_int(env, "BLIPQ_JOB_TIME_LIMIT_S", DEFAULT_TIME_LIMIT_S, minimum=15),
            max_attempts=env_int(env, "BLIPQ_MAX_ATTEMPTS", 3, minimum=1),
            shutdown_grace_s=env_float(env, "BLIPQ_SHUTDOWN_GRACE_S", 30.0),
            reaper_interval_s=env_float(env, "BLIPQ_REAPER_INTERVAL_S", 5.0, inclusive=True),  # 0: never
            log_format=env_str(env, "BLIPQ_LOG_FORMAT", "json", LOG_FORMATS),
            metrics_port=env_port(env, "BLIPQ_METRICS_PORT", DEFAULT_METRICS_PORT),
            metrics_addr=env_str(env, "BLIPQ_METRICS_ADDR", "0.0.0.0"),
            announce_interval_s=env_float(env, "BLIPQ_ANNOUNCE_INTERVAL_S", 5.0),
            webhook_secret=env_webhook_secret(env),
            webhook_max_attempts=env_int(env, "BLIPQ_WEBHOOK_MAX_ATTEMPTS", 6, minimum=1),
            webhook_timeout_s=env_float(env, "BLIPQ_WEBHOOK_TIMEOUT_S", 10.0),
            webhook_backoff_s=env_float(env, "BLIPQ_WEBHOOK_BACKOFF_S", 20.0),
            answer_cache=env_str(env, "BLIPQ_ANSWER_CACHE", "on", ("on", "off")) == "on",
            answer_cache_ttl_s=env_int(env, "BLIPQ_ANSWER_CACHE_TTL_S", 7 * 24 * 3600, minimum=1),
            answer_cache_max=env_int(env, "BLIPQ_ANSWER_CACHE_MAX", 1_000_000, minimum=1),
        )
