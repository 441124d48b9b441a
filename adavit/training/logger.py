"""Run logs, written by rank 0 only: a CSV row per epoch, TensorBoard scalars (if installed), final metrics.json."""
import csv
import os
import sys
from typing import Any, Dict, Mapping, Optional

from ..files import write_atomic, write_json


class RunLogger:
    """Per-epoch CSV (``log.csv``), TensorBoard (``tb/``, when ``tensorboard`` is installed) and ``metrics.json``.

    Args:
        output: The run folder.
        enabled: False on every rank but 0, so that only one process writes.
    """

    def __init__(self, output: str, enabled: bool) -> None:
        self.output = output
        self.enabled = enabled
        self.csv_path = os.path.join(output, 'log.csv')
        self._tb: Any = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(output, 'tb'))
            except ImportError:  # optional dependency: pip install adavit[tensorboard]
                self._tb = None

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = 'train') -> None:
        if self.enabled and self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f'{prefix}/{key}', value, step)

    def epoch(self, row: Mapping[str, Any]) -> None:
        """Append one row to log.csv; new columns (e.g. validation after epochs without it) extend the header."""
        if not self.enabled:
            return
        rows = []
        if os.path.isfile(self.csv_path):
            with open(self.csv_path, newline='') as f:
                rows = list(csv.DictReader(f))
        rows.append({k: _fmt(v) for k, v in row.items()})
        fields = []
        for r in rows:
            fields.extend(k for k in r if k not in fields)
        def write(f) -> None:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

        write_atomic(self.csv_path, write, newline='')
        self.scalars({k: v for k, v in row.items() if k not in ('epoch', 'step')}, int(row.get('step', 0)), 'epoch')

    def metrics(self, values: Mapping[str, Any], name: str = 'metrics.json') -> None:
        if not self.enabled:
            return
        write_json(os.path.join(self.output, name), dict(values))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(value: Any) -> Any:
    return f'{value:.6g}' if isinstance(value, float) else value


def progress(iterable: Any, enabled: bool, total: Optional[int], desc: str, initial: int = 0) -> Any:
    """A tqdm bar on an interactive terminal; in a log file, a line every tenth of the way; else the iterable."""
    if not enabled:
        return iterable
    if not sys.stderr.isatty() and not os.environ.get('ADAVIT_FORCE_PROGRESS'):
        return LineProgress(iterable, total, desc, initial) if total else iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False, file=sys.stderr)


class LineProgress:
    """Progress for non-interactive output (nohup, CI logs): ``desc done/total postfix`` every tenth of the way."""

    def __init__(self, iterable: Any, total: int, desc: str, initial: int = 0) -> None:
        self.iterable, self.total, self.desc, self.done = iterable, total, desc, initial
        self.postfix: Dict[str, Any] = {}
        self.every = max(total // 10, 1)

    def set_postfix(self, values: Optional[Mapping[str, Any]] = None, refresh: bool = False, **kwargs: Any) -> None:
        """tqdm's signature: a mapping and/or keywords (evaluation passes keywords)."""
        self.postfix = dict(values or {}, **kwargs)

    def __iter__(self) -> Any:
        for item in self.iterable:
            yield item
            self.done += 1
            if self.done % self.every == 0 and self.done < self.total:
                extra = ' '.join(f'{k} {v}' for k, v in self.postfix.items())
                print(f'{self.desc} {self.done}/{self.total} {extra}', flush=True)

    def close(self) -> None:
        pass


def summary_line(values: Dict[str, Any]) -> str:
    return ' '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in values.items())
