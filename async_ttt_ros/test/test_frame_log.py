"""FrameLog (compact per-frame record) and the monitor's bounded join state.

The monitor runs for hours on a robot: its per-frame cost must stay a few bytes and the stamps
it keys by must be forgotten once a frame is settled.
"""
import math
import time

import numpy as np
import pytest

from async_ttt_ros.core.frame_log import FrameLog, GrowingArray
from ros_harness import free_domain_id, rclpy_in_domain


def test_growing_array_appends_past_its_capacity_and_views_without_copy():
    arr = GrowingArray(np.float32, fill=np.nan, initial=2)
    for i in range(5):
        assert arr.append(i) == i
    assert len(arr) == 5
    assert arr.view().tolist() == [0, 1, 2, 3, 4]
    arr[3] = 9
    assert arr.view()[3] == 9
    assert np.shares_memory(arr.view(), arr._data)      # a view, not a copy
    with pytest.raises(IndexError):
        arr[5] = 1


def test_frame_log_scores_tracks_and_keeps_segments_not_rows():
    log = FrameLog(('adapted', 'source'))
    for i in range(1000):
        corruption = 'fog' if i < 600 else 'jpeg_compression'
        log.add_truth(i, corruption, 3)
    assert len(log) == 1000
    assert log.segment_list() == [
        {'start': 0, 'end': 600, 'corruption': 'fog', 'severity': 3},
        {'start': 600, 'end': 1000, 'corruption': 'jpeg_compression', 'severity': 3}]
    adapted = log.tracks['adapted']
    for row in range(0, 1000, 2):            # every other frame predicted, 3 in 4 of them right
        adapted.score(row, correct=(row % 8 != 0), version=row // 100)
    assert adapted.scored == 500
    assert adapted.accuracy() == pytest.approx(0.75)
    assert adapted.accuracy(last=100) == pytest.approx(np.mean([r % 8 != 0 for r in range(900, 1000, 2)]))
    assert math.isnan(log.tracks['source'].accuracy())
    adapted.score(0, correct=True, version=0)          # re-scoring a row does not count twice
    assert adapted.scored == 500
    assert adapted.accuracy() == pytest.approx(376 / 500)     # row 0 was wrong, now right
    # a few bytes per frame, not a Python object per value
    per_frame = sum(a._data.nbytes for a in (log.frame_index, adapted.correct, adapted.versions,
                                             log.tracks['source'].correct,
                                             log.tracks['source'].versions)) / 1024
    assert per_frame <= 32


def _truth(i: int, stamp_ns: int):
    from async_ttt_ros_interfaces.msg import GroundTruth
    m = GroundTruth()
    m.header.stamp.sec, m.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    m.frame_index, m.class_index, m.corruption, m.severity = i, i % 10, 'fog', 2
    return m


def _prediction(i: int, stamp_ns: int, class_index: int):
    from async_ttt_ros_interfaces.msg import Prediction
    m = Prediction()
    m.header.stamp.sec, m.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    m.class_index, m.model_version, m.latency_ms = class_index, 1, 2.5
    return m


def test_monitor_forgets_settled_frames_and_counts_the_unanswered(tmp_path):
    """Real messages through the monitor's callbacks (no DDS needed for the join logic): the
    stamp map holds only frames still waiting, a frame without a prediction within
    match_timeout is dropped, and the report covers every frame."""
    from rclpy.parameter import Parameter

    from async_ttt_ros.nodes.monitor_node import MonitorNode
    with rclpy_in_domain(free_domain_id()) as context:
        node = MonitorNode(context=context, parameter_overrides=[
            Parameter('output_dir', value=str(tmp_path)), Parameter('report_period', value=0.0),
            Parameter('match_timeout', value=0.2), Parameter('window', value=100)])
        try:
            base = 1_700_000_000 * 10**9
            for i in range(300):
                stamp = base + i * 33_000_000
                truth = _truth(i, stamp)
                if i % 3 == 0:      # prediction first (it can overtake its ground truth)
                    node._on_prediction(_prediction(i, stamp, i % 10), 'adapted')
                    node._on_prediction(_prediction(i, stamp, 0), 'source')
                    node._on_truth(truth)
                elif i % 3 == 1:
                    node._on_truth(truth)
                    node._on_prediction(_prediction(i, stamp, (i + 1) % 10), 'adapted')
                    node._on_prediction(_prediction(i, stamp, 0), 'source')
                elif i < 290:       # both tracks answer
                    node._on_truth(truth)
                    node._on_prediction(_prediction(i, stamp, i % 10), 'adapted')
                    node._on_prediction(_prediction(i, stamp, i % 10), 'source')
                else:               # the last 4 of this kind never get a prediction
                    node._on_truth(truth)
            # settled frames are forgotten at once; only the unanswered ones wait
            assert len(node._pending_truth) == 4
            assert not any(node._pending_pred.values())
            time.sleep(0.25)
            node._expire()
            assert node._pending_truth == {} and node.dropped == 4
            s = node.summary()
            assert s['frames'] == 300 and s['predicted'] == 296 and s['dropped'] == 4
            # adapted right on i%3 == 0 and i%3 == 2 (except the 4 dropped): 196 of 296
            assert s['accuracy'] == pytest.approx(196 / 296)
            assert s['perception_latency_p50_ms'] == pytest.approx(2.5)
            assert s['latency_frames'] == 296
            assert node.summary(latency_last=50)['latency_frames'] == 50
            paths = node.write_report(plot=False)
        finally:
            node.destroy_node()
    import json
    report = json.loads(open(paths['report']).read())
    adapted = report['runs'][0]
    assert adapted['frames'] == {'total': 300, 'predicted': 296, 'dropped': 4}
    assert adapted['windows']['values'] == pytest.approx([67 / 100, 66 / 100, 63 / 96])
    assert report['schedule'] == [{'start': 0, 'end': 300, 'corruption': 'fog', 'severity': 2}]
