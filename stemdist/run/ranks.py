"""Where the run executes: ranks from torchrun or SLURM, the process group, barriers, self-launch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from ..errors import StemdistError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "none"  # none | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def detect() -> Ranks:
    """Ranks as set by torchrun (or any torchelastic launcher) or by srun under SLURM."""
    if TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
        return Ranks(env.global_rank(), env.local_rank(), env.world_size(),
                     int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size())), "torchrun")
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        env = SLURMEnvironment()
        nodes = int(os.environ.get("SLURM_NNODES", "1"))
        per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", str(env.world_size() // nodes)).split("(")[0])
        os.environ.setdefault("MASTER_ADDR", env.main_address)
        os.environ.setdefault("MASTER_PORT", str(env.main_port))
        return Ranks(env.global_rank(), env.local_rank(), env.world_size(), per_node, "slurm")
    return Ranks()


def init(ranks: Ranks, use_cuda: bool) -> None:
    """Join the process group early (Lightning reuses it), so that set-up and inference can sync."""
    if ranks.world_size == 1 or dist.is_initialized():
        return
    if use_cuda:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=ranks.rank, world_size=ranks.world_size,
                            timeout=timedelta(minutes=30))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_to_main(array):
    """Element-wise sum of a numpy array over ranks (the result is meaningful on rank 0)."""
    if not dist.is_initialized():
        return array
    t = torch.from_numpy(array)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.reduce(t, dst=0)
    return t.cpu().numpy()


def run_on_main(fn, ranks: Ranks):
    """Run ``fn`` on rank 0 only; every rank gets its result, or raises the error rank 0 met."""
    result, error = None, None
    if ranks.is_main:
        try:
            result = fn()
        except StemdistError as exc:
            error = exc
    if dist.is_initialized():
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise error
    return result


def die_with_parent() -> None:
    """Linux: end this process (SIGKILL, as its parent's) when its parent dies, so that a killed launcher leaves no rank
    training on its own. Called in every torchrun rank and in the torchrun of a self-launch."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the line above
        os.kill(os.getpid(), signal.SIGKILL)


ROOT_CAUSE = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*?(?:\((SIG\w+)\))?\s*\n", re.S)


def relaunch(nproc: int, argv: list[str], debug: bool = False) -> int:
    """Run this command again under torchrun with ``nproc`` processes on this node.

    The ranks' output passes through; torchrun's own report of a failed rank (a traceback and a table) is
    replaced by one line naming the rank and the cause. torchrun stops the other ranks within seconds.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "stemdist", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # no torchrun banner
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=die_with_parent)
    report: list[str] = []  # torchrun's report of a failed rank
    echoes: list[str] = []  # tracebacks torch prefixes with [rankN]: (the survivors' lost connections)
    for line in proc.stderr:
        if report or (" torch/distributed/elastic/" in line and line[:1] in "EW" and "failed" in line):
            report.append(line)
        elif line.startswith("[rank") and not debug:
            echoes.append(line)
        elif debug or " torch/distributed/elastic/" not in line:
            sys.stderr.write(line)
    rc = proc.wait()
    if rc == 0:
        return 0
    text = "".join(report)
    if debug:
        sys.stderr.write(text)
    cause = ROOT_CAUSE.search(text.split("Root Cause", 1)[-1])
    if cause is None:
        sys.stderr.write("".join(echoes))
        return rc
    rank, code, sig = int(cause.group(1)), int(cause.group(2)), cause.group(3)
    if code in (2, 130):  # the rank has said why in its own line
        return code
    why = f"was killed by {sig}" if sig else f"exited with status {code}"
    print(f"stemdist: error: rank {rank} {why}; the other ranks were stopped. Continue with --resume",
          file=sys.stderr)
    return 2
