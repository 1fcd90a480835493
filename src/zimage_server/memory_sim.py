"""Peak accelerator memory of a real pipeline call, simulated on a CPU with fake tensors.

The full-size models are built from their configs (architecture.py) under FakeTensorMode, so no
weight is ever materialised; they are placed with the server's own `place_pipeline` (pipe.to,
group offloading, model CPU offload) and the real `ZImagePipeline.__call__` runs on them. A
dispatch mode counts every new device storage as an allocation rounded up to 512 bytes, as
PyTorch's caching allocator does, and frees it when its last tensor dies: the figure
`torch.cuda.max_memory_allocated` would report. Slow (tens of seconds per full-size call), so
only benchmarks/memory_plan.py and a tiny-config test run it; the server reads the fitted model
in memory_plan.py instead.

The torch build here may have no CUDA at all, and fake "cuda" tensors need CUDA's device guard,
so the simulated accelerator is PyTorch's PrivateUse1 backend under the name `simgpu`, given
streams that do nothing. What the simulation has to bend, each for a stated reason:

- `module.to()` swaps fake parameters with `torch.utils.swap_tensors`, which refuses tensors that
  the fake-tensor converter's memo holds weakrefs to; the memo is a cache, so it is cleared first.
- `param.data = t` keeps a fake tensor's old device (and refuses a change of backend): across
  devices it becomes a swap with an alias of `t`, keeping the parameter flag.
- pinned host memory is not device memory: `pin_memory()` returns the tensor itself.
- torch's C++ accelerator memory API asserts on a backend without a C++ DeviceAllocator, and
  libraries call it mid-call (accelerate >= 1.16 empties the cache whenever model offload moves a
  model off the device). The tracker is the simulated device's allocator, so while a call runs
  `torch.accelerator`'s memory functions (and `torch.simgpu`'s) answer from it: whichever library
  asks, and by whatever path, it sees a device whose cache empties and whose counters count.
- SDPA under fake tensors would take the math path, with its [heads, seq, seq] score tensors; a
  GPU takes flash (no mask, head_dim <= 256) or memory-efficient attention, so those ops run.
- host work runs for real: the scheduler and tokenizer on the CPU; `torch.tensor(..., device)`
  makes an empty device tensor of the same shape. Boolean-mask selection of prompt embeddings is
  data-dependent: the simulation's prompts fill `max_sequence_length`, so every mask is all true.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .acceleration import component_sizes, place_pipeline
from .architecture import build_models, build_scheduler
from .memory_plan import ComponentSizes

DEVICE_TYPE = "simgpu"
ALLOCATION_ROUNDING = 512  # bytes; the CUDA caching allocator's smallest block size
FLASH_MAX_HEAD_DIM = 256
STAGES = ("text_encoder", "transformer_step", "vae_decode")
# A long prompt: truncated to max_sequence_length, so the padding mask is all true (module docstring).
LONG_PROMPT = "a lighthouse at dawn on a rocky coast, watercolor, soft light, " * 80


@dataclass
class StagePeak:
    """Device bytes live when a stage began, and the most live during it (weights included)."""

    start: int
    peak: int


@dataclass
class SimulatedCall:
    offload: str
    width: int
    height: int
    batch: int
    vae_slicing: bool
    peak_bytes: int
    sizes: ComponentSizes  # weight bytes per component, as the server measures them
    stages: dict[str, StagePeak] = field(default_factory=dict)

    def activation_bytes(self, stage: str) -> int:
        """What a stage adds on top of what was live when it began (with no offloading: activations)."""
        return self.stages[stage].peak - self.stages[stage].start


class DeviceMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of fake device storage, per stage too, the way the caching allocator counts.

    device_type: whose tensors count: the simulated GPU's, or "meta" (upscalers' tile estimate)."""

    def __init__(self, device_type: str = DEVICE_TYPE):
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self.stages: dict[str, StagePeak] = {}
        self._open: list[str] = []
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == self.device_type:
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage) -> None:
        if storage in self._seen:
            return
        self._seen.add(storage)
        size = -(-storage.nbytes() // ALLOCATION_ROUNDING) * ALLOCATION_ROUNDING
        self.live += size
        weakref.finalize(storage, self._release, size)
        self.peak = max(self.peak, self.live)
        for name in self._open:
            self.stages[name].peak = max(self.stages[name].peak, self.live)

    def _release(self, size: int) -> None:
        self.live -= size

    # The caching-allocator API, as torch.accelerator and torch.cuda expose it (module docstring).
    def empty_cache(self) -> None:
        pass  # nothing is cached: a freed storage is released at once

    def memory_allocated(self, device=None) -> int:
        return self.live

    def max_memory_allocated(self, device=None) -> int:
        return self.peak

    memory_reserved = memory_allocated
    max_memory_reserved = max_memory_allocated

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak = self.live

    def reset_accumulated_memory_stats(self, device=None) -> None:
        pass

    def memory_stats(self, device=None) -> dict[str, int]:
        return {
            "allocated_bytes.all.current": self.live,
            "allocated_bytes.all.peak": self.peak,
            "reserved_bytes.all.current": self.live,
            "reserved_bytes.all.peak": self.peak,
        }

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Record the enclosed work's peak under `name`; a stage run again (each step) keeps the highest."""
        if name not in self.stages:
            self.stages[name] = StagePeak(start=self.live, peak=self.live)
        self._open.append(name)
        try:
            yield
        finally:
            self._open.remove(name)


def _flash_or_efficient_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """F.scaled_dot_product_attention as a GPU runs it: the flash kernel, or memory-efficient with a mask."""
    if enable_gqa and key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    if attn_mask is None and query.shape[-1] <= FLASH_MAX_HEAD_DIM:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[
            0
        ]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # SDPA turns a boolean mask into an additive one, as here
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                ~attn_mask, float("-inf")
            )
        attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale
    )[0]


class _HostAndKernelChoices(TorchFunctionMode):
    """The attention kernel a GPU picks, host-made device tensors, and all-true prompt masks (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _flash_or_efficient_attention(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
            return torch.empty_like(args[0])  # a gather of every row: a copy of the same size
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            device = torch.device(kwargs["device"])
            if device.type == DEVICE_TYPE:
                host = func(*args, **(kwargs | {"device": "cpu"}))
                return torch.empty(host.shape, dtype=host.dtype, device=device)
        return func(*args, **kwargs)


ALLOCATOR_FUNCTIONS = (
    "empty_cache",
    "memory_allocated",
    "max_memory_allocated",
    "memory_reserved",
    "max_memory_reserved",
    "reset_peak_memory_stats",
    "reset_accumulated_memory_stats",
    "memory_stats",
)


class _SimulatedBackend:
    """torch.simgpu: one device, streams that only have to exist (group offloading's prefetch), and
    the memory API of the tracker of the call in progress (module docstring)."""

    allocator: DeviceMemoryTracker | None = None

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def synchronize(self) -> None:
            pass

        def wait_stream(self, other) -> None:
            pass

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        pass

    def device_count(self) -> int:
        return 1

    def current_stream(self, device=None) -> Stream:
        return self.Stream()

    def stream(self, stream) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def synchronize(self, device=None) -> None:
        pass

    def __getattr__(self, name: str):
        if name in ALLOCATOR_FUNCTIONS:
            return getattr(self.allocator or DeviceMemoryTracker(), name)
        raise AttributeError(name)


def simulated_device() -> torch.device:
    """The simulated accelerator, registered on first use (PrivateUse1 can be named once per process)."""
    if not hasattr(torch, DEVICE_TYPE):
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(DEVICE_TYPE, backend_module=_SimulatedBackend())
    return torch.device(DEVICE_TYPE, 0)


@contextlib.contextmanager
def _tracker_as_allocator(tracker: DeviceMemoryTracker) -> Iterator[None]:
    """torch.accelerator's and torch.simgpu's memory functions answer from `tracker` (module docstring)."""
    modules = [torch.accelerator, getattr(torch.accelerator, "memory", None)]
    saved = [
        (module, name, getattr(module, name))
        for module in modules
        for name in ALLOCATOR_FUNCTIONS
        if module is not None and hasattr(module, name)
    ]
    backend = getattr(torch, DEVICE_TYPE)
    for module, name, _ in saved:
        setattr(module, name, getattr(tracker, name))
    backend.allocator = tracker
    try:
        yield
    finally:
        backend.allocator = None
        for module, name, function in saved:
            setattr(module, name, function)


@contextlib.contextmanager
def _fake_parameter_moves(fake_mode: FakeTensorMode) -> Iterator[None]:
    """Let module.to() and `param.data = t` move fake parameters between devices (module docstring)."""
    swap = torch.utils.swap_tensors
    data = torch._C.TensorBase.data

    def swap_forgetting_memo(first, second):
        fake_mode.fake_tensor_converter.meta_converter.tensor_memo.clear()
        swap(first, second)

    def set_data(tensor, new):
        if not isinstance(new, FakeTensor) or new.fake_device == tensor.fake_device:
            data.__set__(tensor, new)
            return
        flags = {k: v for k, v in tensor.__dict__.items() if k == "_is_param"}
        swap_forgetting_memo(tensor, new.detach())
        tensor.__dict__.update(flags)

    pin_memory = torch.Tensor.pin_memory
    torch.utils.swap_tensors = swap_forgetting_memo
    FakeTensor.data = property(data.__get__, set_data)
    torch.Tensor.pin_memory = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        torch.utils.swap_tensors = swap
        del FakeTensor.data
        torch.Tensor.pin_memory = pin_memory


class _Staged:
    """Calls of one model method, each inside a tracker stage."""

    def __init__(self, tracker: DeviceMemoryTracker, name: str, method):
        self.tracker, self.name, self.method = tracker, name, method

    def __call__(self, *args, **kwargs):
        with self.tracker.stage(self.name):
            return self.method(*args, **kwargs)


def build_fake_pipeline(config: dict, dtype: torch.dtype, fake_mode: FakeTensorMode):
    """A ZImagePipeline whose three models have fake CPU weights; tokenizer and scheduler are real."""
    from diffusers import ZImagePipeline

    from .testing import build_tokenizer

    tokenizer = build_tokenizer()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with fake_mode:
            models = build_models(config, tokenizer)
    finally:
        torch.set_default_dtype(previous)
    pipeline = ZImagePipeline(scheduler=build_scheduler(), tokenizer=tokenizer, **models)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def simulate_call(
    config: dict,
    *,
    offload: str,
    width: int,
    height: int,
    batch: int,
    vae_slicing: bool,
    steps: int = 8,
    max_sequence_length: int = 512,
    dtype: torch.dtype = torch.bfloat16,
) -> SimulatedCall:
    """Place a fake pipeline in `offload` mode and run one text-to-image call; its peak device memory per stage.

    Every step peaks alike, so two steps measure what eight do. At least two: a one-element
    schedule would be a fake-tensor "constant", which fake mode then tries to move for real."""
    if steps < 2:
        raise ValueError("simulate at least 2 steps")
    device = simulated_device()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    pipeline = build_fake_pipeline(config, dtype, fake_mode)
    sizes = component_sizes(pipeline)
    tracker = DeviceMemoryTracker()
    pipeline.text_encoder.forward = _Staged(tracker, "text_encoder", pipeline.text_encoder.forward)
    pipeline.transformer.forward = _Staged(tracker, "transformer_step", pipeline.transformer.forward)
    pipeline.vae.decode = _Staged(tracker, "vae_decode", pipeline.vae.decode)
    sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()  # the pipeline's default, made on the host
    with (
        _fake_parameter_moves(fake_mode),
        _tracker_as_allocator(tracker),
        fake_mode,
        tracker,
        _HostAndKernelChoices(),
        torch.no_grad(),
    ):
        place_pipeline(pipeline, device, offload)
        if vae_slicing:
            pipeline.vae.enable_slicing()
        else:
            pipeline.vae.disable_slicing()
        pipeline(
            [LONG_PROMPT] * batch,
            width=width,
            height=height,
            num_inference_steps=steps,
            sigmas=sigmas,
            guidance_scale=0.0,
            max_sequence_length=max_sequence_length,
            output_type="pt",
        )
    return SimulatedCall(
        offload=offload,
        width=width,
        height=height,
        batch=batch,
        vae_slicing=vae_slicing,
        peak_bytes=tracker.peak,
        sizes=sizes,
        stages=dict(tracker.stages),
    )
