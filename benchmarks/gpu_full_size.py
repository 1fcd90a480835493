"""Benchmark 3: the full-size Z-Image architecture with random weights, on one GPU.

    PYTHONPATH=src python benchmarks/gpu_full_size.py --out $OUT [--budget-s 400]
    PYTHONPATH=src python benchmarks/gpu_full_size.py --smoke --out /tmp/bench   # same code, CPU, tiny config
    PYTHONPATH=src python benchmarks/gpu_full_size.py --out $OUT --sections offload,quantized   # memory only

Needs only torch, diffusers, transformers and this package (plus litestar/uvicorn/httpx for the
HTTP section). The models are built directly on the GPU in bf16 from the real configs
(REFERENCE.md), so no weights are downloaded and no 10B-parameter init runs on the CPU; speed
does not depend on the weights' values. Sections, each timed with the GPU synchronised:

  startup     build the three models on the GPU, then place, probe attention and warm up as `serve` does
  stages      at 512 and 1024, 8 steps: text encoding, every denoising step, VAE decode, the whole call
  offload     peak memory (allocated and reserved) and latency at 1024 in each offload mode, at batch 1 and at
              batch 4 with VAE slicing, beside the memory model's prediction; then back to none
  compile     off vs regional (repeated blocks), interleaved after a timed compiling warm-up
  http        the same 1024 request direct and over HTTP (in-process uvicorn), interleaved, compiled
  attention   the whole 1024 call with each attention backend that runs here, interleaved, uncompiled
  throughput  images/s at batch 1, 2 and 4 (distinct prompts), at 512 and 1024, compiled
  quantized   transformer and text encoder int8 (torchao, as Z_IMAGE_QUANTIZE=int8), offload none and text_encoder:
              latency, text encoding, peak memory beside the prediction at 1024; uncompiled, irreversible, so last

The JSON under --out is rewritten after every section, so a run cut short keeps what it measured;
a section that would start past --budget-s is recorded as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from common import add_standard_options, free_port, median, print_table, write_record
from zimage_server.runner import COMPILE_WARM_UP
from zimage_server.architecture import FULL_SIZE, TINY, build_models, build_scheduler
from zimage_server.testing import build_tokenizer

# quantized is last: it quantizes the models in place, which cannot be undone.
SECTIONS = ("startup", "stages", "offload", "compile", "http", "attention", "throughput", "quantized")
# Never timed: they need hub downloads or other hardware; flex is only fast compiled.
SKIPPED_BACKENDS = ("_native_npu", "_native_xla", "flex")


@dataclasses.dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    config: dict
    sizes: tuple[int, ...]
    steps: int
    reps: int
    batches: tuple[int, ...]
    compile_backend: str
    compile_warm_up: tuple  # (width, height, prompts) the compiling warm-up runs; the server's own for full size
    smoke: bool


class Clock:
    """Wall time with the device synchronised at both ends, so GPU work is inside the measurement."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def timed(self, into: list[float]) -> Iterator[None]:
        self.sync()
        started = time.perf_counter()
        yield
        self.sync()
        into.append(time.perf_counter() - started)


def build_pipeline(plan: Plan):
    """ZImagePipeline with random weights, every tensor created on the target device in the target dtype."""
    from diffusers import ZImagePipeline

    tokenizer = build_tokenizer()  # a small offline vocabulary; every id is valid for the real embedding table
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        # Allocated and initialised in place: on a GPU, no 10B-parameter pass through the CPU.
        torch.set_default_dtype(plan.dtype)
        with torch.device(plan.device):
            models = build_models(plan.config, tokenizer)
    finally:
        torch.set_default_dtype(previous)
    transformer = models["transformer"]
    # Random weights make activations grow layer by layer; scaling the output projections keeps
    # them finite in bf16 (values never change the speed, but NaNs would make the images meaningless).
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if name.endswith(("to_out.0.weight", "w2.weight")):
                parameter.mul_(0.1)
    return ZImagePipeline(scheduler=build_scheduler(), tokenizer=tokenizer, **models)


def prompt(tag: str) -> str:
    # Unique per call, so the prompt cache never answers unless a section means it to.
    return f"a lighthouse at dawn on a rocky coast, watercolor, soft light, {tag} {time.perf_counter_ns()}"


class Bench:
    def __init__(self, plan: Plan, out: Path, budget_s: float):
        self.plan = plan
        self.out = out
        self.budget_s = budget_s
        self.started = time.perf_counter()
        self.clock = Clock(plan.device)
        self.results: dict = {"sections": {}}
        self.runner = None
        self.settings = None
        self.table: list[list] = [["measure", "value"]]
        self.set_compiled: Callable[[bool], None] = lambda on: None  # set once the compile section ran

    # --- bookkeeping ---------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def section(self, name: str, run: Callable[[], dict]) -> None:
        if self.elapsed() > self.budget_s:
            self.results["sections"][name] = {"skipped": f"budget of {self.budget_s:.0f} s spent"}
        else:
            began = time.perf_counter()
            try:
                outcome = run()
            except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
                import traceback

                traceback.print_exc()
                outcome = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            outcome["section_s"] = time.perf_counter() - began
            self.results["sections"][name] = outcome
        self.save()

    def save(self) -> None:
        plan = self.plan
        config = {
            "device": str(plan.device),
            "dtype": str(plan.dtype),
            "sizes": plan.sizes,
            "steps": plan.steps,
            "reps": plan.reps,
            "batches": plan.batches,
            "smoke": plan.smoke,
            "budget_s": self.budget_s,
            "architecture": "smoke (scaled down)" if plan.smoke else "full size (REFERENCE.md)",
        }
        self.results["elapsed_s"] = self.elapsed()
        write_record(self.out, "gpu_full_size", config, self.results, self.table)

    def memory(self) -> dict:
        if self.plan.device.type != "cuda":
            return {"max_allocated_gib": None, "max_reserved_gib": None}
        return {
            "max_allocated_gib": torch.cuda.max_memory_allocated(self.plan.device) / 1024**3,
            "max_reserved_gib": torch.cuda.max_memory_reserved(self.plan.device) / 1024**3,
        }

    def reset_peak(self) -> None:
        gc.collect()
        if self.plan.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.plan.device)

    def spec(self, size: int, tag: str, n: int = 1):
        from zimage_server.specs import CallParams, GenerationSpec

        params = CallParams(
            mode="generate", width=size, height=size, num_inference_steps=self.plan.steps, guidance_scale=0.0
        )
        return [GenerationSpec(prompt(f"{tag} {i}"), None, (i,), params) for i in range(n)]

    def whole_call(self, size: int, tag: str, n: int = 1) -> float:
        from zimage_server.policy import BatchPolicy

        samples: list[float] = []
        specs = self.spec(size, tag, n)
        with self.clock.timed(samples):
            BatchPolicy(self.runner, max_batch_size=max(n, 1)).run(specs)
        return samples[0]

    # --- sections ------------------------------------------------------------------------------

    def startup(self) -> dict:
        from zimage_server.runner import start_runner
        from zimage_server.settings import Settings

        build: list[float] = []
        with self.clock.timed(build):
            pipeline = build_pipeline(self.plan)
        self.settings = Settings(device=self.plan.device.type, offload="none", attention="auto", compile="off")
        start: list[float] = []
        with self.clock.timed(start):
            self.runner = start_runner(pipeline, self.settings, self.plan.device, self.plan.dtype)
        acceleration = self.runner.acceleration
        weights = {
            name: sum(p.numel() for p in getattr(pipeline, name).parameters()) / 1e9
            for name in ("text_encoder", "transformer", "vae")
        }
        self.table += [["build models (s)", build[0]], ["place, probe, warm up (s)", start[0]]]
        self.table.append(["attention (auto)", acceleration.attention.backend])
        return {
            "build_s": build[0],
            "start_runner_s": start[0],
            "ready_s": build[0] + start[0],
            "params_billions": weights,
            "attention_auto": dataclasses.asdict(acceleration.attention),
            "weights_gib": (
                torch.cuda.memory_allocated(self.plan.device) / 1024**3 if self.plan.device.type == "cuda" else None
            ),
            "note": "random weights built on the device; loading real weights from disk adds their read time",
        }

    def stages(self) -> dict:
        runner, plan = self.runner, self.plan
        out: dict = {}
        for size in plan.sizes:
            encode: list[float] = []
            steps: list[list[float]] = []
            decode: list[float] = []
            whole: list[float] = []
            for rep in range(plan.reps + 1):  # the first rep warms this size up and is dropped
                with runner.lock:
                    encoded: list[float] = []
                    with self.clock.timed(encoded):
                        [embedding] = runner._encode_batch([prompt(f"stage {rep}")], 512)
                    marks: list[float] = []

                    def on_step(_pipeline, _i, _t, _tensors, marks=marks):
                        self.clock.sync()
                        marks.append(time.perf_counter())
                        return {}

                    self.clock.sync()
                    began = time.perf_counter()
                    # In inference mode, as the server's calls run (`ModelRunner.run_call`).
                    with runner.acceleration.attention.applied(False), torch.inference_mode():
                        runner.pipeline(
                            prompt_embeds=[embedding],
                            width=size,
                            height=size,
                            num_inference_steps=plan.steps,
                            guidance_scale=0.0,
                            generator=torch.Generator("cpu").manual_seed(rep),
                            callback_on_step_end=on_step,
                        )
                    self.clock.sync()
                    ended = time.perf_counter()
                whole_s = self.whole_call(size, f"whole {rep}")
                if rep == 0:
                    continue
                encode.append(encoded[0])
                points = [began, *marks]
                steps.append([b - a for a, b in zip(points, points[1:])])
                decode.append(ended - marks[-1])
                whole.append(whole_s)
            per_step = [median([s[i] for s in steps]) for i in range(len(steps[0]))]
            out[str(size)] = {
                "text_encode_s": median(encode),
                "step_s": per_step,
                "denoise_s": sum(per_step),
                "vae_decode_and_postprocess_s": median(decode),
                "whole_call_s": median(whole),
                "whole_call_samples_s": whole,
            }
            self.table += [
                [f"{size}: text encode (s)", median(encode)],
                [f"{size}: denoise step, median (s)", median(per_step)],
                [f"{size}: VAE decode + to PIL (s)", median(decode)],
                [f"{size}: whole call, {plan.steps} steps (s)", median(whole)],
            ]
        return out

    def throughput(self) -> dict:
        out: dict = {}
        for size in self.plan.sizes:
            rates: dict[int, list[float]] = {b: [] for b in self.plan.batches}
            # Compiled blocks may meet a batch size for the first time here: one untimed round first.
            first = -1 if self.runner.acceleration.compile != "off" else 0
            for rep in range(first, max(1, self.plan.reps - 1)):
                order = self.plan.batches if rep % 2 == 0 else self.plan.batches[::-1]
                for batch in order:
                    rate = batch / self.whole_call(size, f"batch {rep}", batch)
                    if rep >= 0:
                        rates[batch].append(rate)
            out[str(size)] = {f"batch_{b}_images_per_s": median(v) for b, v in rates.items()}
            out["compile"] = self.runner.acceleration.compile
            for batch in self.plan.batches:
                self.table.append([f"{size}: images/s at batch {batch}", median(rates[batch])])
        return out

    def attention(self) -> dict:
        from diffusers.models.attention_dispatch import AttentionBackendName

        from zimage_server.acceleration import AttentionPlan, probe_attention

        runner, plan = self.runner, self.plan
        original = runner.acceleration
        usable: dict[str, AttentionPlan] = {}
        refused: dict[str, str] = {}
        for backend in sorted(b.value for b in AttentionBackendName):
            if backend.endswith("_hub") or backend in SKIPPED_BACKENDS:
                continue
            problem, handles_masks = probe_attention(backend, plan.device, plan.dtype)
            if problem:
                refused[backend] = problem
            else:
                usable[backend] = AttentionPlan(backend, handles_masks)
        size = max(plan.sizes)
        times: dict[str, list[float]] = {name: [] for name in usable}
        # Uncompiled, so that switching backends does not recompile the blocks for each one.
        self.set_compiled(False)
        try:
            for rep in range(max(1, plan.reps - 1) + 1):
                for name, attention_plan in usable.items():
                    runner.acceleration = dataclasses.replace(original, attention=attention_plan)
                    elapsed = self.whole_call(size, f"attention {name} {rep}")
                    if rep > 0:  # the first round warms each backend up
                        times[name].append(elapsed)
        finally:
            runner.acceleration = original
            self.set_compiled(True)
        out = {
            "size": size,
            "compile": "off",
            "whole_call_s": {name: median(v) for name, v in times.items()},
            "handles_masks": {name: p.handles_masks for name, p in usable.items()},
            "unusable": refused,
        }
        if times:
            fastest = min(out["whole_call_s"], key=out["whole_call_s"].get)
            out["fastest"] = fastest
            for name in usable:
                self.table.append([f"{size}: attention {name} (s)", out["whole_call_s"][name]])
        return out

    def compile(self) -> dict:
        from zimage_server.acceleration import apply_compile

        runner, plan = self.runner, self.plan
        transformer = runner.pipeline.transformer
        blocks = [m for m in transformer.modules() if type(m).__name__ in transformer._repeated_blocks]
        uncompiled = runner.acceleration
        apply_compile(transformer, "regional", plan.compile_backend)
        compiled = [block._compiled_call_impl for block in blocks]

        def use_compiled(on: bool) -> None:
            for block, impl in zip(blocks, compiled):
                block._compiled_call_impl = impl if on else None

        runner.acceleration = dataclasses.replace(uncompiled, compile="regional")
        warm: list[float] = []
        try:
            with self.clock.timed(warm):
                runner.warm_up(plan.compile_warm_up)
        except Exception:
            # Leave the later sections an uncompiled transformer rather than one that fails every call.
            use_compiled(False)
            runner.acceleration = uncompiled
            raise

        self.set_compiled = use_compiled
        out: dict = {"warm_up_with_compile_s": warm[0], "backend": plan.compile_backend}
        for size in plan.sizes:
            times: dict[str, list[float]] = {"off": [], "regional": []}
            for rep in range(plan.reps):
                for mode in ("off", "regional") if rep % 2 == 0 else ("regional", "off"):
                    use_compiled(mode == "regional")
                    times[mode].append(self.whole_call(size, f"compile {mode} {rep}"))
            use_compiled(True)
            out[str(size)] = {mode: median(v) for mode, v in times.items()}
            out[str(size)]["speedup"] = out[str(size)]["off"] / out[str(size)]["regional"]
            self.table.append([f"{size}: compile off / regional (s)", f"{out[str(size)]['off']:.3f} / {out[str(size)]['regional']:.3f}"])
        self.table.append(["compiling warm-up (s)", warm[0]])
        return out

    def http(self) -> dict:
        import httpx
        import uvicorn

        from zimage_server.api import create_app

        runner, plan = self.runner, self.plan
        size = max(plan.sizes)
        port = free_port()
        app = create_app(self.settings.replace(max_batch_size=4), runner)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.01)
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        sizes_b: dict[str, int] = {}

        def direct(tag: str) -> float:
            samples: list[float] = []
            # In inference mode, as the server's calls run: compiled blocks called in both modes
            # would compile again for this one and run into dynamo's recompile limit.
            with self.clock.timed(samples), torch.inference_mode():
                runner.pipeline(
                    prompt(tag),
                    width=size,
                    height=size,
                    num_inference_steps=plan.steps,
                    guidance_scale=0.0,
                    generator=torch.Generator("cpu").manual_seed(0),
                ).images[0]
            return samples[0]

        def over_http(client: httpx.Client, arm: str, body: dict) -> float:
            started = time.perf_counter()
            response = client.post(url, json=body)
            response.raise_for_status()
            response.json()
            sizes_b[arm] = len(response.content)
            return time.perf_counter() - started

        base = {"size": f"{size}x{size}", "num_inference_steps": plan.steps, "seed": 0}
        times: dict[str, list[float]] = {"direct": [], "http_png": [], "http_jpeg": [], "http_repeated_prompt": []}
        try:
            with httpx.Client(timeout=300) as client:
                arms = {
                    "direct": lambda tag: direct(tag),
                    "http_png": lambda tag: over_http(client, "http_png", base | {"prompt": prompt(tag)}),
                    "http_jpeg": lambda tag: over_http(
                        client, "http_jpeg", base | {"prompt": prompt(tag), "output_format": "jpeg"}
                    ),
                    "http_repeated_prompt": lambda tag: over_http(
                        client, "http_repeated_prompt", base | {"prompt": "a lighthouse at dawn", "output_format": "jpeg"}
                    ),
                }
                for rep in range(-1, plan.reps + 1):
                    names = list(arms)
                    names = names[rep % len(names) :] + names[: rep % len(names)]
                    for name in names:
                        elapsed = arms[name](f"http {name} {rep}")
                        if rep >= 0:
                            times[name].append(elapsed)
        finally:
            server.should_exit = True
            thread.join(timeout=60)
        direct_s = median(times["direct"])
        out = {
            "size": size,
            "compile": runner.acceleration.compile,
            "attention": runner.acceleration.attention.backend,
            "median_s": {name: median(v) for name, v in times.items()},
            "ratio_to_direct": {name: median(v) / direct_s for name, v in times.items()},
            "response_bytes": sizes_b,
        }
        for name in times:
            self.table.append([f"{size}: {name} (s, x direct)", f"{out['median_s'][name]:.3f} ({out['ratio_to_direct'][name]:.3f}x)"])
        out["last_mile_ms"] = self.last_mile(app_settings=self.settings.replace(max_batch_size=4))
        for name, added in out["last_mile_ms"].items():
            self.table.append([f"{name}: total - pipeline (ms)", f"{added:.1f}"])
        return out

    def last_mile(self, app_settings) -> dict:
        """What the server adds after the pipeline call (host copy, conversion, encoding, sending):
        `total_ms - pipeline_ms` of the request log, median per case, 1024x1024 and 2048x2048
        (128 and 256 in smoke mode)."""
        import logging

        import httpx
        import uvicorn

        from zimage_server.api import create_app

        added: dict[str, list[float]] = {}

        class AccessLines(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                tag = getattr(record, "request_id", "")  # lastmile/<case>/<rep>, as sent below
                if tag.startswith("lastmile/") and record.pipeline_ms is not None:
                    added.setdefault(tag.split("/")[1], []).append(record.total_ms - record.pipeline_ms)

        handler = AccessLines()
        access = logging.getLogger("zimage_server.access")
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(app_settings, self.runner), port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.01)
        big, bigger = (128, 256) if self.plan.smoke else (1024, 2048)  # the smoke checks code, not sizes
        cases = (
            (f"png-{big}-n1", big, 1, "png"),
            (f"png-{big}-n4", big, 4, "png"),
            (f"jpeg-{big}-n1", big, 1, "jpeg"),
            (f"webp-{big}-n1", big, 1, "webp"),
            (f"png-{bigger}-n1", bigger, 1, "png"),
        )
        try:
            with httpx.Client(timeout=600) as client:
                for rep in range(-1, self.plan.reps):
                    for name, size, n, output_format in cases:
                        body = {"prompt": prompt(f"last mile {rep}"), "size": f"{size}x{size}", "n": n,
                                "num_inference_steps": self.plan.steps, "output_format": output_format}
                        tag = f"lastmile/{name}/{rep}" if rep >= 0 else "warm-up"
                        client.post(f"http://127.0.0.1:{port}/v1/images/generations", json=body,
                                    headers={"X-Request-ID": tag}).raise_for_status()
        finally:
            server.should_exit = True
            thread.join(timeout=60)
            access.removeHandler(handler)
        return {name: median(values) for name, values in added.items()}

    def offload(self) -> dict:
        plan = self.plan
        size = max(plan.sizes)
        out: dict = {"size": size}
        # none first (everything already resident), then model offload, then the streamed text
        # encoder (diffusers refuses model offload on top of group offloading), then back to none
        # for the sections after this one.
        for mode in ("none", "model", "text_encoder", "restored"):
            placed = 0.0 if mode == "none" else self.place("none" if mode == "restored" else mode)
            if mode == "restored":
                out[mode] = {"placing_s": placed}
                break
            out[mode] = {"placing_s": placed} | self.measure(mode, size, 1, max(2, plan.reps))
            self.memory_row(f"{size}: offload {mode}", out[mode])
            # The README ladder's batch, decoded one image at a time as the plan has it where a batched decode does not fit.
            out[mode]["batch_4"] = self.measure(mode, size, 4, max(1, plan.reps - 1))
            self.memory_row(f"{size} x4, VAE sliced: offload {mode}", out[mode]["batch_4"])
        return out

    def quantized(self) -> dict:
        """The int8 rungs of the README ladder: both big models quantized (Z_IMAGE_QUANTIZE=int8), resident or streamed."""
        try:
            import torchao  # noqa: F401
        except ImportError:
            return {"skipped": "torchao not installed"}
        from zimage_server.acceleration import component_sizes
        from zimage_server.checkpoints import quantize_components
        from zimage_server.memory_plan import GIB

        runner, plan = self.runner, self.plan
        size = max(plan.sizes)
        # Uncompiled, like the offload section it is compared with; compiled blocks would also
        # recompile for the quantized weights.
        self.set_compiled(False)
        self.place("none")  # whatever an earlier section left: quantize with everything on the device
        quantizing: list[float] = []
        with self.clock.timed(quantizing):
            quantize_components(runner.pipeline, {"transformer": "int8", "text_encoder": "int8"})
        # The quantized weights as measured (torchao's inner tensors), to set beside memory_plan's int8 sizes.
        weights = {name: b / GIB for name, b in dataclasses.asdict(component_sizes(runner.pipeline)).items()}
        out: dict = {"size": size, "compile": "off", "quantize_s": quantizing[0], "weights_gib": weights}
        for mode in ("none", "text_encoder"):
            try:
                placed = self.place(mode) if mode != "none" else 0.0
                out[mode] = {"placing_s": placed} | self.measure(mode, size, 1, max(2, plan.reps), encode=True)
            except Exception as exc:  # noqa: BLE001 - a failed streamed mode must not lose the resident one
                out[mode] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                continue
            self.memory_row(f"{size}: int8 {mode}", out[mode])
            self.table.append([f"{size}: int8 {mode}: text encode (s)", out[mode]["text_encode_s"]])
        return out

    # --- helpers for the memory sections ---------------------------------------------------------

    def place(self, mode: str) -> float:
        """Move the pipeline from whatever offload mode it is in to `mode`; the seconds placing took."""
        from zimage_server.acceleration import place_pipeline

        placed: list[float] = []
        remove_offload(self.runner.pipeline)
        with self.clock.timed(placed):
            place_pipeline(self.runner.pipeline, self.plan.device, mode)
        self.runner.execution_device = self.runner.pipeline._execution_device
        return placed[0]

    def measure(self, mode: str, size: int, batch: int, reps: int, encode: bool = False) -> dict:
        """Median whole call of `batch` distinct prompts after a warm-up, its peak memory, and the memory
        model's prediction for the same call, so measured and predicted sit side by side. A batch
        decodes with VAE slicing on; with `encode`, also the text encoding of one prompt."""
        from zimage_server.acceleration import component_sizes
        from zimage_server.memory_plan import GIB, predict_peak

        runner = self.runner
        slicing = batch > 1
        if slicing:
            runner.pipeline.vae.enable_slicing()
        try:
            self.whole_call(size, f"warm {mode} x{batch}", batch)
            self.reset_peak()
            times = [self.whole_call(size, f"{mode} x{batch} {rep}", batch) for rep in range(reps)]
        finally:
            runner.pipeline.vae.disable_slicing()  # off everywhere else in this benchmark
        memory = self.memory()  # before the encodes below, which would not raise it anyway
        predicted = predict_peak(component_sizes(runner.pipeline), mode, size, size, batch, slicing).peak_bytes
        out = {"batch": batch, "vae_slicing": slicing, "whole_call_s": median(times), "predicted_gib": predicted / GIB}
        if encode:
            encodes: list[float] = []
            for rep in range(reps):
                with runner.lock, self.clock.timed(encodes):
                    runner._encode_batch([prompt(f"encode {mode} {rep}")], 512)
            out["text_encode_s"] = median(encodes)
        return out | memory

    def memory_row(self, label: str, row: dict) -> None:
        peak = row["max_allocated_gib"]
        shown = f"{row['whole_call_s']:.3f} / " + (f"{peak:.2f}" if peak is not None else "n/a") + f" / {row['predicted_gib']:.2f}"
        self.table.append([f"{label}: call (s) / peak alloc / predicted (GiB)", shown])


def remove_offload(pipeline) -> None:
    """Undo `place_pipeline`'s hooks (model offload's, and the text encoder's group offloading); weights stay put.

    Only the benchmark switches modes in one process; the server places its pipeline once.
    """
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
    )

    pipeline.remove_all_hooks()
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module) and hasattr(component, "_diffusers_hook"):
            registry = HookRegistry.check_if_exists_or_initialize(component)
            # The same three hooks diffusers removes before re-applying group offloading.
            for hook in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
                registry.remove_hook(hook, recurse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=400, help="start no section after this many seconds")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated sections to run (startup always runs)"
    )
    add_standard_options(parser, "CPU, scaled-down config: checks the code, not the speed", threads=False)
    args = parser.parse_args()
    chosen = {"startup", *args.sections.split(",")}
    if chosen - set(SECTIONS):
        parser.error(f"unknown sections {', '.join(sorted(chosen - set(SECTIONS)))}; known: {', '.join(SECTIONS)}")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.smoke:
        plan = Plan(
            device=torch.device("cpu"),
            dtype=torch.float32,  # CPU bf16 kernels are slow to first use; the smoke checks code, not speed
            config=TINY,
            sizes=(64, 128),
            steps=2,
            reps=1,
            batches=(1, 2),
            compile_backend="eager",  # traces with dynamo (fullgraph errors show) without a C++ toolchain
            compile_warm_up=((128, 128, ("warm-up",)), (64, 64, ("warm-up", "a longer warm-up prompt " * 8))),
            smoke=True,
        )
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmark 3 needs a CUDA GPU; use --smoke to check it on a CPU")
        plan = Plan(
            device=torch.device("cuda"),
            dtype=torch.bfloat16,
            config=FULL_SIZE,
            sizes=(512, 1024),
            steps=8,
            reps=args.reps,
            batches=(1, 2, 4),
            compile_backend="inductor",
            compile_warm_up=COMPILE_WARM_UP,
            smoke=False,
        )
    bench = Bench(plan, args.out, args.budget_s)
    # Most wanted first, so a run cut short by the budget loses the least: per-stage costs, memory
    # per mode (which ends back in mode none), then the fastest setting (compiled) over HTTP; the
    # quantized rungs last, as quantizing cannot be undone (`--sections` can run them early).
    for name in (name for name in SECTIONS if name in chosen):
        bench.section(name, getattr(bench, name))
        print(f"[{bench.elapsed():6.1f} s] {name}: {'done' if 'error' not in bench.results['sections'][name] else 'failed'}", flush=True)
    print(f"wrote {args.out / 'gpu_full_size.json'}")
    print_table(bench.table)


if __name__ == "__main__":
    main()
