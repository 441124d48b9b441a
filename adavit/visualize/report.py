"""A markdown report that embeds the figures and tabulates the numbers it is given (it computes nothing itself)."""
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def format_value(value: Any) -> str:
    """A number as a report shows it: ints as is, floats with 4 significant digits in positional notation (whole
    numbers from 1e4 up), anything else as ``str``."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1e4:
            return f'{value:.0f}'
        # Positional, 4 significant digits: small costs (a tiny model's GMACs) stay readable as 0.0005952.
        return np.format_float_positional(value, precision=4, unique=False, fractional=False, trim='-')
    if hasattr(value, 'item') and getattr(value, 'ndim', 1) == 0:  # numpy / torch scalars
        return format_value(value.item())
    return str(value).replace('|', '\\|').replace('\n', ' ')


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    lines = ['| ' + ' | '.join(str(h) for h in header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(format_value(v) for v in row) + ' |' for row in rows]
    return lines


def _section(name: str, value: Any) -> List[str]:
    """Markdown for one summary entry: a mapping of mappings or a list of mappings is a table, a flat mapping a
    two-column table, anything else one line."""
    if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
        columns: List[str] = []
        for row in value.values():
            columns += [k for k in row if k not in columns]
        rows = [[key] + [row.get(c, '') for c in columns] for key, row in value.items()]
        return [f'### {name}', ''] + _table([''] + columns, rows) + ['']
    if isinstance(value, Sequence) and not isinstance(value, str) and value and \
            all(isinstance(v, Mapping) for v in value):
        columns = []
        for row in value:
            columns += [k for k in row if k not in columns]
        return [f'### {name}', ''] + _table(columns, [[row.get(c, '') for c in columns] for row in value]) + ['']
    if isinstance(value, Mapping):
        return [f'### {name}', ''] + _table(['', 'value'], list(value.items())) + ['']
    return []


def _is_structured(value: Any) -> bool:
    return isinstance(value, Mapping) or (isinstance(value, Sequence) and not isinstance(value, str))


def write_report(
        out_dir: PathLike,
        summary: Mapping[str, Any],
        figures: Mapping[str, PathLike],
        title: str = 'AdaViT report',
        filename: str = 'report.md',
        notes: Optional[str] = None,
) -> str:
    """Write ``out_dir/filename``: scalar summary entries as one table, structured ones as their own tables, then
    every figure embedded under its name.

    Args:
        out_dir: Directory of the report (created if needed). Figure links are made relative to it, so the report
            and its pictures can be moved together.
        summary: Name -> number/string (collected into a "Summary" table), or name -> mapping (a two-column table), or
            name -> mapping of mappings / list of mappings (a table with one row per entry).
        figures: Caption -> PNG path, in display order.
        title: The report's heading.
        filename: The report's file name.
        notes: Optional markdown paragraph placed after the title.

    Returns:
        The report's path.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    lines: List[str] = [f'# {title}', '']
    if notes:
        lines += [notes.strip(), '']
    scalars: Dict[str, Any] = {k: v for k, v in summary.items() if not _is_structured(v)}
    if scalars:
        lines += ['## Summary', ''] + _table(['', 'value'], list(scalars.items())) + ['']
    structured = [(k, v) for k, v in summary.items() if k not in scalars]
    if structured:
        lines += ['## Details', '']
        for key, value in structured:
            section = _section(key, value)
            lines += section if section else [f'- {key}: ' + ', '.join(format_value(v) for v in value), '']
    if figures:
        lines += ['## Figures', '']
        for caption, path in figures.items():
            rel = os.path.relpath(os.path.abspath(os.fspath(path)), os.path.abspath(out_dir)).replace(os.sep, '/')
            lines += [f'### {caption}', '', f'![{caption}]({rel})', '']
    path = os.path.join(out_dir, filename)
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines).rstrip() + '\n')
    return path
