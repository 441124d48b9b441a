"""One training epoch: forward (with decisions), AdaViT loss, backward, clipping, optimizer, schedule and EMA steps.

The data order of an epoch is a function of (seed, epoch) (``DistributedSampler``), so a resumed run skips the batches
already consumed and continues with exactly the batches the uninterrupted run would have seen.
"""
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from .distributed import DistEnv, all_reduce_sum


class SkipSampler(Sampler):
    """The indices of ``sampler`` from position ``start`` on (the rest of an interrupted epoch)."""

    def __init__(self, sampler: Sampler, start: int) -> None:
        self.sampler = sampler
        self.start = start

    def __iter__(self) -> Iterator[int]:
        for i, index in enumerate(self.sampler):
            if i >= self.start:
                yield index

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)  # type: ignore[arg-type]


def epoch_loader(dataset: Dataset, env: DistEnv, batch_size: int, seed: int, epoch: int, skip_batches: int,
                 workers: int) -> DataLoader:
    """The training batches of ``epoch`` on this rank, after the first ``skip_batches``."""
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    batches = BatchSampler(SkipSampler(sampler, skip_batches * batch_size), batch_size, drop_last=True)
    # A private generator: worker seeds then do not draw from (and shift) the global RNG a checkpoint restores.
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed * 100_003 + epoch), persistent_workers=False)


def steps_per_epoch(dataset_size: int, env: DistEnv, batch_size: int) -> int:
    return (dataset_size // env.world_size) // batch_size


@dataclass
class StepState:
    """Counters the epoch loop advances and the checkpoint records."""
    epoch: int
    batch_in_epoch: int
    step: int


@dataclass
class EpochStats:
    """Running sums of one epoch on one rank (reduced over ranks by ``reduced``)."""
    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    batches: float = 0.0
    keep: Dict[str, float] = field(default_factory=dict)
    parts: Dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, correct: float, count: int, parts: Dict[str, float]) -> None:
        self.loss += loss
        self.correct += correct
        self.count += count
        self.batches += 1
        for key, value in parts.items():
            target = self.keep if key.startswith('keep_') else self.parts
            target[key] = target.get(key, 0.0) + value

    def means(self) -> Dict[str, float]:
        n = max(self.batches, 1.0)
        out = {'train_loss': self.loss / n, 'train_acc': 100.0 * self.correct / max(self.count, 1.0)}
        out.update({k: v / n for k, v in self.parts.items()})
        out.update({k: v / n for k, v in self.keep.items()})
        return out

    def reduced(self, env: DistEnv) -> Dict[str, float]:
        keys = sorted(self.parts) + sorted(self.keep)
        values = [self.loss, self.correct, self.count, self.batches] + [self.parts.get(k, self.keep.get(k, 0.0))
                                                                         for k in keys]
        total = all_reduce_sum(env, torch.tensor(values, dtype=torch.float64)).tolist()
        n = max(total[3], 1.0)
        out = {'train_loss': total[0] / n, 'train_acc': 100.0 * total[1] / max(total[2], 1.0)}
        out.update({k: v / n for k, v in zip(keys, total[4:])})
        return out


@dataclass
class TrainParts:
    """What one optimizer step needs."""
    model: nn.Module  # what the forward runs (possibly DDP-wrapped and compiled)
    raw_model: nn.Module  # the unwrapped model (EMA updates, gradient clipping)
    criterion: Optional[nn.Module]  # AdaViTLoss for gated models, else None
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    ema: Optional[nn.Module]
    mixup: Optional[Callable]
    teacher: Optional[nn.Module]
    amp_dtype: Optional[torch.dtype]
    clip_grad: Optional[float]
    gated: bool


def train_one_epoch(
        parts: TrainParts,
        loader: DataLoader,
        env: DistEnv,
        state: StepState,
        steps_in_epoch: int,
        max_steps: Optional[int],
        on_step: Callable[[StepState], None],
        bar: Callable[[Any, int, int], Any],
) -> EpochStats:
    """Run the remaining batches of ``state.epoch``; stop early at ``max_steps`` optimizer steps.

    Args:
        parts: Model, losses, optimizer and friends.
        loader: This epoch's remaining batches.
        env: The distributed environment.
        state: Advanced in place, one optimizer step per batch.
        steps_in_epoch: Batches in a full epoch (for the progress bar).
        max_steps: Stop once ``state.step`` reaches it.
        on_step: Called after every step (periodic checkpoints).
        bar: Wraps the loader in a progress bar: ``bar(loader, total, initial)``.

    Returns:
        This rank's running sums for the epoch.
    """
    parts.model.train()
    stats = EpochStats()
    device = env.device
    batches = bar(loader, steps_in_epoch, state.batch_in_epoch)
    started, seen = time.perf_counter(), 0
    for images, target in batches:
        if max_steps is not None and state.step >= max_steps:
            break
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        hard_target = target
        if parts.mixup is not None:
            images, target = parts.mixup(images, target)
        teacher_logits = None
        if parts.teacher is not None:
            with torch.no_grad(), torch.autocast(device.type, dtype=parts.amp_dtype,
                                                 enabled=parts.amp_dtype is not None):
                teacher_logits = parts.teacher(images).float()
        with torch.autocast(device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
            if parts.gated:
                logits, decisions = parts.model(images, return_decisions=True)
            else:
                logits, decisions = parts.model(images), None
        logits = logits.float()
        if decisions is not None:
            loss, loss_parts = parts.criterion(logits, target, decisions, teacher_logits)
        else:
            loss = parts.task_loss(logits, target)
            loss_parts = {}
        if not torch.isfinite(loss):
            raise FloatingPointError(f'loss is {loss.item()} at step {state.step}: lower train.lr or turn AMP off')

        parts.optimizer.zero_grad(set_to_none=True)
        if parts.scaler is not None:
            parts.scaler.scale(loss).backward()
            parts.scaler.unscale_(parts.optimizer)
        else:
            loss.backward()
        if parts.clip_grad:
            torch.nn.utils.clip_grad_norm_(parts.raw_model.parameters(), parts.clip_grad)
        if parts.scaler is not None:
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
        else:
            parts.optimizer.step()
        state.step += 1
        state.batch_in_epoch += 1
        parts.scheduler.step_update(num_updates=state.step)
        if parts.ema is not None:
            parts.ema.update(parts.raw_model, step=state.step)

        correct = (logits.detach().argmax(dim=1) == hard_target).sum().item()
        stats.add(loss.item(), correct, len(hard_target), {k: float(v) for k, v in loss_parts.items()})
        seen += len(hard_target)
        if hasattr(batches, 'set_postfix'):
            post = {'loss': f'{stats.loss / stats.batches:.3f}', 'acc': f'{100 * stats.correct / stats.count:.1f}'}
            post.update({k[5:]: f'{v / stats.batches:.2f}' for k, v in stats.keep.items()})
            post['img/s'] = f'{seen * env.world_size / max(time.perf_counter() - started, 1e-9):.0f}'
            batches.set_postfix(post, refresh=False)
        on_step(state)
        if max_steps is not None and state.step >= max_steps:
            break
    if hasattr(batches, 'close'):
        batches.close()
    return stats
