"""A training run, end to end: setup, (resume), epochs, validation, checkpoints, logs.

Everything that can be wrong with the inputs (config, data, ``--init``, the output folder) is checked before the first
file is written, so a bad invocation fails with one line and leaves any existing run untouched.
"""
import os
import random
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..losses.usage import AdaViTLoss
from ..model.adavit import AdaViT, gate_keys
from .builder import InitInfo, build_model, build_teacher, initialize, is_gated
from .checkpoint import (FORMAT, capture_rng, list_ranks, plain_state, read_checkpoint, restore_rng, save_atomic,
                         weights_hash)
from .config import save_yaml
from .distributed import DistEnv, all_gather_objects, barrier, init_distributed, shutdown
from .evaluation import eval_loader, evaluate
from .logger import RunLogger, progress, summary_line
from .loop import StepState, TrainParts, epoch_loader, steps_per_epoch, train_one_epoch

DEBUG_HASH_ENV = 'ADAVIT_DEBUG_WEIGHTS_HASH'  # set to 1: every rank prints its final weight hash (tests)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def amp_dtype(setting: Any, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``train.amp``: bf16 anywhere; fp16 on CUDA (on CPU, bf16 instead)."""
    if setting in (None, False, 'none'):
        return None
    if setting == 'fp16' and device.type == 'cuda':
        return torch.float16
    return torch.bfloat16


def param_groups(model: nn.Module, weight_decay: float, gate_lr_scale: float) -> List[Dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings; decision networks at their own lr scale."""
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    groups: Dict[Any, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in skip
        gate = any(g in name for g in ('.patch_gate.', '.head_gate.', '.block_gate.'))
        key = (decay, gate)
        if key not in groups:
            groups[key] = {'params': [], 'weight_decay': weight_decay if decay else 0.0,
                           'lr_scale': gate_lr_scale if gate else 1.0}
        groups[key]['params'].append(p)
    return [groups[k] for k in sorted(groups)]


def resolve_resume(path: str) -> str:
    """``--resume`` takes a checkpoint or a run folder (its ``last.pt``)."""
    return os.path.join(path, 'last.pt') if os.path.isdir(path) else path


def train(config: Dict[str, Any], resume: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Train as ``config`` says (joining torchrun's process group, if any); return the final metrics.

    Args:
        config: The resolved config (``adavit.training.config.build_config``).
        resume: A checkpoint (or run folder) to continue from, exactly where it stopped.
        overwrite: Start afresh in an output folder that already holds a run.
    """
    env = init_distributed(str(config['train']['device']))
    try:
        return Trainer(config, env, resume, overwrite).run()
    finally:
        shutdown(env)


class Trainer:
    """One run; ``run()`` does the work. Only rank 0 writes files."""

    def __init__(self, config: Dict[str, Any], env: DistEnv, resume: Optional[str], overwrite: bool) -> None:
        self.config = config
        self.env = env
        self.tc = config['train']
        self.output = str(config['output'])
        self.resume_path = resolve_resume(resume) if resume else None
        self.overwrite = overwrite

    # ----------------------------------------------------------------------------------------------------------------
    # Setup (no file written until everything checked out)

    def _setup(self) -> None:
        tc, env, config = self.tc, self.env, self.config
        if tc['export_from'] not in ('best', 'last'):  # checked now, not after the run
            raise ConfigError(f"train.export_from must be 'best' or 'last', got {tc['export_from']!r}")
        if tc['threads']:
            torch.set_num_threads(int(tc['threads']))
        if tc['deterministic']:
            os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        checkpoint = read_checkpoint(self.resume_path) if self.resume_path else None
        last = os.path.join(self.output, 'last.pt')
        if checkpoint is None and os.path.exists(last) and not self.overwrite:
            raise ConfigError(f'{self.output} already holds a run (last.pt): pass --resume {self.output} to continue '
                              f'it, --overwrite to start afresh, or another --output')

        seed = int(config['seed'])
        seed_everything(seed)  # the same initial weights on every rank
        model_cfg = dict(config['model'])
        self.model = build_model(model_cfg)
        self.gated = is_gated(self.model)
        self.init_info: Optional[InitInfo] = None
        if checkpoint is not None:
            self.init_info = InitInfo(checkpoint.get('init'), checkpoint.get('backbone'), False)
        elif config['init']:
            self.init_info = initialize(self.model, model_cfg, str(config['init']))
            if self.init_info.head_reset and env.is_main:
                print(f'adavit train: the classifier of {config["init"]} does not fit {self.model.num_classes} '
                      f'classes; it starts from scratch')
        lc = config['loss']
        self.teacher = None
        if lc['distill_weight'] and float(lc['distill_weight']) > 0:
            source = lc['teacher'] or (self.init_info.backbone if self.init_info else None) or config['init']
            if not source:
                raise ConfigError('distillation (loss.distill_weight > 0) needs a teacher: pass --init BACKBONE '
                                  'or loss.teacher=CHECKPOINT')
            self.teacher = build_teacher(model_cfg, str(source), env.device)

        datasets, classes = self._datasets(seed)
        self.train_set, self.val_set = datasets['train'], datasets['val']
        config['data']['class_names'] = classes
        self.steps_in_epoch = steps_per_epoch(len(self.train_set), env, int(tc['batch_size']))
        if self.steps_in_epoch < 1:
            raise ConfigError(f'{len(self.train_set)} training images make no batch of {tc["batch_size"]} per process '
                              f'on {env.world_size} process(es): lower --batch-size or raise --subset')
        self.total_steps = self.steps_in_epoch * int(tc['epochs'])

        self.model.to(env.device)
        if isinstance(self.model, AdaViT) and self.model.policy == 'learned' and self.model.train_decisions == 'eval':
            # Noise-free decisions pass no gradient to the decision networks: freeze them, so that the optimizer
            # leaves them as they are (no weight decay either) and DDP sees no parameter without a gradient.
            for name in gate_keys(self.model):
                self.model.get_parameter(name).requires_grad_(False)
        if isinstance(self.model, AdaViT) and self.model.policy == 'random':
            self.model.reset_random_policy(self.model.random_seed + env.rank)  # ranks draw different decisions
        self.optimizer = torch.optim.AdamW(param_groups(self.model, float(tc['weight_decay']),
                                                        float(tc['gate_lr_scale'])),
                                           lr=float(tc['lr']), betas=tuple(tc['betas']))
        from timm.scheduler import CosineLRScheduler
        warmup = int(round(float(tc['warmup_epochs']) * self.steps_in_epoch))
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=max(self.total_steps, 1),
                                           lr_min=float(tc['min_lr']), warmup_t=warmup,
                                           warmup_lr_init=float(tc['warmup_lr']), t_in_epochs=False)
        self.amp = amp_dtype(tc['amp'], env.device)
        self.scaler = torch.amp.GradScaler('cuda') if self.amp == torch.float16 else None
        self.ema = None
        if tc['ema']:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=float(tc['ema_decay']))

        self.state = StepState(epoch=0, batch_in_epoch=0, step=0)
        self.best_top1 = -1.0
        self.history: List[Dict[str, Any]] = []
        self.last_val: Dict[str, Any] = {}  # the latest validation, kept when a resume has nothing left to do
        if checkpoint is not None:
            self._load_state(checkpoint)
        # The per-rank RNG streams (Gumbel noise, mixup, dropout): restored from a checkpoint, else seeded anew.
        rng = list_ranks(checkpoint['rng'], env.rank) if checkpoint is not None and checkpoint.get('rng') else None
        if rng is not None:
            restore_rng(rng)
            if rng.get('random_policy') is not None and getattr(self.model, '_generator', None) is not None:
                self.model._generator.set_state(rng['random_policy'])
        else:
            seed_everything(seed + 1000 * env.rank + 1)

        self.train_model: nn.Module = self.model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[env.local_rank] if env.device.type == 'cuda' else None)
        if tc['compile']:
            self.train_model = torch.compile(self.train_model)

        self.task_loss, self.mixup = self._task_loss()
        self.criterion = AdaViTLoss(task_loss=self.task_loss, budgets=lc['budgets'], weights=lc['weights'],
                                    form=lc['form'], distill_weight=float(lc['distill_weight'] or 0.0),
                                    distill_temperature=float(lc['distill_temperature'])) if self.gated else None
        if self.teacher is not None and not self.gated:
            self.criterion = None  # a dense student distils through the task loss only
            self.teacher = None

        # Inputs are good: now the run folder may be written.
        if env.is_main:
            os.makedirs(self.output, exist_ok=True)
            save_yaml(config, os.path.join(self.output, 'config.yaml'))
            if checkpoint is None:  # a fresh start (--overwrite): the old run's log would mix with this one's
                for name in ('log.csv', 'metrics.json'):
                    if os.path.exists(os.path.join(self.output, name)):
                        os.unlink(os.path.join(self.output, name))
        barrier(env)
        self.logger = RunLogger(self.output, env.is_main)

    def _datasets(self, seed: int) -> Any:
        from ..data.datasets import build_datasets
        datasets, classes = build_datasets(self.config['data'], self.model, seed)
        num_classes = getattr(self.model, 'num_classes', None)
        if num_classes != len(classes):
            raise ConfigError(f'the dataset has {len(classes)} classes but model.num_classes is {num_classes}: set '
                              f'model.num_classes={len(classes)} (--set model.num_classes={len(classes)})')
        return datasets, classes

    def _task_loss(self) -> Any:
        tc = self.tc
        smoothing = float(tc['label_smoothing'] or 0.0)
        if float(tc['mixup'] or 0) > 0 or float(tc['cutmix'] or 0) > 0:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy
            if int(tc['batch_size']) % 2:
                raise ConfigError('mixup/cutmix needs an even train.batch_size')
            mixup = Mixup(mixup_alpha=float(tc['mixup'] or 0), cutmix_alpha=float(tc['cutmix'] or 0),
                          prob=float(tc['mixup_prob']), label_smoothing=smoothing,
                          num_classes=int(self.model.num_classes))
            return SoftTargetCrossEntropy(), mixup
        return nn.CrossEntropyLoss(label_smoothing=smoothing), None

    def _load_state(self, checkpoint: Dict[str, Any]) -> None:
        from .builder import load_strict
        load_strict(self.model, checkpoint['model'], str(self.resume_path))
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        if checkpoint.get('scheduler'):
            self.scheduler.load_state_dict(checkpoint['scheduler'])
        if self.scaler is not None and checkpoint.get('scaler'):
            self.scaler.load_state_dict(checkpoint['scaler'])
        if self.ema is not None:
            if checkpoint.get('model_ema') is not None:
                self.ema.module.load_state_dict(checkpoint['model_ema'])
            else:
                self.ema.set(self.model)
        self.state = StepState(int(checkpoint['epoch']), int(checkpoint['batch_in_epoch']), int(checkpoint['step']))
        self.best_top1 = float(checkpoint.get('best_top1', -1.0))
        self.history = list(checkpoint.get('history', []))
        self.last_val = dict(checkpoint.get('metrics') or {})
        self.scheduler.step_update(num_updates=self.state.step)

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def _payload(self, rng: List[Dict[str, Any]], metrics: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return {
            'format': FORMAT,
            'model': self.model.state_dict(),
            'model_ema': self.ema.module.state_dict() if self.ema is not None else None,
            'config': self.config,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': plain_state(self.scheduler.state_dict()),
            'scaler': self.scaler.state_dict() if self.scaler is not None else None,
            'epoch': self.state.epoch,
            'batch_in_epoch': self.state.batch_in_epoch,
            'step': self.state.step,
            'steps_per_epoch': self.steps_in_epoch,
            'world_size': self.env.world_size,
            'rng': rng,
            'best_top1': self.best_top1,
            'history': self.history,
            'metrics': metrics or {},
            'init': self.config['init'] if self.init_info is None else self.init_info.source,
            'backbone': self.init_info.backbone if self.init_info is not None else None,
        }

    def save(self, names: List[str], metrics: Optional[Dict[str, Any]] = None) -> None:
        """Write the checkpoint as each of ``names`` (collective: every rank contributes its RNG state)."""
        rng = capture_rng()
        generator = getattr(self.model, '_generator', None)
        rng['random_policy'] = generator.get_state() if generator is not None else None
        ranks = all_gather_objects(self.env, rng)
        if self.env.is_main:
            payload = self._payload(ranks, metrics)
            for name in names:
                save_atomic(payload, os.path.join(self.output, name))
        barrier(self.env)

    # ----------------------------------------------------------------------------------------------------------------
    # The run

    def run(self) -> Dict[str, Any]:
        self._setup()
        tc, env = self.tc, self.env
        epochs, max_steps = int(tc['epochs']), tc['max_steps']
        save_every = tc['save_every']
        show = bool(tc['progress']) and env.is_main
        parts = TrainParts(self.train_model, self.model, self.criterion, self.task_loss, self.optimizer,
                           self.scheduler, self.scaler, self.ema, self.mixup, self.teacher, self.amp,
                           float(tc['clip_grad']) if tc['clip_grad'] else None, self.gated)

        def on_step(state: StepState) -> None:
            if save_every and state.step % int(save_every) == 0 and state.batch_in_epoch < self.steps_in_epoch:
                self.save(['last.pt'])

        if env.is_main:
            print(f'adavit train: {type(self.model).__name__} '
                  f'{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, {len(self.train_set)} '
                  f'train / {len(self.val_set)} val images, {env.world_size} process(es) on {env.device.type}, '
                  f'{self.steps_in_epoch} steps/epoch, epoch {self.state.epoch} step {self.state.step} -> '
                  f'{self.output}', flush=True)
        val: Dict[str, Any] = self.last_val
        started = time.perf_counter()
        while self.state.epoch < epochs and not (max_steps is not None and self.state.step >= max_steps):
            epoch = self.state.epoch
            self.train_set.transform.epoch = epoch  # seeds this epoch's augmentation
            loader = epoch_loader(self.train_set, env, int(tc['batch_size']), int(self.config['seed']), epoch,
                                  self.state.batch_in_epoch, int(self.config['data']['workers']))
            t0, first_batch = time.perf_counter(), self.state.batch_in_epoch

            def bar(it: Any, total: int, initial: int) -> Any:
                return progress(it, show, total, f'epoch {epoch + 1}/{epochs}', initial)

            stats = train_one_epoch(parts, loader, env, self.state, self.steps_in_epoch, max_steps, on_step, bar)
            seconds = time.perf_counter() - t0
            if self.state.batch_in_epoch < self.steps_in_epoch:
                self.save(['last.pt'])  # stopped by max_steps inside the epoch: resume continues from here
                break
            row: Dict[str, Any] = {'epoch': epoch + 1, 'step': self.state.step,
                                   'lr': self.optimizer.param_groups[0]['lr']}
            row.update(stats.reduced(env))
            row['epoch_seconds'] = seconds
            row['img_per_s'] = (self.state.batch_in_epoch - first_batch) * int(tc['batch_size']) * env.world_size \
                / max(seconds, 1e-9)
            last_epoch = epoch + 1 == epochs or (max_steps is not None and self.state.step >= max_steps)
            names = ['last.pt']
            if (epoch + 1) % int(tc['eval_every']) == 0 or last_epoch:
                val = self.validate()
                row.update({'val_top1': val['top1'], 'val_top5': val['top5'], 'val_loss': val['loss']})
                if self.gated:
                    row.update({f'val_keep_{k}': v for k, v in val['keep_mean'].items()})
                if val['top1'] > self.best_top1:
                    self.best_top1 = val['top1']
                    names.append('best.pt')
            self.history.append(row)
            self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
            self.logger.epoch(row)
            self.save(names, metrics=val)
            if env.is_main:
                print(f'adavit train: {summary_line(row)}', flush=True)

        final = self._finish(val, time.perf_counter() - started)
        return final

    def validate(self) -> Dict[str, Any]:
        model = self.ema.module if self.ema is not None else self.model
        loader = eval_loader(self.val_set, self.env, int(self.tc['eval_batch_size']),
                             int(self.config['data']['workers']))
        show = bool(self.tc['progress']) and self.env.is_main
        # Full precision: validation is cheap next to training, and the sparse executor's row scatter
        # (index_add_) does not take autocast's mixed dtypes.
        return evaluate(model, loader, self.env, None,
                        progress=(lambda it: progress(it, True, None, 'val')) if show else None)

    def _finish(self, val: Dict[str, Any], seconds: float) -> Dict[str, Any]:
        env = self.env
        if os.environ.get(DEBUG_HASH_ENV):
            print(f'adavit-weights-sha256 rank={env.rank} step={self.state.step} {weights_hash(self.model)}',
                  flush=True)
        metrics = {
            'epoch': self.state.epoch, 'step': self.state.step, 'finished': self.state.epoch >= int(self.tc['epochs']),
            'best_top1': self.best_top1 if self.best_top1 >= 0 else None, 'seconds': seconds,
            'world_size': env.world_size, 'final': {k: v for k, v in val.items() if k != 'macs'},
            'history': self.history,
        }
        export = self.tc['export']
        if export and metrics['finished'] and env.is_main:
            self._export(str(export))
            metrics['export'] = str(export)
        self.logger.metrics(metrics)
        self.logger.close()
        barrier(env)
        return metrics

    def _export(self, path: str) -> None:
        """The best (or, by ``train.export_from``, the last) weights, EMA ones if kept, and the config, without
        optimizer state: the input of the next stage."""
        best = os.path.join(self.output, 'best.pt')
        use_best = self.tc['export_from'] == 'best' and os.path.isfile(best)
        checkpoint = read_checkpoint(best if use_best else os.path.join(self.output, 'last.pt'))
        slim = {key: checkpoint.get(key) for key in ('format', 'model', 'model_ema', 'config', 'epoch', 'step',
                                                     'best_top1', 'metrics', 'init', 'backbone')}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_atomic(slim, path)
        print(f'adavit train: exported {path}', flush=True)
