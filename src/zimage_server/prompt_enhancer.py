"""The prompt enhancer: a language model rewrites a short prompt into the long, literal caption
Z-Image was trained on, with guard rails so that a bad answer never reaches the pipeline.

No torch and no HTTP server here. The model behind it is an `EnhancerBackend`: `ChatBackend`
talks to any OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp, Ollama, ...), and
`ResidentBackend` runs a callable on the model thread (resident_lm.py turns the pipeline's own
text encoder, Qwen3-4B without its head, into that callable).

`PromptEnhancer.enhance` never raises for a backend problem: whatever goes wrong (an error, a
timeout, an empty answer, a refusal, a quoted string lost on the way), the request goes ahead with
the user's own prompt and the result says why (`Enhancement.fallback`).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx

from .logs import first_line
from .model_thread import model_thread

log = logging.getLogger("zimage_server.prompt_enhancer")

RULES = (
    "Keep every subject, count, action, colour and named person, place, brand or work the request gives; "
    "contradict none of them.",
    "When the request asks a question or sets a puzzle, work out the answer and describe an image that shows it.",
    "Decide what a photographer or painter would: composition and framing, lighting, materials and textures, "
    "and what sits in the foreground, the middle ground and the background.",
    "Every piece of text meant to appear in the image goes into the caption exactly as given, inside double "
    "quotes, with where it appears and how it looks; never translate or reword it.",
    "Describe only what can be seen, literally and concretely; no quality tags such as \"masterpiece\", \"8K\" "
    "or \"best quality\".",
    "Answer with the caption alone: no title, preamble, explanation, list or formatting.",
)
INSTRUCTIONS = (
    "You turn a short request for an image into one detailed caption that a text-to-image model will draw.\n"
    + "\n".join(f"- {rule}" for rule in RULES)
)
SAME_LANGUAGE = "Write the caption in the language of the request."

# OpenAI's documented way to ask DALL-E 3 not to rewrite a prompt; clients send it to us too.
DALL_E_VERBATIM_PREFIX = (
    "I NEED to test how the tool works with extremely simple prompts. DO NOT add any detail, just use it AS-IS:"
)

# Why a prompt went to the pipeline unenhanced (`Enhancement.fallback`, the `fallbacks` counter).
EMPTY = "empty"
REFUSAL = "refusal"
LOST_QUOTES = "lost_quotes"
BACKEND_ERROR = "backend_error"
TIMEOUT = "timeout"
SKIPPED_PREFIX = "skipped_prefix"
# Prompts longer than this are detailed already: used as written (TOO_LONG).
MAX_PROMPT_CHARS = 8_000
TOO_LONG = "too_long"
# Fallbacks that may not happen next time; the others follow from the prompt and are cached.
TRANSIENT = frozenset({BACKEND_ERROR, TIMEOUT})

# Sampling when a seed is given, as the official Z-Image enhancer called its model; no seed is greedy.
SAMPLED_TEMPERATURE = 0.7
SAMPLED_TOP_P = 0.9

# Text the user wants written in the image: straight and curly double quotes, CJK corner brackets.
QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|「([^」]+)」|『([^』]+)』')
# Openings of an answer that declines the task (apostrophes normalised to ').
REFUSAL_OPENINGS = (
    "i'm sorry", "i am sorry", "sorry,", "i apologize", "i can't", "i cannot", "i can not", "i won't",
    "i will not", "i'm unable", "i am unable", "i'm not able", "as an ai", "抱歉", "对不起", "我不能",
    "我无法", "我無法", "我不可以",
)  # fmt: skip
# An answer this short (in characters, so that it works for unspaced CJK too) that contains a
# refusal phrase anywhere is a refusal too: a caption is longer.
REFUSAL_MAX_CHARS = 200
# Where a too-long caption may be cut: after a sentence's end (Western punctuation needs a space or
# the end after it; CJK punctuation needs nothing), else after a word.
SENTENCE_END = re.compile(r"[.!?](?=\s|$)|[。！？]")
WORD_END = re.compile(r"\S(?=\s)")

THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
FENCED = re.compile(r"^```[\w+-]*[ \t]*\n?(.*?)(?:\n?```)?$", re.DOTALL)
LABEL = re.compile(
    r"^\**\s*(?:(?:enhanced|revised|improved|rewritten|expanded|final|detailed|image)\s+)?"
    r"(?:prompt|caption|description)\s*\**\s*[:：]\s*\**\s*",
    re.IGNORECASE,
)
JSON_KEYS = ("prompt", "revised_prompt")


@dataclass(frozen=True)
class Enhancement:
    """What to generate from, and what the enhancer did.

    prompt: the revised prompt, or the original when enhancement did not run (less the DALL-E
    prefix, when it was there); revised_prompt: the model's caption, None when it did not run or
    was refused by a guard rail; fallback: why not (EMPTY, REFUSAL, ...), None when it ran."""

    prompt: str
    revised_prompt: str | None = None
    fallback: str | None = None


class EnhancerBackend(Protocol):
    """A chat model answering one conversation. `seed=None`: greedy (temperature 0); an int:
    sampled at temperature 0.7, top_p 0.9, reproducibly from that seed."""

    name: str

    async def complete(self, messages: list[dict[str, str]], *, max_new_tokens: int, seed: int | None) -> str: ...


class EnhancerBackendError(RuntimeError):
    """The backend answered, but not with a usable chat completion."""


def build_messages(prompt: str, language: str | None = None) -> list[dict[str, str]]:
    """The conversation every backend gets: the instructions, then the user's prompt."""
    language_line = f"Write the caption in {language}." if language else SAME_LANGUAGE
    return [
        {"role": "system", "content": f"{INSTRUCTIONS}\n- {language_line}"},
        {"role": "user", "content": prompt},
    ]


def clean_answer(text: str) -> str:
    """The caption inside a model's answer: without reasoning (<think> blocks), code fences, a
    {"prompt": ...} JSON wrapper, a "Prompt:" label, or quotes around the whole of it."""
    text = THINK_BLOCK.sub("", text)
    if "</think>" in text:  # the opening tag was in the template (or eaten by the server): drop what precedes
        text = text.rsplit("</think>", 1)[1]
    if text.lstrip().startswith("<think>"):  # never closed: the budget ran out while reasoning
        return ""
    previous = None
    while text != previous:  # the wrappers nest in any order (a fenced JSON, a labelled quote)
        previous = text
        text = text.strip()
        fenced = FENCED.match(text) if text.startswith("```") else None
        text = fenced.group(1) if fenced else text
        text = _unwrap_json(text)
        text = LABEL.sub("", text, count=1)
        text = _unquote(text)
    return text.strip()


def _unwrap_json(text: str) -> str:
    if not text.startswith("{"):
        return text
    try:
        value, _end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return text
    if isinstance(value, dict):
        for key in JSON_KEYS:
            if isinstance(value.get(key), str):
                return value[key]
    return text


def _unquote(text: str) -> str:
    for left, right in (('"', '"'), ("“", "”")):
        inner = text[1:-1]
        if len(text) >= 2 and text[0] == left and text[-1] == right and left not in inner and right not in inner:
            return inner
    return text


def quoted_strings(prompt: str) -> list[str]:
    """The strings the prompt quotes (text meant to appear in the image), in order."""
    return [next(group for group in match.groups() if group) for match in QUOTED.finditer(prompt)]


def is_refusal(answer: str, quotes: Sequence[str] = ()) -> bool:
    """Whether the answer declines the task: it opens with an apology or "I can't"-style phrase, or
    is short and has one anywhere. The prompt's own quoted strings are ignored, so a sign that
    reads "I can't" is not a refusal."""
    for quote in quotes:
        answer = answer.replace(quote, " ")
    answer = answer.replace("’", "'").strip().lower()
    if answer.startswith(REFUSAL_OPENINGS):
        return True
    return len(answer) <= REFUSAL_MAX_CHARS and any(phrase in answer for phrase in REFUSAL_OPENINGS)


def fit_tokens(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> str:
    """`text`, cut after its last sentence end that keeps it within `max_tokens`; after a word when
    no sentence fits, and by characters when no word does (one long CJK clause)."""
    if count_tokens(text) <= max_tokens:
        return text
    for pattern in (SENTENCE_END, WORD_END):
        cuts = [match.end() for match in pattern.finditer(text)]
        # Tokens grow with the prefix, so the longest prefix that fits is found by bisection.
        fitting = bisect.bisect_right(cuts, False, key=lambda cut: count_tokens(text[:cut].rstrip()) > max_tokens)
        if fitting:
            return text[: cuts[fitting - 1]].rstrip()
    fitting = bisect.bisect_right(range(len(text)), False, key=lambda n: count_tokens(text[:n]) > max_tokens)
    return text[: max(fitting - 1, 0)].rstrip()


def prompt_token_counter(tokenizer) -> Callable[[str], int]:
    """Tokens the Z-Image pipeline encodes for a prompt, chat template included (diffusers'
    `ZImagePipeline._encode_prompt`: one user turn, a generation prompt, thinking on), which is
    what its max_sequence_length cuts. Here, not in resident_lm.py: a tokenizer needs no torch.

    The template is rendered once, around a marker, not for every count (fit_tokens counts many
    times): the prompt sits verbatim between the same two pieces of text whatever it is."""
    marker = "\x00prompt\x00"
    before, after = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    ).split(marker)

    def count(prompt: str) -> int:
        return len(tokenizer(before + prompt + after)["input_ids"])

    return count


class PromptEnhancer:
    """Rewrites prompts through a backend, guarded, bounded and cached.

    max_new_tokens: the answer's budget; timeout_s: how long one answer may take; count_tokens and
    max_prompt_tokens: a caption longer than the text encoder reads (diffusers truncates silently)
    is cut at a sentence (a request's own max_sequence_length may lower it); cache_size: answers
    kept, least recently used out first (greedy answers are deterministic, and a seeded one is
    reproducible, so the same question gets the same answer); max_prompt_chars, and
    max_prompt_tokens for the prompt itself: longer prompts are used as written (`too_long`:
    detailed already, more than the encoder reads, and a conversation longer than the memory plan
    counts); concurrent: answers written at once (each holds a KV cache), the rest wait."""

    def __init__(
        self,
        backend: EnhancerBackend,
        *,
        max_new_tokens: int = 400,
        timeout_s: float = 60.0,
        count_tokens: Callable[[str], int] | None = None,
        max_prompt_tokens: int = 512,
        cache_size: int = 256,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
        concurrent: int = 4,
    ):
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.count_tokens = count_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.cache_size = cache_size
        self.max_prompt_chars = max_prompt_chars
        self._writing = asyncio.Semaphore(concurrent)
        self._cache: OrderedDict[tuple, Enhancement] = OrderedDict()
        self.fallbacks: Counter[str] = Counter()  # reason -> times, as they happen (cache hits not recounted)

    async def enhance(
        self, prompt: str, *, seed: int | None = None, language: str | None = None, max_tokens: int | None = None
    ) -> Enhancement:
        """The prompt to generate from. Never raises because of the backend. `max_tokens`: what the
        request's encoder reads (its max_sequence_length), when less than max_prompt_tokens."""
        if prompt.lstrip().startswith(DALL_E_VERBATIM_PREFIX):
            rest = prompt.lstrip()[len(DALL_E_VERBATIM_PREFIX) :].strip()
            return self._fall_back(rest, SKIPPED_PREFIX)
        if len(prompt) > self.max_prompt_chars or (
            self.count_tokens is not None and self.count_tokens(prompt) > self.max_prompt_tokens
        ):
            return self._fall_back(prompt, TOO_LONG)
        limit = min(self.max_prompt_tokens, max_tokens or self.max_prompt_tokens)
        key = (prompt, seed, language, limit, self.backend.name)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        result = await self._enhance(prompt, seed, language, limit)
        if result.fallback not in TRANSIENT and self.cache_size > 0:
            self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    async def _enhance(self, prompt: str, seed: int | None, language: str | None, limit: int) -> Enhancement:
        if not prompt.strip():
            return self._fall_back(prompt, EMPTY)
        async def write() -> str:
            async with self._writing:  # waiting for a turn counts in the timeout too
                messages = build_messages(prompt, language)
                return await self.backend.complete(messages, max_new_tokens=self.max_new_tokens, seed=seed)

        try:
            answer = await asyncio.wait_for(write(), self.timeout_s)
        except (TimeoutError, httpx.TimeoutException):
            return self._fall_back(prompt, TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - no backend failure may fail the request
            return self._fall_back(prompt, BACKEND_ERROR, f"{type(exc).__name__}: {first_line(exc)[:200]}")
        caption = clean_answer(answer if isinstance(answer, str) else "")
        quotes = quoted_strings(prompt)
        if not caption:
            return self._fall_back(prompt, EMPTY)
        if is_refusal(caption, quotes):
            return self._fall_back(prompt, REFUSAL)
        if self.count_tokens is not None:
            caption = fit_tokens(caption, self.count_tokens, limit)
        if not caption:
            return self._fall_back(prompt, EMPTY)
        if any(quote not in caption for quote in quotes):
            return self._fall_back(prompt, LOST_QUOTES)
        return Enhancement(prompt=caption, revised_prompt=caption)

    def _fall_back(self, prompt: str, reason: str, detail: str = "") -> Enhancement:
        self.fallbacks[reason] += 1
        level = logging.WARNING if reason in TRANSIENT else logging.INFO
        log.log(
            level,
            "prompt enhancer (%s) not used: %s%s; prompt %r",
            self.backend.name,
            reason,
            f" ({detail})" if detail else "",
            prompt[:80],
        )
        return Enhancement(prompt=prompt, revised_prompt=None, fallback=reason)


class ChatBackend:
    """An OpenAI-compatible chat-completions endpoint: `base_url` like http://host:8000/v1.

    Asks for no reasoning (`chat_template_kwargs.enable_thinking=false`, which vLLM and SGLang pass
    to Qwen3's template; servers that do not know it ignore it) and for a fixed seed when sampled.
    `max_tokens` and its newer name `max_completion_tokens` both go along, for old and new servers."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        client: httpx.AsyncClient | None = None,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"{model} at {base_url.rstrip('/')}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.owns_client = client is None  # a client passed in is the caller's to close
        self.client = client or httpx.AsyncClient(timeout=timeout_s)

    def request_body(self, messages: list[dict[str, str]], max_new_tokens: int, seed: int | None) -> dict:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_new_tokens,
            "max_completion_tokens": max_new_tokens,
            "chat_template_kwargs": {"enable_thinking": False},
            "stream": False,
        }
        if seed is None:
            return body | {"temperature": 0.0}
        return body | {"temperature": SAMPLED_TEMPERATURE, "top_p": SAMPLED_TOP_P, "seed": seed}

    async def complete(self, messages: list[dict[str, str]], *, max_new_tokens: int, seed: int | None) -> str:
        response = await self.client.post(
            self.url, json=self.request_body(messages, max_new_tokens, seed), headers=self.headers
        )
        if not response.is_success:
            raise EnhancerBackendError(f"HTTP {response.status_code} from {self.url}: {response.text[:200]}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError) as exc:
            raise EnhancerBackendError(f"not a chat completion from {self.url}: {type(exc).__name__}") from None
        # A reasoning parser may move everything into reasoning_content, leaving no content: empty.
        if content is not None and not isinstance(content, str):
            raise EnhancerBackendError(f"not a chat completion from {self.url}: content is {type(content).__name__}")
        return content or ""

    async def aclose(self) -> None:
        if self.owns_client:
            await self.client.aclose()


class ResidentBackend:
    """The loaded model's own text encoder as the chat model (resident_lm.ResidentLanguageModel).

    The answer is written in turns on the model thread (`lm.advance`), each holding it for a few
    tokens only, so image calls queued meanwhile run between turns. A timeout (the enhancer's
    wait_for) cancels this coroutine between turns: nothing more is written for nobody."""

    name = "resident"

    def __init__(self, lm):
        self.lm = lm  # start(messages, max_new_tokens, seed), advance(answer), text(answer)
        self.writing = 0
        self.last_written = time.monotonic()

    def idle_for(self) -> float | None:
        """For the idle watcher (idle.py): None while an answer is being written, so the model is
        not put to sleep between its turns; else the seconds since the last one ended."""
        return None if self.writing else time.monotonic() - self.last_written

    async def complete(self, messages: list[dict[str, str]], *, max_new_tokens: int, seed: int | None) -> str:
        answer = self.lm.start(messages, max_new_tokens, seed)
        self.writing += 1
        try:
            while not answer.done:
                await model_thread().run(self.lm.advance, answer)
        finally:
            self.writing -= 1
            self.last_written = time.monotonic()
        return self.lm.text(answer)
