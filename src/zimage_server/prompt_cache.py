"""An LRU cache of prompt embeddings, so a repeated prompt skips the text encoder.

Pure Python: it stores whatever the encode function returns (one tensor per text) and knows
nothing of torch. The key is the text together with max_sequence_length, because the pipeline
truncates at that length, so one text can have several embeddings. A hit returns the very tensor
the miss computed, so a cached result is bit-for-bit the uncached one.

Used under the runner's lock only, so it needs no lock of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

E = TypeVar("E")


@dataclass
class PromptCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class PromptEmbeddingCache(Generic[E]):
    """Embeddings for (text, max_sequence_length), least recently used evicted first; capacity 0 stores nothing."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, E] = OrderedDict()
        self.stats = PromptCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def encode(
        self, texts: Sequence[str], max_sequence_length: int, encode_batch: Callable[[list[str], int], list[E]]
    ) -> list[E]:
        """Embeddings for `texts`, in order: hits from the cache, the distinct misses in one `encode_batch` call."""
        found: dict[str, E] = {}
        missing: list[str] = []
        for text in texts:
            if text in found or text in missing:
                continue
            key = (text, max_sequence_length)
            if key in self._entries:
                self._entries.move_to_end(key)
                found[text] = self._entries[key]
                self.stats.hits += 1
            else:
                missing.append(text)
                self.stats.misses += 1
        if missing:
            encoded = encode_batch(list(missing), max_sequence_length)
            for text, embedding in zip(missing, encoded, strict=True):
                found[text] = embedding
                self._store((text, max_sequence_length), embedding)
        return [found[text] for text in texts]

    def _store(self, key: Hashable, embedding: E) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = embedding
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.stats.evictions += 1
