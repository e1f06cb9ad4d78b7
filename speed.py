"""The speed options of a run (--amp, --compile, --channels-last, --fast-pipeline's batches,
--tf32, --deterministic): each off by default, so that a run computes as the release did.
engine.py calls these; bench.py times them.
"""
import contextlib
import os
import warnings

import torch

from util import normalize_on_device, out_of_memory


def prepare_images(images, device, channels_last=False):
    """Move a batch to the device; uint8 batches (--fast-pipeline) are normalised there."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize_on_device(images)
    return images.contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)


def on_device(model, device, args, world_size=1):
    """`model` on `device` with the speed options of `args`: SyncBatchNorm across processes
    (--sync-bn under torchrun), channels-last memory, a compiled trunk. Returns the model."""
    model.to(device)
    if world_size > 1 and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        compile_trunk(model.trunk)
    return model


def warn_if_compile_changed(args, checkpoint, per_step):
    """--compile toggled on --resume under a per-step schedule: the epochs' numbers of steps
    differ (it drops each epoch's last partial batch), and so does the learning-rate curve."""
    trained_compiled = ((checkpoint or {}).get("args") or {}).get("compile", args.compile)
    if args.resume and per_step and trained_compiled != args.compile:
        warnings.warn(f"--compile {'on' if args.compile else 'off'} here but not when "
                      f"{args.resume} was trained: it drops each epoch's last partial batch, so "
                      f"an epoch has another number of steps and the per-step learning-rate curve "
                      f"is not the uninterrupted one's", stacklevel=4)


def compile_trunk(trunk):
    """torch.compile the trunk's forward in place (state-dict keys unchanged).

    If compiling fails (no compiler, unsupported platform) it warns and runs the trunk eagerly
    from then on; the first training call also runs the compiled backward once (torch compiles
    it at its first use), so that a failure there falls back too. Later errors (out of memory
    ...) are raised as they are. In evaluation a smaller last batch is padded to the size of the
    first (BatchNorm uses its running statistics there, so padding changes no image's scores),
    and training drops its last partial batch (`make_loader`): every call has one shape, and
    nothing is compiled again for another one.
    """
    eager = trunk.forward
    compiled = torch.compile(eager)
    batch = []  # the batch size of the first call
    forward_done = []  # a compiled forward has run: later errors of the forward are real ones

    def padded(images):
        size = images.shape[0]
        batch[:] = batch or [size]
        if trunk.training or size >= batch[0]:
            return compiled(images)
        filler = images[-1:].expand(batch[0] - size, *images.shape[1:])
        return compiled(torch.cat([images, filler]))[:size]

    def fall_back(error, images):
        warnings.warn(f"--compile does not work here ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); running without it")
        trunk.forward = eager
        return eager(images)

    def checked(images):
        try:
            output = padded(images)
        except Exception as error:  # torch._dynamo / inductor raise many types
            if forward_done or out_of_memory(error):
                raise
            return fall_back(error, images)
        forward_done.append(True)
        if torch.is_grad_enabled() and output.requires_grad:
            try:
                trained = [p for p in trunk.parameters() if p.requires_grad]
                torch.autograd.grad(output.float().sum(), trained, retain_graph=True,
                                    allow_unused=True)  # compiles the backward, touches no .grad
            except Exception as error:
                if out_of_memory(error):
                    raise
                return fall_back(error, images)
            trunk.forward = padded  # forward and backward compiled: no more checks
        return output

    trunk.forward = checked


def mixed_precision(device, enabled):
    """(autocast dtype or None, GradScaler or None) for --amp on this device.

    GPUs: bf16 where the GPU computes in it (`native_bf16`), else fp16 with loss scaling. CPUs: float32 with a warning, as
    --help says: bf16 is only fast on CPUs with bf16 units, and PyTorch offers no public way to
    ask whether this one has them (on one without, bf16 was 23x slower than float32).
    """
    if not enabled:
        return None, None
    if device.type == "cuda":
        if native_bf16(device):
            return torch.bfloat16, None
        return torch.float16, torch.amp.GradScaler("cuda")
    warnings.warn("--amp has no effect on the CPU; running in float32")
    return None, None


def autocast(device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def native_bf16(device):
    """Whether this GPU has bf16 units (compute capability 8.0, Ampere, and newer).
    torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (V100, T4), slowly."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


@contextlib.contextmanager
def numerics(device, tf32, deterministic):
    """The process-wide float32 and algorithm settings of a run (restored afterwards).

    --tf32 off (the default): float32 convolutions and matrix products in full float32, the
    arithmetic the release trained with (its GPUs had no TF32), where cuDNN would otherwise run
    convolutions in TF32 on Ampere and newer GPUs. --tf32 on: TF32 for both (faster; 10 bits of
    mantissa for their products). --deterministic: deterministic algorithms and no cuDNN
    autotuning, so that a resumed run and -j do not change the weights on a GPU either (slower).
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32 == "on"
        torch.backends.cudnn.benchmark = not deterministic  # autotuning picks kernels by timing
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace, set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        # warn_only: torch flags adaptive max pooling's CUDA backward, which with one window
        # per channel (global pooling) adds one gradient per position: deterministic in fact.
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
