"""The answer cache: an answer, once computed, is given again without the model for the same question and image.

An answer is a function of the image's bytes, the text (question or caption prompt), the model (its weights, and
its configurations: the model's, the tokenizer's, the image processor's, the generation defaults), the worker's
generation settings (max new tokens, beams, dtype) and how far it decodes images (BLIPQ_IMAGE_DECODE), so it is kept
in Redis under a SHA-256 of all of them: the key names no URL (the same photo at two addresses is one entry) and no
model by name only (a model directory whose weights or any other file changed misses). Entries expire after
BLIPQ_ANSWER_CACHE_TTL_S, and the cache holds about BLIPQ_ANSWER_CACHE_MAX of them: an index scored by write time
loses its oldest when a write passes the bound. Every worker of the fleet shares it, so a re-run of a tagging job
with one new question costs only the new question's answers.

A lookup is one MGET per image (all its texts), a write one script call per chunk or job; nothing when it is off.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import Counter

from contract.keys import ANSWER_INDEX_KEY, ANSWER_PREFIX
from contract.lua import register
from worker.batching import Batcher, Expected, Output
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    import torch

    from worker.inference import LoadedModel

HASH_BLOCK = 1 << 20
CACHED_CALL = -1  # the model call an answer from the cache names: none

LOOKUPS = Counter("blipq_worker_answer_cache", "Answers looked up in the answer cache, by result", ["result"])


@dataclass(frozen=True)
class CacheSettings:
    """Whether answers are cached, for how long, and how many at most."""

    enabled: bool = True
    ttl_s: int = 7 * 24 * 3600
    max_entries: int = 1_000_000


class AnswerCache:
    """Answers by (image bytes, text) for one model revision and one set of generation settings."""

    def __init__(self, client: redis.Redis, settings: CacheSettings, generation: str) -> None:
        """`generation` names the model's revision and the generation settings: part of every key."""
        self.client, self.settings, self.generation = client, settings, generation
        self._store = register(client, "answer_cache_store", "worker")  # worker/scripts/answer_cache_store.lua

    def keys(self, image: bytes, texts: list[str]) -> list[str]:
        """The entries of `texts` asked about `image`."""
        image_digest = hashlib.sha256(image).hexdigest()
        return [
            ANSWER_PREFIX + hashlib.sha256(f"{self.generation}\0{image_digest}\0{text}".encode()).hexdigest()
            for text in texts
        ]

    def lookup(self, keys: list[str]) -> list[str | None]:
        """The cached answer of each key, or None (a miss); all misses when the cache is off."""
        if not self.settings.enabled or not keys:
            return [None] * len(keys)
        values: list[bytes | None] = self.client.mget(keys)  # type: ignore[assignment]
        hits = sum(value is not None for value in values)
        LOOKUPS.labels(result="hit").inc(hits)
        LOOKUPS.labels(result="miss").inc(len(values) - hits)
        return [value.decode() if value is not None else None for value in values]

    def store(self, answers: dict[str, str]) -> None:
        """Keep new answers (key -> answer), in one call."""
        if not self.settings.enabled or not answers:
            return
        args: list[str | int | float] = [time.time(), self.settings.ttl_s, self.settings.max_entries]
        for key, answer in answers.items():
            args += [key, answer]
        self._store(keys=[ANSWER_INDEX_KEY], args=args)


@dataclass
class PreparedImage:
    """An image ready for the model: its texts' cache keys, the answers found cached, and its pixels (None when every
    answer was cached: it was not even decoded)."""

    keys: list[str]
    cached: list[str | None]
    pixels: torch.Tensor | None

    def cached_or_submit(
        self,
        batcher: Batcher,
        texts: list[str],
        gate: tuple[str, list[int]] | None = None,
        expected: Expected | None = None,
    ) -> list[Future[Output]]:
        """The futures of the texts' answers: resolved at once for cached ones, the batcher's for the rest."""
        futures: list[Future[Output]] = []
        for answer in self.cached:
            futures.append(Future())
            if answer is not None:
                futures[-1].set_result(Output(answer, 0.0, CACHED_CALL))
        missing = [n for n, answer in enumerate(self.cached) if answer is None]
        if missing:
            assert self.pixels is not None
            part = (gate[0], [gate[1][n] for n in missing]) if gate is not None else None
            submitted = batcher.submit(self.pixels, [texts[n] for n in missing], part, expected)
            for n, future in zip(missing, submitted, strict=True):
                futures[n] = future
        elif expected is not None:
            expected.settle()
        return futures

    def new_answers(self, answers: dict[int, str]) -> dict[str, str]:
        """Cache key -> answer of the texts (by position) that the model answered now."""
        return {self.keys[n]: answer for n, answer in answers.items() if self.cached[n] is None}

    def keep(self, cache: AnswerCache, answers: dict[int, Any]) -> None:
        """Keep the new ones of `answers` (by position) in `cache`."""
        cache.store(self.new_answers(answers))


def answer_cache_for(client: redis.Redis, loaded: LoadedModel, settings: WorkerSettings) -> AnswerCache:
    """The cache of a worker's answers: keyed by its model's revision and its generation settings."""
    revision = model_revision(settings.model, getattr(loaded.model.config, "_commit_hash", None))
    generation = [
        revision,
        loaded.task,
        settings.max_new_tokens,
        settings.num_beams,
        str(loaded.dtype),
        settings.image_decode,  # how far images are decoded changes their pixels, so it may change an answer
    ]
    cache = CacheSettings(settings.answer_cache, settings.answer_cache_ttl_s, settings.answer_cache_max)
    return AnswerCache(client, cache, json.dumps(generation))


def model_revision(model_id: str, commit_hash: str | None) -> str:
    """What identifies the model: the hub's commit hash when it came from the hub, else a SHA-256 of every file under
    its local directory, recursively (weights, configurations, tokenizer, processor and generation configuration):
    their paths, sizes and bytes."""
    if commit_hash:
        return commit_hash
    digest = hashlib.sha256()
    directory = Path(model_id)
    files = sorted(path for path in directory.rglob("*") if path.is_file()) if directory.is_dir() else []
    for path in files:
        # The size first: a file's bytes and the next one's name cannot run into each other.
        digest.update(f"{path.relative_to(directory).as_posix()}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as contents:
            while block := contents.read(HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()
