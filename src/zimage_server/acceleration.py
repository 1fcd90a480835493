"""Where the weights live (offload modes), which attention kernel runs, and what gets compiled.

`prepare_pipeline` is the one entry point the loader calls: it places a loaded pipeline on its
device in the chosen offload mode, picks and checks the attention backend, and compiles the
transformer if asked. Compilation itself happens lazily on the first call, which is why the
runner's warm-up runs at the sizes users send (see `ModelRunner.warm_up`).

The choice of offload mode and VAE slicing is a pure function of free GPU memory and component
sizes through the memory model (`choose_offload`, memory_plan.py), so it is unit-tested without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .memory_plan import (
    OFFLOAD_MODES,
    TEXT_ENCODER_BLOCKS_ON_DEVICE,
    ComponentSizes,
    choose,
    enhancer_kv_bytes,
    plan_mode,
)
from .settings import SettingsError

log = logging.getLogger("zimage_server.acceleration")

# Tried in order when Z_IMAGE_ATTENTION=auto on CUDA; the first that runs and agrees with a
# float32 reference wins. FA3 and cuDNN beat PyTorch's built-in flash kernel on Hopper; benchmark 3
# times each one available so this order can follow measurements.
AUTO_ATTENTION_CUDA = ("_flash_3", "_native_cudnn", "flash", "native")
# Batches whose prompts pad to different lengths need an attention mask; backends that refuse
# masks run those calls with this one instead.
MASKED_FALLBACK_ATTENTION = "native"
# The size `auto` plans for: the models' native one. Larger requests that do not fit fail alone
# with an out-of-memory error (policy.py retries a batch one image at a time).
PLANNING_SIZE = 1024


def choose_offload(free_bytes: int, sizes: ComponentSizes, batch: int = 1) -> tuple[str, bool, str]:
    """The lightest offload mode whose predicted peak (memory_plan) fits in `free_bytes` for a
    1024x1024 call of `batch` images, whether it needs VAE slicing, and why, in words for the log."""
    rows = [plan_mode(sizes, mode, free_bytes, PLANNING_SIZE, PLANNING_SIZE, batch) for mode in OFFLOAD_MODES]
    row, reason = choose(rows)
    return row.offload, row.vae_slicing, reason


def module_bytes(module: torch.nn.Module) -> int:
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds. A tensor subclass (torchao's int8 and fp8 weights) reports its logical
    dtype's element size, so count the inner tensors it is made of (`__tensor_flatten__`) instead."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def component_sizes(pipeline, controlnet: torch.nn.Module | None = None, enhance_tokens: int = 0) -> ComponentSizes:
    """The pipeline's weight bytes; `controlnet` before `from_transformer` joins it (its own blocks only);
    the resident prompt enhancer's KV cache for `enhance_tokens` new tokens."""
    text_encoder = module_bytes(pipeline.text_encoder)
    blocks = [module_bytes(block) for block in _block_list(pipeline.text_encoder)]
    resident = text_encoder - sum(blocks) + TEXT_ENCODER_BLOCKS_ON_DEVICE * max(blocks, default=0)
    return ComponentSizes(
        text_encoder=text_encoder,
        text_encoder_streamed=resident,
        transformer=module_bytes(pipeline.transformer),
        vae=module_bytes(pipeline.vae),
        controlnet=module_bytes(controlnet) if controlnet is not None else 0,
        enhancer_kv=enhancer_kv_bytes(enhance_tokens),
    )


def _block_list(module: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The longest ModuleList inside a module: the repeated layers block-level offloading streams."""
    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len, default=[])


def resolve_offload(
    setting: str,
    pipeline,
    device: torch.device,
    max_batch_size: int = 1,
    controlnet: torch.nn.Module | None = None,
    enhance_tokens: int = 0,
) -> tuple[str, bool, str]:
    """The offload mode, whether to slice VAE decodes, and the reason, for Z_IMAGE_OFFLOAD=`setting` on `device`."""
    if device.type != "cuda":
        mode = "none" if setting == "auto" else setting
        return mode, False, f"the device is {device.type}; offloading and VAE slicing only save accelerator memory"
    free, _total = torch.cuda.mem_get_info(device)
    # Weights already on this GPU (a pipeline built there) count as room they already take.
    on_device = sum(
        tensor_bytes(t)
        for name in ("text_encoder", "transformer", "vae")
        for t in getattr(pipeline, name).parameters()
        if t.device.type == "cuda"
    )
    sizes = component_sizes(pipeline, controlnet, enhance_tokens)
    if setting == "auto":
        return choose_offload(free + on_device, sizes, max_batch_size)
    # A mode chosen by hand still gets the plan's VAE slicing decision: a batch that fits only sliced.
    row = plan_mode(sizes, setting, free + on_device, PLANNING_SIZE, PLANNING_SIZE, max_batch_size)
    return setting, row.vae_slicing, f"Z_IMAGE_OFFLOAD={setting}; {row.describe()}"


def place_pipeline(pipeline, device: torch.device, mode: str) -> None:
    """Put the components where `mode` wants them. Works whether the pipeline starts on the CPU or the device."""
    if mode == "none":
        pipeline.to(device)
        return
    if mode == "model":
        pipeline.to("cpu")
        pipeline.enable_model_cpu_offload(device=device)
        return
    if mode != "text_encoder":
        raise ValueError(f"unknown offload mode {mode!r}")
    from diffusers.hooks import apply_group_offloading

    pipeline.transformer.to(device)
    pipeline.vae.to(device)
    pipeline.text_encoder.to("cpu")
    # Block by block from pinned CPU memory on a side stream, so copying block i+1 overlaps
    # computing block i, and offloading is a pointer swap back to the pinned copy (no copy out).
    # Streams wherever the backend has them, as diffusers checks (CUDA; the memory simulation's device).
    streams = device.type != "cpu" and hasattr(torch.get_device_module(device), "Stream")
    apply_group_offloading(
        pipeline.text_encoder,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=streams,
    )


def pin_placement(pipeline) -> torch.device:
    """Answer diffusers' placement questions once, from where the pipeline was placed; returns
    its execution device.

    A pipeline asks for its execution device once a call and for its transformer's dtype once a
    step, and diffusers answers both by walking every submodule for offload and casting hooks:
    15 ms of Python for an 8-step call's questions on the full-size module tree on our CPU, 2.5 ms
    for a 4-step call's on the tiny model, whose 64x64 image takes 25-30 ms (docs/benchmarks.md,
    benchmark 8). The answers hold while the runner holds the pipeline: loading put the weights
    where they stay (a LoRA swap under model offload puts the hooks back on the same device; a
    sleep drops the pipeline, a wake places and pins a new one). So the pipeline and each of its
    models get a subclass of their own class whose properties return what the walk returned here."""
    device = _walked(pipeline, "_execution_device")
    _pin(pipeline, _execution_device=device)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module) and isinstance(getattr(type(component), "dtype", None), property):
            _pin(component, dtype=_walked(component, "dtype"))
    return device


def _walked(obj, name: str):
    """What diffusers' (or transformers') own property answers, walking the modules, pinned or not:
    pinning a shared module again asks anew."""
    cls = type(obj).__mro__[1] if "_pinned" in obj.__dict__ else type(obj)
    return getattr(cls, name).fget(obj)


def _pin(obj, **answers) -> None:
    if "_pinned" not in obj.__dict__:  # pinned again (a module shared by pipelines): new answers only
        obj.__class__ = _pinned_class(type(obj), tuple(sorted(answers)))
    obj.__dict__["_pinned"] = answers  # the instance dict: nn.Module's __setattr__ has no say


@functools.cache
def _pinned_class(cls: type, names: tuple[str, ...]) -> type:
    """`cls` with these properties read from the instance's `_pinned` answers; same name and module."""
    namespace = {name: property(lambda self, name=name: self.__dict__["_pinned"][name]) for name in names}
    namespace.update(__module__=cls.__module__, __qualname__=cls.__qualname__, __doc__=cls.__doc__)
    return type(cls.__name__, (cls,), namespace)


@dataclass(frozen=True)
class AttentionPlan:
    """The attention backend every call uses, and whether it takes the padding masks mixed-length batches need."""

    backend: str
    handles_masks: bool

    def backend_for(self, needs_mask: bool) -> str:
        return self.backend if self.handles_masks or not needs_mask else MASKED_FALLBACK_ATTENTION

    @contextlib.contextmanager
    def applied(self, needs_mask: bool) -> Iterator[str]:
        """Run the enclosed pipeline call with this plan's backend (the fallback when a mask is needed)."""
        from diffusers.models.attention_dispatch import attention_backend

        name = self.backend_for(needs_mask)
        with attention_backend(name):
            yield name


def probe_attention(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str | None, bool]:
    """Run `name` on small Z-Image-shaped tensors: (why it is unusable or None, whether it takes masks)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend, dispatch_attention_fn

    known = sorted(b.value for b in AttentionBackendName)
    if name not in known:
        return f"unknown backend; diffusers offers {', '.join(known)}", False
    generator = torch.Generator("cpu").manual_seed(0)
    # (batch, sequence, heads, head_dim) as diffusers lays them out; head_dim 128 as in Z-Image.
    q, k, v = (torch.randn(2, 96, 2, 128, generator=generator).to(device, dtype) for _ in range(3))
    mask = torch.ones(2, 1, 1, 96, dtype=torch.bool, device=device)
    mask[1, :, :, 64:] = False  # the second item is shorter: the padding mask a mixed batch carries

    def reference(attn_mask):
        out = torch.nn.functional.scaled_dot_product_attention(
            *(t.float().transpose(1, 2) for t in (q, k, v)), attn_mask=attn_mask
        )
        return out.transpose(1, 2)

    def run(attn_mask):
        with attention_backend(name):
            return dispatch_attention_fn(q, k, v, attn_mask=attn_mask).float()

    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    try:
        if (run(None) - reference(None)).abs().max().item() > tolerance:
            return f"its output disagrees with a float32 reference on {device.type}", False
    except Exception as exc:  # noqa: BLE001 - any failure means this backend cannot serve here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'failed'}", False
    try:
        ok = (run(mask) - reference(mask)).abs().max().item() <= tolerance
    except Exception:  # noqa: BLE001 - refusing masks is fine: such calls use the fallback
        ok = False
    return None, ok


def resolve_attention(setting: str, device: torch.device, dtype: torch.dtype) -> AttentionPlan:
    """The backend for Z_IMAGE_ATTENTION=`setting` on this device; SettingsError if it cannot run here."""
    if setting != "auto":
        problem, handles_masks = probe_attention(setting, device, dtype)
        if problem:
            raise SettingsError(f"invalid Z_IMAGE_ATTENTION={setting!r}: not usable on {device.type}: {problem}")
        return AttentionPlan(setting, handles_masks)
    candidates = AUTO_ATTENTION_CUDA if device.type == "cuda" else ("native",)
    for name in candidates:
        problem, handles_masks = probe_attention(name, device, dtype)
        if problem is None:
            return AttentionPlan(name, handles_masks)
        log.info("attention backend %s skipped: %s", name, problem)
    raise SettingsError(f"no attention backend works on {device.type}: tried {', '.join(candidates)}")


def apply_compile(transformer: torch.nn.Module, mode: str, backend: str = "inductor") -> None:
    """Mark the transformer for torch.compile; the compiling itself happens on its first calls (the warm-up)."""
    if mode == "off":
        return
    if mode == "regional":
        # The 30 identical blocks compile once and share the code: seconds, not minutes, and
        # nearly all of the speed of compiling the whole model.
        transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
    elif mode == "full":
        # The forward pass builds Python lists of per-image tensors, so it cannot be one graph.
        transformer.compile(backend=backend)
    else:
        raise ValueError(f"unknown compile mode {mode!r}")


@dataclass(frozen=True)
class Acceleration:
    """What `prepare_pipeline` chose, for logs, metrics and the benchmark JSON."""

    offload: str
    offload_reason: str
    attention: AttentionPlan
    compile: str
    vae_slicing: bool = False


def prepare_pipeline(
    pipeline,
    device: torch.device,
    dtype: torch.dtype,
    *,
    offload: str,
    attention: str,
    compile: str,
    max_batch_size: int = 1,
    controlnet: torch.nn.Module | None = None,
    enhance_tokens: int = 0,
) -> Acceleration:
    """Place the pipeline, choose attention, mark compilation. Raises SettingsError for an unusable backend.

    enhance_tokens: the resident prompt enhancer's new-token budget, whose KV cache the plan counts."""
    plan = resolve_attention(attention, device, dtype)
    mode, vae_slicing, reason = resolve_offload(offload, pipeline, device, max_batch_size, controlnet, enhance_tokens)
    place_pipeline(pipeline, device, mode)
    if vae_slicing:
        # A batched decode's activations grow with the batch (1.5 GiB per 1024x1024 image); one at a time they do not.
        pipeline.vae.enable_slicing()
    apply_compile(pipeline.transformer, compile)
    log.info("offload: %s, VAE slicing %s (%s)", mode, "on" if vae_slicing else "off", reason)
    log.info(
        "attention: %s%s; compile: %s",
        plan.backend,
        "" if plan.handles_masks else f" ({MASKED_FALLBACK_ATTENTION} for mixed-length batches, which need masks)",
        compile,
    )
    return Acceleration(offload=mode, offload_reason=reason, attention=plan, compile=compile, vae_slicing=vae_slicing)


def captions_need_mask(lengths: Sequence[int], multiple: int) -> bool:
    """Whether the transformer will build an attention mask: caption lengths padded to `multiple` differ."""
    return len({-(-length // multiple) for length in lengths}) > 1
