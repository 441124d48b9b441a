"""The Fashion-MNIST demo: fine-tune AdaViT from the dense backbone, evaluate it against the backbone and the Random /
Random+ baselines, time it, and write a report with pictures (``adavit demo``, ``make demo``).

Stages (each prints a header and shows progress bars):

1. fine-tune AdaViT from the backbone with the AdaViT config, shortened (``epochs``, ``max_steps``, ``subset``);
2. evaluate it and the dense backbone on the test set (top-1, mean GMACs under the decisions taken) and time the dense
   twin against the sparse executor at a few batch sizes, on real test images;
3. the baselines: Random (the backbone under random decisions at the AdaViT's cost, no training) and,
   when its checkpoint exists, Random+ (random decisions during fine-tuning too); the shipped AdaViT when present;
4. pictures (kept patches, also for the shipped AdaViT when present; usage, GMACs by class, accuracy vs GMACs from the
   budget knob), ``report.md`` and ``summary.json``.

Everything is computed here; ``adavit.visualize.write_report`` only lays it out.
"""
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .cost.benchmark import machine_info
from .errors import CheckpointError, ConfigError
from .files import write_json
from .gates.budget import random_patch_keep_for_cost
from .training.evaluation import gated_keep_rates

DEFAULT_CONFIG = 'configs/fashion_mnist_adavit.yaml'
DEFAULT_BACKBONE = 'checkpoints/fashion_mnist_backbone.pt'
DEFAULT_SHIPPED = 'checkpoints/fashion_mnist_adavit.pt'
DEFAULT_RANDOM_PLUS = 'checkpoints/fashion_mnist_random_plus.pt'
DEFAULT_OUTPUT = 'runs/demo'
BACKBONE_COMMAND = 'adavit train --config configs/fashion_mnist_backbone.yaml'
# The model-config keys that fix the shapes of the weights: the fine-tuned AdaViT takes them from the backbone, so a
# backbone of another size (a tiny one in tests) needs no matching --set.
SHAPE_KEYS = ('img_size', 'patch_size', 'in_chans', 'num_classes', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio',
              'qkv_bias', 'qk_norm', 'class_token', 'reg_tokens', 'no_embed_class', 'global_pool', 'pos_embed',
              'init_values', 'fc_norm', 'pre_norm')
# The trainer validates after the last epoch; the demo's own evaluation on the test set follows, so a sample is
# enough there and the full pass is not paid twice.
TRAIN_VAL_IMAGES = 1000
KINDS = ('patch', 'head', 'block')


@dataclass
class DemoSettings:
    """What ``run_demo`` does; the defaults are ``make demo``'s: one fine-tuning epoch on all 60k training images,
    evaluation on all 10k test images (5-6 minutes on 2 CPU cores, within the 10 the demo is allowed).

    Attributes:
        config: The AdaViT fine-tuning config (YAML).
        backbone: The dense backbone checkpoint to fine-tune from.
        output: Folder of the demo: ``adavit/`` (the run), ``report.md``, ``summary.json``, PNGs.
        epochs: Fine-tuning epochs (the config's schedule is shortened to this).
        max_steps: Stop fine-tuning after this many optimizer steps (None: the whole epochs).
        subset: Fine-tune on the first N training images (None: all 60k).
        eval_subset: Evaluate on the first N test images (None: all 10k).
        curve_subset: Test images per point of the accuracy-vs-GMACs sweep (None: the evaluation set).
        thresholds: Patch thresholds of the budget-knob sweep.
        batch_sizes: Batch sizes of the throughput measurement.
        warmup: Untimed rounds of the throughput measurement.
        repeats: Timed rounds (median reported).
        threads: ``torch.set_num_threads`` (None: torch's default, one per core).
        data_dir: Folder of the Fashion-MNIST IDX files (None: the config's, else the Debian package's).
        shipped: The shipped AdaViT checkpoint, reported when the file exists.
        random_plus: The Random+ checkpoint, reported when the file exists.
        overlay_images: Test images in the kept-patch figure (one per class, classes in order).
        overrides: Config overrides (``--set``-style mappings), applied before the demo's own.
        override_items: The same as the ``KEY=VALUE`` text given, for the report's commands.
        progress: Show progress bars.
        command: The command line that started the demo, for the report.
    """
    config: str = DEFAULT_CONFIG
    backbone: str = DEFAULT_BACKBONE
    output: str = DEFAULT_OUTPUT
    epochs: int = 1
    max_steps: Optional[int] = None
    subset: Optional[int] = None
    eval_subset: Optional[int] = None
    curve_subset: Optional[int] = 2000
    thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    batch_sizes: Sequence[int] = (1, 256)
    warmup: int = 1
    repeats: int = 3
    threads: Optional[int] = None
    data_dir: Optional[str] = None
    shipped: Optional[str] = DEFAULT_SHIPPED
    random_plus: Optional[str] = DEFAULT_RANDOM_PLUS
    overlay_images: int = 8
    overrides: List[Mapping[str, Any]] = field(default_factory=list)
    override_items: List[str] = field(default_factory=list)
    progress: bool = True
    command: str = 'adavit demo'


def check_inputs(settings: DemoSettings) -> Dict[str, Any]:
    """The backbone checkpoint, read; one-line errors for what would otherwise fail minutes in.

    Raises:
        CheckpointError: The backbone is missing (the message says how to create it) or is not one of ours.
        ConfigError: A setting out of range.
    """
    from .training.checkpoint import read_checkpoint
    if not os.path.isfile(settings.backbone):
        raise CheckpointError(f'backbone {settings.backbone} does not exist: create it with `{BACKBONE_COMMAND}` '
                              f'(about 30 minutes on 2 CPU cores) or pass --backbone PATH')
    if not os.path.isfile(settings.config):
        raise ConfigError(f'config file {settings.config} does not exist: pass --config {DEFAULT_CONFIG}')
    for name in ('epochs', 'warmup', 'overlay_images'):
        if int(getattr(settings, name)) < (0 if name == 'warmup' else 1):
            raise ConfigError(f'--{name.replace("_", "-")} must be a positive integer, got {getattr(settings, name)}')
    if int(settings.repeats) < 1:
        raise ConfigError(f'--repeats must be at least 1, got {settings.repeats}')
    if not settings.batch_sizes or any(int(b) < 1 for b in settings.batch_sizes):
        raise ConfigError(f'--batch-sizes must be positive integers, got {list(settings.batch_sizes)}')
    if not settings.thresholds or any(not 0.0 <= float(t) <= 1.0 for t in settings.thresholds):
        raise ConfigError(f'--thresholds must lie in [0, 1], got {list(settings.thresholds)}')
    return read_checkpoint(settings.backbone)


def finetune_config(settings: DemoSettings, backbone: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The fine-tuning run's config, and the model keys taken from the backbone that differ from the YAML's.

    The YAML file, then the user's overrides, then what the demo decides: the backbone as ``init`` (and teacher),
    its weight shapes, the output folder, the shortened schedule, and no export (``checkpoints/`` is for the full
    runs).
    """
    from .training.builder import model_section
    from .training.config import build_config, read_yaml
    yaml_model = dict(read_yaml(settings.config).get('model') or {})
    for layer in settings.overrides:
        yaml_model.update(dict(layer.get('model') or {}))
    shapes = {k: v for k, v in model_section(backbone['config']).items() if k in SHAPE_KEYS}
    changed = {k: v for k, v in shapes.items() if yaml_model.get(k) != v}
    val_images = min(TRAIN_VAL_IMAGES, settings.eval_subset) if settings.eval_subset else TRAIN_VAL_IMAGES
    data: Dict[str, Any] = {'subset': settings.subset, 'val_subset': val_images}
    if settings.data_dir:
        data['dir'] = settings.data_dir
    train: Dict[str, Any] = {'epochs': int(settings.epochs), 'max_steps': settings.max_steps,
                             'progress': bool(settings.progress), 'export': None}
    if settings.threads:
        train['threads'] = int(settings.threads)
    demo = {'output': os.path.join(settings.output, 'adavit'), 'init': settings.backbone, 'model': shapes,
            'data': data, 'train': train}
    config = build_config(settings.config, list(settings.overrides) + [demo])
    return config, changed


class _Progress:
    """A re-iterable loader that shows a bar on each pass (``budget_curve`` iterates its loader once per setting)."""

    def __init__(self, loader: Any, desc: str, enabled: bool) -> None:
        self.loader, self.desc, self.enabled = loader, desc, enabled

    def __iter__(self) -> Iterator[Any]:
        from .training.logger import progress
        return iter(progress(self.loader, self.enabled, len(self.loader), self.desc))

    def __len__(self) -> int:
        return len(self.loader)


class Demo:
    """One demo run; ``run()`` does the work and returns the summary (also written to ``summary.json``)."""

    def __init__(self, settings: DemoSettings, log: Callable[[str], None] = print) -> None:
        self.s = settings
        self.log = log
        self.seconds: Dict[str, float] = {}
        self.notes: List[str] = []
        self._clock = time.perf_counter()
        # Filled in by the stages, in this order.
        self.eval_batch_size = 256
        self.train_config: Dict[str, Any] = {}
        self.shape_sets: Dict[str, Any] = {}
        self.train_metrics: Dict[str, Any] = {}
        self.model: Optional[nn.Module] = None  # the fine-tuned AdaViT
        self.data_cfg: Dict[str, Any] = {}  # its data section, with the demo's test images and folder
        self.val_set: Any = None
        self.speed_images: Optional[torch.Tensor] = None  # the test images the throughput is measured on
        self.curve_images = 0

    # ----------------------------------------------------------------------------------------------------------------
    # Helpers

    def _stage(self, index: int, text: str) -> None:
        self.log(f'adavit demo [{index}/4] {text} ({time.perf_counter() - self._clock:.0f}s so far)')

    def _bar(self, desc: str) -> Optional[Callable[[Any], Any]]:
        from .training.logger import progress
        if not self.s.progress:
            return None
        return lambda it: progress(it, True, len(it), desc)

    def _eval_data(self) -> Dict[str, Any]:
        """Overrides of a checkpoint's ``data`` section: the demo's test images and data folder."""
        # evaluate_checkpoint ignores None overrides: "all test images" must be said as a number.
        return {'val_subset': self.s.eval_subset or sys.maxsize, 'dir': self.s.data_dir}

    def _val_set(self, model: nn.Module, limit: Optional[int]) -> Any:
        from .data.datasets import build_datasets
        data = dict(self.data_cfg)
        data.update(val_subset=limit or sys.maxsize)
        return build_datasets(data, model, splits=('val',))[0]['val']

    def _loader(self, dataset: Any) -> Any:
        from .training.distributed import DistEnv
        from .training.evaluation import eval_loader
        return eval_loader(dataset, DistEnv(device=torch.device('cpu')), self.eval_batch_size,
                           int(self.data_cfg.get('workers') or 0))

    def _speed(self, model: nn.Module, name: str) -> Dict[str, Dict[str, Any]]:
        from .cost.benchmark import format_rows, measure_speed, rows_as_dicts
        t0 = time.perf_counter()
        rows = measure_speed(model, batch_sizes=[int(b) for b in self.s.batch_sizes], threads=None, device='cpu',
                             warmup=int(self.s.warmup), repeats=int(self.s.repeats), images=self.speed_images)
        self.log(f'{name}: throughput (dense = timm ViT, sparse = AdaViT sparse executor)\n{format_rows(rows)}')
        self.seconds[f'throughput {name}'] = time.perf_counter() - t0
        return {str(r['batch_size']): r for r in rows_as_dicts(rows)}

    def _evaluate_model(self, model: nn.Module, desc: str) -> Dict[str, Any]:
        """``evaluate`` (top-1, keep-rates, per-image MACs) of an in-memory model on the demo's test images."""
        from .training.distributed import DistEnv
        from .training.evaluation import evaluate
        loader = self._loader(self._val_set(model, self.s.eval_subset))
        result = evaluate(model, loader, DistEnv(device=torch.device('cpu')), with_macs=True,
                          progress=self._bar(desc))
        gmacs = np.asarray(result.pop('macs'), dtype=np.float64) / 1e9
        result['gmacs_mean'] = float(gmacs.mean()) if gmacs.size else 0.0
        return result

    # ----------------------------------------------------------------------------------------------------------------
    # Stages

    def finetune(self, backbone: Mapping[str, Any]) -> str:
        from .training.trainer import train
        config, changed = finetune_config(self.s, backbone)
        self.train_config = config
        if changed:
            self.log('adavit demo: model shape from the backbone: ' + ', '.join(f'{k}={v}' for k, v in changed.items()))
        self.shape_sets = changed
        t0 = time.perf_counter()
        metrics = train(config, overwrite=True)  # a rerun of the demo starts the fine-tuning afresh
        self.seconds['fine-tune'] = time.perf_counter() - t0
        self.train_metrics = {k: metrics.get(k) for k in ('epoch', 'step', 'finished', 'seconds')}
        # last.pt holds the final weights whether or not the run stopped inside an epoch (--max-steps); best.pt is
        # chosen on the trainer's small validation sample only.
        return os.path.join(str(config['output']), 'last.pt')

    def evaluate_adavit(self, checkpoint: str) -> Dict[str, Any]:
        from .training.checkpoint import load_model, read_checkpoint
        from .training.evaluation import evaluate_checkpoint
        t0 = time.perf_counter()
        result = evaluate_checkpoint(checkpoint, data=self._eval_data(), batch_size=self.eval_batch_size,
                                     compare_dense=self.s.backbone, progress=self._bar('eval'))
        self.seconds['evaluate AdaViT and dense'] = time.perf_counter() - t0
        self.model = load_model(checkpoint)
        self.data_cfg = dict(read_checkpoint(checkpoint)['config']['data'])
        self.data_cfg.update({k: v for k, v in self._eval_data().items() if v is not None})
        self.val_set = self._val_set(self.model, self.s.eval_subset)
        count = max(int(b) for b in self.s.batch_sizes)
        self.speed_images = torch.stack([self.val_set[i][0] for i in range(min(count, len(self.val_set)))])
        result['throughput'] = self._speed(self.model, 'AdaViT')
        return result

    def random_baseline(self, checkpoint: str, keep: Dict[str, float], target_gmacs: float
                        ) -> Tuple[nn.Module, Dict[str, Any]]:
        """The backbone under random decisions, in the fine-tuned model's shape: heads and sub-blocks at ``keep``'s
        rates, patches at the rate that costs ``target_gmacs`` per image (``random_patch_keep_for_cost``)."""
        from .training.builder import build_model, initialize, model_section
        from .training.checkpoint import attach_data_config, read_checkpoint
        config = read_checkpoint(checkpoint)['config']
        model_cfg = dict(model_section(config), policy='random', random_keep=[keep[k] for k in KINDS])
        model = build_model(model_cfg)
        initialize(model, model_cfg, self.s.backbone)  # backbone weights; the unused decision networks stay fresh
        attach_data_config(model, config)
        model.eval()
        random_patch_keep_for_cost(model, target_gmacs * 1e9)
        t0 = time.perf_counter()
        result = self._evaluate_model(model, 'eval Random')
        self.seconds['evaluate Random'] = time.perf_counter() - t0
        result['throughput'] = self._speed(model, 'Random')
        return model, result

    def optional_checkpoint(self, path: Optional[str], name: str) -> Optional[Dict[str, Any]]:
        """Evaluate and time ``path`` when it exists; else note the skip and return None."""
        from .training.checkpoint import load_model
        from .training.evaluation import evaluate_checkpoint
        if not path or not os.path.isfile(path):
            self.notes.append(f'{name}: skipped, {path or "no checkpoint given"} does not exist.')
            self.log(f'adavit demo: {self.notes[-1]}')
            return None
        t0 = time.perf_counter()
        result = evaluate_checkpoint(path, data=self._eval_data(), batch_size=self.eval_batch_size,
                                     progress=self._bar(f'eval {name}'))
        self.seconds[f'evaluate {name}'] = time.perf_counter() - t0
        model = load_model(path)
        if hasattr(model, 'dense_twin'):
            result['throughput'] = self._speed(model, name)
        return result

    def _shipped_model(self, images: torch.Tensor) -> Optional[nn.Module]:
        """The shipped AdaViT, if it exists and takes ``images`` as they are (same size, channels and normalisation)."""
        from .training.checkpoint import load_model
        if not self.s.shipped or not os.path.isfile(self.s.shipped):
            return None
        model = load_model(self.s.shipped)
        same_input = (tuple(model.patch_embed.img_size) == tuple(images.shape[-2:])
                      and model.patch_embed.proj.in_channels == images.shape[1]
                      and all(tuple(model.pretrained_cfg[k]) == tuple(self.model.pretrained_cfg[k])
                              for k in ('mean', 'std')))
        return model if same_input else None

    def figures(self, points: Mapping[str, Tuple[float, float]]) -> Tuple[Dict[str, str], Any, List[Any]]:
        from .data.datasets import FASHION_MNIST_CLASSES
        from .visualize import (budget_curve, collect, plot_accuracy_vs_gmacs, plot_gmacs_histogram,
                                plot_patch_overlays, plot_usage)
        from .cost.macs import dense_macs
        out, model = self.s.output, self.model
        names = list(self.data_cfg.get('class_names') or FASHION_MNIST_CLASSES)
        t0 = time.perf_counter()
        stats = collect(model, _Progress(self._loader(self.val_set), 'pictures', self.s.progress))
        figures: Dict[str, str] = {}

        # One test image per class, in class order: the overlays then show how the decisions differ by content.
        labels = stats.labels
        picks = [int(np.flatnonzero(labels == c)[0]) for c in range(len(names)) if (labels == c).any()]
        picks = picks[:int(self.s.overlay_images)]
        images = torch.stack([self.val_set[i][0] for i in picks])
        cfg = model.pretrained_cfg
        titles = [f'{names[int(labels[i])]} -> {names[int(stats.preds[i])]}' for i in picks]
        figures['1. Kept patches per layer (one test image per class; label -> prediction)'] = plot_patch_overlays(
            model, images, os.path.join(out, 'patches.png'), titles=titles, mean=cfg['mean'], std=cfg['std'])
        shipped = self._shipped_model(images)
        if shipped is not None:
            # One epoch of fine-tuning leaves the patch gates half-trained; the full recipe's maps are the ones to read.
            figures['1b. Kept patches per layer of the shipped AdaViT (the full recipe), same images'] = \
                plot_patch_overlays(shipped, images, os.path.join(out, 'patches_shipped.png'), class_names=names,
                                    labels=[int(labels[i]) for i in picks], mean=cfg['mean'], std=cfg['std'])
        figures['2. Head usage and MSA/FFN usage per layer'] = plot_usage(stats, os.path.join(out, 'usage.png'))
        dense_g = dense_macs(model) / 1e9
        figures['3. GMACs per test image, by class'] = plot_gmacs_histogram(
            stats.gmacs, stats.labels, names, os.path.join(out, 'gmacs_by_class.png'), dense_gmacs=dense_g)

        curve_set = self.val_set if self.s.curve_subset is None or self.s.curve_subset >= len(self.val_set) \
            else self._val_set(model, self.s.curve_subset)
        settings = [{'patch': float(t)} for t in self.s.thresholds]
        curve = budget_curve(model, _Progress(self._loader(curve_set), 'budget sweep', self.s.progress), settings)
        self.curve_images = len(curve_set)
        figures['4. Accuracy vs GMACs: the run-time budget knob (patch threshold sweep)'] = plot_accuracy_vs_gmacs(
            [(p.gmacs, p.top1) for p in curve], os.path.join(out, 'accuracy_vs_gmacs.png'), points=points,
            curve_label='AdaViT, patch threshold sweep', curve_annotations=[f'p={t:g}' for t in self.s.thresholds])
        self.seconds['pictures'] = time.perf_counter() - t0
        return figures, stats, curve

    # ----------------------------------------------------------------------------------------------------------------
    # The run

    def run(self) -> Dict[str, Any]:
        s = self.s
        backbone = check_inputs(s)
        if s.threads:
            torch.set_num_threads(int(s.threads))
        os.makedirs(s.output, exist_ok=True)
        from .training.config import read_yaml
        self.eval_batch_size = int((read_yaml(s.config).get('train') or {}).get('eval_batch_size') or 256)

        self._stage(1, f'fine-tuning AdaViT from {s.backbone}')
        checkpoint = self.finetune(backbone)

        self._stage(2, 'evaluating AdaViT and the dense backbone on the test set, timing them')
        ada = self.evaluate_adavit(checkpoint)
        ada_keep = gated_keep_rates(ada['keep'], self.model)

        self._stage(3, 'baselines: Random at the AdaViT\'s cost, Random+ and the shipped AdaViT if present')
        random_model, rnd = self.random_baseline(checkpoint, ada_keep, ada['gmacs_mean'])
        plus = self.optional_checkpoint(s.random_plus, 'Random+')
        shipped = self.optional_checkpoint(s.shipped, 'shipped AdaViT')

        self._stage(4, f'pictures and report in {s.output}')
        models = self._models(checkpoint, ada, ada_keep, random_model, rnd, plus, shipped)
        points = {'dense backbone': (models['dense']['gmacs'], 100 * models['dense']['top1']),
                  'AdaViT (demo, default thresholds)': (models['adavit']['gmacs'], 100 * models['adavit']['top1']),
                  'Random': (models['random']['gmacs'], 100 * models['random']['top1'])}
        if 'random_plus' in models:
            points['Random+'] = (models['random_plus']['gmacs'], 100 * models['random_plus']['top1'])
        if 'adavit_shipped' in models:
            points['AdaViT (shipped)'] = (models['adavit_shipped']['gmacs'], 100 * models['adavit_shipped']['top1'])
        figures, stats, curve = self.figures(points)
        self.seconds['total'] = time.perf_counter() - self._clock
        summary = self._summary(models, figures, curve, stats, checkpoint)
        self._write(summary, figures)
        self.log(f'adavit demo: done in {self.seconds["total"]:.0f}s: {os.path.join(s.output, "report.md")}')
        return summary

    def _models(self, checkpoint: str, ada: Dict[str, Any], ada_keep: Dict[str, float], random_model: nn.Module,
                rnd: Dict[str, Any], plus: Optional[Dict[str, Any]], shipped: Optional[Dict[str, Any]]
                ) -> Dict[str, Dict[str, Any]]:
        """The results table as data: top-1 as a fraction, mean GMACs per image, throughput per batch size."""
        speed = ada['throughput']
        models: Dict[str, Dict[str, Any]] = {
            'dense': {'label': 'dense backbone', 'checkpoint': self.s.backbone, 'top1': ada['dense_top1'] / 100,
                      'gmacs': ada['dense_gmacs_mean'],
                      'images_per_s': {b: r['dense_images_per_s'] for b, r in speed.items()}},
            'adavit': self._row('AdaViT (fine-tuned by the demo)', checkpoint, ada),
            'random': self._row('Random (backbone, random decisions, no training)', None, rnd),
        }
        models['adavit'].update(gated_keep=ada_keep, keep=ada['keep'], gmacs_p50=ada['gmacs_p50'],
                                gmacs_p95=ada['gmacs_p95'], dense_gmacs=ada['dense_gmacs'],
                                macs_reduction=ada.get('macs_reduction'))
        models['random'].update(random_keep=dict(zip(KINDS, random_model.random_keep)),
                                gated_keep=gated_keep_rates(rnd['keep'], random_model))
        if plus is not None:
            models['random_plus'] = self._row('Random+ (fine-tuned under random decisions)', self.s.random_plus, plus)
        if shipped is not None:
            models['adavit_shipped'] = self._row('AdaViT (shipped)', self.s.shipped, shipped)
        return models

    @staticmethod
    def _row(label: str, checkpoint: Optional[str], result: Mapping[str, Any]) -> Dict[str, Any]:
        speed = result.get('throughput') or {}
        return {'label': label, 'checkpoint': checkpoint, 'top1': result['top1'] / 100, 'gmacs': result['gmacs_mean'],
                'keep_mean': result.get('keep_mean'),
                'images_per_s': {b: r['sparse_images_per_s'] for b, r in speed.items()},
                'dense_images_per_s': {b: r['dense_images_per_s'] for b, r in speed.items()},
                'speedup': {b: r['speedup'] for b, r in speed.items()},
                'mac_ratio': {b: r['mac_ratio'] for b, r in speed.items()},
                'throughput': speed}

    def _summary(self, models: Dict[str, Dict[str, Any]], figures: Mapping[str, str], curve: Sequence[Any],
                 stats: Any, checkpoint: str) -> Dict[str, Any]:
        s = self.s
        config = self.train_config
        train_cmd = [f'adavit train --config {s.config} --init {s.backbone} --output {config["output"]}',
                     f'--epochs {s.epochs}']
        if s.max_steps:
            train_cmd.append(f'--max-steps {s.max_steps}')
        if s.subset:
            train_cmd.append(f'--subset {s.subset}')
        train_cmd.append(f'--val-subset {config["data"]["val_subset"]}')
        train_cmd += [f'--set {item}' for item in s.override_items]
        train_cmd += [f'--set model.{k}={v}' for k, v in self.shape_sets.items()]
        if s.threads:
            train_cmd.append(f'--threads {s.threads}')
        if s.data_dir:
            train_cmd.append(f'--data-dir {s.data_dir}')
        eval_cmd = f'adavit eval --checkpoint {checkpoint} --compare-dense {s.backbone}'
        if s.eval_subset:
            eval_cmd += f' --subset {s.eval_subset}'
        return {
            'commands': {'demo': s.command, 'fine-tune': ' '.join(train_cmd) + ' --overwrite', 'evaluate': eval_cmd},
            'machine': machine_info(),
            'settings': {'epochs': s.epochs, 'max_steps': s.max_steps, 'subset': s.subset,
                         'test_images': int(stats.num_images), 'curve_images': int(self.curve_images),
                         'thresholds': [float(t) for t in s.thresholds],
                         'batch_sizes': [int(b) for b in s.batch_sizes], 'warmup': s.warmup, 'repeats': s.repeats},
            'fine_tune': self.train_metrics,
            'models': models,
            'budget_curve': [{'thresholds': p.thresholds, 'gmacs': p.gmacs, 'top1': p.top1 / 100} for p in curve],
            'gmacs_by_class': {name: float(stats.gmacs[stats.labels == c].mean())
                               for c, name in enumerate(self.data_cfg.get('class_names') or [])
                               if (stats.labels == c).any()},
            'figures': {caption: os.path.basename(path) for caption, path in figures.items()},
            'notes': list(self.notes),
            'seconds': {k: round(v, 2) for k, v in self.seconds.items()},
        }

    def _write(self, summary: Dict[str, Any], figures: Mapping[str, str]) -> None:
        from .visualize import write_report
        out = self.s.output
        write_json(os.path.join(out, 'summary.json'), summary)
        write_report(out, report_tables(summary), figures, title='AdaViT on Fashion-MNIST: the demo',
                     notes=report_notes(summary))


def report_tables(summary: Mapping[str, Any]) -> Dict[str, Any]:
    """The report's tables: results (top-1, GMACs, throughput), keep-rates, the budget sweep, timings."""
    models = summary['models']
    batch_sizes = [str(b) for b in summary['settings']['batch_sizes']]
    dense_g = models['dense']['gmacs']
    results: Dict[str, Dict[str, Any]] = {}
    for key in ('dense', 'adavit', 'adavit_shipped', 'random', 'random_plus'):
        if key not in models:
            continue
        m = models[key]
        row: Dict[str, Any] = {'top-1 (%)': round(100 * m['top1'], 2), 'GMACs/image': m['gmacs'],
                               'MACs vs dense': m['gmacs'] / dense_g if dense_g else float('nan')}
        for b in batch_sizes:
            row[f'img/s b={b}'] = round(m['images_per_s'].get(b, float('nan')), 1)
            if key != 'dense':
                row[f'speedup b={b}'] = round(m['speedup'].get(b, float('nan')), 2)
        results[m['label']] = row
    keep = {models[k]['label']: {f'{kind} kept': round(models[k]['gated_keep'][kind], 3) for kind in KINDS}
            for k in ('adavit', 'random')}
    keep[models['random']['label']].update({f'{kind} target': round(models['random']['random_keep'][kind], 3)
                                            for kind in KINDS})
    curve = [{'patch threshold': p['thresholds']['patch'], 'GMACs/image': p['gmacs'],
              'top-1 (%)': round(100 * p['top1'], 2)} for p in summary['budget_curve']]
    return {
        'Results on the Fashion-MNIST test set': results,
        'Keep-rates where decisions are made (Random draws heads and sub-blocks at the AdaViT\'s rates, patches '
        'at its cost)': keep,
        f'Budget knob ({summary["settings"]["curve_images"]} test images)': curve,
        'Seconds per stage': summary['seconds'],
    }


def report_notes(summary: Mapping[str, Any]) -> str:
    """The paragraph under the report's title: what ran, how, and on what."""
    s, m, c = summary['settings'], summary['machine'], summary['commands']
    steps = summary['fine_tune'].get('step')
    lines = [
        f'AdaViT fine-tuned from the dense backbone for {steps} steps ({s["epochs"]} epoch(s) on '
        f'{s["subset"] or "all"} training images), evaluated on {s["test_images"]} test images. '
        'top-1 and GMACs (multiply-adds per image, under each image\'s own decisions) come from the sparse '
        'executor; throughput is the median of '
        f'{s["repeats"]} interleaved rounds after {s["warmup"]} warm-up, on real test images: "img/s" of the dense '
        'backbone is timm\'s plain ViT, of the others AdaViT\'s sparse executor; "speedup" divides by the dense ViT '
        'timed in the same rounds.',
        '',
        f'Machine: {m["cpu"]}, {m["cores"]} CPU cores, {m["threads"]} torch threads, torch {m["torch"]}, '
        f'timm {m["timm"]}, Python {m["python"]} ({m["platform"]}).',
        '',
        'Commands:',
        '',
        '```',
        c['demo'],
        '# what it ran, stage by stage:',
        c['fine-tune'],
        c['evaluate'],
        '```',
    ]
    notes = list(summary.get('notes') or [])
    if s['curve_images'] != s['test_images']:
        notes.append(f'The budget-knob curve (figure 4) runs on the first {s["curve_images"]} test images (one pass '
                     f'per threshold); the other points on all {s["test_images"]} evaluation images.')
    if notes:
        lines += [''] + [f'- {note}' for note in notes]
    return '\n'.join(lines)


def run_demo(settings: DemoSettings, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the demo (see the module docstring); returns the summary also written to ``summary.json``.

    Raises:
        CheckpointError: The backbone is missing (the message says how to create it).
    """
    return Demo(settings, log).run()
