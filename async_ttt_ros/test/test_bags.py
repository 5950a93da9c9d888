"""rosbag2 make / record / replay / eval-bag (async_ttt_ros.bags and its commands).

Bags are written with rosbags and read back with rosbags' AnyReader, and their raw bytes are
deserialised with rclpy's own deserialize_message into the generated message classes: a bag that
rclpy cannot read would fail here. Record and replay run as real subprocesses over real DDS.
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ros_harness import python_process, rclpy_in_domain, ros_env, spin_until, stop

torch = pytest.importorskip('torch')
torch.set_num_threads(1)

from async_ttt_ros import bags  # noqa: E402
from async_ttt_ros.cli import main as cli  # noqa: E402

ASYNC_TTT = [str(Path(sys.executable).with_name('async-ttt'))]
SCHEDULE, LENGTH, SEED, RATE = 'continual', 240, 3, 30.0
START_NS = 1_700_000_000 * 10**9


def _stream(length=LENGTH, seed=SEED):
    from async_ttt_ros.core.streams import make_stream
    return make_stream(SCHEDULE, length, seed=seed, severity=5)


def _all_frames(stream):
    images, labels, corruption, severity = [], [], [], []
    for b in stream.batches(64):
        images.append(np.asarray(b.images))
        labels.append(np.asarray(b.labels))
        corruption += [str(c) for c in b.corruption]
        severity.append(np.asarray(b.severity))
    return np.concatenate(images), np.concatenate(labels), corruption, np.concatenate(severity)


def _make_bag(path, *extra, length=LENGTH, seed=SEED):
    rc = cli(['make-bag', '-o', str(path), '--schedule', SCHEDULE, '--length', str(length),
              '--seed', str(seed), '--rate', str(RATE), '--start-time', str(START_NS / 1e9),
              '--no-progress', *extra])
    assert rc == 0
    return path


def _metadata(path) -> dict:
    return yaml.safe_load((Path(path) / 'metadata.yaml').read_text())['rosbag2_bagfile_information']


def _raw_messages(path):
    """{topic: [(timestamp, raw bytes)]} read with rosbags' AnyReader."""
    from rosbags.highlevel import AnyReader
    out = {}
    with AnyReader([Path(path)]) as reader:
        for conn, ts, raw in reader.messages():
            out.setdefault(conn.topic, []).append((ts, bytes(raw)))
    return out


@pytest.fixture(scope='module')
def source_model():
    """The cached source model (trained once, from real Fashion-MNIST, if not cached yet)."""
    from async_ttt_ros.core.training import load_or_train
    return load_or_train(log=None)


# ----------------------------------------------------------------------------------------------
# definitions come from the interface package, not from hand-typed text

def test_interface_definitions_come_from_the_package():
    msg_dir = bags.find_interface_dir('async_ttt_ros_interfaces')
    assert (msg_dir / 'GroundTruth.msg').is_file()
    store = bags.make_typestore(9)
    for name in ('GroundTruth', 'Prediction', 'LatentBatch', 'AdaptationStatus'):
        # rosidl writes the type hash next to the installed .msg (share/<pkg>/msg/X.json);
        # without an install (source tree) only the definition check applies.
        typename = f'async_ttt_ros_interfaces/msg/{name}'
        assert typename in store.types
        json_path = msg_dir / f'{name}.json'
        if json_path.is_file():
            hashes = json.loads(json_path.read_text())['type_hashes']
            expected = next(h['hash_string'] for h in hashes if h['type_name'] == typename)
            assert store.hash_rihs01(typename) == expected


# ----------------------------------------------------------------------------------------------
# make-bag: every storage and metadata version reads back through rclpy

@pytest.mark.parametrize('storage,version', [('mcap', 9), ('mcap', 8), ('sqlite3', 9),
                                             ('sqlite3', 8)])
def test_made_bag_reads_back_with_rclpy(tmp_path, storage, version):
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import Image

    from async_ttt_ros_interfaces.msg import GroundTruth
    from async_ttt_ros.core.data import CLASS_NAMES

    path = _make_bag(tmp_path / 'bag', '--mono8', '--storage', storage, '--version', str(version))
    meta = _metadata(path)
    assert meta['version'] == version
    assert meta['storage_identifier'] == storage
    images, labels, corruption, severity = _all_frames(_stream())

    msgs = _raw_messages(path)
    assert sorted(msgs) == ['/ground_truth', '/image']
    assert len(msgs['/image']) == len(msgs['/ground_truth']) == LENGTH
    period_ns = 1e9 / RATE
    pairs = zip(msgs['/image'], msgs['/ground_truth'])
    for i, ((ts_img, raw_img), (ts_gt, raw_gt)) in enumerate(pairs):
        img = deserialize_message(raw_img, Image)
        gt = deserialize_message(raw_gt, GroundTruth)
        stamp = START_NS + int(round(i * period_ns))
        assert ts_img == ts_gt == stamp
        assert img.header.stamp.sec * 10**9 + img.header.stamp.nanosec == stamp
        assert gt.header == img.header
        assert (img.height, img.width, img.encoding, img.step) == (28, 28, 'mono8', 28)
        assert np.array_equal(np.frombuffer(bytes(img.data), np.uint8).reshape(28, 28), images[i])
        assert (gt.frame_index, gt.class_index, gt.label) == (i, labels[i], CLASS_NAMES[labels[i]])
        assert (gt.corruption, gt.severity) == (corruption[i], severity[i])


def test_camera_bag_holds_the_sim_camera_frames(tmp_path):
    """Default frames are the sim camera's scene; eval-bag's crop recovers the stream items."""
    from rclpy.serialization import deserialize_message
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image

    from async_ttt_ros.nodes.scene import SceneComposer

    length = 40
    path = _make_bag(tmp_path / 'cam', '--clock', '--noise-sigma', '0', length=length)
    images, labels, _, _ = _all_frames(_stream(length))
    msgs = _raw_messages(path)
    assert len(msgs['/clock']) == length
    scene = SceneComposer(noise_sigma=0.0, seed=SEED)
    for i in (0, 17, length - 1):
        img = deserialize_message(msgs['/image'][i][1], Image)
        assert (img.width, img.height, img.encoding) == (640, 480, 'rgb8')
        pixels = np.frombuffer(bytes(img.data), np.uint8).reshape(480, 640, 3)
        assert np.array_equal(pixels, scene.compose(images[i], i))
        clock = deserialize_message(msgs['/clock'][i][1], Clock)
        assert clock.clock == img.header.stamp
    frames = bags.read_frames(path)          # crops the stored tray region, area-downscales
    assert np.array_equal(frames.images, images)
    assert np.array_equal(frames.labels, labels)
    with bags.open_reader(path) as reader:
        assert bags.bag_item_roi(reader) is not None


def test_make_bag_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / 'exists').mkdir()
    rc = cli(['make-bag', '-o', str(tmp_path / 'exists'), '--length', '4', '--mono8',
              '--no-progress'])
    assert rc == 2
    assert 'exists already' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# eval-bag

@pytest.mark.parametrize('frames', ['mono8', 'camera'])
def test_eval_bag_equals_eval_on_the_same_stream(tmp_path, source_model, frames):
    """Mode none, source model: the bag's frames are the stream's, so accuracy is identical."""
    common = ['--methods', 'source', '--modes', 'none', '--no-plot', '--no-progress',
              '--window', '50']
    assert cli(['eval', '--stream', SCHEDULE, '--length', str(LENGTH), '--seed', str(SEED),
                '--out', str(tmp_path / 'eval'), *common]) == 0
    extra = ['--mono8'] if frames == 'mono8' else ['--noise-sigma', '0']
    bag = _make_bag(tmp_path / 'bag', *extra)
    assert cli(['eval-bag', str(bag), '--out', str(tmp_path / 'evalbag'), *common]) == 0
    ref = json.loads((tmp_path / 'eval' / 'report.json').read_text())['runs']
    got = json.loads((tmp_path / 'evalbag' / 'report.json').read_text())
    assert len(ref) == len(got['runs']) == 1
    assert got['runs'][0]['frames']['total'] == LENGTH
    print(f'eval {ref[0]["accuracy"]:.4f}  eval-bag ({frames}) {got["runs"][0]["accuracy"]:.4f}')
    assert got['runs'][0]['accuracy'] == ref[0]['accuracy']
    assert got['runs'][0]['windows']['accuracy'] == ref[0]['windows']['accuracy']
    assert got['meta']['rate_hz'] == pytest.approx(RATE, rel=1e-6)


def _write_recorded_bag(path, n=100):
    """A bag as `record` would write it from a live graph: ground truth for every frame,
    predictions for some (perception dropped the others), one latched status."""
    store = bags.make_typestore(9)
    T = store.types
    writer = bags.open_writer(path, 'mcap', 9)
    gt_c = bags.add_topic(writer, store, '/ground_truth', bags.GROUND_TRUTH_TYPE)
    pr_c = bags.add_topic(writer, store, '/prediction', bags.PREDICTION_TYPE)
    st_c = bags.add_topic(writer, store, '/adaptation_status', bags.STATUS_TYPE)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    has_pred = np.arange(n) % 5 != 0
    predicted = np.where(np.arange(n) % 3 == 0, labels, (labels + 1) % 10)
    for i in range(n):
        ts = START_NS + i * 33_000_000
        header = T['std_msgs/msg/Header'](
            stamp=T['builtin_interfaces/msg/Time'](sec=ts // 10**9, nanosec=ts % 10**9),
            frame_id='camera')
        gt = T[bags.GROUND_TRUTH_TYPE](header=header, frame_index=i, class_index=int(labels[i]),
                                       label='x', corruption='noise' if i < n // 2 else 'blur',
                                       severity=5)
        writer.write(gt_c, ts, store.serialize_cdr(gt, bags.GROUND_TRUTH_TYPE))
        if has_pred[i]:
            probs = np.full(10, 0.1, np.float32)
            pred = T[bags.PREDICTION_TYPE](header=header, model_version=i // 10,
                                           class_index=int(predicted[i]), label='x',
                                           confidence=0.5, entropy=1.0, probabilities=probs,
                                           latency_ms=2.0)
            # Predictions arrive after their frame: receive time later than the stamp.
            writer.write(pr_c, ts + 5_000_000, store.serialize_cdr(pred, bags.PREDICTION_TYPE))
    status = T[bags.STATUS_TYPE](
        header=T['std_msgs/msg/Header'](stamp=T['builtin_interfaces/msg/Time'](sec=0, nanosec=0),
                                        frame_id=''),
        method='tent', served_version=9, memory_size=0, latents_received=0, latents_dropped=0,
        steps=0, accepted=0, held=0, rolled_back=0, resets=0, deltas_sent=0, deltas_refused=0,
        calls_failed=0, last_decision='accept', last_score=0.0, last_reason='', step_ms=0.0)
    writer.write(st_c, START_NS, store.serialize_cdr(status, bags.STATUS_TYPE))
    writer.close()
    return labels, has_pred, predicted


def test_eval_bag_scores_recorded_predictions(tmp_path):
    labels, has_pred, predicted = _write_recorded_bag(tmp_path / 'rec')
    out = tmp_path / 'report'
    assert cli(['eval-bag', str(tmp_path / 'rec'), '--mode', 'recorded', '--out', str(out),
                '--window', '20']) == 0
    doc = json.loads((out / 'report.json').read_text())
    run = doc['runs'][0]
    correct = has_pred & (predicted == labels)
    assert run['name'] == 'recorded/tent' and run['mode'] == 'recorded'
    assert run['frames']['total'] == len(labels)
    assert run['frames']['dropped'] == int((~has_pred).sum())
    assert run['accuracy'] == pytest.approx(correct.mean())
    assert run['accuracy_predicted'] == pytest.approx(correct[has_pred].mean())
    assert [s['corruption'] for s in doc['schedule']] == ['noise', 'blur']
    assert (out / 'plot.png').is_file()


def test_eval_bag_explains_a_bag_without_the_topics(tmp_path, capsys):
    store = bags.make_typestore(9)
    writer = bags.open_writer(tmp_path / 'empty', 'mcap', 9)
    bags.add_topic(writer, store, '/image', bags.IMAGE_TYPE)
    writer.close()
    assert cli(['eval-bag', str(tmp_path / 'empty'), '--mode', 'recorded',
                '--out', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert "no async_ttt_ros_interfaces/msg/Prediction messages on topic 'prediction'" in err
    assert 'the bag has: /image [sensor_msgs/msg/Image]' in err
    # rerun checks the topics before loading (or training) a model
    assert cli(['eval-bag', str(tmp_path / 'empty'), '--out', str(tmp_path / 'o')]) == 2
    assert "no async_ttt_ros_interfaces/msg/GroundTruth messages on topic 'ground_truth'" \
        in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# record and replay over real DDS

PUBLISHER = r'''
import sys, time, rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy, DurabilityPolicy
from async_ttt_ros_interfaces.msg import AdaptationStatus, GroundTruth
n = int(sys.argv[1])
rclpy.init()
node = rclpy.create_node('bag_test_publisher')
latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
status_pub = node.create_publisher(AdaptationStatus, 'adaptation_status', latched)
gt_pub = node.create_publisher(GroundTruth, 'ground_truth', QoSProfile(depth=100))
status = AdaptationStatus(method='eata', served_version=7)
status_pub.publish(status)          # before any subscriber exists: only latching delivers it
deadline = time.monotonic() + 30
while gt_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)
for i in range(n):
    msg = GroundTruth(frame_index=i, class_index=i % 10, label=f'l{i}', corruption='fog',
                      severity=3)
    msg.header.stamp.sec = 100 + i
    gt_pub.publish(msg)
    time.sleep(0.005)
print('published', n, flush=True)
time.sleep(1.0)
'''


def test_record_round_trip(tmp_path, domain_id):
    from rclpy.serialization import deserialize_message

    from async_ttt_ros_interfaces.msg import AdaptationStatus, GroundTruth

    env = ros_env(domain_id)
    n = 150
    pub = python_process(['-c', PUBLISHER, str(n)], env=env)
    time.sleep(1.0)   # the latched status is published before the recorder exists
    bag = tmp_path / 'rec'
    rec = python_process(['-m', 'async_ttt_ros.cli', 'record', '-o', str(bag),
                          'ground_truth', 'adaptation_status', '--storage', 'sqlite3'], env=env)
    try:
        pub.wait(timeout=60)
        time.sleep(0.5)
    finally:
        pub_out = stop(pub)
        rec_out = stop(rec)     # SIGINT, as Ctrl-C: the recorder must close the bag cleanly
    assert 'published' in pub_out, pub_out
    assert rec.returncode == 0, rec_out
    meta = _metadata(bag)
    qos = {t['topic_metadata']['name']: t['topic_metadata']['offered_qos_profiles']
           for t in meta['topics_with_message_count']}
    assert qos['/adaptation_status'][0]['durability'] == 'transient_local'
    msgs = _raw_messages(bag)
    statuses = [deserialize_message(raw, AdaptationStatus) for _, raw in msgs['/adaptation_status']]
    assert [(s.method, s.served_version) for s in statuses] == [('eata', 7)]
    truths = [deserialize_message(raw, GroundTruth) for _, raw in msgs['/ground_truth']]
    assert [t.frame_index for t in truths] == list(range(n)), rec_out   # reliable: none lost
    assert truths[5].label == 'l5' and truths[5].header.stamp.sec == 105
    stamps = [ts for ts, _ in msgs['/ground_truth']]
    assert stamps == sorted(stamps)


def test_replay_into_perception_node_record_and_score(tmp_path, domain_id, source_model):
    """A made camera bag replayed into a live perception node yields its predictions; recording
    them with `record` and scoring with `eval-bag --mode recorded` gives the same accuracy."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from async_ttt_ros_interfaces.msg import Prediction
    from async_ttt_ros.core.model import preprocess

    length = 90
    bag = _make_bag(tmp_path / 'cam', length=length)
    frames = bags.read_frames(bag)
    with bags.open_reader(bag) as reader:
        roi = bags.bag_item_roi(reader)
    # What the source model says for each frame (batch 1, as the node runs it).
    with torch.inference_mode():
        expected = {int(s): int(source_model(preprocess(img[None])).argmax(1))
                    for s, img in zip(frames.stamps_ns, frames.images)}

    env = ros_env(domain_id)
    node_proc = python_process(
        ['-m', 'async_ttt_ros.nodes.perception_node', '--ros-args', '-p', 'num_threads:=1',
         '-p', f'roi:=[{roi.x},{roi.y},{roi.width},{roi.height}]', '-p', 'latents_every_n:=0'],
        env=env)
    received = {}
    replay = recorder = None
    recorded = tmp_path / 'recorded'
    with rclpy_in_domain(domain_id) as context:
        import rclpy
        node = rclpy.create_node('bag_test_listener', context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)

        def on_prediction(msg):
            received[msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec] = msg.class_index
        node.create_subscription(Prediction, '/prediction', on_prediction,
                                 QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        try:
            ready = spin_until(executor, lambda: node.count_subscribers('/image') > 0
                               and node.count_publishers('/prediction') > 0, timeout=120)
            assert ready, 'perception node did not come up:\n' + stop(node_proc)
            recorder = python_process(['-m', 'async_ttt_ros.cli', 'record', '-o', str(recorded),
                                       'prediction', 'ground_truth'], env=env)
            # The recorder subscribes to /prediction once it discovers the perception node
            # (ground_truth appears with replay, which waits for it).
            subscribed = spin_until(executor, lambda: node.count_subscribers('/prediction') >= 2,
                                    timeout=60)
            assert subscribed, 'recorder never subscribed to /prediction:\n' + stop(recorder)
            # Waits for the perception node (image) and the recorder (ground_truth).
            replay = python_process(['-m', 'async_ttt_ros.cli', 'replay', str(bag),
                                     '--topics', 'image', 'ground_truth',
                                     '--wait-for-subscribers', '20'], env=env)
            spin_until(executor, lambda: replay.poll() is not None, timeout=60)
            spin_until(executor, lambda: len(received) >= length, timeout=3)
        finally:
            replay_out = stop(replay) if replay is not None else ''
            recorder_out = stop(recorder) if recorder is not None else ''
            node_out = stop(node_proc)
            node.destroy_node()
    print(f'replay -> perception: {len(received)}/{length} predictions')
    assert replay.returncode == 0, replay_out
    assert len(received) >= 0.8 * length, f'{len(received)}/{length}\n{replay_out}\n{node_out}'
    assert set(received) <= set(expected), 'predictions must carry the replayed image stamps'
    agree = np.mean([received[s] == expected[s] for s in received])
    assert agree == 1.0, f'node and offline source model disagree on {1 - agree:.1%} of frames'

    assert recorder.returncode == 0, recorder_out
    out = tmp_path / 'score'
    assert cli(['eval-bag', str(recorded), '--mode', 'recorded', '--out', str(out),
                '--no-plot']) == 0
    run = json.loads((out / 'report.json').read_text())['runs'][0]
    labels = dict(zip(frames.stamps_ns.tolist(), frames.labels.tolist()))
    assert run['frames']['total'] == length, recorder_out         # every ground truth recorded
    # SIGINT came right after the last prediction reached the test: the recorder still takes
    # what DDS had delivered to it before closing the bag
    assert run['frames']['predicted'] == len(received), recorder_out
    assert run['accuracy'] == pytest.approx(
        sum(received[s] == labels[s] for s in received) / length)


def test_replay_offset_rate_and_clock(tmp_path, domain_id):
    """--start-offset skips the start, --rate speeds up, --clock publishes the bag time."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock

    from async_ttt_ros_interfaces.msg import GroundTruth

    length, offset_s, rate = 120, 2.0, 4.0
    bag = _make_bag(tmp_path / 'bag', '--mono8', '--clock', length=length)
    env = ros_env(domain_id)
    truths, clocks = [], []
    with rclpy_in_domain(domain_id) as context:
        import rclpy
        node = rclpy.create_node('bag_test_clock', context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        node.create_subscription(GroundTruth, '/ground_truth',
                                 lambda m: truths.append((time.monotonic(), m.frame_index)),
                                 QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE))
        node.create_subscription(Clock, '/clock', lambda m: clocks.append(
            m.clock.sec * 10**9 + m.clock.nanosec), QoSProfile(
                depth=10, reliability=ReliabilityPolicy.BEST_EFFORT))
        replay = python_process(['-m', 'async_ttt_ros.cli', 'replay', str(bag), '--topics',
                                 'ground_truth', '--start-offset', str(offset_s), '--rate',
                                 str(rate), '--clock', '50', '--wait-for-subscribers', '10'],
                                env=env)
        try:
            spin_until(executor, lambda: replay.poll() is not None, timeout=60)
            spin_until(executor, lambda: False, timeout=0.3)
        finally:
            out = stop(replay)
            node.destroy_node()
    assert replay.returncode == 0, out
    first = int(offset_s * RATE)
    assert [i for _, i in truths] == list(range(first, length)), out   # reliable, in order
    span = truths[-1][0] - truths[0][0]
    nominal = (length - 1 - first) / RATE / rate
    print(f'replay: {len(truths)} frames in {span:.2f} s (nominal {nominal:.2f} s); '
          f'{len(clocks)} /clock messages')
    assert clocks and clocks == sorted(clocks)
    bag_start = START_NS + int(round(first * 1e9 / RATE))
    assert bag_start - 10**8 <= clocks[0] and clocks[-1] <= START_NS + int(length * 1e9 / RATE)
