"""The prompt enhancer: the resident encoder as Qwen3-4B's causal LM, the chat client against a
real loopback server, and the guard rails (quotes, refusals, timeouts, length, cache, prefix)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import safetensors.torch
import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from conftest import Captured
from zimage_server.prompt_enhancer import (
    DALL_E_VERBATIM_PREFIX,
    INSTRUCTIONS,
    ChatBackend,
    Enhancement,
    PromptEnhancer,
    ResidentBackend,
    build_messages,
    clean_answer,
    fit_tokens,
    prompt_token_counter,
    quoted_strings,
)
from zimage_server.resident_lm import ResidentLanguageModel, causal_lm_over
from zimage_server.runner import load_runner
from zimage_server.settings import SettingsError, load_settings

MESSAGES = build_messages("a watercolor painting of mountains at sunset")
CAPTION = "A watercolor of mountains at sunset. Warm light falls on the ridges; a lake fills the foreground."


# ---------------------------------------------------------------------------------------------
# The resident model: the pipeline's encoder plus its tied head is Qwen3ForCausalLM.


@pytest.fixture(scope="module")
def own_runner(settings):
    """A runner of this file's own: one test puts it to sleep."""
    return load_runner(settings)


@pytest.fixture(scope="module")
def reference(settings) -> Qwen3ForCausalLM:
    """Qwen3ForCausalLM as plain transformers builds it from the encoder folder: its config with
    tied embeddings, the folder's weights loaded into `.model`."""
    folder = settings.model_dir / "text_encoder"
    config = Qwen3Config.from_pretrained(folder, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config)
    model.model.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"), strict=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def reference_generate(reference, tokenizer, messages, max_new_tokens, seed=None, **sampling) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    inputs = tokenizer(text, return_tensors="pt")
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        output = reference.generate(
            **inputs, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_the_head_is_the_encoders_embedding_matrix_itself(own_runner):
    encoder = own_runner.pipeline.text_encoder
    model = causal_lm_over(encoder)
    assert model.model is encoder
    assert model.lm_head.weight is encoder.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == encoder.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings and not encoder.config.tie_word_embeddings  # the tiny folder's is untied


def test_the_wrapper_computes_the_logits_plain_transformers_does(own_runner, reference):
    tokenizer = own_runner.pipeline.tokenizer
    ids = tokenizer("a cat on a red chair", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = causal_lm_over(own_runner.pipeline.text_encoder)(ids).logits
        theirs = reference(ids).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("chunk_tokens", [5, 16, 1000])
def test_resident_greedy_and_seeded_answers_are_plain_transformers_ones(own_runner, reference, chunk_tokens):
    # Written in turns of chunk_tokens (the model thread is free between them), or in one go.
    model = ResidentLanguageModel(own_runner, chunk_tokens=chunk_tokens)
    tokenizer = own_runner.pipeline.tokenizer
    greedy = model.generate(MESSAGES, 24, None)
    assert greedy == reference_generate(reference, tokenizer, MESSAGES, 24, do_sample=False)
    assert len(greedy) > 0
    seeded = model.generate(MESSAGES, 24, 7)
    assert seeded == model.generate(MESSAGES, 24, 7)  # same seed, same answer
    assert seeded != model.generate(MESSAGES, 24, 8)
    expected = reference_generate(
        reference, tokenizer, MESSAGES, 24, seed=7, do_sample=True, temperature=0.7, top_p=0.9, top_k=0
    )
    assert seeded == expected


def test_seeded_answers_written_in_turns_do_not_disturb_each_other_or_the_global_generator(own_runner):
    model = ResidentLanguageModel(own_runner, chunk_tokens=4)
    alone = model.generate(MESSAGES, 16, 7)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, second = model.start(MESSAGES, 16, 7), model.start(MESSAGES, 16, 8)
    while not (first.done and second.done):  # interleaved turns, as two requests' would be
        for answer in (first, second):
            if not answer.done:
                model.advance(answer)
    assert model.text(first) == alone and model.text(second) == model.generate(MESSAGES, 16, 8)
    assert torch.equal(torch.rand(3), expected_next)


@pytest.mark.anyio
async def test_image_calls_run_between_the_turns_of_a_long_answer(own_runner):
    """An image request queued while an expansion is being written waits for one turn, not all of them."""
    import asyncio

    from conftest import make_spec
    from zimage_server.model_thread import model_thread
    from zimage_server.specs import ImageRow

    finished: list[str] = []
    model = ResidentLanguageModel(own_runner, chunk_tokens=8)
    backend = ResidentBackend(model)

    async def enhance() -> None:
        await backend.complete(MESSAGES, max_new_tokens=800, seed=None)  # blank lines: never stops early
        finished.append("answer")

    async def image() -> None:
        await asyncio.sleep(0.05)  # the answer's turns have begun
        spec = make_spec("a cat")
        await model_thread().run(own_runner.run_call, spec.params, [ImageRow(spec, 0)])
        finished.append("image")

    await asyncio.gather(enhance(), image())
    assert finished == ["image", "answer"]


@pytest.mark.anyio
async def test_the_resident_backend_answers_through_the_enhancer_after_the_model_slept(own_runner):
    model = ResidentLanguageModel(own_runner)
    before = model.generate(MESSAGES, 16, 3)
    own_runner.sleep()
    enhancer = PromptEnhancer(ResidentBackend(model), max_new_tokens=16)
    result = await enhancer.enhance("a watercolor painting of mountains at sunset", seed=3)
    assert own_runner.resident and own_runner.wakes == 1  # woke for it, with a new encoder
    assert result == Enhancement(clean_answer(before), clean_answer(before), None)


def test_offload_hooks_on_the_encoder_fire_under_the_wrapper_and_change_nothing(settings, reference, monkeypatch):
    """Group offloading (Z_IMAGE_OFFLOAD=text_encoder's hooks), here from the CPU to the CPU: the
    wrapper calls the hooked encoder at every step, and the KV cache goes through the hooks intact."""
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks.group_offloading import GroupOffloadingHook
    from transformers import Qwen3Model

    encoder = Qwen3Model.from_pretrained(settings.model_dir / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(settings.model_dir / "tokenizer")
    hooked = []
    original = GroupOffloadingHook.pre_forward

    def counting(hook, module, *args, **kwargs):
        hooked.append(module is encoder)
        return original(hook, module, *args, **kwargs)

    sampling = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=0)
    cpu = torch.device("cpu")
    monkeypatch.setattr(GroupOffloadingHook, "pre_forward", counting)  # before the hooks exist: they bind it
    apply_group_offloading(
        encoder, onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
    )
    answer = reference_generate(causal_lm_over(encoder), tokenizer, MESSAGES, 12, seed=5, **sampling)
    assert sum(hooked) >= 1 and len(hooked) > sum(hooked)  # the encoder's own hook and its blocks'
    assert answer == reference_generate(reference, tokenizer, MESSAGES, 12, seed=5, **sampling)


def test_the_token_counter_counts_what_the_pipeline_encodes(own_runner):
    pipeline = own_runner.pipeline
    count = prompt_token_counter(pipeline.tokenizer)
    for prompt in ("a cat", "a watercolor painting of mountains at sunset, soft light " * 3):
        with torch.no_grad():
            [embedding], _ = pipeline.encode_prompt(
                prompt=[prompt], device="cpu", do_classifier_free_guidance=False, max_sequence_length=1000
            )
        assert count(prompt) == embedding.shape[0]


# ---------------------------------------------------------------------------------------------
# A real OpenAI-compatible chat server on loopback.


class ChatServer:
    """Answers /v1/chat/completions: `replies[user prompt]` is a content string, or (status, raw
    body) for a broken server, or ("sleep", seconds) for a slow one; others get a caption."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.replies: dict[str, object] = {}
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                prompt = body["messages"][-1]["content"]
                reply = server.replies.get(prompt, f"A detailed picture of {prompt}.")
                status, raw = 200, None
                if isinstance(reply, tuple) and reply[0] == "sleep":
                    server.stop.wait(reply[1])
                    reply = "too late"
                if isinstance(reply, tuple):
                    status, raw = reply
                if raw is None:
                    raw = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.server.handle_error = lambda *args: None  # a client that timed out is gone; not an error here
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    server = ChatServer()
    yield server
    server.close()


def enhancer_for(chat: ChatServer, **options) -> PromptEnhancer:
    backend = ChatBackend(chat.url, "qwen3-4b", api_key="sk-enhance", timeout_s=options.pop("http_timeout_s", 10))
    return PromptEnhancer(backend, **({"max_new_tokens": 300} | options))


@pytest.mark.anyio
async def test_the_chat_backend_sends_an_openai_request_greedy_or_seeded(chat):
    enhancer = enhancer_for(chat)
    greedy = await enhancer.enhance("a red fox")
    seeded = await enhancer.enhance("a red fox", seed=42, language="French")
    assert greedy == Enhancement("A detailed picture of a red fox.", "A detailed picture of a red fox.", None)
    assert seeded.prompt == greedy.prompt
    first, second = chat.requests
    assert first["model"] == "qwen3-4b" and first["max_tokens"] == first["max_completion_tokens"] == 300
    assert first["chat_template_kwargs"] == {"enable_thinking": False}
    assert first["temperature"] == 0 and "seed" not in first and "top_p" not in first
    assert (second["temperature"], second["top_p"], second["seed"]) == (0.7, 0.9, 42)
    system, user = first["messages"]
    assert system["role"] == "system" and system["content"].startswith(INSTRUCTIONS)
    assert user == {"role": "user", "content": "a red fox"}
    assert second["messages"][0]["content"].endswith("Write the caption in French.")
    assert chat.headers[0]["Authorization"] == "Bearer sk-enhance"
    await enhancer.backend.aclose()


@pytest.mark.parametrize(
    "answer, expected",
    [
        (CAPTION, CAPTION),
        (f'```json\n{{"prompt": "{CAPTION}"}}\n```', CAPTION),
        (f'{{"revised_prompt": "{CAPTION}"}}', CAPTION),
        (f"```\n{CAPTION}\n```", CAPTION),
        (f"<think>The user wants mountains.\nAdd light.</think>\n\n{CAPTION}", CAPTION),
        (f"The user wants mountains.</think>\n{CAPTION}", CAPTION),
        ("<think>Let me think about the mountains and", ""),
        (f'"{CAPTION}"', CAPTION),
        (f"Enhanced prompt: {CAPTION}", CAPTION),
        (f'**Prompt:** "{CAPTION}"', CAPTION),
        ('A sign reading "OPEN" hangs over a door.', 'A sign reading "OPEN" hangs over a door.'),
        ("  \n ", ""),
    ],
)
def test_clean_answer_unwraps_what_models_put_around_the_caption(answer, expected):
    assert clean_answer(answer) == expected


@pytest.mark.anyio
@pytest.mark.parametrize(
    "reply, prompt, reason",
    [
        (f'```json\n{{"prompt": "{CAPTION}"}}\n```', CAPTION, None),
        (f"<think>mountains, then light</think>\n\n{CAPTION}", CAPTION, None),
        ("I'm sorry, but I can't help with that request.", None, "refusal"),
        ("抱歉，我无法生成这张图片。", None, "refusal"),
        ("<think>mountains", None, "empty"),
        ("", None, "empty"),
        ((500, b'{"error": "overloaded"}'), None, "backend_error"),
        ((200, b"{not json"), None, "backend_error"),
        ((200, b'{"choices": []}'), None, "backend_error"),
        (("sleep", 3), None, "timeout"),
    ],
)
async def test_each_answer_gives_a_caption_or_the_original_with_a_reason(chat, reply, prompt, reason):
    chat.replies["mountains at sunset"] = reply
    enhancer = enhancer_for(chat, timeout_s=0.5)
    with Captured("zimage_server.prompt_enhancer") as captured:
        result = await enhancer.enhance("mountains at sunset")
    if reason is None:
        assert result == Enhancement(prompt, prompt, None) and not enhancer.fallbacks
        assert not captured.records
    else:
        assert result == Enhancement("mountains at sunset", None, reason)
        assert enhancer.fallbacks == {reason: 1}
        [record] = captured.records
        assert reason in record.getMessage() and "qwen3-4b at " + chat.url in record.getMessage()
    await enhancer.backend.aclose()


@pytest.mark.anyio
async def test_the_http_clients_own_timeout_is_a_timeout_too(chat):
    chat.replies["slow"] = ("sleep", 3)
    enhancer = enhancer_for(chat, http_timeout_s=0.3, timeout_s=10)
    assert (await enhancer.enhance("slow")).fallback == "timeout"
    await enhancer.backend.aclose()


@pytest.mark.anyio
async def test_a_refusal_is_not_a_sign_that_reads_i_cant(chat):
    prompt = 'a protest sign that reads "I can\'t breathe"'
    chat.replies[prompt] = "A cardboard protest sign reads \"I can't breathe\" in black marker."
    enhancer = enhancer_for(chat)
    assert (await enhancer.enhance(prompt)).fallback is None
    await enhancer.backend.aclose()


@pytest.mark.anyio
async def test_every_quoted_string_must_survive_verbatim(chat):
    prompt = 'a cafe with a neon sign "OPEN 24/7", a menu “Daily Soup” and a banner 「珈琲」'
    assert quoted_strings(prompt) == ["OPEN 24/7", "Daily Soup", "珈琲"]
    kept = 'A cafe at night. A neon sign reads "OPEN 24/7"; a chalk menu says "Daily Soup"; a banner shows "珈琲".'
    chat.replies[prompt] = kept
    chat.replies[prompt + "!"] = kept.replace("24/7", "24-7")
    enhancer = enhancer_for(chat)
    assert (await enhancer.enhance(prompt)).prompt == kept
    assert await enhancer.enhance(prompt + "!") == Enhancement(prompt + "!", None, "lost_quotes")
    await enhancer.backend.aclose()


@pytest.fixture(scope="module")
def count_tokens(settings):
    return prompt_token_counter(AutoTokenizer.from_pretrained(settings.model_dir / "tokenizer"))


@pytest.mark.anyio
async def test_a_caption_too_long_for_the_encoder_is_cut_after_its_last_sentence_that_fits(chat, count_tokens):
    sentences = [f"Sentence {i} describes a mountain, a lake and the light on them." for i in range(12)]
    chat.replies["mountains"] = " ".join(sentences)
    limit = count_tokens(" ".join(sentences[:5])) + 3  # five sentences fit, six do not
    enhancer = enhancer_for(chat, count_tokens=count_tokens, max_prompt_tokens=limit)
    result = await enhancer.enhance("mountains")
    assert result.prompt == " ".join(sentences[:5]) and result.fallback is None
    assert count_tokens(result.prompt) <= limit < count_tokens(" ".join(sentences[:6]))
    # A quoted string in the part cut off is lost: the original prompt goes instead.
    chat.replies['a sign "END"'] = " ".join(sentences) + ' The sign says "END".'
    assert (await enhancer.enhance('a sign "END"')).fallback == "lost_quotes"
    await enhancer.backend.aclose()


def test_without_a_sentence_that_fits_the_cut_is_after_a_word(count_tokens):
    text = "a very long clause about a mountain and a lake and the light and the trees and the sky, " * 4
    limit = count_tokens("a very long clause about a mountain") + 1
    cut = fit_tokens(text, count_tokens, limit)
    assert count_tokens(cut) <= limit and text.startswith(cut) and text[len(cut)] == " " and len(cut) > 20


@pytest.mark.anyio
async def test_the_dall_e_as_is_prefix_skips_the_enhancer(chat):
    enhancer = enhancer_for(chat)
    result = await enhancer.enhance(f"  {DALL_E_VERBATIM_PREFIX}  a red cube ")
    assert result == Enhancement("a red cube", None, "skipped_prefix") and not chat.requests
    lowered = await enhancer.enhance(DALL_E_VERBATIM_PREFIX.lower() + " a red cube")  # OpenAI's spelling only
    assert lowered.fallback is None and len(chat.requests) == 1
    await enhancer.backend.aclose()


@pytest.mark.anyio
async def test_answers_are_cached_per_prompt_seed_language_and_backend_but_failures_are_retried(chat):
    enhancer = enhancer_for(chat, cache_size=2)
    first = await enhancer.enhance("a lighthouse", seed=1)
    assert await enhancer.enhance("a lighthouse", seed=1) is first and len(chat.requests) == 1
    await enhancer.enhance("a lighthouse", seed=2)
    await enhancer.enhance("a lighthouse", seed=1, language="German")
    assert len(chat.requests) == 3
    await enhancer.enhance("a lighthouse", seed=1)  # evicted: two entries are kept
    assert len(chat.requests) == 4
    chat.replies["a storm"] = (503, b"busy")
    assert (await enhancer.enhance("a storm")).fallback == "backend_error"
    chat.replies.pop("a storm")
    assert (await enhancer.enhance("a storm")).fallback is None and len(chat.requests) == 6
    await enhancer.backend.aclose()


@pytest.mark.anyio
async def test_a_fallback_logs_at_most_80_characters_of_the_prompt(chat):
    prompt = "a" * 80 + "SECRET-TAIL"
    chat.replies[prompt] = "I cannot do that."
    enhancer = enhancer_for(chat)
    with Captured("zimage_server.prompt_enhancer") as captured:
        assert (await enhancer.enhance(prompt)).fallback == "refusal"
    [record] = captured.records
    assert "refusal" in record.getMessage() and "SECRET" not in record.getMessage()
    await enhancer.backend.aclose()


# ---------------------------------------------------------------------------------------------
# Settings.


def test_prompt_enhancer_settings():
    settings = load_settings(env={})
    assert (settings.prompt_enhancer, settings.enhance_max_tokens, settings.enhance_prompt) == ("resident", 400, False)
    assert settings.enhance_timeout_s == 60
    url = load_settings(
        env={
            "Z_IMAGE_PROMPT_ENHANCER": "http://127.0.0.1:8001/v1",
            "Z_IMAGE_PROMPT_ENHANCER_MODEL": "Qwen/Qwen3-4B",
            "Z_IMAGE_PROMPT_ENHANCER_API_KEY": "sk-secret-key",
            "Z_IMAGE_ENHANCE_PROMPT": "yes",
        }
    )
    assert url.prompt_enhancer_model == "Qwen/Qwen3-4B" and url.enhance_prompt
    assert "sk-secret-key" not in repr(url)
    for env, message in [
        ({"Z_IMAGE_PROMPT_ENHANCER": "qwen"}, "invalid Z_IMAGE_PROMPT_ENHANCER='qwen'"),
        ({"Z_IMAGE_PROMPT_ENHANCER": "ftp://host/v1"}, "invalid Z_IMAGE_PROMPT_ENHANCER"),
        ({"Z_IMAGE_PROMPT_ENHANCER": "https://llm.example/v1"}, "needs Z_IMAGE_PROMPT_ENHANCER_MODEL"),
        ({"Z_IMAGE_PROMPT_ENHANCER": "off", "Z_IMAGE_ENHANCE_PROMPT": "1"}, "Z_IMAGE_ENHANCE_PROMPT needs"),
        ({"Z_IMAGE_ENHANCE_MAX_TOKENS": "5000"}, "Z_IMAGE_ENHANCE_MAX_TOKENS"),
        ({"Z_IMAGE_ENHANCE_TIMEOUT_S": "0"}, "Z_IMAGE_ENHANCE_TIMEOUT_S"),
    ]:
        with pytest.raises(SettingsError, match=message) as error:
            load_settings(env=env)
        assert "\n" not in str(error.value)


@pytest.mark.anyio
async def test_the_model_does_not_fall_asleep_between_the_turns_of_an_answer(own_runner):
    """Z_IMAGE_IDLE_UNLOAD_S watches the batcher and the resident enhancer: an answer's turns are
    model work the batcher never sees, and sleeping between them would start the answer over."""
    import asyncio

    from zimage_server.idle import AllIdle, unload_when_idle
    from zimage_server.model_thread import model_thread

    class QuietBatcher:  # no image work at all: only the enhancer keeps the model busy
        def idle_for(self) -> float:
            return 60.0

    model = ResidentLanguageModel(own_runner, chunk_tokens=8)
    expected = model.generate(MESSAGES, 400, None)
    backend = ResidentBackend(model)
    wakes = own_runner.wakes
    watch = asyncio.ensure_future(unload_when_idle(AllIdle(QuietBatcher(), backend), own_runner, 0.01, model_thread().run))
    try:
        await asyncio.sleep(0.2)  # idle: the watcher puts the model to sleep
        assert not own_runner.resident
        answer = await backend.complete(MESSAGES, max_new_tokens=400, seed=None)
    finally:
        watch.cancel()
    assert answer == expected and own_runner.wakes == wakes + 1  # woke once, and stayed awake for the answer
    assert 0 <= backend.idle_for() < 5  # idle again, counted from the answer's end


class CountingBackend:
    """A backend that records how many answers are being written at once (the enhancer's limit is under test)."""

    name = "counting"

    def __init__(self) -> None:
        self.now = self.most = self.calls = 0

    async def complete(self, messages, *, max_new_tokens, seed) -> str:
        import asyncio

        self.calls += 1
        self.now += 1
        self.most = max(self.most, self.now)
        await asyncio.sleep(0.02)
        self.now -= 1
        return f"A detailed picture, take {seed}."


@pytest.mark.anyio
async def test_at_most_four_answers_are_written_at_once_and_long_prompts_are_kept_as_written():
    import asyncio

    backend = CountingBackend()
    enhancer = PromptEnhancer(backend, max_prompt_chars=100)
    results = await asyncio.gather(*(enhancer.enhance("a cat", seed=seed) for seed in range(12)))
    assert backend.calls == 12 and backend.most == 4
    assert all(result.revised_prompt for result in results)
    long = await enhancer.enhance("a cat " * 40)
    assert long == Enhancement("a cat " * 40, None, "too_long") and backend.calls == 12


@pytest.mark.anyio
async def test_a_prompt_longer_than_the_encoder_reads_is_kept_as_written(count_tokens):
    backend = CountingBackend()
    enhancer = PromptEnhancer(backend, count_tokens=count_tokens, max_prompt_tokens=64)
    long = "a red barn in a snowy field at dusk " * 12
    assert count_tokens(long) > 64
    assert (await enhancer.enhance(long)).fallback == "too_long" and backend.calls == 0
    assert (await enhancer.enhance("a red barn")).revised_prompt and backend.calls == 1
