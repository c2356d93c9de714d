"""Run megatron-core 0.16.x, written for CUDA, on a CPU-only torch build (tests and recipes only).

Nothing here is active until ``install()`` is called; the plugin never calls it on its own, because
every change is process-global: a GPU job must not get it. ``install()`` is idempotent and refuses a
torch that can see a GPU. What it changes, and why each piece is needed:

1. **Device redirect** (``_CudaToCpuMode``, a ``TorchFunctionMode`` kept active for the process):
   megatron allocates with ``device=torch.cuda.current_device()`` (an int, i.e. ``cuda:0``),
   ``device="cuda"``, ``.cuda()`` and ``.to("cuda")``; each is rewritten to the CPU. ``Tensor.type()``
   reports ``torch.cuda.FloatTensor`` for a CPU float tensor because the DistributedOptimizer and the
   Float16 optimizer accept only the CUDA type names. ``pin_memory`` becomes a no-op.
2. **The redirect inside backward**: a torch-function mode is popped while its own handler runs, and
   ``Tensor.backward``/``torch.autograd.backward``/``grad`` are themselves dispatched through the mode,
   so the whole backward pass would run without it and a custom ``autograd.Function.backward`` that
   allocates on "cuda" (megatron's ``_AllToAll``) fails with "Cannot access accelerator device".
   ``torch.autograd._engine_run_backward`` is wrapped to re-enter the mode for the engine run.
3. **torch.cuda stubs**: current_device/set_device/synchronize/streams/events/nvtx/memory statistics.
4. **A separate "CUDA" RNG**: ``torch.cuda.manual_seed``/``get_rng_state``/``set_rng_state`` and
   megatron's ``_set_cuda_rng_state`` act on a private CPU generator that no CPU op draws from.
   Mapping them onto the default generator would make megatron's RNG-tracker forks consume the CPU
   stream that ``use_cpu_initialization`` draws weights from, so TP-replicated parameters (norms,
   position embeddings) would differ per TP rank. Consequence: dropout on CPU draws from the default
   generator, not from the tracker's forks; turn dropout off when comparing losses across layouts.
5. **MoE without Transformer Engine**: ``moe_utils`` references ``te_general_gemm`` that is only
   defined when TE imports (NameError in the router): it is set to None. The alltoall token
   dispatcher passes split sizes as tensors (on CUDA they become numpy arrays at its "dtoh point";
   CPU tensors are left alone) and gloo's ``all_to_all_single`` accepts only int lists: megatron's
   ``_AllToAll.forward`` gets its split sizes converted to lists. With expert TP x EP > 1 the
   dispatcher gathers / reduce-scatters uneven token counts, which gloo cannot: both are done with
   collectives gloo has (``_patch_uneven_collectives``).
6. **GroupedMLP without grouped_gemm** (``moe_grouped_gemm=True`` with the local spec): megatron's
   legacy ``GroupedMLP`` calls ``grouped_gemm.ops.gmm``, a CUDA-only package, and asserts it at
   construction. ``gmm`` below is a CPU reference (one matmul per expert's rows, plain autograd),
   installed into ``megatron.core.transformer.moe.grouped_gemm_util``. Its forward also asserts
   ``config.bf16`` because the CUDA kernel takes bf16 only; the CPU ``gmm`` takes any dtype, so each
   GroupedMLP gets a private copy of its config claiming bf16 (its forward reads ``bf16`` only in
   that assertion; the model's shared config, which DDP and the optimizer read, is untouched).
   GroupedMLP wraps its activation closures in megatron's ``jit_fuser`` (``torch.compile``), which
   on the CPU builds C++ kernels with inductor for ~15 s per process; in ``experts`` it is made the
   identity (the eager activation computes the same values).

Supported: megatron-core 0.16.x with torch >= 2.4 (tested with 0.16.1 and torch 2.13.0 CPU).
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from ..errors import UnsupportedError

SUPPORTED_MEGATRON = ("0.16.",)
_CPU = torch.device("cpu")
_STATE: dict[str, object] = {}


def install(allow_untested_megatron: bool = False) -> None:
    """Install every shim (idempotent). Call before building any megatron module."""
    if _STATE.get("installed"):
        return
    _check_environment(allow_untested_megatron)
    mode = _CudaToCpuMode()
    mode.__enter__()  # stays active for the life of the process, on purpose
    _STATE["mode"] = mode
    _wrap_backward_engine(mode)
    _stub_torch_cuda()
    _patch_megatron_rng()
    _patch_megatron_moe()
    _install_grouped_gemm()
    _STATE["installed"] = True


def installed() -> bool:
    return bool(_STATE.get("installed"))


def _check_environment(allow_untested_megatron: bool) -> None:
    if torch.cuda.is_available():
        raise UnsupportedError("ucp_plugin.testing.cpu_shim.install() refuses to run where torch sees a "
                               "GPU: the shim redirects every CUDA allocation to the CPU. Do not call it "
                               "in GPU jobs.")
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if not version.startswith(SUPPORTED_MEGATRON) and not allow_untested_megatron:
        raise UnsupportedError(f"the CPU shim is written for megatron-core {SUPPORTED_MEGATRON}, found "
                               f"{version}; pin megatron-core==0.16.1 or pass allow_untested_megatron=True")


# ---------------------------------------------------------------- 1. device redirect

def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # a bare int is a CUDA ordinal (torch.cuda.current_device() returns 0)
    return isinstance(device, int) and not isinstance(device, bool)


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                    "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of any torch call to the CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        name = getattr(func, "__name__", "")
        is_method = bool(args) and isinstance(args[0], torch.Tensor)
        if is_method and name in ("cuda", "pin_memory"):
            return args[0]
        if is_method and name == "to" and len(args) >= 2 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        if is_method and name == "type" and len(args) == 1 and not kwargs:
            type_name = func(*args)
            return _CUDA_TYPE_NAMES.get(type_name, type_name)
        return func(*args, **kwargs)


def _wrap_backward_engine(mode: _CudaToCpuMode) -> None:
    import torch.autograd as autograd

    engine_run = autograd._engine_run_backward

    def run_backward_with_redirect(*args, **kwargs):
        # the mode was popped by its own handler for Tensor.backward / autograd.backward
        if mode in _get_current_function_mode_stack():
            return engine_run(*args, **kwargs)
        with mode:
            return engine_run(*args, **kwargs)

    autograd._engine_run_backward = run_backward_with_redirect


# ---------------------------------------------------------------- 3. torch.cuda stubs

class _Stream:
    """Stands for torch.cuda.Stream: everything runs in order on the CPU already."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def record_event(self, *args, **kwargs):
        return _Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    """Stands for torch.cuda.Event; timings read as 0 ms."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _nothing():
    # a fresh function per stub: torch.compile's rule table rejects one object under two torch names
    return lambda *args, **kwargs: None


def _zero():
    return lambda *args, **kwargs: 0


def _stub_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0  # an ordinal; the mode maps device=0 to the CPU
    cuda.device_count = lambda: 1
    for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats", "set_stream"):
        setattr(cuda, name, _nothing())
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, _zero())
    cuda.memory_stats = lambda *args, **kwargs: {}
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda *args, **kwargs: _Stream()
    cuda.default_stream = lambda *args, **kwargs: _Stream()
    cuda.stream = lambda stream=None: stream if stream is not None else contextlib.nullcontext()
    cuda.nvtx.range_push = _nothing()
    cuda.nvtx.range_pop = _nothing()
    torch.Tensor.record_stream = lambda self, *args, **kwargs: None
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self


# ---------------------------------------------------------------- 4. separate "CUDA" generator

def _patch_megatron_rng() -> None:
    generator = torch.Generator()
    _STATE["cuda_generator"] = generator
    cuda = torch.cuda

    def manual_seed(seed, *args, **kwargs):
        generator.manual_seed(int(seed))

    def get_rng_state(*args, **kwargs):
        return generator.get_state()

    def set_rng_state(state, *args, **kwargs):
        generator.set_state(state)

    cuda.manual_seed = cuda.manual_seed_all = manual_seed
    cuda.get_rng_state = cuda.random.get_rng_state = get_rng_state
    cuda.set_rng_state = cuda.random.set_rng_state = set_rng_state
    from megatron.core.tensor_parallel import random as mrandom

    # upstream defers the set with torch.cuda._lazy_call, which on a CPU build queues it forever
    # (a tensor leaked per RNG-tracker fork, i.e. per attention forward)
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: set_rng_state(new_state)


def cuda_rng_generator() -> torch.Generator:
    """The private generator standing for the CUDA RNG (after ``install()``)."""
    if not installed():
        raise UnsupportedError("cpu_shim.install() has not been called in this process")
    return _STATE["cuda_generator"]


# ---------------------------------------------------------------- 5. MoE without TE, over gloo

def _as_int_list(sizes):
    if sizes is None or isinstance(sizes, list):
        return sizes
    if hasattr(sizes, "tolist"):  # a tensor or a numpy array
        return [int(s) for s in sizes.tolist()]
    return [int(s) for s in sizes]


def _patch_megatron_moe() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    forward = mappings._AllToAll.forward

    def forward_with_list_splits(ctx, group, input, output_split_sizes, input_split_sizes):
        # backward re-applies _AllToAll with the sizes saved on ctx, so converting here covers both
        return forward(ctx, group, input, _as_int_list(output_split_sizes), _as_int_list(input_split_sizes))

    mappings._AllToAll.forward = staticmethod(forward_with_list_splits)
    _patch_uneven_collectives(mappings)


def _patch_uneven_collectives(mappings) -> None:
    """The token dispatcher gathers and reduce-scatters per-rank token counts that differ (expert
    TP x EP groups); gloo's all_gather needs equal sizes and gloo has no reduce_scatter. With split
    sizes given, the gather pads every part to the largest and trims, the reduce-scatter all-reduces
    the whole tensor and keeps this rank's rows (same sums, more bytes: fine on one machine)."""
    import torch.distributed as dist

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        sizes = _as_int_list(output_split_sizes)
        if sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        sizes = _as_int_list(input_split_sizes)
        if sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(sizes[:group.rank()])
        return total[start:start + sizes[group.rank()]].clone()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = scatter_uneven


# ---------------------------------------------------------------- 6. GroupedMLP on the CPU

def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes, trans_b: bool = False) -> torch.Tensor:
    """``grouped_gemm.ops.gmm`` on the CPU: rows of ``a`` [tokens, k] are grouped by expert
    (``batch_sizes[e]`` consecutive rows each) and group e is multiplied by ``b[e]`` ([k, n], or
    [n, k] with ``trans_b``). Plain torch ops, so autograd gives the gradients of ``a`` and ``b``
    (an expert with no rows gets a zero gradient, as with the CUDA kernel)."""
    sizes = _as_int_list(batch_sizes)
    if len(sizes) != b.shape[0] or sum(sizes) != a.shape[0]:
        raise ValueError(f"gmm: batch_sizes {sizes} do not match a {list(a.shape)} and b {list(b.shape)}")
    outs = [rows @ (b[e].t() if trans_b else b[e]) for e, rows in enumerate(torch.split(a, sizes))]
    return torch.cat(outs) if outs else a.new_zeros(0, b.shape[1] if trans_b else b.shape[2])


def _install_grouped_gemm() -> None:
    import copy
    from types import SimpleNamespace

    from megatron.core.transformer.moe import experts, grouped_gemm_util

    if grouped_gemm_util.grouped_gemm is not None:
        return  # the real package is importable: nothing to stand in for
    package = SimpleNamespace(ops=SimpleNamespace(gmm=gmm))
    grouped_gemm_util.grouped_gemm, grouped_gemm_util.ops = package, package.ops
    init = experts.GroupedMLP.__init__

    def init_with_cpu_dtypes(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not self.config.bf16:
            self.config = copy.copy(self.config)
            self.config.bf16 = True

    experts.GroupedMLP.__init__ = init_with_cpu_dtypes
    experts.jit_fuser = lambda fn: fn  # read by GroupedMLP.__init__ only, when it builds its closures
