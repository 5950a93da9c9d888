"""Evaluation reports: `report.json`, `plot.png` and a plain-text table.

Generic on purpose: the offline evaluator (protocol.RunResult), the ROS monitor node and
eval-bag all produce "named runs with a per-frame correctness series", so everything here takes
either objects with `to_dict()` (+ a `correct` array) or plain mappings. matplotlib is imported
lazily with the Agg backend so headless robots and CI can write plots.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

REPORT_VERSION = 1
REPORT_FILE = 'report.json'
PLOT_FILE = 'plot.png'

# Keys every run summary in report.json has (documented in docs/results.md).
RUN_KEYS = ('name', 'method', 'mode', 'accuracy', 'frames', 'updates', 'decisions',
            'latency_ms', 'compute_ms_per_frame', 'windows')


# ----------------------------------------------------------------------------------------------
# inputs

def _summary(result) -> dict:
    if hasattr(result, 'to_dict'):
        return result.to_dict()
    if isinstance(result, Mapping):
        return {k: v for k, v in result.items() if k != 'correct'}
    raise TypeError(f'cannot report {type(result).__name__}: need to_dict() or a mapping')


def _series(result) -> tuple[str, np.ndarray] | None:
    """(name, per-frame correctness as float, NaN = unknown) of a result, if it has one."""
    correct = getattr(result, 'correct', None)
    if correct is None and isinstance(result, Mapping):
        correct = result.get('correct')
    if correct is None:
        return None
    name = getattr(result, 'name', None) or (result.get('name') if isinstance(result, Mapping) else None)
    return str(name or 'run'), np.asarray(correct, dtype=float)


def normalize_schedule(schedule) -> list[dict]:
    """Segments as [{start, end, corruption, severity}] from the accepted schedule forms:
    a list of such dicts; of (start, end, label[, severity]) tuples; objects with those
    attributes; or a DriftStream-like object with `schedule()`. Invalid input raises ValueError."""
    if schedule is None:
        return []
    if callable(getattr(schedule, 'schedule', None)):
        schedule = schedule.schedule()
    segs = []
    for item in schedule:
        if isinstance(item, Mapping):
            start = item.get('start')
            end = item.get('end', item.get('stop'))
            label = item.get('corruption', item.get('label', item.get('name', '')))
            sev = item.get('severity')
        elif isinstance(item, (tuple, list)) and len(item) >= 3:
            start, end, label = item[:3]
            sev = item[3] if len(item) > 3 else None
        elif hasattr(item, 'start') and (hasattr(item, 'end') or hasattr(item, 'stop')):
            start = item.start
            end = getattr(item, 'end', getattr(item, 'stop', None))
            label = getattr(item, 'corruption', getattr(item, 'label', getattr(item, 'name', '')))
            sev = getattr(item, 'severity', None)
        else:
            raise ValueError(f'unrecognised schedule segment {item!r}')
        if start is None or end is None or int(end) < int(start):
            raise ValueError(f'bad schedule segment {item!r}')
        segs.append({'start': int(start), 'end': int(end), 'corruption': str(label),
                     'severity': None if sev is None else _num(sev)})
    return segs


def _num(value):
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return int(f) if f.is_integer() else f


# ----------------------------------------------------------------------------------------------
# windows and plot

def windowed(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping window means (NaNs ignored) -> (window centre frame index, mean)."""
    values = np.asarray(values, dtype=float)
    if window < 1:
        raise ValueError('window must be >= 1')
    xs, ys = [], []
    for start in range(0, len(values), window):
        chunk = values[start:start + window]
        if np.isfinite(chunk).any():
            xs.append(start + len(chunk) / 2)
            ys.append(float(np.nanmean(chunk)))
    return np.asarray(xs), np.asarray(ys)


def plot_accuracy(series: Iterable, path, segments=None, window: int = 1000,
                  title: str | None = None, ylabel: str = 'online accuracy (%)') -> Path:
    """Accuracy along the stream, one line per named series, corruption segments shaded.

    `series`: (name, per-frame correctness) pairs, or results accepted by write_report.
    Returns the written path (PNG).
    """
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt

    pairs = []
    for item in series:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            pairs.append((item[0], np.asarray(item[1], dtype=float)))
        else:
            s = _series(item)
            if s is not None:
                pairs.append(s)
    segs = normalize_schedule(segments)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(12, 5), dpi=110)
    # shaded segments, alternating, labelled with their corruption
    for k, seg in enumerate(segs):
        ax.axvspan(seg['start'], seg['end'], color='0.85' if k % 2 == 0 else '0.93', lw=0, zorder=0)
        label = seg['corruption'] + (f" {seg['severity']}" if seg.get('severity') not in (None, 0) else '')
        ax.text((seg['start'] + seg['end']) / 2, 1.01, label, transform=ax.get_xaxis_transform(),
                ha='center', va='bottom', fontsize=7, rotation=30 if len(segs) > 6 else 0)
    # 'method/mode' names: one colour per method, line style per mode (sync dashed), so a
    # method's sync and async runs are told apart at a glance; source is black.
    bases = []
    for name, _ in pairs:
        base = name.split('/')[0]
        if base not in bases:
            bases.append(base)
    palette = plt.get_cmap('tab10')
    styles = {'sync': '--', 'async': '-', 'none': '-'}
    for name, values in pairs:
        xs, ys = windowed(values, window)
        if not len(xs):
            continue
        base, _, mode = name.partition('/')
        color = 'black' if base.startswith('source') else palette(bases.index(base) % 10)
        ax.plot(xs, ys * 100, marker='.' if len(xs) < 60 else None, lw=1.4, label=name,
                color=color, ls=styles.get(mode, '-' if not mode else ':'))
    xmax = max([len(v) for _, v in pairs] + [seg['end'] for seg in segs] + [1])
    ax.set_xlim(0, xmax)
    ax.set_xlabel('frame')
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if pairs:
        ax.legend(loc='lower left', fontsize=8, ncol=2 if len(pairs) > 5 else 1)
    ax.set_title(title or f'accuracy per {window} frames', pad=45 if segs else 6)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=path.name + '.', suffix='.png', dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format='png')
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ----------------------------------------------------------------------------------------------
# table

def _pct(v) -> str:
    return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v * 100:.2f}'


def _ms(v) -> str:
    return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.2f}'


def format_table(results: Sequence, deficits: Mapping | None = None, markdown: bool = False) -> str:
    """One row per run: accuracy, frames dropped/late, updates, decisions, latency, compute."""
    rows = []
    header = ['run', 'acc %', 'acc pred %', 'min win %', 'dropped', 'late', 'applied',
              'decisions', 'lat p50 ms', 'lat p99 ms', 'ms/frame pred', 'ms/frame adapt']
    if deficits:
        header.insert(4, 'worst win vs src')
    for r in results:
        d = _summary(r)
        frames = d.get('frames', {})
        lat = d.get('latency_ms', {})
        comp = d.get('compute_ms_per_frame', {})
        dec = d.get('decisions') or {}
        row = [d.get('name', '?'), _pct(d.get('accuracy')), _pct(d.get('accuracy_predicted')),
               _pct((d.get('windows') or {}).get('min')),
               str(frames.get('dropped', '-')), str(frames.get('late', '-')),
               str((d.get('updates') or {}).get('applied', '-')),
               ' '.join(f'{k}:{v}' for k, v in sorted(dec.items())) or '-',
               _ms(lat.get('p50')), _ms(lat.get('p99')),
               _ms(comp.get('predictor')), _ms(comp.get('adapter'))]
        if deficits:
            w = deficits.get(d.get('name'))
            row.insert(4, '-' if w is None else f"{w['min_diff_points']:+.1f}")
        rows.append(row)
    if markdown:
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
        lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
        return '\n'.join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: '  '.join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return '\n'.join([fmt(header), fmt(['-' * w for w in widths])] + [fmt(r) for r in rows])


# ----------------------------------------------------------------------------------------------
# report

def _clean(obj: Any):
    """JSON-safe: NaN/inf -> None, numpy -> python."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    return str(obj)


def write_report(results: Sequence, out_dir, schedule=None, *, window: int = 1000,
                 meta: Mapping | None = None, extra: Mapping | None = None,
                 plot: bool = True, title: str | None = None) -> dict[str, Path]:
    """Write `report.json` (+ `plot.png` when any result has a per-frame series) into out_dir.

    report.json: {version, created, meta, schedule, runs: [run summaries], **extra}.
    Returns {'report': path, 'plot': path (if written)}. Files are written atomically.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = list(results)
    segs = normalize_schedule(schedule)
    doc = {'version': REPORT_VERSION,
           'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
           'meta': dict(meta or {}), 'schedule': segs,
           'runs': [_summary(r) for r in results]}
    if extra:
        doc.update(extra)
    paths: dict[str, Path] = {}
    report_path = out / REPORT_FILE
    fd, tmp = tempfile.mkstemp(prefix=REPORT_FILE + '.', suffix='.tmp', dir=out)
    with os.fdopen(fd, 'w') as fh:
        json.dump(_clean(doc), fh, indent=1)
    os.replace(tmp, report_path)
    paths['report'] = report_path
    series = [s for s in (_series(r) for r in results) if s is not None]
    if plot and series:
        paths['plot'] = plot_accuracy(series, out / PLOT_FILE, segs, window=window, title=title)
    return paths
