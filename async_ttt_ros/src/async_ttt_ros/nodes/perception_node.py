"""perception_node: classifies every camera frame at sensor rate and never waits for learning.

Image callback (its own mutually exclusive group): view the pixels (zero copy), crop/resize,
one forward pass of the served model under torch.inference_mode(), publish `prediction` (header
copied from the image) and every n-th frame `latents` for the adaptation node. Nothing else runs
in that callback.

Services (their own group, so a delta never waits behind a frame and vice versa):
`apply_parameter_delta` validates a versioned delta through ServedModel (names, shapes, finite,
base version, norm bound, optional HMAC) and swaps it in between frames; `get_adaptable_state`
lets an adapter resynchronise. Every accepted delta is checkpointed atomically; at start the
node resumes from that checkpoint.

Modes (parameter `mode`): `async` (default: deltas come from adaptation_node), `sync` (the
classic TTA loop: an Adapter runs inline in the image callback, for comparison), `none` (frozen
source model; deltas refused).
"""
from __future__ import annotations

import copy
import os
import threading
import time

import numpy as np
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from sensor_msgs.msg import Image

from async_ttt_ros_interfaces.msg import LatentBatch, Prediction
from async_ttt_ros_interfaces.srv import ApplyParameterDelta, GetAdaptableState

from .. import qos
from ..imaging import (ENCODINGS, MAX_DIM, ImageFormatError, Roi, crop_to_model_input,
                       image_to_numpy, to_rgb)
from ..ros_conversions import (DeltaFormatError, latents_to_msg, prediction_msg, request_to_delta,
                               state_to_response)
from ._common import RateMeter, Rolling, declare, diagnostic_array, load_hmac_key, run

MODES = ('async', 'sync', 'none')
# Why a frame was dropped; each has its own counter in /diagnostics (malformed_<reason>).
MALFORMED_REASONS = ('encoding', 'zero_size', 'too_large', 'endianness', 'step', 'data_size',
                     'region', 'other')
# Upper bounds of the small fields of a delta request (the values are bounded by
# max_delta_values): anything longer is garbage or an attack, refused before it is parsed.
MAX_ID_CHARS, MAX_PROPOSER_CHARS, MAX_SIGNATURE_BYTES, MAX_RANK = 128, 256, 64, 8


class PerceptionNode(Node):
    def __init__(self, **kwargs):
        super().__init__('perception_node', **kwargs)
        self.arch = declare(self, 'arch', 'fmnist_cnn', 'Model architecture.',
                            choices=('fmnist_cnn', 'camera_resnet18'))
        tap = declare(self, 'tap', '', 'Split point between frozen stem and adaptable head '
                      '("" = the architecture default). Must match adaptation_node.')
        threads = declare(self, 'num_threads', 1, 'torch.set_num_threads for this process.',
                          int_range=(1, 256))
        self.mode = declare(self, 'mode', 'async', 'async: deltas from adaptation_node; sync: '
                            'adapt inline per frame (comparison); none: frozen model.', choices=MODES)
        self.method = declare(self, 'method', 'norm', 'Adaptation method of the inline Adapter '
                              '(mode sync only).', choices=('source', 'norm', 'tent', 'eata', 'safe'))
        self.sync_batch = declare(self, 'sync_batch_size', 16, 'Adapter batch size (mode sync).',
                                  int_range=(1, 4096))
        self.latents_every_n = declare(self, 'latents_every_n', 1, 'Publish latents of every n-th '
                                       'frame (0 = never).', read_only=False, int_range=(0, 1000))
        self.max_delta_norm = declare(self, 'max_delta_norm', 1000.0, 'Largest L2 norm of a delta '
                                      'that is accepted.', float_range=(1e-6, 1e9))
        self.checkpoint_path = declare(self, 'checkpoint_path', '', 'Served state is saved here '
                                       '(atomically) after every accepted delta ("" = off).')
        self.resume = declare(self, 'resume', True, 'Resume from checkpoint_path at start.')
        roi = declare(self, 'roi', [0, 0, 0, 0], 'Region of interest [x, y, w, h] cropped from '
                      'the image before resizing to the model input (zeros = centre square).')
        self.publish_source = declare(
            self, 'publish_source_prediction', False, 'Also publish the frozen source model\'s '
            'prediction of each frame on prediction_source (honest baseline; costs one forward).',
            read_only=False)
        epochs = declare(self, 'train_epochs', 2, 'Source model: training epochs (cache key).',
                         int_range=(1, 100))
        seed = declare(self, 'seed', 0, 'Source model: training seed (cache key).',
                       int_range=(0, 2**31 - 1))
        cache_dir = declare(self, 'cache_dir', '', 'Model cache ("" = $ASYNC_TTT_CACHE or '
                            '~/.cache/async_ttt_ros).')
        hmac_env = declare(self, 'hmac_key_env', '', 'Name of an environment variable holding '
                           'the HMAC key deltas must be signed with ("" = unsigned).')
        hmac_file = declare(self, 'hmac_key_file', '', 'File holding the HMAC key deltas must be '
                            'signed with (wins over hmac_key_env; "" = not used).')
        max_values = declare(self, 'max_delta_values', 0, 'Largest number of values a delta '
                             'request may carry; larger requests are refused before parsing '
                             '(0 = the size of the adaptable state, the most a real delta has).',
                             int_range=(0, 1 << 30))
        diag_period = declare(self, 'diagnostics_period', 1.0, 'Seconds between /diagnostics.',
                              float_range=(0.05, 3600.0))

        torch.set_num_threads(int(threads))
        self.roi = Roi(*roi) if any(roi) else None

        from ..core.serving import ServedModel
        from ..core.training import load_or_train
        model = load_or_train(self.arch, tap or None, epochs=epochs, seed=seed,
                              cache_dir=cache_dir or None, log=self.get_logger().info)
        self.tap = model.tap
        self.labels = _class_names()
        self.source_model = copy.deepcopy(model).eval()
        hmac_key = load_hmac_key(hmac_env, hmac_file)
        self.served = ServedModel(model, max_delta_norm=self.max_delta_norm, hmac_key=hmac_key)
        version, state = self.served.state()
        self.max_delta_values = int(max_values) or int(sum(v.size for v in state.values()))
        self.max_delta_tensors = len(state)
        if self.checkpoint_path and self.resume and os.path.exists(self.checkpoint_path):
            result = self.served.load_checkpoint(self.checkpoint_path)
            if result.accepted:
                self.get_logger().info(f'resumed served state: {result.reason}')
            else:   # a bad checkpoint must not stop perception: serve the source model
                self.get_logger().error(f'not resuming: {result.reason}')

        self._checkpoints = None
        if self.checkpoint_path:
            from ..core.checkpoint_writer import CheckpointWriter
            self._checkpoints = CheckpointWriter(
                self.served.save_checkpoint, self.checkpoint_path,
                on_error=lambda exc: self.get_logger().error(
                    f'checkpoint {self.checkpoint_path} failed: {exc}', throttle_duration_sec=10.0))

        self.adapter = None
        if self.mode == 'sync':
            from ..core.adapter import Adapter
            self.adapter = Adapter(self.source_model, self.method, batch_size=self.sync_batch,
                                   max_delta_norm=self.max_delta_norm, proposer='inline')
            version, state = self.served.state()
            self.adapter.resync(version, state)

        # Statistics (read by the diagnostics timer from another thread).
        self.latency = Rolling(1000)
        self.frames = RateMeter(time.monotonic_ns)
        self.malformed = 0
        self.malformed_by_reason = dict.fromkeys(MALFORMED_REASONS, 0)
        self.lost = 0
        self.deltas_accepted = 0
        self.deltas_refused = 0
        self._frame_count = 0
        self._apply_lock = threading.Lock()   # sync-mode applies vs service applies

        image_group = MutuallyExclusiveCallbackGroup()
        service_group = MutuallyExclusiveCallbackGroup()
        diag_group = MutuallyExclusiveCallbackGroup()
        self.pred_pub = self.create_publisher(Prediction, 'prediction', qos.prediction_qos())
        self.source_pub = self.create_publisher(Prediction, 'prediction_source', qos.prediction_qos())
        self.latent_pub = self.create_publisher(LatentBatch, 'latents', qos.latents_qos())
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', qos.diagnostics_qos())
        self.image_sub = self._subscribe_images(image_group)
        self.create_service(ApplyParameterDelta, 'apply_parameter_delta', self._on_apply,
                            callback_group=service_group)
        self.create_service(GetAdaptableState, 'get_adaptable_state', self._on_get_state,
                            callback_group=service_group)
        self.create_timer(diag_period, self._publish_diagnostics, callback_group=diag_group,
                          clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.get_logger().info(
            f'perception: {self.arch} tap={self.tap} mode={self.mode} version={self.served.version} '
            f'threads={torch.get_num_threads()} roi={list(roi) if self.roi else "centre square"} '
            f'deltas: {"HMAC-SHA256 signed" if hmac_key else "unsigned"}, at most '
            f'{self.max_delta_values} values, L2 norm <= {self.max_delta_norm:g}')

    def destroy_node(self) -> None:
        if self._checkpoints is not None and not self._checkpoints.close():
            self.get_logger().error(f'checkpoint {self.checkpoint_path}: last write did not finish')
        super().destroy_node()

    # -- wiring ----------------------------------------------------------------------------------
    def _subscribe_images(self, group):
        def on_lost(info):
            self.lost += int(getattr(info, 'total_count_change', 1))

        kwargs = dict(callback_group=group, qos_overriding_options=qos.image_overrides())
        try:
            return self.create_subscription(
                Image, 'image', self._on_image, qos.image_qos(),
                event_callbacks=qos.SubscriptionEventCallbacks(message_lost=on_lost), **kwargs)
        except qos.UnsupportedEventTypeError:   # RMW without message_lost events
            return self.create_subscription(Image, 'image', self._on_image, qos.image_qos(), **kwargs)

    def _on_set_parameters(self, params):
        from rcl_interfaces.msg import SetParametersResult
        for p in params:
            if p.name == 'latents_every_n':
                self.latents_every_n = int(p.value)
            elif p.name == 'publish_source_prediction':
                self.publish_source = bool(p.value)
        return SetParametersResult(successful=True)

    # -- hot path --------------------------------------------------------------------------------
    def _model_input(self, msg: Image) -> torch.Tensor:
        from ..core.model import preprocess, preprocess_frame
        pixels = image_to_numpy(msg)   # validates encoding, sizes, step, endianness flag
        if self.roi is not None:
            region = crop_to_model_input(pixels, msg.encoding, self.roi, self.served_shape)
            return preprocess(region[None], self.arch)
        if pixels.ndim == 3:
            pixels = to_rgb(pixels, msg.encoding)
        elif pixels.dtype != np.uint8:
            from ..imaging import to_grey
            pixels = to_grey(pixels, msg.encoding)
        return preprocess_frame(pixels, self.arch)

    @property
    def served_shape(self):
        return self.source_model.input_shape

    def _on_image(self, msg: Image) -> None:
        t0 = time.perf_counter()
        if not self.context.ok():   # shutting down (Ctrl-C): publishers are gone
            return
        try:
            x = self._model_input(msg)
        except (ImageFormatError, ValueError) as exc:
            reason = self._malformed_reason(msg)
            self.malformed_by_reason[reason] += 1
            self.malformed += 1
            self.get_logger().warning(f'dropping malformed image ({reason}; {self.malformed} so '
                                      f'far): {exc}', throttle_duration_sec=5.0)
            return
        with torch.inference_mode():
            logits, latents, version = self.served.predict_versioned(x)
            probs = torch.softmax(logits, dim=1)[0].numpy()
            source_probs = None
            if self.publish_source:
                source_probs = torch.softmax(self.source_model(x), dim=1)[0].numpy()
        self._frame_count += 1
        if self.adapter is not None:
            self._sync_step(latents, version)
        publish_latents = (self.mode == 'async' and self.latents_every_n
                           and self._frame_count % self.latents_every_n == 0)
        latency_ms = (time.perf_counter() - t0) * 1e3
        self.pred_pub.publish(prediction_msg(msg.header, version, probs, self.labels, latency_ms))
        if source_probs is not None:
            self.source_pub.publish(prediction_msg(msg.header, 0, source_probs, self.labels, latency_ms))
        if publish_latents:
            self.latent_pub.publish(latents_to_msg(latents, version, self.tap, msg.header,
                                                   [int(np.argmax(probs))]))
        self.latency.add(latency_ms)
        self.frames.tick()

    def _malformed_reason(self, msg: Image) -> str:
        """Which check a refused frame failed (error path only: the hot path never runs this)."""
        spec = ENCODINGS.get(str(msg.encoding))
        if spec is None:
            return 'encoding'
        height, width, step = int(msg.height), int(msg.width), int(msg.step)
        if height <= 0 or width <= 0:
            return 'zero_size'
        if height > MAX_DIM or width > MAX_DIM:
            return 'too_large'
        if msg.is_bigendian not in (0, 1):
            return 'endianness'
        if step < width * spec.dtype.itemsize * spec.channels or step % spec.dtype.itemsize:
            return 'step'
        if len(msg.data) != step * height:
            return 'data_size'
        return 'region' if self.roi is not None else 'other'

    def _sync_step(self, latents, version) -> None:
        """The classic loop, inline: ingest this frame, adapt, apply at once (sync mode)."""
        self.adapter.ingest(latents, version)
        proposal = self.adapter.step()
        if proposal is None or proposal.delta is None:
            return
        with self._apply_lock:
            result = self.served.apply(proposal.delta)
        if result.accepted:
            self.adapter.acknowledge(result.version)
            self.deltas_accepted += 1
        else:
            self.adapter.refused(result.reason)
            self.deltas_refused += 1
            version, state = self.served.state()
            self.adapter.resync(version, state)

    # -- services --------------------------------------------------------------------------------
    def _on_apply(self, request, response):
        if self.mode != 'async':
            response.accepted, response.version = False, int(self.served.version)
            response.reason = f'mode {self.mode}: this node does not take external deltas'
            self.deltas_refused += 1
            return response
        too_large = self._oversized(request)
        if too_large:
            response.accepted, response.version = False, int(self.served.version)
            response.reason = f'request too large: {too_large}'
            self.deltas_refused += 1
            self.get_logger().warning(f'refused delta: {response.reason}', throttle_duration_sec=2.0)
            return response
        try:
            delta = request_to_delta(request)
        except DeltaFormatError as exc:
            response.accepted, response.version = False, int(self.served.version)
            response.reason = f'malformed delta: {exc}'
            self.deltas_refused += 1
            return response
        with self._apply_lock:
            result = self.served.apply(delta)
        if result.accepted and self._checkpoints is not None:
            self._checkpoints.request()     # written on its own thread: frames never wait on disk
        response.accepted, response.version, response.reason = (
            bool(result.accepted), int(result.version), str(result.reason))
        if result.accepted:
            self.deltas_accepted += 1
        else:
            self.deltas_refused += 1
            self.get_logger().info(f'refused delta {request.delta_id[:8]}: {result.reason}',
                                   throttle_duration_sec=2.0)
        return response

    def _oversized(self, request) -> str:
        """Why a request is larger than any real delta ('' if it is not), checked on the field
        lengths only, before anything is copied or parsed."""
        checks = (
            (len(request.values), self.max_delta_values, 'values (max_delta_values)'),
            (len(request.names), self.max_delta_tensors, 'names (adaptable tensors)'),
            (len(request.ranks), self.max_delta_tensors, 'ranks (adaptable tensors)'),
            (len(request.dims), MAX_RANK * self.max_delta_tensors, 'dims'),
            (len(request.delta_id), MAX_ID_CHARS, 'characters of delta_id'),
            (len(request.proposer), MAX_PROPOSER_CHARS, 'characters of proposer'),
            (len(request.signature), MAX_SIGNATURE_BYTES, 'signature bytes'),
            (sum(len(n) for n in request.names), 256 * self.max_delta_tensors, 'characters of names'),
        )
        for size, limit, what in checks:
            if size > limit:
                return f'{size} {what} > {limit}'
        return ''

    def _on_get_state(self, _request, response):
        version, state = self.served.state()
        return state_to_response(version, self.tap, state, response)

    # -- diagnostics -----------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        if not self.context.ok():
            return
        p50, p99 = self.latency.percentiles(50, 99)
        rate = self.frames.rate()
        level = DiagnosticStatus.OK if not (self.malformed or self.lost) else DiagnosticStatus.WARN
        self.diag_pub.publish(diagnostic_array(
            self, 'perception_node: inference', level,
            f'{rate:.1f} Hz, model version {self.served.version}', {
                'rate_hz': rate, 'latency_p50_ms': p50, 'latency_p99_ms': p99,
                'frames': self.frames.total, 'malformed_dropped': self.malformed,
                **{f'malformed_{k}': v for k, v in self.malformed_by_reason.items()},
                'transport_lost': self.lost, 'model_version': int(self.served.version),
                'deltas_accepted': self.deltas_accepted, 'deltas_refused': self.deltas_refused,
                'mode': self.mode, 'arch': self.arch, 'tap': self.tap}))


def _class_names():
    from ..core.data import CLASS_NAMES
    return CLASS_NAMES


def main(args=None) -> int:
    # One thread: measured with bench-live (fmnist_cnn, 30 Hz, 2 cores), rclpy's
    # MultiThreadedExecutor spent about a third of perception's CPU handing each frame to a pool
    # thread and rebuilding its wait set (6.3-6.8 ms CPU per frame, async/none p99 1.24-1.94x,
    # up to 6.5 % frames dropped); the single-threaded executor: 4.0-4.3 ms, p99 0.83-0.93x,
    # none dropped. Nothing here needs a second thread: a delta is validated and swapped in under
    # a millisecond (between frames, by construction) and checkpoints are written on their own
    # thread.
    return run(PerceptionNode, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
