"""The pipeline's text encoder as a chat model, for the prompt enhancer. Imports torch.

Z-Image's text encoder is Qwen3-4B without its output head, and Qwen3-4B ties that head to its
input embeddings (`tie_word_embeddings`). So the loaded encoder plus its own embedding matrix
*is* Qwen3-4B: `causal_lm_over` wraps it in a `Qwen3ForCausalLM` whose `.model` is the encoder
and whose head's weight is the encoder's `embed_tokens.weight`, the same Parameter, so the
enhancer costs no weight memory at all (only its KV cache: 144 KiB a token at full size).

Everything runs on the model thread under the runner's lock, between pipeline calls.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, Qwen3ForCausalLM

from .model_thread import on_model_thread
from .prompt_enhancer import SAMPLED_TEMPERATURE, SAMPLED_TOP_P

log = logging.getLogger("zimage_server.resident_lm")

# Qwen3 ends a turn with <|im_end|>; <|endoftext|> ends a document. Either stops generation.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


class TiedHead(torch.nn.Linear):
    """The output head over the embedding matrix, computed wherever that matrix is at the time.

    With Z_IMAGE_OFFLOAD=text_encoder, diffusers' group offloading onloads the encoder's embedding
    (with its final norm) in a hook on the encoder's forward and offloads it again when that
    forward returns, before Qwen3ForCausalLM applies its head: the head's weight is then back on
    the CPU while the hidden state is on the GPU. Rather than copy 0.78 GB to the GPU for every
    token (or keep a second copy there, which the memory plan does not count), the one last
    hidden state per step goes to the weight, and its logits come back. In the other modes the
    weight sits with the hidden states (model offload's accelerate hook moves the whole encoder,
    this Parameter included, onto the GPU before the encoder runs, and leaves it there) and the
    moves are no-ops."""

    def __init__(self, weight: torch.nn.Parameter):
        torch.nn.Module.__init__(self)  # no fresh weight of its own: it takes the embedding's
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = weight
        self.register_parameter("bias", None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.to(self.weight.device), self.weight).to(hidden_states.device)


def causal_lm_over(text_encoder: torch.nn.Module) -> Qwen3ForCausalLM:
    """A Qwen3ForCausalLM made of `text_encoder` (a loaded Qwen3Model) and its tied head: no new weights.

    Built on the meta device, so its own (thrown away) layers and head never allocate; the
    config is the encoder's own, with tied embeddings (transformers' Qwen3Config defaults to
    untied, and the tiny test encoder says so)."""
    config = copy.deepcopy(text_encoder.config)
    config.tie_word_embeddings = True
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model.model = text_encoder
    model.lm_head = TiedHead(text_encoder.embed_tokens.weight)
    return model.eval()


# New tokens per turn on the model thread: between turns, image calls queued meanwhile run, so a
# long expansion never holds up requests that asked for none (at full size a turn is 16 tokens at
# the decode rate; not measured here: no GPU was lent).
CHUNK_TOKENS = 16


@dataclass
class Answer:
    """One answer being written, between turns on the model thread."""

    messages: list[dict[str, str]]
    max_new_tokens: int
    seed: int | None
    pipeline: object = None  # the pipeline it is written with; a sleep and wake replace it: start over
    model: object = None  # causal_lm_over that pipeline's encoder (kept with it: no second copy)
    config: GenerationConfig | None = None
    devices: list = field(default_factory=list)  # the CUDA device whose RNG sampling draws from, if any
    prompt_length: int = 0
    tokens: torch.Tensor | None = None  # prompt and answer so far, (1, length)
    cache: object = None  # the KV cache of every token but the last
    rng: dict = field(default_factory=dict)  # its own sampling RNG state, kept between turns
    done: bool = False

    @property
    def written(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1] - self.prompt_length


class ResidentLanguageModel:
    """Chat completions from the runner's own text encoder, for `prompt_enhancer.ResidentBackend`.

    An answer is written in turns of `chunk_tokens` (`start`, `advance` until `done`, `text`):
    each turn holds the model's lock and thread only for its tokens, so image calls run between
    them, and a caller that stops waiting simply stops asking for turns. `generate` does all turns
    in one go (tests, benchmarks)."""

    def __init__(self, runner, chunk_tokens: int = CHUNK_TOKENS):
        self.runner = runner
        self.chunk_tokens = chunk_tokens

    def stop_token_ids(self, tokenizer) -> list[int]:
        ids = {i for i in tokenizer.convert_tokens_to_ids(list(STOP_TOKENS)) if i is not None}
        if tokenizer.unk_token_id is not None:  # a tokenizer without these tokens maps them to unk
            ids.discard(tokenizer.unk_token_id)
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return sorted(ids)

    def generation_config(self, tokenizer, max_new_tokens: int, seed: int | None) -> GenerationConfig:
        stops = self.stop_token_ids(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        # No top-k: the official enhancer's API call sampled with temperature and top_p only.
        sampling = (
            dict(do_sample=False)
            if seed is None
            else dict(do_sample=True, temperature=SAMPLED_TEMPERATURE, top_p=SAMPLED_TOP_P, top_k=0)
        )
        return GenerationConfig(
            max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, return_dict_in_generate=True,
            **sampling,
        )  # fmt: skip

    def start(self, messages: list[dict[str, str]], max_new_tokens: int, seed: int | None) -> Answer:
        """An answer not yet begun (no torch work: the first `advance` tokenizes)."""
        return Answer(messages, max_new_tokens, seed)

    @on_model_thread
    def advance(self, answer: Answer) -> Answer:
        """Up to `chunk_tokens` more tokens of `answer`, under the model's lock; `answer.done` when
        it ended (a stop token, or the budget spent).

        Greedy when `seed` is None, else sampled (temperature 0.7, top_p 0.9) from the answer's own
        RNG state, seeded with `seed` and carried between turns, so other answers' turns in between
        change nothing and torch's global generators are left as they were. Each turn after the
        first feeds only the last token to the cached keys and values, as one `generate` call's
        next step would: the turns write exactly what one call writes (tests check)."""
        runner = self.runner
        if not runner.resident:
            runner.wake()
        with runner.lock:
            if answer.pipeline is not runner.pipeline:  # first turn, or the model slept and woke since
                self._begin(answer, runner.pipeline)
            budget = min(self.chunk_tokens, answer.max_new_tokens - answer.written)
            devices = answer.devices
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                if answer.seed is not None:
                    torch.set_rng_state(answer.rng["cpu"])
                    if devices:
                        torch.cuda.set_rng_state(answer.rng["cuda"], devices[0])
                # Offload hooks run as for prompt encoding: Qwen3ForCausalLM calls `self.model(...)`,
                # which is the hooked encoder itself, so each step onloads it as `_encode_prompt` does.
                output = answer.model.generate(
                    input_ids=answer.tokens,
                    attention_mask=torch.ones_like(answer.tokens),
                    cache=answer.cache,
                    generation_config=answer.config,
                    max_new_tokens=budget,
                )
                if answer.seed is not None:
                    answer.rng = {"cpu": torch.get_rng_state()}
                    if devices:
                        answer.rng["cuda"] = torch.cuda.get_rng_state(devices[0])
        new = output.sequences.shape[1] - answer.tokens.shape[1]
        answer.tokens, answer.cache = output.sequences, output.cache
        stopped = new < budget or int(answer.tokens[0, -1]) in answer.config.eos_token_id
        answer.done = stopped or answer.written >= answer.max_new_tokens
        return answer

    def _begin(self, answer: Answer, pipeline) -> None:
        tokenizer = pipeline.tokenizer
        text = tokenizer.apply_chat_template(
            answer.messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        answer.tokens = tokenizer(text, return_tensors="pt")["input_ids"].to(self.runner.execution_device)
        answer.prompt_length = answer.tokens.shape[1]
        # Kept with the answer, like the pipeline it wraps (the answer ends before a sleep could
        # need the encoder gone: the idle watch waits for it).
        answer.pipeline, answer.model, answer.cache = pipeline, causal_lm_over(pipeline.text_encoder), None
        answer.config = self.generation_config(tokenizer, answer.max_new_tokens, answer.seed)
        answer.devices = [answer.tokens.device] if answer.tokens.device.type == "cuda" else []
        if answer.seed is not None:
            with torch.random.fork_rng(devices=answer.devices):
                torch.manual_seed(answer.seed)
                answer.rng = {"cpu": torch.get_rng_state()}
                if answer.devices:
                    answer.rng["cuda"] = torch.cuda.get_rng_state(answer.devices[0])

    def text(self, answer: Answer) -> str:
        """The answer written so far, special tokens left out."""
        tokenizer = answer.pipeline.tokenizer
        return tokenizer.decode(answer.tokens[0, answer.prompt_length :], skip_special_tokens=True)

    @on_model_thread
    def generate(self, messages: list[dict[str, str]], max_new_tokens: int, seed: int | None) -> str:
        """The whole answer to `messages` in one go (every turn in a row), without thinking."""
        answer = self.start(messages, max_new_tokens, seed)
        while not answer.done:
            self.advance(answer)
        return self.text(answer)
