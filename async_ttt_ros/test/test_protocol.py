"""Realistic online evaluation (core/protocol.py), report files (core/report.py), `async-ttt eval`.

Real trained model, real Fashion-MNIST-C frames, real adaptation. Small streams (<= 1.5k frames)
and one torch thread. Where a test asserts exact frame counts it uses fixed virtual costs
(ProtocolConfig.fixed_costs): counts must not depend on how loaded the machine is; measured-cost
runs only assert what holds whatever the timing.
"""
import json

import numpy as np
import pytest
import torch

from async_ttt_ros.core import protocol, report
from async_ttt_ros.core.protocol import ProtocolConfig, run_protocol
from async_ttt_ros.core.streams import make_stream
from async_ttt_ros.core.training import load_or_train

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def model():
    return load_or_train(log=None)


@pytest.fixture(scope='module')
def drift():
    """Short continual drift stream over three severe corruptions."""
    return make_stream('continual', 900, seed=3, severity=5,
                       corruptions=['gaussian_noise', 'contrast', 'brightness'])


@pytest.fixture(scope='module')
def noise():
    return make_stream('continual', 1500, seed=1, severity=5, corruptions=['gaussian_noise'])


def test_none_mode_equals_offline_accuracy(model, drift):
    res = run_protocol(model, drift, 'source', 'none', config=ProtocolConfig(rate_hz=30))
    # per-frame offline predictions of the source model on the very same frames
    from async_ttt_ros.core.model import preprocess
    correct = []
    with torch.inference_mode():
        for batch in drift.batches(128):
            pred = model(preprocess(np.asarray(batch.images))).argmax(1).numpy()
            correct.append(pred == np.asarray(batch.labels))
    correct = np.concatenate(correct)
    assert len(correct) == res.n == len(drift)
    # batch-1 vs batch-128 float order may flip an exact tie at most on a frame or two
    assert (res.correct != correct).sum() <= 2
    assert abs(res.accuracy - protocol.offline_accuracy(model, drift)) <= 2 / len(drift)
    assert res.counts['applied'] == 0 and (res.version == 0).all()
    # every frame is either predicted or dropped, and latency exists exactly for predicted ones
    assert res.predicted.sum() + (~res.predicted).sum() == res.n
    assert np.isfinite(res.latency_s[res.predicted]).all()
    assert np.isnan(res.latency_s[~res.predicted]).all()
    # the model handed in is not modified by the run
    assert model.training is False
    # CPU-time clock: same frames, same predictions
    cpu = run_protocol(model, drift, 'source', 'none', config=ProtocolConfig(clock='cpu'))
    assert np.array_equal(cpu.correct, res.correct) and cpu.compute_s['forward'] > 0
    with pytest.raises(ValueError):
        ProtocolConfig(clock='sundial').validate()


def test_none_mode_fast_predictor_never_drops(model, drift):
    cfg = ProtocolConfig(rate_hz=30, fixed_costs={'forward': 0.002})
    res = run_protocol(model, drift, 'source', 'none', config=cfg)
    d = res.to_dict()
    assert d['frames'] == {'total': 900, 'predicted': 900, 'on_time': 900, 'late': 0, 'dropped': 0}
    assert d['latency_ms']['p50'] == pytest.approx(2.0) and d['latency_ms']['p99'] == pytest.approx(2.0)


def test_none_mode_slow_predictor_drops_and_is_late(model, drift):
    # forward 25 ms at 100 Hz (10 ms/frame): predict one, newest frame waits, the rest drop
    cfg = ProtocolConfig(rate_hz=100, fixed_costs={'forward': 0.025})
    res = run_protocol(model, drift, 'source', 'none', config=cfg)
    d = res.to_dict()['frames']
    assert d['dropped'] > 0 and d['late'] > 0
    assert d['predicted'] + d['dropped'] == 900
    # throughput bound: at most one prediction per 25 ms over the 9 s stream (+ the last one)
    assert d['predicted'] <= 9.0 / 0.025 + 2
    # dropped frames are scored by the (only) model: accuracy still equals the offline one
    assert abs(res.accuracy - protocol.offline_accuracy(model, drift)) <= 2 / 900


def test_sync_mode_counts_late_and_dropped_frames(model, drift):
    # 100 Hz, forward 1 ms, an update every 16 frames costing 50 ms: each update blocks the
    # predictor for 5 frame periods -> exactly 1 late (the newest queued) + 4 dropped per update
    cfg = ProtocolConfig(rate_hz=100, batch_size=16,
                         fixed_costs={'forward': 0.001, 'ingest': 0.0, 'step': 0.05, 'apply': 0.0})
    res = run_protocol(model, drift, 'norm', 'sync', config=cfg)
    d = res.to_dict()
    steps = res.counts['steps']
    assert steps > 10
    assert d['frames']['late'] == steps or d['frames']['late'] == steps - 1
    assert d['frames']['dropped'] == pytest.approx(4 * steps, abs=4)
    assert d['frames']['predicted'] + d['frames']['dropped'] == 900
    # sync applies its deltas inline: versions only grow along the stream
    assert res.counts['applied'] > 0
    assert np.all(np.diff(res.version) >= 0)
    # measured costs at a high rate: a real adaptation step is far longer than a 1 ms frame
    measured = run_protocol(model, drift, 'tent', 'sync',
                            config=ProtocolConfig(rate_hz=1000, batch_size=16))
    md = measured.to_dict()['frames']
    assert md['dropped'] > 0
    assert md['predicted'] + md['dropped'] == 900
    assert measured.compute_s['step'] > 0


def test_async_applies_increasing_versions_and_beats_source(model, noise):
    source = run_protocol(model, noise, 'source', 'none')
    res = run_protocol(model, noise, 'norm', 'async', config=ProtocolConfig(rate_hz=30))
    versions = np.asarray(res.applied_versions)
    assert len(versions) >= 5
    assert np.all(np.diff(versions) > 0)
    assert np.all(np.diff(res.version) >= 0) and res.version[-1] == versions[-1]
    # the real lag: nothing can be applied before the first batch was even collected
    assert (res.version[:64] == 0).all()
    assert res.decisions.get('accept', 0) >= len(versions)
    # async keeps perception unblocked: no drops at 30 Hz with a ~1 ms forward
    assert res.counts['steps'] >= len(versions)
    print(f'\nsource {source.accuracy:.3f}  norm/async {res.accuracy:.3f}  '
          f'({len(versions)} deltas applied)')
    assert res.accuracy > source.accuracy + 0.10


def test_async_refused_deltas_leave_the_served_model_untouched(model, drift):
    # a ServedModel bound far below any real delta: every proposal is refused, counted, and the
    # served model stays the source (frame-for-frame the same predictions as mode none)
    cfg = ProtocolConfig(rate_hz=30, max_delta_norm=1e-6)
    res = run_protocol(model, drift, 'norm', 'async', config=cfg)
    source = run_protocol(model, drift, 'source', 'none', config=cfg)
    assert res.counts['sent'] > 0
    assert res.counts['refused'] + res.counts['in_flight_at_end'] == res.counts['sent']
    assert res.counts['applied'] == 0 and (res.version == 0).all()
    assert any('norm' in reason for reason in res.refusals)
    assert np.array_equal(res.correct, source.correct)


def test_async_with_reputation_runs_the_gate(model, drift):
    res = run_protocol(model, drift, 'tent+rep', 'async', config=ProtocolConfig(rate_hz=30))
    assert res.gate is True and res.name == 'tent+rep/async'
    assert 0 < sum(res.decisions.values()) <= res.counts['steps']
    assert set(res.decisions) <= {'accept', 'hold', 'rollback', 'reset'}
    assert res.counts['proposals'] > 0


def test_determinism_of_stream_and_metrics(model, drift):
    again = make_stream('continual', 900, seed=3, severity=5,
                        corruptions=['gaussian_noise', 'contrast', 'brightness'])
    cfg = ProtocolConfig(rate_hz=30, batch_size=32,
                         fixed_costs={'forward': 0.001, 'ingest': 0.0, 'step': 0.02, 'apply': 0.0})
    a = run_protocol(model, drift, 'norm', 'async', config=cfg)
    b = run_protocol(model, again, 'norm', 'async', config=cfg)
    assert a.corruption == b.corruption
    assert np.array_equal(a.correct, b.correct)
    assert np.array_equal(a.version, b.version)
    assert a.counts == b.counts and a.decisions == b.decisions
    da, db = a.to_dict(), b.to_dict()
    assert da['frames'] == db['frames'] and da['windows'] == db['windows']
    assert da['segments'] == db['segments']
    # segments follow the schedule: three corruptions, in order, covering the stream
    segs = da['segments']
    assert [s['corruption'] for s in segs] == ['gaussian_noise', 'contrast', 'brightness']
    assert segs[0]['start'] == 0 and segs[-1]['end'] == 900
    # a different seed gives different frames
    other = make_stream('continual', 900, seed=4, severity=5,
                        corruptions=['gaussian_noise', 'contrast', 'brightness'])
    c = run_protocol(model, other, 'source', 'none', config=cfg)
    assert not np.array_equal(c.correct, a.correct)


def test_window_means_and_segments():
    correct = np.array([1] * 10 + [0] * 10 + [1] * 4, float)
    assert protocol.window_means(correct, 10).tolist() == [1.0, 0.0]       # 4-frame tail < half
    assert protocol.window_means(correct, 8).tolist() == [1.0, 0.25, 0.5]
    segs = protocol.segments_from_labels(['a', 'a', 'b', 'b', 'a'], [5, 5, 5, 5, 5])
    assert [(s['start'], s['end'], s['corruption']) for s in segs] == [(0, 2, 'a'), (2, 4, 'b'), (4, 5, 'a')]
    assert protocol.plan_runs(['source', 'tent', 'safe', 'tent+rep'], ['none', 'sync', 'async']) == [
        ('source', 'none', False), ('tent', 'sync', False), ('tent', 'async', False),
        ('safe', 'sync', True), ('safe', 'async', True), ('tent', 'sync', True), ('tent', 'async', True)]
    with pytest.raises(ValueError):
        protocol.plan_runs(['tent'], ['later'])
    with pytest.raises(ValueError):
        ProtocolConfig(rate_hz=0).validate()


def test_report_json_keys_and_png(model, drift, tmp_path):
    cfg = ProtocolConfig(rate_hz=30, window=200)
    results = [run_protocol(model, drift, 'source', 'none', config=cfg),
               run_protocol(model, drift, 'norm', 'async', config=cfg)]
    paths = report.write_report(results, tmp_path, schedule=[(0, 300, 'gaussian_noise', 5),
                                                             (300, 600, 'contrast', 5),
                                                             (600, 900, 'brightness', 5)],
                                window=200, meta={'test': True})
    doc = json.loads(paths['report'].read_text())
    assert {'version', 'created', 'meta', 'schedule', 'runs'} <= set(doc)
    assert [s['corruption'] for s in doc['schedule']] == ['gaussian_noise', 'contrast', 'brightness']
    assert len(doc['runs']) == 2
    for run in doc['runs']:
        assert set(report.RUN_KEYS) <= set(run)
        assert {'total', 'predicted', 'on_time', 'late', 'dropped'} == set(run['frames'])
        assert {'p50', 'p99'} <= set(run['latency_ms'])
        assert {'predictor', 'adapter', 'total'} == set(run['compute_ms_per_frame'])
        assert len(run['windows']['accuracy']) == 900 // 200 + 1      # 100-frame tail < half
        assert 0.0 <= run['accuracy'] <= 1.0
    png = paths['plot'].read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000
    table = report.format_table(results)
    assert 'source/none' in table and 'norm/async' in table
    # generic use (monitor / eval-bag): plain named series and mappings
    p = report.plot_accuracy([('live', np.r_[np.ones(50), np.zeros(50)])], tmp_path / 'live.png',
                             window=10)
    assert p.read_bytes()[:4] == b'\x89PNG'
    with pytest.raises(ValueError):
        report.normalize_schedule([(5, 1, 'bad')])


def test_cli_eval_writes_report(model, tmp_path, capsys):
    from async_ttt_ros.cli import main
    out = tmp_path / 'eval'
    rc = main(['eval', '--length', '400', '--methods', 'source,norm', '--modes', 'none,async',
               '--corruptions', 'gaussian_noise,contrast', '--window', '100', '--out', str(out),
               '--no-progress'])
    assert rc == 0
    printed = capsys.readouterr().out
    assert 'source/none' in printed and 'norm/async' in printed
    doc = json.loads((out / 'report.json').read_text())
    assert [r['name'] for r in doc['runs']] == ['source/none', 'norm/async']
    assert doc['meta']['stream']['length'] == 400
    assert (out / 'plot.png').stat().st_size > 5000
    assert main(['eval', '--length', '100', '--modes', 'later', '--out', str(out)]) == 2
