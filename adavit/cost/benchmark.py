"""Paired speed benchmark: dense timm vs AdaViT sparse vs AdaViT masked, same weights, same inputs, one process.

Timings are interleaved after a warm-up and reported as medians of rounds, because a shared machine is noisy: in each
round every model takes one turn, in an order that changes from round to round so that no model always follows the
same one, and a turn is an untimed call and then every input of the round in a row (``interleave="turn"``). A deployed
model follows itself, call after call; a call that follows another model's call starts in the caches that model left.
Taking turns on every input instead (``interleave="input"``, the benchmark's design before) put each sparse call after
a dense or masked one: at batch 1 on a 2-core Intel Xeon (DeiT-S, keep 0.7/0.7/0.9, four contenders, one process, the
two designs alternating) the sparse model took 29.7 and 30.3 ms a forward that way against 27.8 and 27.4 ms in turns,
while dense timm took the same either way (47.3-48.3 ms), so the efficiency read 0.82 against 0.88; with the decision
networks 0.75 against 0.79; with every unit kept, and at batch 64 (one input a round), no difference beyond the
noise. The dense baseline is timm's model at its faster attention path: timm calls ``scaled_dot_product_attention``
by default, whose CPU kernel can lose to plain matmuls at short sequences, so both paths are timed and the faster one is
the baseline (a deployer would pick it too). The two paths race in rounds of their own first (``dense_attention_path``),
and the chosen one then takes its turns with the sparse and the masked executor: the smaller of two medians from the
same rounds reads low where the paths run close, as they do for DeiT-S at 224 (0.5-18% apart): resampling 22 rounds of
both (batch 1, 2 threads, Intel Xeon) into halves of 11, it read 2.2% under a median from other rounds when they tied,
1.2% at 3% apart, 0.7% at 5%, and the efficiency read as much too low. Decisions are frozen per input (the random
policy is reseeded before each call), so the MACs quoted are exactly those of the timed runs.

On CPU the benchmark first pins glibc's allocator (``pin_allocator``). By default glibc hands large blocks back to the
kernel when they are freed, so a model whose intermediates are large pays page faults on every call, and how many
depends on what the process allocated before: the dense Fashion-MNIST model at batch 256 (20 MB FFN activations) took
12,000 page faults per forward by default and none pinned, and its speed swung from 1,200 to 2,000 images/s between
runs. Pinned (with mmap off, so that blocks over 32 MB are kept too), neither model pays them, so the baseline is the
dense model at its best, and runs agree.

Both models run under ``torch.inference_mode()``, as a deployment would: ``no_grad`` still keeps autograd's view and
version bookkeeping on every op, which costs the sparse executor, with its packing and slicing, about 2% of a
Fashion-MNIST batch of 256 (the dense model 0.7%).
"""
import contextlib
import ctypes
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
from torch import nn

from ..model.adavit import AdaViT
from .macs import decision_macs, dense_macs

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


@dataclass
class SpeedRow:
    """One batch size's result. Times are per batch, in milliseconds; MACs per image, in GMACs."""
    batch_size: int
    threads: int
    device: str
    dtype: str
    dense_ms: float  # timm's faster attention path (dense_attention), timed in turns with sparse and masked
    # Both paths in the rounds that chose the baseline (``dense_attention_path``), not in those of the other times:
    dense_fused_ms: float  # timm's default attention (scaled_dot_product_attention)
    dense_matmul_ms: float  # timm's attention with fused_attn=False (matmul, softmax, matmul)
    dense_attention: str  # 'fused' or 'matmul': the one with the smaller of the two, the baseline
    sparse_ms: float
    masked_ms: float
    dense_images_per_s: float
    sparse_images_per_s: float
    masked_images_per_s: float
    dense_gmacs: float
    adaptive_gmacs: float
    mac_ratio: float  # dense MACs / adaptive MACs: the speedup the cost promises
    speedup: float  # dense time / sparse time
    masked_speedup: float  # dense time / masked time
    efficiency: float  # speedup / mac_ratio: the share of the promised speedup delivered
    # The efficiency of each timed round alone (dense and sparse of the same round, paired), lowest and highest: how
    # far the median of this run could move on this machine's noise.
    efficiency_low: float
    efficiency_high: float
    rounds: int  # timed rounds
    allocator: str = 'default'  # 'glibc pinned' when ``pin_allocator`` took effect
    interleave: str = 'turn'  # how the contenders took turns (``interleaved_times``)
    # A 95% bootstrap interval of ``efficiency`` over the timed rounds (``efficiency_interval``): how far the median
    # itself could move on this machine's noise, where ``efficiency_low`` and ``_high`` say how far one round can.
    efficiency_ci_low: float = float('nan')
    efficiency_ci_high: float = float('nan')
    # Each timed round's milliseconds per batch, in round order, whose medians the times above are: for analyses of the
    # noise that the summary does not show.
    dense_rounds_ms: List[float] = field(default_factory=list)
    sparse_rounds_ms: List[float] = field(default_factory=list)
    masked_rounds_ms: List[float] = field(default_factory=list)

    @property
    def efficiency_range(self) -> str:
        """``"0.78-0.83"``: the lowest and highest efficiency of a single round."""
        return f'{self.efficiency_low:.2f}-{self.efficiency_high:.2f}'

    @property
    def efficiency_ci(self) -> str:
        """``"0.80-0.86"``: the 95% bootstrap interval of the efficiency."""
        return f'{self.efficiency_ci_low:.2f}-{self.efficiency_ci_high:.2f}'


def efficiency_interval(
        dense: Sequence[float],
        sparse: Sequence[float],
        mac_ratio: float,
        level: float = 0.95,
        resamples: int = 4000,
        seed: int = 0,
) -> Tuple[float, float]:
    """A percentile bootstrap interval of the efficiency ``median(dense) / median(sparse) / mac_ratio``.

    The rounds are resampled with replacement, a round's dense and sparse time together (they shared the host's state
    of that moment), and the efficiency recomputed on each resample; seeded, so a run's JSON can be recomputed.

    Args:
        dense: Each round's dense time.
        sparse: The same rounds' sparse times.
        mac_ratio: Dense MACs over adaptive MACs.
        level: Coverage of the interval.
        resamples: Bootstrap resamples.
        seed: Seed of the resampling.

    Returns:
        (low, high).
    """
    dense_rounds, sparse_rounds = np.asarray(dense, dtype=np.float64), np.asarray(sparse, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(dense_rounds), size=(resamples, len(dense_rounds)))
    efficiency = np.median(dense_rounds[picks], axis=1) / np.median(sparse_rounds[picks], axis=1) / mac_ratio
    low, high = np.quantile(efficiency, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit Linux (HEAP_MAX_SIZE / 2).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MAX_MMAP_THRESHOLD = 32 << 20


def pin_allocator() -> str:
    """Keep freed blocks in the process instead of returning them to the kernel (glibc only).

    Turns off glibc's dynamic thresholds and its use of mmap, so that repeated forwards reuse memory instead of
    faulting in fresh pages. The threshold alone does not do it for blocks over 32 MB (the most glibc accepts), which
    are still mapped and unmapped on every call: the dense DeiT-S at batch 64 (77 MB FFN activations) took 430,000
    page faults a forward with only the threshold pinned, none with mmap off, and took 2.78 against 2.39 s (medians of 4
    forwards, one process each way, 2 threads, Intel Xeon). It changes this process's allocator for good, which a
    benchmark process can afford.

    Returns:
        ``"glibc pinned"``, or ``"default"`` where the C library is not glibc.
    """
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return 'default'
    mallopt = ctypes.CDLL(None).mallopt
    pinned = (mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
              and mallopt(_M_MMAP_MAX, 0) == 1)
    return 'glibc pinned' if pinned else 'default'


def cpu_name(cpuinfo: str = '/proc/cpuinfo') -> str:
    """The processor's model name (``"AMD EPYC 7B13"``), where Linux tells it; else what ``platform`` knows.

    Recorded with every figure: the same code's efficiency differs by processor (cache sizes, vector width), and
    ``platform.processor()`` says only ``"x86_64"`` on Linux.
    """
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = 'cpu') -> Dict[str, Any]:
    """What a figure was measured on, for its JSON: processor, cores, torch threads, library versions, and the GPU where
    ``device`` is one."""
    return {'cpu': cpu_name(), 'cores': os.cpu_count(), 'threads': torch.get_num_threads(),
            'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
            'platform': platform.platform(), 'device': device,
            'cuda': torch.cuda.get_device_name(device) if device.startswith('cuda') else None}


def missing_device(device: str) -> Optional[str]:
    """Why ``device`` (as ``--device`` names it) cannot run here, in one line, or None: CUDA asked for, none seen."""
    if device.startswith('cuda') and not torch.cuda.is_available():
        return '--device cuda asked for, but torch sees no CUDA device: run on a GPU machine, or with --device cpu'
    return None


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timer(model: nn.Module, inputs: List[torch.Tensor], reseed: bool, device: torch.device) -> Callable[[int], float]:
    """A closure that runs ``model`` on input ``i`` and returns the seconds it took: a contender for
    ``interleaved_medians``. With ``reseed``, ``model.reset_random_policy(i)`` first, so input ``i`` always gets the
    same decisions."""
    def run(i: int) -> float:
        if reseed:
            model.reset_random_policy(i)
        _sync(device)
        start = time.perf_counter()
        model(inputs[i])
        _sync(device)
        return time.perf_counter() - start
    return run


def balanced_orders(n: int) -> List[List[int]]:
    """Orders of ``n`` runs in which each run takes every place, and follows every other run, equally often.

    Rotations of one order would let every run always follow the same one (the run before it leaves its weights and
    buffers in the caches, which helps a run that shares them and hurts one that does not); these are the rows of a
    Williams Latin square, the standard design against such carry-over: n orders, 2n for odd n.
    """
    first, low, high = [0], 1, n - 1  # 0, 1, n-1, 2, n-2, ...
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(run + shift) % n for run in first] for shift in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 else orders


# How contenders take turns (``interleaved_times``): a turn of every input of the round each, or a turn per input.
INTERLEAVES = ('turn', 'input')


def interleaved_times(
        runs: Dict[str, Callable[[int], float]],
        count: int,
        warmup: int,
        repeats: int,
        interleave: str = 'input',
) -> Dict[str, List[float]]:
    """Seconds per input of each run in each of ``repeats`` rounds, after ``warmup`` untimed ones.

    A round covers inputs ``0 .. count - 1``. With ``interleave="input"`` the runs take turns on every input: a slow
    spell of a shared machine then slows all of them alike, and their ratios stay put, round by round; but every call
    then starts right after another run's call, in the caches it left. With ``interleave="turn"`` each run takes one
    turn a round: an untimed call (on input ``count - 1``), so that the timed ones start from the run's own state as in
    a deployment, where a model follows itself, then every input in order. Either way the order changes from input to
    input (``"input"``) or round to round (``balanced_orders``), so that no run always goes first or always follows
    the same run.

    Args:
        runs: Name -> a closure that runs on input ``i`` and returns the seconds it took.
        count: Inputs per round.
        warmup: Untimed rounds.
        repeats: Timed rounds.
        interleave: One of ``INTERLEAVES``.

    Returns:
        Name -> ``repeats`` mean seconds per input, one per timed round, in round order.
    """
    if interleave not in INTERLEAVES:
        raise ValueError(f'interleave must be one of {INTERLEAVES}, got {interleave!r}')
    names = list(runs)
    orders = balanced_orders(len(names))
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        seconds = dict.fromkeys(names, 0.0)
        if interleave == 'turn':
            for name in (names[j] for j in orders[round_index % len(orders)]):
                runs[name](count - 1)  # untimed: the turn starts from this run's own state, not the previous run's
                for i in range(count):
                    seconds[name] += runs[name](i)
        else:
            for i in range(count):
                for name in (names[j] for j in orders[(round_index + i) % len(orders)]):
                    seconds[name] += runs[name](i)
        if round_index >= warmup:
            for name in names:
                times[name].append(seconds[name] / count)
    return times


def interleaved_medians(
        runs: Dict[str, Callable[[int], float]],
        count: int,
        warmup: int,
        repeats: int,
        interleave: str = 'input',
) -> Dict[str, float]:
    """Median seconds per input of each run over the rounds of ``interleaved_times`` (same arguments)."""
    times = interleaved_times(runs, count, warmup, repeats, interleave)
    return {name: statistics.median(values) for name, values in times.items()}


# On an accelerator each contender gets at least this many untimed calls, whatever ``warmup`` says: its first calls pay
# one-time costs there (pinned host buffers of new sizes, kernels loaded). At batch 256, one input a round, 2 warm-up
# rounds left the sparse executor at 20.7 ms a forward, where a plain loop on the same machine took 16.2; with 5 calls
# first, 17.1 ms (DeiT-S, H200, bf16; each on a fresh machine).
ACCELERATOR_WARMUP_CALLS = 5


def warmup_rounds(warmup: int, count: int, device: torch.device) -> int:
    """Untimed rounds of ``count`` inputs: ``warmup``, or on an accelerator enough for ``ACCELERATOR_WARMUP_CALLS``."""
    return warmup if device.type == 'cpu' else max(warmup, -(-ACCELERATOR_WARMUP_CALLS // count))


def batches_per_round(batch_size: int, images_per_round: int, max_inputs: int = 32) -> int:
    """How many distinct input batches ``measure_speed`` times per round at ``batch_size``: at least one."""
    return max(1, min(max_inputs, images_per_round // batch_size))


def mean_adaptive_macs(model: AdaViT, inputs: List[torch.Tensor], reseed: bool) -> float:
    """The mean MACs per image of ``inputs`` under the decisions ``model`` takes on them, as ``timer`` runs it: with
    ``reseed``, ``model.reset_random_policy(i)`` before input ``i``."""
    adaptive = []
    for i, x in enumerate(inputs):
        if reseed:
            model.reset_random_policy(i)
        with torch.inference_mode():
            _, decisions = model(x, return_decisions=True)
        adaptive.append(decision_macs(model, decisions))
    return torch.cat(adaptive).mean().item()


@torch.no_grad()
def measure_speed(
        model: AdaViT,
        batch_sizes: Sequence[int] = (1, 64),
        threads: Optional[int] = None,
        device: str = 'cpu',
        dtype: str = 'fp32',
        warmup: int = 2,
        repeats: int = 5,
        images_per_round: int = 64,
        max_inputs: int = 32,
        seed: int = 0,
        log: Optional[Callable[[str], None]] = None,
        images: Optional[torch.Tensor] = None,
        interleave: str = 'turn',
) -> List[SpeedRow]:
    """Time the dense twin, the sparse and the masked executor of ``model`` per batch size: the dense twin at the
    faster of timm's attention paths, chosen first in rounds of their own (``dense_attention_path``).

    Args:
        model: An AdaViT. With ``policy="random"`` its decisions are reseeded per input, so each input always gets
            the same decisions; with learned gates the decisions follow from the input.
        batch_sizes: Batch sizes to time.
        threads: ``torch.set_num_threads`` for the run (None: leave as is).
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``: weights and inputs are cast to it.
        warmup: Untimed rounds first (on an accelerator, enough for ``ACCELERATOR_WARMUP_CALLS`` calls at least).
        repeats: Timed rounds; the median is reported. The attention paths race in half as many first.
        images_per_round: A round covers about this many images (at least one batch), so that small batches are
            timed over several inputs with different decisions.
        max_inputs: At most this many distinct input batches per round. At batch 1 each input has its own decisions,
            so a round of 32 averages the speed over 32 decision patterns, not over a handful of draws.
        seed: Seed of the random inputs.
        log: Called with a progress line per batch size.
        images: Real (preprocessed) images to time on instead of Gaussian noise, (n, C, H, W); batches cycle through
            them. Learned gates decide from the content, so noise would time (and cost) decisions that real images
            never get.
        interleave: ``"turn"``: each model runs all of a round's inputs in a row, after an untimed call, as a
            deployed model follows itself; ``"input"``: the models take turns on every input, so each call follows
            another model's (``interleaved_times``).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    allocator = pin_allocator() if dev.type == 'cpu' else 'default'  # CUDA tensors come from torch's caching allocator
    cast = DTYPES[dtype]
    model = model.eval().to(dev, cast)
    dense = model.dense_twin().eval().to(dev, cast)
    reseed = model.policy == 'random'
    in_chans = model.patch_embed.proj.in_channels
    height, width = model.patch_embed.img_size
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for batch_size in batch_sizes:
        count = batches_per_round(batch_size, images_per_round, max_inputs)
        if images is not None:
            index = torch.arange(count * batch_size) % images.shape[0]
            inputs = [images[index[i * batch_size:(i + 1) * batch_size]].to(dev, cast) for i in range(count)]
        else:
            inputs = [torch.randn(batch_size, in_chans, height, width, generator=generator).to(dev, cast)
                      for _ in range(count)]
        adaptive_macs = mean_adaptive_macs(model, inputs, reseed)
        with torch.inference_mode():  # as a deployment runs: no autograd bookkeeping on any op, for either model
            dense_attention, path_ms = dense_attention_path(dense, inputs, dev, warmup, repeats, interleave)
            runs: Dict[str, Callable[[int], float]] = {
                'dense': timer(_AttentionPathView(dense, dense_attention == 'fused'), inputs, False, dev)}
            for executor in ('sparse', 'masked'):
                runs[executor] = timer(ExecutorView(model, executor), inputs, reseed, dev)
            times = interleaved_times(runs, count, warmup_rounds(warmup, count, dev), repeats, interleave)
        med = {name: statistics.median(values) for name, values in times.items()}
        dense_g = dense_macs(dense) / 1e9
        mac_ratio = dense_g * 1e9 / adaptive_macs
        round_efficiency = [d / s / mac_ratio for d, s in zip(times['dense'], times['sparse'])]
        ci_low, ci_high = efficiency_interval(times['dense'], times['sparse'], mac_ratio)
        row = SpeedRow(
            batch_size=batch_size, threads=torch.get_num_threads(), device=str(dev), dtype=dtype,
            dense_ms=med['dense'] * 1e3, dense_fused_ms=path_ms['fused'], dense_matmul_ms=path_ms['matmul'],
            dense_attention=dense_attention, sparse_ms=med['sparse'] * 1e3, masked_ms=med['masked'] * 1e3,
            dense_images_per_s=batch_size / med['dense'], sparse_images_per_s=batch_size / med['sparse'],
            masked_images_per_s=batch_size / med['masked'],
            dense_gmacs=dense_g, adaptive_gmacs=adaptive_macs / 1e9, mac_ratio=mac_ratio,
            speedup=med['dense'] / med['sparse'], masked_speedup=med['dense'] / med['masked'],
            efficiency=med['dense'] / med['sparse'] / mac_ratio, efficiency_low=min(round_efficiency),
            efficiency_high=max(round_efficiency), rounds=repeats, allocator=allocator,
            interleave=interleave, efficiency_ci_low=ci_low, efficiency_ci_high=ci_high,
            **{f'{name}_rounds_ms': [t * 1e3 for t in times[name]] for name in ('dense', 'sparse', 'masked')},
        )
        rows.append(row)
        if log is not None:
            log(format_rows([row], header=False))
    return rows


def dense_attention_path(
        dense: nn.Module,
        inputs: List[torch.Tensor],
        device: torch.device,
        warmup: int,
        repeats: int,
        interleave: str = 'turn',
) -> Tuple[str, Dict[str, float]]:
    """Which of timm's attention paths runs ``dense`` faster on ``inputs``: ``"fused"`` or ``"matmul"``, and each one's
    median milliseconds per input, from rounds of their own (``interleaved_times``, ``warmup`` untimed rounds, then
    half of ``repeats``, at least one).

    ``measure_speed`` times the baseline in other rounds than those that chose it: picking the smaller of two medians
    and quoting it, from the same rounds, quotes the noise that made it the smaller one.
    """
    runs = {path: timer(_AttentionPathView(dense, path == 'fused'), inputs, False, device)
            for path in ('fused', 'matmul')}
    times = interleaved_times(runs, len(inputs), warmup_rounds(warmup, len(inputs), device), max(1, repeats // 2),
                              interleave)
    ms = {path: statistics.median(values) * 1e3 for path, values in times.items()}
    return min(ms, key=ms.__getitem__), ms


class _AttentionPathView:
    """Calls timm's dense ``model`` with its fused attention (SDPA) or its matmul path: both from one set of weights."""

    def __init__(self, model: nn.Module, fused: bool) -> None:
        self.model, self.fused = model, fused

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.model.blocks:
            block.attn.fused_attn = self.fused
        return self.model(x)


class ExecutorView:
    """Calls ``model`` with a given executor, restoring the model's own afterwards."""

    def __init__(self, model: AdaViT, executor: str) -> None:
        self.model, self.executor = model, executor

    def reset_random_policy(self, seed: int) -> None:
        self.model.reset_random_policy(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with use_executor(self.model, self.executor):
            return self.model(x)


@contextlib.contextmanager
def use_executor(model: AdaViT, executor: str):
    """Temporarily switch ``model.executor``."""
    previous = model.executor
    model.executor = executor
    try:
        yield model
    finally:
        model.executor = previous


_COLUMNS = (
    ('batch', 'batch_size', '{:d}'), ('thr', 'threads', '{:d}'), ('device', 'device', '{}'), ('dtype', 'dtype', '{}'),
    ('dense img/s', 'dense_images_per_s', '{:.1f}'), ('attn', 'dense_attention', '{}'),
    ('sparse img/s', 'sparse_images_per_s', '{:.1f}'), ('masked img/s', 'masked_images_per_s', '{:.1f}'),
    ('dense ms', 'dense_ms', '{:.1f}'), ('sparse ms', 'sparse_ms', '{:.1f}'), ('GMACs', 'adaptive_gmacs', '{:.3f}'),
    ('dense GMACs', 'dense_gmacs', '{:.3f}'),
    ('MAC ratio', 'mac_ratio', '{:.2f}'), ('speedup', 'speedup', '{:.2f}'), ('masked', 'masked_speedup', '{:.2f}'),
    ('efficiency', 'efficiency', '{:.2f}'), ('95% CI', 'efficiency_ci', '{}'), ('by round', 'efficiency_range', '{}'),
)


def format_rows(rows: Sequence[SpeedRow], header: bool = True) -> str:
    """A fixed-width table of ``rows``."""
    cells = [[fmt.format(getattr(r, key)) for _, key, fmt in _COLUMNS] for r in rows]
    widths = [max([len(title)] + [len(c[i]) for c in cells]) for i, (title, _, _) in enumerate(_COLUMNS)]
    lines = ['  '.join(t.rjust(w) for (t, _, _), w in zip(_COLUMNS, widths))] if header else []
    lines += ['  '.join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return '\n'.join(lines)


def rows_as_dicts(rows: Sequence[SpeedRow]) -> List[dict]:
    return [asdict(r) for r in rows]
