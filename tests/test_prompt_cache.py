"""The prompt-embedding cache: hits skip the text encoder, results are bit-for-bit the uncached ones."""

from __future__ import annotations

import numpy as np
import torch

from conftest import generate
from test_runner import spec
from zimage_server.runner import ModelRunner
from zimage_server.prompt_cache import PromptEmbeddingCache


class CountingEncoder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str], max_sequence_length: int) -> list[tuple[str, int]]:
        self.calls.append(texts)
        return [(text, max_sequence_length) for text in texts]


def test_hits_skip_the_encoder_and_misses_are_encoded_together_once():
    cache, encoder = PromptEmbeddingCache(4), CountingEncoder()
    assert cache.encode(["a", "b", "a"], 64, encoder) == [("a", 64), ("b", 64), ("a", 64)]
    assert cache.encode(["b", "c"], 64, encoder) == [("b", 64), ("c", 64)]
    assert encoder.calls == [["a", "b"], ["c"]]
    assert (cache.stats.hits, cache.stats.misses) == (1, 3)


def test_the_key_includes_max_sequence_length():
    cache, encoder = PromptEmbeddingCache(4), CountingEncoder()
    cache.encode(["a"], 64, encoder)
    assert cache.encode(["a"], 128, encoder) == [("a", 128)]
    assert encoder.calls == [["a"], ["a"]]


def test_least_recently_used_entry_is_evicted_first():
    cache, encoder = PromptEmbeddingCache(2), CountingEncoder()
    cache.encode(["a"], 64, encoder)
    cache.encode(["b"], 64, encoder)
    cache.encode(["a"], 64, encoder)  # a is now the most recently used
    cache.encode(["c"], 64, encoder)  # evicts b
    assert len(cache) == 2 and cache.stats.evictions == 1
    encoder.calls.clear()
    cache.encode(["a", "c"], 64, encoder)
    assert encoder.calls == []
    cache.encode(["b"], 64, encoder)
    assert encoder.calls == [["b"]]


def test_capacity_zero_stores_nothing():
    cache, encoder = PromptEmbeddingCache(0), CountingEncoder()
    cache.encode(["a"], 64, encoder)
    cache.encode(["a"], 64, encoder)
    assert len(cache) == 0 and encoder.calls == [["a"], ["a"]] and cache.stats.hits == 0


def runner_with_cache(runner: ModelRunner, settings, capacity: int) -> ModelRunner:
    """A second runner over the same loaded pipeline, with its own cache."""
    return ModelRunner(runner.pipeline, settings.replace(prompt_cache=capacity), runner.device, runner.dtype)


def test_cached_results_are_bit_identical_to_uncached_ones(runner, settings):
    cached, uncached = runner_with_cache(runner, settings, 8), runner_with_cache(runner, settings, 0)
    # Guidance on, so negative prompts are encoded (and cached) too.
    requests = [spec("a red chair", (3,), negative_prompt="blurry"), spec("astronaut", (4, 5))]
    first = generate(cached, requests)
    second = generate(cached, requests)  # every embedding now comes from the cache
    plain = generate(uncached, requests)
    assert cached.prompt_cache.stats.hits >= 3 and uncached.prompt_cache.stats.hits == 0
    for a, b, c in zip(sum(first, []), sum(second, []), sum(plain, []), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))


def test_a_hit_does_not_call_the_text_encoder(runner, settings):
    cached = runner_with_cache(runner, settings, 8)
    calls = []
    handle = cached.pipeline.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        generate(cached, [spec("a cat", (1,), guidance_scale=0.0)])
        generate(cached, [spec("a cat", (2,), guidance_scale=0.0)])
    finally:
        handle.remove()
    assert len(calls) == 1


def test_embeddings_are_the_pipelines_own(runner):
    [embedding] = runner.encode_prompts(["a cat"], 64)
    expected, _ = runner.pipeline.encode_prompt(
        ["a cat"], device="cpu", do_classifier_free_guidance=False, max_sequence_length=64
    )
    assert torch.equal(embedding, expected[0])
    # Cached tensors must not hold the text encoder's autograd graph (on a GPU, its activations).
    assert not embedding.requires_grad and embedding.grad_fn is None
