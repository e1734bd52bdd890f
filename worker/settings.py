"""A worker's settings, read from BLIPQ_* environment variables (the shared ones in contract/settings.py)."""

from __future__ import annotations

import ipaddress
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ValidationInfo, field_validator
from pydantic_settings import NoDecode

from contract.settings import (
    DEFAULT_CAPTION_QUEUE,
    DEFAULT_QUEUE,
    OnOff,
    SharedSettings,
    comma_separated,
    setting,
)
from contract.states import JobTask
from worker.keepalive import KEEPALIVE_S

# The model that ships in the repository: what `blipq up` and `blipq worker` serve when BLIPQ_MODEL is unset.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model" / "blip-vqa-easy"

# The captioning model that ships beside it: what a worker with BLIPQ_TASK=caption serves when BLIPQ_MODEL is unset
# (production sets Salesforce/blip-image-captioning-base).
DEMO_CAPTION_MODEL_DIR = DEMO_MODEL_DIR.parent / "blip-caption-easy"

# What a worker serves when BLIPQ_MODEL is unset, by BLIPQ_TASK.
DEFAULT_QUEUES = {JobTask.VQA: DEFAULT_QUEUE, JobTask.CAPTION: DEFAULT_CAPTION_QUEUE}
DEFAULT_MODELS = {JobTask.VQA: str(DEMO_MODEL_DIR), JobTask.CAPTION: str(DEMO_CAPTION_MODEL_DIR)}
DEFAULT_BATCH_MAX_SIZE = 32  # texts (questions, caption prompts) answered by one generate call, at most

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_METRICS_PORT = 9808  # a worker's Prometheus endpoint (0: none)
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
ImageDecode = Literal["fast", "exact"]  # how far images are decoded (contract.images.decode_for_model)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # a container's CPU limit (cgroup v2): "quota period", or "max period"


def usable_cores() -> int:
    """The cores this process may use: those it may run on (its affinity), within its container's CPU limit if any."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


class WorkerSettings(SharedSettings):
    """Everything a worker process needs, from BLIPQ_* variables."""

    task: JobTask = setting(JobTask.VQA, "Picks the default model and queue (the model's architecture does the task)")
    # Unset: the task's own (validate_default runs `task_default`, which needs `task` above).
    queue: str = setting(
        None, "The queue the worker reads", shown_default="blipq (vqa), blipq-caption (caption)", validate_default=True
    )
    model: str = setting(
        None,
        "The model served: a Hugging Face name or a directory",
        shown_default="demo_model/blip-vqa-easy (vqa), demo_model/blip-caption-easy (caption)",
        validate_default=True,
    )
    device: str = setting("auto", "Where the model runs (auto: cuda if there is one)", rule="auto, cpu, cuda or cuda:N")
    dtype: Dtype = setting("auto", "The model's floating-point type (auto: float16 on a GPU, float32 on a CPU)")
    max_new_tokens: int = setting(20, "Tokens generated for one answer or caption, at most", ge=1)
    num_beams: int = setting(1, "Beam search width (1: greedy)", ge=1)
    torch_threads: int = setting(0, "Torch's CPU threads (0: torch's own default)", ge=0)
    batch_max_size: int = setting(
        DEFAULT_BATCH_MAX_SIZE, "Texts (questions, caption prompts) answered by one generate call, at most", ge=1
    )
    batch_max_wait_ms: float = setting(5.0, "How long a batch's first text waits for others to join it", ge=0)
    # Threads enough for the single jobs of two model batches (a chunk is one message of many texts)...
    concurrency: int = setting(
        None,
        "Messages held at once, one thread each",
        variable="BLIPQ_WORKER_CONCURRENCY",
        shown_default="2 × BLIPQ_BATCH_MAX_SIZE (64)",
        validate_default=True,
        ge=1,
    )
    # ...and answers enough to fill the next model batch while one runs: the rest waits on the queue.
    intake: int = setting(
        None,
        "A message is taken only while fewer answers are held (received, not finished), so up to this plus one "
        "chunk less one are held; the rest waits on the queue",
        variable="BLIPQ_WORKER_INTAKE",
        shown_default="2 × BLIPQ_BATCH_MAX_SIZE (64)",
        validate_default=True,
        ge=1,
    )
    fetch_threads: int = setting(8, "Threads that fetch the images of a batch's chunk", ge=1)
    decode_processes: int = setting(
        None,
        "Processes that decode images over 512x512 pixels for the model (worker/decoders.py); 0: the worker's threads",
        shown_default="the cores the worker may use (its CPU affinity, within its container's CPU limit)",
        validate_default=True,
        ge=0,
    )
    image_decode: ImageDecode = setting(
        "fast",
        "fast: a JPEG decoded at the smallest DCT scale still at least the model's input, a big image box-reduced"
        " before the processor's resize (3.8x faster than exact on a 12 MP JPEG to 384 px; pixels within a level on"
        " average; the demo models' answers all agree on 3,660 photo-sized tests); exact: every image decoded in full,"
        " pixel for pixel what the model card's processor makes of the viewer's picture",
    )
    fetch_connect_timeout_s: float = setting(5.0, "Seconds to connect to an image's host", gt=0)
    fetch_timeout_s: float = setting(20.0, "Seconds for a whole image download, not one read", gt=0)
    fetch_keepalive_s: float = setting(
        KEEPALIVE_S, "Seconds a connection to an image host stays open, idle, for the next image (0: none kept)", ge=0
    )
    fetch_allow_networks: Annotated[tuple[Network, ...], NoDecode] = setting(
        (),
        "Private networks whose images may be fetched all the same (all private addresses are refused otherwise)",
        rule="networks in CIDR notation (a bare address: a network of one), comma-separated",
    )
    fetch_allow_ports: Annotated[tuple[range, ...], NoDecode] = setting(
        (),
        "Ports images may be fetched from, besides 80 and 443",
        rule="ports (8080) and port ranges (9000-9099), 1-65535, comma-separated",
    )
    max_attempts: int = setting(3, "Starts of one job whose worker died each time, before it fails `worker_lost`", ge=1)
    shutdown_grace_s: float = setting(
        30.0, "On SIGTERM, how long the jobs held may take to finish; then they go to other workers", gt=0
    )
    reaper_interval_s: float = setting(
        5.0, "Seconds between two looks for jobs whose message was lost (0: never)", ge=0
    )
    metrics_port: int = setting(DEFAULT_METRICS_PORT, "The port of the worker's /metrics (0: none)", ge=0, le=65535)
    # All interfaces: Prometheus scrapes each worker from elsewhere.
    metrics_addr: str = setting("0.0.0.0", "The address the worker's /metrics listens on")
    announce_interval_s: float = setting(
        5.0, "Seconds between two refreshes of the worker's record, which /readyz reads", gt=0
    )
    webhook_max_attempts: int = setting(
        6, "Tries of one webhook delivery (retried on timeouts, connection errors, 5xx, 429)", ge=1
    )
    webhook_timeout_s: float = setting(
        10.0, "Seconds to connect to a webhook's receiver, and again for its answer", gt=0
    )
    webhook_backoff_s: float = setting(
        20.0, "Seconds before a webhook's 2nd try, doubled before each next one (6 tries: about 10 min)", gt=0
    )
    answer_cache: OnOff = setting(True, "Give an answer again, without the model, for the same image bytes and text")
    answer_cache_ttl_s: int = setting(7 * 24 * 3600, "Seconds a cached answer is kept", ge=1)
    answer_cache_max: int = setting(
        1_000_000, "Cached answers at most (about 200 bytes of Redis each); the oldest go first", ge=1
    )

    @field_validator("queue", "model", mode="before")
    @classmethod
    def task_default(cls, value: Any, info: ValidationInfo) -> Any:
        """Unset: the worker's task's queue or model (a bad BLIPQ_TASK is reported on its own)."""
        if value is not None:
            return value
        task = info.data.get("task", JobTask.VQA)
        return (DEFAULT_QUEUES if info.field_name == "queue" else DEFAULT_MODELS)[task]

    @field_validator("concurrency", "intake", mode="before")
    @classmethod
    def two_batches(cls, value: Any, info: ValidationInfo) -> Any:
        """Unset: two model batches' worth."""
        return 2 * info.data.get("batch_max_size", DEFAULT_BATCH_MAX_SIZE) if value is None else value

    @field_validator("decode_processes", mode="before")
    @classmethod
    def one_per_core(cls, value: Any) -> Any:
        """Unset: one per core this process may use."""
        return usable_cores() if value is None else value

    @field_validator("device")
    @classmethod
    def check_device(cls, value: str) -> str:
        """Accept auto, cpu, cuda and cuda:N."""
        base, _, index = value.partition(":")
        if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
            raise ValueError("is not one of auto, cpu, cuda, cuda:N")
        return value

    @field_validator("fetch_allow_networks", mode="before")
    @classmethod
    def parse_networks(cls, value: Any) -> Any:
        """Read networks in CIDR notation, comma-separated."""
        if not isinstance(value, str):
            return value
        networks = []
        for item in comma_separated(value):
            try:
                networks.append(ipaddress.ip_network(item))  # strict: 10.0.0.5/8 is a typo, not 10.0.0.0/8
            except ValueError as exc:
                raise ValueError(f"has {item!r}, which is not a network in CIDR notation ({exc})") from None
        return tuple(networks)

    @field_validator("fetch_allow_ports", mode="before")
    @classmethod
    def parse_ports(cls, value: Any) -> Any:
        """Read ports and port ranges, such as `8080,9000-9099`."""
        if not isinstance(value, str):
            return value
        ports = []
        for item in comma_separated(value):
            low_text, dash, high_text = (part.strip() for part in item.partition("-"))
            if not low_text.isdecimal() or (dash and not high_text.isdecimal()):
                raise ValueError(f"has {item!r}, which is not a port (8080) or a port range (9000-9099)")
            low, high = int(low_text), int(high_text or low_text)
            if not 1 <= low <= high <= 65535:
                raise ValueError(f"has {item!r}, which is not within 1-65535, low to high")
            ports.append(range(low, high + 1))
        return tuple(ports)
