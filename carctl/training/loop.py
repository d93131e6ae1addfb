"""What every ``carctl train`` run shares: the optimisation loop, the learning-rate schedule
and resumable checkpoints.

A checkpoint folder holds the model, the optimiser state and the step as safetensors/JSON
(no pickles). The random stream of step ``n`` depends only on the seed and ``n`` (the caller
draws its batch from :func:`step_generator`), so a resumed run is the run that was never
interrupted.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), each process draws its own samples (stream
``step * world + rank``) and the gradients are averaged across processes with an
all-reduce before every step: data parallelism as DistributedDataParallel does it, without
its forward hooks (a CAR step runs the encoder several times outside ``forward``). Process 0
validates and writes the checkpoints and the weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

# Gradient norm clip (keeps Adam from running away on an unlucky batch).
CLIP = 1.0


def settings_dict(settings) -> dict:
    """A training dataclass as JSON-ready data (its ``network`` config included)."""
    out = asdict(settings)
    out["network"] = settings.network.to_dict()
    return out


def learning_rate(initial: float, steps: int, step: int) -> float:
    """Cosine decay from ``initial`` to a tenth of it over ``steps``."""
    t = min(step / max(steps, 1), 1.0)
    return initial * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of training step ``step``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def on(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """A dict of tensors moved to ``device``."""
    return {k: v.to(device) for k, v in tensors.items()}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{i}.{key}"] = torch.as_tensor(value).clone()
    return out


def save_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer, step: int, settings, log: list
) -> None:
    from carctl.pretrained import save_tensors

    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(model.state_dict(), folder / "model.safetensors")
    save_tensors(_optimizer_tensors(optimizer), folder / "optimizer.safetensors")
    state = {"step": step, "settings": settings_dict(settings), "log": log}
    tmp = folder / ".state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(folder / "state.json")


def resumes(folder: Path, resume: bool) -> bool:
    """Whether a run asked to ``resume`` in ``folder`` continues a checkpoint there."""
    return resume and (folder / "state.json").exists()


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer) -> tuple[int, list]:
    from safetensors.torch import load_file

    from carctl.pretrained import load_weights

    refusal = f"the checkpoint in {folder} is of another network than these options make"
    load_weights(model, folder / "model.safetensors", refusal)
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state_dict = optimizer.state_dict()
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state_dict["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(state_dict)
    state = json.loads((folder / "state.json").read_text())
    return int(state["step"]), list(state["log"])


def distributed() -> tuple[int, int]:
    """``(rank, world size)``; under ``torchrun`` the process group is initialised here (NCCL
    with CUDA, else Gloo) and each process takes its local GPU."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def finish() -> None:
    """Leave the process group, if any (a process that exits inside it may abort)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    import torch.distributed as dist

    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world


def fit(
    model: torch.nn.Module,
    settings,
    loss_of: Callable[[torch.Generator], tuple[torch.Tensor, dict]],
    validate: Callable[[], dict],
    folder: Path,
    resume: bool = False,
    progress: Callable[[int, dict], None] | None = None,
    stop: int | None = None,
) -> dict:
    """Adam on ``model`` up to ``settings.steps`` (or until step ``stop``, keeping the
    schedule of the whole run). ``loss_of(generator)`` draws a sample from ``generator``
    (:func:`step_generator` of the stream ``n``: the step, or ``step * world + rank`` under
    ``torchrun``) and returns its loss and a few numbers to show;
    every ``settings.validate_every`` steps (and at the end) process 0 logs ``validate()``
    and writes a checkpoint to ``folder``. Returns the last validation."""
    rank, world = distributed()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    step, log = 0, []
    if resumes(folder, resume):
        step, log = load_checkpoint(folder, model, optimizer)
    metrics = log[-1] if log else {}
    if progress is not None and step:  # a resumed run's bar starts where it left off
        progress(step, metrics)
    started = time.perf_counter()
    end = min(settings.steps, stop if stop is not None else settings.steps)
    model.train()
    while step < end:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings.learning_rate, settings.steps, step)
        loss, shown = loss_of(step_generator(settings.seed, step * world + rank))
        if not bool(torch.isfinite(loss)):  # every step after would write NaN weights
            from carctl.errors import CarctlError

            raise CarctlError(
                f"the training diverged at step {step + 1} (loss {loss.item()}): nothing "
                f"written from this step on; try a lower --lr, or resume from the last "
                f"checkpoint in {folder}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _average_gradients(model, world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        step += 1
        due = step % settings.validate_every == 0 or step in (settings.steps, stop)
        if due and rank == 0:
            model.eval()
            with torch.no_grad():
                checked = validate()
            model.train()
            metrics = {"step": step, "loss": loss.item(), **checked}
            metrics["seconds"] = round(time.perf_counter() - started, 1)
            log.append(metrics)
            save_checkpoint(folder, model, optimizer, step, settings, log)
        if progress is not None:
            progress(step, {"loss": loss.item(), **shown, **metrics})
    return {**metrics, "step": step}
