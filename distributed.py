"""The device and torchrun's process group (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)."""
import contextlib
import datetime
import os

import numpy as np
import torch

from util import DSDLError

# How long a collective of training (gradients, evaluation shares, barriers) waits for the other
# processes before it fails: a hung or dead rank is found within half an hour. The longest wait
# between two collectives in a healthy run is rank 0 alone writing a checkpoint, the metrics and
# the plots after an evaluation (seconds; minutes on a slow network disk), so three times
# torch's 10-minute NCCL default leaves room for a slow disk or a first compilation.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# How long the other processes wait while rank 0 downloads and extracts (COCO: 19 GB, over a
# slow connection for hours): only rank_zero_first waits this long, on a group of its own.
DOWNLOAD_TIMEOUT = datetime.timedelta(hours=12)
_rank_zero_group = None  # gloo, DOWNLOAD_TIMEOUT: what rank_zero_first waits on


def resolve_device(device):
    """The device to run on: `device` (--device), else cuda when a GPU is available, else cpu;
    asking for cuda without a GPU is an error."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DSDLError(f"--device {device}, but no CUDA GPU is available; pass --device cpu")
    return device


def gpu_problem():
    """Why no GPU can be used here, in a sentence, or None when CUDA runs a kernel and a cuDNN
    convolution. torch.cuda.is_available() alone does not see a driver too old for this build
    of torch, a GPU in a bad state or a missing cuDNN: those fail at the first kernel."""
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
        return f"no CUDA GPU is available (torch {torch.__version__}, {built})"
    try:
        ones = torch.ones(1, 1, 4, 4, device="cuda")
        torch.nn.functional.conv2d(ones, ones[:, :, :3, :3]).sum().item()
    except Exception as error:  # CUDA, cuDNN and the driver raise RuntimeError and its kin
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"CUDA is present but does not work ({type(error).__name__}: {message})"
    return None


def init_distributed(device):
    """Join the process group torchrun describes; returns (rank, world size, device).

    NCCL on GPUs, gloo on CPUs; each process drives the GPU of its LOCAL_RANK. Under torchrun
    the group is joined with one process too (so that `torchrun --nproc_per_node 1` runs the
    distributed code); without torchrun there is none.
    """
    if "RANK" not in os.environ:  # not started by torchrun
        return 0, 1, torch.device(device)
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        global _rank_zero_group
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=COLLECTIVE_TIMEOUT)
        # The long wait for rank 0's downloads has a group of its own, so that it is not every
        # collective's; gloo, as it only carries rank 0's outcome (a few bytes, on the CPU).
        _rank_zero_group = torch.distributed.new_group(backend="gloo", timeout=DOWNLOAD_TIMEOUT)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def is_main_process():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


@contextlib.contextmanager
def rank_zero_first():
    """Under torchrun, rank 0 runs the block (checks, downloads, extraction) before the other
    ranks, which wait up to DOWNLOAD_TIMEOUT. A DSDLError raised there is raised by every rank
    (and printed by rank 0 only), so that the other ranks stop with it instead of waiting or
    failing on a closed connection."""
    if not torch.distributed.is_initialized():
        yield
        return
    if is_main_process():
        failure = [None]
        try:
            yield
        except DSDLError as error:
            failure = [str(error)]
            raise
        finally:
            torch.distributed.broadcast_object_list(failure, src=0, group=_rank_zero_group)
    else:
        failure = [None]
        torch.distributed.broadcast_object_list(failure, src=0, group=_rank_zero_group)
        if failure[0] is not None:
            raise DSDLError(failure[0])
        yield


def mean_over_processes(values):
    """A tensor's values as numbers (a float, or a list for a vector), averaged over torchrun's
    processes (every process sees the same). Reading them makes the host wait for the device."""
    if not torch.distributed.is_initialized():
        return values.tolist()
    total = values.detach().clone()
    torch.distributed.all_reduce(total)
    world_size = torch.distributed.get_world_size()
    return total.item() / world_size if total.dim() == 0 else [v / world_size for v in total.tolist()]


def share_rank_zero_buffers(model):
    """Give every process rank 0's BatchNorm statistics (the ones it saves) before evaluating.

    DDP copies rank 0's buffers before each training forward only: after the last step every
    rank has its own statistics.
    """
    if torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


def gather_shares(positions, scores, labels, ids, total, count):
    """The evaluation shares of every process put back into the split's order: the images at
    `positions` of the split, their scores and labels (N x C tensors; on the GPU under NCCL),
    their ids, the summed loss and the count. Returns the split's scores and labels as numpy
    arrays, its ids, the summed loss and the count, on every process.

    The shares are broadcast one process at a time and written into place: a process holds the
    split's arrays once and one share beside them (Open Images' test split: 4.8 GB of scores),
    not every share pickled, unpickled and then reordered."""
    shares = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, (list(positions), ids, total, count))
    labels = labels.to(scores.device)  # NCCL carries GPU tensors only
    num_images = sum(len(share[0]) for share in shares)
    split = [torch.empty((num_images, *tensor.shape[1:]), dtype=tensor.dtype)
             for tensor in (scores, labels)]
    split_ids = [None] * num_images
    for rank, (share_positions, share_ids, _, _) in enumerate(shares):
        index = torch.as_tensor(share_positions, dtype=torch.long)
        for tensor, whole in zip((scores, labels), split):
            share = (tensor if rank == torch.distributed.get_rank()
                     else tensor.new_empty((len(index), *tensor.shape[1:])))
            torch.distributed.broadcast(share, src=rank)
            whole[index] = share.cpu()
        for position, image_id in zip(share_positions, share_ids):
            split_ids[position] = image_id
    return (split[0].numpy(), split[1].numpy(), split_ids, sum(share[2] for share in shares),
            sum(share[3] for share in shares))
