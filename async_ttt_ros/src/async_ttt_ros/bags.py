"""rosbag2 writing and reading with the `rosbags` library (make-bag, record, replay, eval-bag).

Why rosbags and not rosbag2_py: rosbag2_py is a compiled distro package (not on PyPI), while
rosbags is pure Python, writes both storage plugins (mcap, sqlite3) and both metadata versions
(8 = Humble, 9 = Jazzy/Kilted), and its CDR bytes are the bytes rclpy sends and receives. Bags
written here play with `ros2 bag play`; bags from `ros2 bag record` read here.

Custom message types are never retyped by hand: they are parsed from the interface package's own
`.msg` files (installed share dir, ament index, or the source tree), so a bag always carries the
definitions and type hashes the running graph uses.

This module imports no rclpy: writing a bag from a stream, reading frames and joining
predictions with ground truth work on machines without ROS. rclpy-facing helpers (QoS
conversion) import it lazily.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INTERFACES_PACKAGE = 'async_ttt_ros_interfaces'

IMAGE_TYPE = 'sensor_msgs/msg/Image'
CLOCK_TYPE = 'rosgraph_msgs/msg/Clock'
GROUND_TRUTH_TYPE = f'{INTERFACES_PACKAGE}/msg/GroundTruth'
PREDICTION_TYPE = f'{INTERFACES_PACKAGE}/msg/Prediction'
LATENTS_TYPE = f'{INTERFACES_PACKAGE}/msg/LatentBatch'
STATUS_TYPE = f'{INTERFACES_PACKAGE}/msg/AdaptationStatus'

# Topics of the graph (docs/architecture.md). Bags store fully qualified names, as rosbag2 does.
DEFAULT_RECORD_TOPICS = ('image', 'prediction', 'latents', 'ground_truth', 'adaptation_status')
STORAGES = ('mcap', 'sqlite3')
VERSIONS = (8, 9)
DEFAULT_VERSION = 9          # Jazzy / Kilted; 8 for Humble's rosbag2


class BagError(RuntimeError):
    """A bag that cannot be written or read as asked; the message says why."""


# ----------------------------------------------------------------------------------------------
# message definitions: from the packages' own .msg files

def _prefixes() -> list[Path]:
    """Install prefixes to search for share/<pkg>/msg, most specific first."""
    prefixes: list[Path] = []
    for entry in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        if entry:
            prefixes.append(Path(entry))
    prefixes.append(Path(sys.prefix))            # the venv / colcon install the code runs from
    return prefixes


def _module_prefix(package: str) -> Path | None:
    """<prefix> of an importable generated interface package (<prefix>/lib/.../pkg)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).resolve()
    for parent in path.parents:
        if (parent / 'share' / package).is_dir():
            return parent
    return None


def find_interface_dir(package: str, kind: str = 'msg') -> Path:
    """Directory holding `package`'s `.msg` (or `.srv`) files.

    Order: ament index (AMENT_PREFIX_PATH), this interpreter's prefix (venv install), the prefix
    the generated Python package was imported from, and finally this repository's source tree.
    """
    candidates: list[Path] = []
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory(package)) / kind)
    except Exception:  # not installed, no ament index, or AMENT_PREFIX_PATH unset
        pass
    candidates += [p / 'share' / package / kind for p in _prefixes()]
    module_prefix = _module_prefix(package)
    if module_prefix is not None:
        candidates.append(module_prefix / 'share' / package / kind)
    # Source checkout: <repo>/async_ttt_ros/src/async_ttt_ros/bags.py -> <repo>/<package>/<kind>
    candidates.append(Path(__file__).resolve().parents[3] / package / kind)
    for cand in candidates:
        if cand.is_dir() and any(cand.glob(f'*.{kind}')):
            return cand
    raise BagError(f'cannot find the {kind} files of {package}; looked in: '
                   + ', '.join(str(c) for c in dict.fromkeys(candidates))
                   + '. Build and install the interface package (make setup / colcon build).')


def _msg_file(msgtype: str) -> Path | None:
    """<share>/<pkg>/msg/<Type>.msg of a type name like 'pkg/msg/Type', if installed."""
    pkg, _, name = msgtype.split('/')
    try:
        path = find_interface_dir(pkg) / f'{name}.msg'
    except BagError:
        return None
    return path if path.is_file() else None


def _referenced_types(node) -> Iterator[str]:
    """Type names referenced in a rosbags field description (nested tuples)."""
    if isinstance(node, str):
        if node.count('/') == 2:
            yield node
    elif isinstance(node, (tuple, list)):
        for item in node:
            yield from _referenced_types(item)


def register_msg_type(typestore, msgtype: str) -> bool:
    """Make `msgtype` (and the types it nests) known to `typestore` from installed .msg files.

    Returns False when some definition cannot be found (the type cannot be written then).
    """
    from rosbags.typesys import get_types_from_msg

    pending, found = [msgtype], {}
    while pending:
        name = pending.pop()
        if name in typestore.fielddefs or name in found:
            continue
        path = _msg_file(name)
        if path is None:
            return False
        types = get_types_from_msg(path.read_text(), name)
        found.update(types)
        for _, fields in types.values():
            pending.extend(t for t in _referenced_types(fields) if t not in found)
    if found:
        typestore.register(found)
    return True


def make_typestore(version: int = DEFAULT_VERSION):
    """A rosbags typestore of the distro matching the bag version, plus our interfaces.

    The message types used here (Image, Header, Clock) are identical across Humble..Kilted; the
    store only decides which definitions and hashes the bag embeds for them.
    """
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE if version == 8 else Stores.ROS2_KILTED)
    msg_dir = find_interface_dir(INTERFACES_PACKAGE)
    types = {}
    for path in sorted(msg_dir.glob('*.msg')):
        types.update(get_types_from_msg(path.read_text(), f'{INTERFACES_PACKAGE}/msg/{path.stem}'))
    store.register(types)
    return store


# ----------------------------------------------------------------------------------------------
# QoS: one neutral description, converted to rosbags metadata and to rclpy profiles

@dataclass(frozen=True)
class QosSpec:
    reliable: bool = True
    transient_local: bool = False
    depth: int = 10

    def to_rosbags(self):
        from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness,
                                        QosReliability, QosTime)
        # Durations 0/0 = "default": what rosbag2 writes for profiles without deadlines.
        zero = QosTime(0, 0)
        return Qos(QosHistory.KEEP_LAST, self.depth,
                   QosReliability.RELIABLE if self.reliable else QosReliability.BEST_EFFORT,
                   QosDurability.TRANSIENT_LOCAL if self.transient_local
                   else QosDurability.VOLATILE,
                   zero, zero, QosLiveliness.AUTOMATIC, zero, False)

    def to_rclpy(self):
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        return QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=self.depth,
            reliability=ReliabilityPolicy.RELIABLE if self.reliable
            else ReliabilityPolicy.BEST_EFFORT,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if self.transient_local
            else DurabilityPolicy.VOLATILE)

    @classmethod
    def from_rosbags(cls, qos) -> QosSpec:
        from rosbags.interfaces import QosDurability, QosReliability
        return cls(reliable=qos.reliability != QosReliability.BEST_EFFORT,
                   transient_local=qos.durability == QosDurability.TRANSIENT_LOCAL,
                   depth=max(1, int(qos.depth or 10)))


# Same profiles as async_ttt_ros.qos (the nodes' QoS), keyed by topic base name; kept here
# without rclpy so bag metadata can carry them on machines without ROS.
TOPIC_QOS: dict[str, QosSpec] = {
    'image': QosSpec(reliable=False, depth=1),
    'prediction': QosSpec(reliable=True, depth=10),
    'latents': QosSpec(reliable=False, depth=5),
    'ground_truth': QosSpec(reliable=True, depth=100),
    'adaptation_status': QosSpec(reliable=True, transient_local=True, depth=1),
    'clock': QosSpec(reliable=False, depth=1),
}


def default_qos(topic: str, msgtype: str | None = None) -> QosSpec:
    """The graph's QoS for a topic (by base name), SensorData-like for any Image topic."""
    if msgtype == IMAGE_TYPE:
        return TOPIC_QOS['image']
    base = topic.rstrip('/').rsplit('/', 1)[-1]
    return TOPIC_QOS.get(base, QosSpec())


# ----------------------------------------------------------------------------------------------
# writing

def _storage_plugin(storage: str):
    from rosbags.rosbag2 import StoragePlugin
    if storage not in STORAGES:
        raise BagError(f'unknown storage {storage!r}; choose one of {", ".join(STORAGES)}')
    return StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3


def open_writer(path: str | os.PathLike, storage: str = 'mcap', version: int = DEFAULT_VERSION):
    """An opened rosbags Writer for a new bag directory (refuses to overwrite)."""
    from rosbags.rosbag2 import Writer, WriterError
    if version not in VERSIONS:
        raise BagError(f'unsupported bag metadata version {version}; use 8 (Humble) or 9 '
                       '(Jazzy/Kilted)')
    path = Path(path)
    if path.exists():
        raise BagError(f'{path} exists already; choose a new bag directory')
    try:
        writer = Writer(path, version=version, storage_plugin=_storage_plugin(storage))
        writer.open()
    except WriterError as exc:
        raise BagError(str(exc)) from exc
    return writer


def add_topic(writer, typestore, topic: str, msgtype: str, qos: Sequence[QosSpec] = ()):
    """Register a topic on an open writer with its definition and offered QoS profiles."""
    return writer.add_connection(topic, msgtype, typestore=typestore,
                                 offered_qos_profiles=[q.to_rosbags() for q in qos])


def _stamp(typestore, ns: int):
    Time = typestore.types['builtin_interfaces/msg/Time']
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def stamp_to_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


@dataclass
class BagSummary:
    path: Path
    storage: str
    version: int
    frames: int
    start_ns: int
    end_ns: int
    topics: dict[str, int] = field(default_factory=dict)   # topic -> message count


def write_stream_bag(stream, path: str | os.PathLike, *, rate_hz: float = 30.0,
                     start_ns: int | None = None,
                     render: Callable[[np.ndarray, int], tuple[np.ndarray, str]] | None = None,
                     frame_id: str = 'camera', image_topic: str = '/image',
                     truth_topic: str = '/ground_truth', clock: bool = False,
                     storage: str = 'mcap', version: int = DEFAULT_VERSION,
                     batch_size: int = 256, progress: Callable[[int], None] | None = None,
                     custom_data: dict[str, str] | None = None) -> BagSummary:
    """Write every frame of a drift stream as Image + GroundTruth (same header) [+ /clock].

    `render(grey28, index) -> (pixels, encoding)` turns frame `index` into the published image
    (default: the 28x28 frame itself as mono8). Frame i is stamped start + i / rate_hz; the bag's
    receive timestamps equal the header stamps, so replay reproduces the stream rate.
    On any error the half-written bag directory is removed: no truncated bag is left behind.
    """
    import shutil

    if rate_hz <= 0:
        raise BagError(f'rate must be positive, got {rate_hz}')
    render = render or (lambda grey, _index: (grey, 'mono8'))
    start_ns = int(time.time_ns() if start_ns is None else start_ns)
    period_ns = 1e9 / rate_hz
    typestore = make_typestore(version)
    Header = typestore.types['std_msgs/msg/Header']
    Image = typestore.types[IMAGE_TYPE]
    GroundTruth = typestore.types[GROUND_TRUTH_TYPE]
    Clock = typestore.types[CLOCK_TYPE]
    from .core.data import CLASS_NAMES

    writer = open_writer(path, storage, version)
    for key, value in (custom_data or {}).items():
        writer.set_custom_data(key, str(value))
    counts = {image_topic: 0, truth_topic: 0}
    end_ns = start_ns
    try:
        img_conn = add_topic(writer, typestore, image_topic, IMAGE_TYPE,
                             [default_qos(image_topic, IMAGE_TYPE)])
        gt_conn = add_topic(writer, typestore, truth_topic, GROUND_TRUTH_TYPE,
                            [TOPIC_QOS['ground_truth']])
        clock_conn = None
        if clock:
            clock_conn = add_topic(writer, typestore, '/clock', CLOCK_TYPE, [TOPIC_QOS['clock']])
            counts['/clock'] = 0
        n = 0
        for batch in stream.batches(batch_size):
            for k in range(len(batch.labels)):
                index = n        # position in the stream (as the sim camera counts frames)
                ts = start_ns + int(round(index * period_ns))
                header = Header(stamp=_stamp(typestore, ts), frame_id=frame_id)
                pixels, encoding = render(batch.images[k], index)
                pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
                channels = 1 if pixels.ndim == 2 else pixels.shape[2]
                image = Image(header=header, height=pixels.shape[0], width=pixels.shape[1],
                              encoding=encoding, is_bigendian=0,
                              step=pixels.shape[1] * channels, data=pixels.reshape(-1))
                label = int(batch.labels[k])
                truth = GroundTruth(header=header, frame_index=index, class_index=label,
                                    label=CLASS_NAMES[label], corruption=str(batch.corruption[k]),
                                    severity=int(batch.severity[k]))
                if clock_conn is not None:
                    writer.write(clock_conn, ts,
                                 typestore.serialize_cdr(Clock(clock=header.stamp), CLOCK_TYPE))
                    counts['/clock'] += 1
                writer.write(img_conn, ts, typestore.serialize_cdr(image, IMAGE_TYPE))
                writer.write(gt_conn, ts, typestore.serialize_cdr(truth, GROUND_TRUTH_TYPE))
                counts[image_topic] += 1
                counts[truth_topic] += 1
                end_ns = ts
                n += 1
            if progress is not None:
                progress(len(batch.labels))
        writer.close()
    except BaseException:
        try:
            writer.close()
        except Exception:
            pass
        shutil.rmtree(path, ignore_errors=True)
        raise
    return BagSummary(Path(path), storage, version, n, start_ns, end_ns, counts)


# ----------------------------------------------------------------------------------------------
# reading

def open_reader(path: str | os.PathLike, version: int = DEFAULT_VERSION):
    """An AnyReader over a rosbag2 directory; our types are the fallback for bags without defs."""
    from rosbags.highlevel import AnyReader, AnyReaderError
    path = Path(path)
    if not path.exists():
        raise BagError(f'bag {path} does not exist')
    if path.is_file():
        path = path.parent   # accept the .mcap/.db3 file or its metadata.yaml
    try:
        return AnyReader([path], default_typestore=make_typestore(version))
    except AnyReaderError as exc:
        raise BagError(f'{path}: {exc}') from exc


def custom_data(reader) -> dict[str, str]:
    """The bag's custom metadata (rosbag2 metadata >= 6), e.g. make-bag's item region."""
    out: dict[str, str] = {}
    for sub in getattr(reader, 'readers', []):
        # rosbags 0.11 keeps metadata on the storage wrapper; older releases on the reader.
        for holder in (getattr(sub, 'storage', None), sub):
            meta = getattr(holder, 'metadata', None)
            custom = getattr(meta, 'custom', None)
            if custom:
                out.update({str(k): str(v) for k, v in custom.items()})
                break
    return out


def bag_item_roi(reader):
    """The item region make-bag stored for camera frames (imaging.Roi), or None."""
    from .imaging import Roi
    text = custom_data(reader).get('async_ttt_ros.item_roi', '').split()
    if len(text) != 4:
        return None
    x, y, w, h = (int(v) for v in text)
    return Roi(x, y, w, h)


def topic_name_matches(bag_topic: str, wanted: str) -> bool:
    """'/ns/image' matches 'image', '/ns/image' and 'ns/image' (relative names match the tail)."""
    if wanted.startswith('/'):
        return bag_topic == wanted
    return bag_topic == '/' + wanted or bag_topic.endswith('/' + wanted)


def find_connections(reader, topic: str, msgtype: str | None = None) -> list:
    conns = [c for c in reader.connections if topic_name_matches(c.topic, topic)]
    if msgtype is not None:
        conns = [c for c in conns if c.msgtype == msgtype]
    return conns


def _require(reader, topic: str, msgtype: str, path) -> list:
    conns = find_connections(reader, topic, msgtype)
    if not conns:
        have = ', '.join(f'{c.topic} [{c.msgtype}]' for c in reader.connections) or 'nothing'
        raise BagError(f'{path}: no {msgtype} messages on topic {topic!r} (the bag has: {have})')
    return conns


def _image_to_model_frame(msg, input_shape: tuple[int, int, int], roi) -> np.ndarray:
    """Decoded Image -> uint8 frame at the model input size, as perception_node sees it.

    With a region (perception's `roi` parameter; make-bag stores the tray it drew the item in)
    the crop is exactly perception's. Without one, perception takes the centre square; here the
    centre square is area-downscaled to the model input (the same region, resized with
    imaging's resize rather than torch's: give --roi where that difference matters).
    """
    from .imaging import Roi, crop_to_model_input, image_to_numpy
    pixels = image_to_numpy(msg)
    if roi is None:
        h, w = int(msg.height), int(msg.width)
        side = min(h, w)
        roi = Roi((w - side) // 2, (h - side) // 2, side, side)
    return crop_to_model_input(pixels, msg.encoding, roi, input_shape)


def require_topics(path, topics: Sequence[tuple[str, str]]) -> None:
    """Raise BagError unless the bag has messages of each (topic, type): a cheap check before
    anything expensive (loading or training a model) runs."""
    with open_reader(path) as reader:
        for topic, msgtype in topics:
            _require(reader, topic, msgtype, path)


@dataclass
class BagFrames:
    """Frames of a bag joined with their ground truth (by header stamp), in stamp order."""
    stamps_ns: np.ndarray        # int64 [N]
    images: np.ndarray           # uint8 [N, H, W] (or [N, H, W, 3]) at the model input size
    labels: np.ndarray           # int64 [N]
    corruption: list[str]
    severity: np.ndarray         # int64 [N]
    frame_index: np.ndarray      # int64 [N] (GroundTruth.frame_index)
    unmatched_images: int = 0    # images without a ground-truth message (not evaluated)


def read_frames(path, image_topic: str = 'image', truth_topic: str = 'ground_truth',
                input_shape: tuple[int, int, int] = (1, 28, 28), roi=None,
                limit: int | None = None) -> BagFrames:
    """Images and ground truth of a bag, joined by header stamp, converted to model input size."""
    images: dict[int, np.ndarray] = {}
    truths: dict[int, tuple] = {}
    with open_reader(path) as reader:
        # Region of the frame that holds the item: given, else stored by make-bag, else the
        # centre square (perception_node's default).
        roi = roi if roi is not None else bag_item_roi(reader)
        img_conns = _require(reader, image_topic, IMAGE_TYPE, path)
        gt_conns = _require(reader, truth_topic, GROUND_TRUTH_TYPE, path)
        for conn, _, raw in reader.messages(connections=img_conns + gt_conns):
            msg = reader.deserialize(raw, conn.msgtype)
            key = stamp_to_ns(msg.header.stamp)
            if conn.msgtype == IMAGE_TYPE:
                images[key] = _image_to_model_frame(msg, input_shape, roi)
            else:
                truths[key] = (int(msg.class_index), str(msg.corruption), int(msg.severity),
                               int(msg.frame_index))
            if limit is not None and len(images.keys() & truths.keys()) >= limit:
                break
    keys = sorted(images.keys() & truths.keys())
    if limit is not None:
        keys = keys[:limit]
    if not keys:
        raise BagError(f'{path}: no image has a ground-truth message with the same header stamp')
    shape = (0, *input_shape[1:]) if input_shape[0] == 1 else (0, *input_shape[1:], input_shape[0])
    return BagFrames(
        stamps_ns=np.asarray(keys, dtype=np.int64),
        images=np.stack([images[k] for k in keys]) if keys else np.zeros(shape, np.uint8),
        labels=np.asarray([truths[k][0] for k in keys], dtype=np.int64),
        corruption=[truths[k][1] for k in keys],
        severity=np.asarray([truths[k][2] for k in keys], dtype=np.int64),
        frame_index=np.asarray([truths[k][3] for k in keys], dtype=np.int64),
        unmatched_images=len(images.keys() - truths.keys()))


@dataclass
class RecordedPredictions:
    """Every recorded ground-truth frame (stamp order) with the prediction of the same stamp."""
    stamps_ns: np.ndarray
    has_prediction: np.ndarray   # bool [N]: perception published a prediction for this frame
    predicted: np.ndarray        # int64 [N]: predicted class, -1 where none
    labels: np.ndarray           # int64 [N]
    confidence: np.ndarray       # float32 [N] (NaN where none)
    latency_ms: np.ndarray       # float32 [N] (NaN where none)
    model_version: np.ndarray    # int64 [N]: version that predicted (last known where none)
    corruption: list[str]
    severity: np.ndarray
    frame_index: np.ndarray
    predictions_without_truth: int = 0     # predictions of frames with no ground truth


def read_predictions(path, prediction_topic: str = 'prediction',
                     truth_topic: str = 'ground_truth') -> RecordedPredictions:
    """Join recorded Prediction and GroundTruth messages by header stamp."""
    preds: dict[int, tuple] = {}
    truths: dict[int, tuple] = {}
    with open_reader(path) as reader:
        p_conns = _require(reader, prediction_topic, PREDICTION_TYPE, path)
        gt_conns = _require(reader, truth_topic, GROUND_TRUTH_TYPE, path)
        for conn, _, raw in reader.messages(connections=p_conns + gt_conns):
            msg = reader.deserialize(raw, conn.msgtype)
            key = stamp_to_ns(msg.header.stamp)
            if conn.msgtype == PREDICTION_TYPE:
                preds[key] = (int(msg.class_index), float(msg.confidence), float(msg.latency_ms),
                              int(msg.model_version))
            else:
                truths[key] = (int(msg.class_index), str(msg.corruption), int(msg.severity),
                               int(msg.frame_index))
    keys = sorted(truths)
    matched = [k in preds for k in keys]
    if not any(matched):
        raise BagError(f'{path}: no prediction has a ground-truth message with the same header '
                       f'stamp ({len(preds)} predictions, {len(truths)} ground truths)')
    nan = float('nan')
    versions, last = [], 0
    for k in keys:
        last = preds[k][3] if k in preds else last
        versions.append(last)
    return RecordedPredictions(
        stamps_ns=np.asarray(keys, dtype=np.int64),
        has_prediction=np.asarray(matched, dtype=bool),
        predicted=np.asarray([preds[k][0] if k in preds else -1 for k in keys], dtype=np.int64),
        labels=np.asarray([truths[k][0] for k in keys], dtype=np.int64),
        confidence=np.asarray([preds[k][1] if k in preds else nan for k in keys], np.float32),
        latency_ms=np.asarray([preds[k][2] if k in preds else nan for k in keys], np.float32),
        model_version=np.asarray(versions, dtype=np.int64),
        corruption=[truths[k][1] for k in keys],
        severity=np.asarray([truths[k][2] for k in keys], dtype=np.int64),
        frame_index=np.asarray([truths[k][3] for k in keys], dtype=np.int64),
        predictions_without_truth=len(preds.keys() - truths.keys()))


class BagStream:
    """A recorded stream with the DriftStream interface the evaluation protocol consumes:
    `len()`, `batches(batch_size)`, `frame(i)` and `schedule()` (segments of the recording)."""

    def __init__(self, frames: BagFrames, name: str = 'bag'):
        self.frames = frames
        self.name = name

    def __len__(self) -> int:
        return int(len(self.frames.labels))

    def _batch(self, sl: slice):
        try:
            from .core.streams import FrameBatch
        except ImportError:   # pragma: no cover - core.streams missing in a partial install
            FrameBatch = _FrameBatch
        f = self.frames
        return FrameBatch(index=np.arange(len(self))[sl], images=f.images[sl],
                          labels=f.labels[sl], corruption=f.corruption[sl],
                          severity=f.severity[sl])

    def batches(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, not {batch_size}')
        for start in range(0, len(self), batch_size):
            yield self._batch(slice(start, start + batch_size))

    def frame(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f'frame {i} out of range 0..{len(self) - 1}')
        return self._batch(slice(i, i + 1))

    def schedule(self) -> list[dict]:
        """Contiguous (corruption, severity) segments, as the frames were recorded."""
        segs: list[dict] = []
        for i, (c, s) in enumerate(zip(self.frames.corruption, self.frames.severity)):
            if segs and segs[-1]['corruption'] == c and segs[-1]['severity'] == int(s):
                segs[-1]['end'] = i + 1
            else:
                segs.append({'start': i, 'end': i + 1, 'corruption': c, 'severity': int(s)})
        return segs

    def rate_hz(self) -> float | None:
        """The recording's frame rate from the median stamp interval (None if unknown)."""
        stamps = self.frames.stamps_ns
        if len(stamps) < 2:
            return None
        period = float(np.median(np.diff(stamps)))
        return 1e9 / period if period > 0 else None


@dataclass
class _FrameBatch:
    index: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    corruption: list
    severity: np.ndarray


def iter_messages(reader, connections: Iterable | None = None, start_ns: int | None = None
                  ) -> Iterator[tuple[object, int, bytes]]:
    """(connection, receive timestamp ns, raw CDR bytes) in timestamp order.

    `connections=None` means all; an empty collection yields nothing (rosbags would read all).
    """
    if connections is not None:
        connections = list(connections)
        if not connections:
            return
    yield from reader.messages(connections=connections or (), start=start_ns)
