"""sim_camera_node: a 640x480 rgb8 camera looking at Fashion-MNIST items on a conveyor, under drift.

Publishes `image` (sensor_msgs/Image, SensorDataQoS) at `rate` Hz and, with the very same header,
`ground_truth` (GroundTruth: class, corruption, severity) for evaluation. The items come from the
core's DriftStream (the corruption schedule is the drift), composed into a camera-like scene by
`scene.SceneComposer`. Optionally publishes `/clock` so the whole graph can run on sim time.

Holding the rate on a loaded machine: stream frames (whose corruptions can cost milliseconds) are
prefetched in batches by a worker thread into a bounded queue; the timer callback only composes (~1.5 ms),
copies into the message (~1 ms) and publishes.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.time import Time
from rosgraph_msgs.msg import Clock as ClockMsg
from sensor_msgs.msg import Image

from async_ttt_ros_interfaces.msg import GroundTruth

from .. import qos
from ..imaging import numpy_to_image
from ._common import declare, diagnostic_array, run
from .scene import HEIGHT, WIDTH, SceneComposer


class SimCameraNode(Node):
    def __init__(self, **kwargs):
        super().__init__('sim_camera_node', **kwargs)
        self.rate = declare(self, 'rate', 30.0, 'Frames per second.', float_range=(0.1, 1000.0))
        self.schedule = declare(self, 'schedule', 'continual',
                                'Drift schedule of core.streams.make_stream.')
        self.length = declare(self, 'stream_length', 10000, 'Frames in the drift stream.',
                              int_range=(1, 10_000_000))
        self.seed = declare(self, 'seed', 0, 'Stream and scene seed.', int_range=(0, 2**31 - 1))
        self.severity = declare(self, 'severity', 5, 'Corruption severity.', int_range=(0, 5))
        corruptions = declare(self, 'corruptions', [''],
                              'Corruption names in schedule order ([""] = the stream default).')
        self.corruptions = [c for c in corruptions if c] or None
        self.loop = declare(self, 'loop', True, 'Restart the stream when it ends (else stop).')
        self.max_frames = declare(self, 'max_frames', 0,
                                  'Stop after this many frames (0 = unlimited).', int_range=(0, 2**31 - 1))
        roi = declare(self, 'item_roi', [0, 0, 0, 0],
                      'Tray region [x, y, w, h] where the item is drawn (zeros = centred 224x224). '
                      'Give the perception node the same region as its roi parameter.')
        noise = declare(self, 'noise_sigma', 2.0, 'Camera sensor noise (grey levels).',
                        float_range=(0.0, 50.0))
        self.frame_id = declare(self, 'frame_id', 'camera_optical_frame', 'Header frame_id.')
        self.publish_clock = declare(
            self, 'publish_clock', False,
            'Publish /clock (sim time = frame index / rate): run the graph with use_sim_time.')

        self.stream = self._make_stream()
        self.scene = SceneComposer(WIDTH, HEIGHT, roi, noise_sigma=noise, seed=self.seed)
        self.labels = _class_names()

        self.image_pub = self.create_publisher(Image, 'image', qos.image_qos())
        self.truth_pub = self.create_publisher(GroundTruth, 'ground_truth', qos.ground_truth_qos())
        self.clock_pub = (self.create_publisher(ClockMsg, '/clock', qos.clock_qos())
                          if self.publish_clock else None)
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', qos.diagnostics_qos())

        # Prefetch queue: the worker stays `ahead` frames in front of the publisher.
        self._ahead = max(8, int(self.rate))
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._running = True
        self._worker = threading.Thread(target=self._prefetch, daemon=True, name='stream_prefetch')
        self._worker.start()

        self.index = 0
        self.published = 0
        self.late = 0
        self._t_start = time.monotonic()
        period = 1.0 / self.rate
        # When this node is the time source it cannot wait on its own sim clock: steady timer.
        clock = Clock(clock_type=ClockType.STEADY_TIME) if self.publish_clock else None
        group = MutuallyExclusiveCallbackGroup()
        self.timer = self.create_timer(period, self._on_timer, callback_group=group, clock=clock)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup(),
                          clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.get_logger().info(
            f'sim camera: {WIDTH}x{HEIGHT} rgb8 at {self.rate:g} Hz, stream {self.schedule} '
            f'({self.length} frames, severity {self.severity}), item region {list(self.scene.roi)}'
            + (', publishing /clock' if self.publish_clock else ''))

    def _make_stream(self):
        from ..core.streams import make_stream
        stream = make_stream(self.schedule, self.length, seed=self.seed, severity=self.severity,
                             corruptions=self.corruptions)
        # Load (or generate once, cached on disk) every corrupted pool now, not mid-stream
        # where it would stall the camera.
        t0 = time.monotonic()
        stream.prepare()
        self.get_logger().info(f'stream {stream!r} ready in {time.monotonic() - t0:.1f} s')
        return stream

    def _prefetch(self) -> None:
        """Worker thread: walk the stream in batches (corruptions are cheaper batched) and keep
        the queue `ahead` frames in front of the publisher; loop or mark the end."""
        index = 0
        while self._running:
            for batch in self.stream.batches(64):
                for k in range(len(batch.labels)):
                    item = (index, np.ascontiguousarray(batch.images[k], dtype=np.uint8),
                            int(batch.labels[k]), str(batch.corruption[k]), int(batch.severity[k]))
                    with self._cond:
                        while self._running and len(self._queue) >= self._ahead:
                            self._cond.wait(0.5)
                        if not self._running:
                            return
                        self._queue.append(item)
                    index += 1
            if not self.loop:
                with self._cond:
                    self._queue.append(None)   # end of stream
                return

    def _on_timer(self) -> None:
        if not self.context.ok():   # shutting down: publishers are gone
            return
        if self.max_frames and self.published >= self.max_frames:
            return
        with self._cond:
            if not self._queue:
                self.late += 1      # the prefetcher fell behind: skip this tick, never block
                return
            entry = self._queue.popleft()
            self._cond.notify_all()
        if entry is None:
            self.get_logger().info(f'stream finished after {self.published} frames')
            self.timer.cancel()
            return
        index, item, label, corruption, severity = entry
        if self.clock_pub is not None:
            stamp = Time(nanoseconds=int(round(self.published * 1e9 / self.rate))).to_msg()
            self.clock_pub.publish(ClockMsg(clock=stamp))
        else:
            stamp = self.get_clock().now().to_msg()
        frame = self.scene.compose(item, index)
        msg = numpy_to_image(frame, 'rgb8')
        msg.header.stamp = stamp
        msg.header.frame_id = self.frame_id
        truth = GroundTruth()
        truth.header = msg.header
        truth.frame_index = int(index)
        truth.class_index = label
        truth.label = self.labels[label] if 0 <= label < len(self.labels) else str(label)
        truth.corruption = corruption
        truth.severity = max(0, min(255, severity))
        # Ground truth first: a reliable message the monitor must hold until the prediction comes.
        self.truth_pub.publish(truth)
        self.image_pub.publish(msg)
        self.published += 1

    def _publish_diagnostics(self) -> None:
        if not self.context.ok():
            return
        elapsed = max(1e-9, time.monotonic() - self._t_start)
        self.diag_pub.publish(diagnostic_array(
            self, 'sim_camera_node: stream', DiagnosticStatus.OK if not self.late else DiagnosticStatus.WARN,
            f'{self.published} frames', {
                'frames_published': self.published, 'mean_rate_hz': self.published / elapsed,
                'ticks_skipped_prefetch_behind': self.late, 'schedule': self.schedule,
                'prefetched': len(self._queue)}))

    def destroy_node(self):
        with self._cond:
            self._running = False
            self._cond.notify_all()
        return super().destroy_node()


def _class_names():
    from ..core.data import CLASS_NAMES
    return CLASS_NAMES


def main(args=None) -> int:
    # Single-threaded: a frame timer and a 1 Hz diagnostics tick need no thread pool, and the
    # MultiThreadedExecutor's hand-off per tick costs CPU the perception node needs (see there).
    return run(SimCameraNode, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
