"""adaptation_node: learns from perception's latents on its own clock and sends versioned deltas.

Two threads, so that receiving never waits for learning:

- The executor thread (a SingleThreadedExecutor in `main`) does only I/O. `latents` (best
  effort, keep last 5, their own callback group) are validated and put into a bounded inbox;
  when the adapter falls behind, the inbox drops its oldest entries (counted as `busy`),
  perception never notices.
  A timer at `adapt_rate` Hz (on the node's clock, so it follows /clock with use_sim_time)
  only wakes the adaptation thread; status and diagnostics are published from a snapshot.
- The adaptation thread owns the Adapter: it moves the inbox into the Adapter's memory, runs
  Adapter.step(), and sends a proposal's delta to perception with `call_async` (at most one
  request in flight; never a blocking call). Responses wake it; a request unanswered after
  `call_timeout` is abandoned and counted.
- After any refusal, timeout or restart the adapter resynchronises: it fetches the served state
  with `get_adaptable_state` (also async) and adopts it before proposing again, so it never
  builds on a version perception does not serve.
- `adaptation_status` (latched) reports memory, steps, gate decisions and delivery counters.
"""
from __future__ import annotations

import collections
import os
import threading
import time
import traceback

import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node

from async_ttt_ros_interfaces.msg import AdaptationStatus, LatentBatch
from async_ttt_ros_interfaces.srv import ApplyParameterDelta, GetAdaptableState

from .. import qos
from ..ros_conversions import (DeltaFormatError, LatentFormatError, delta_to_request,
                               latents_from_msg, state_from_response)
from ._common import declare, diagnostic_array, load_hmac_key, run

METHODS = ('source', 'norm', 'tent', 'eata', 'safe')


class AdaptationThreadFailed(RuntimeError):
    """Raised on the executor thread when the adaptation thread died: ends the spin."""
DROP_REASONS = ('tap', 'shape', 'nonfinite', 'version', 'busy')


class AdaptationNode(Node):
    def __init__(self, **kwargs):
        super().__init__('adaptation_node', **kwargs)
        self.arch = declare(self, 'arch', 'fmnist_cnn', 'Model architecture (as perception_node).',
                            choices=('fmnist_cnn', 'camera_resnet18'))
        tap = declare(self, 'tap', '', 'Split point ("" = architecture default); must match '
                      'perception_node.')
        threads = declare(self, 'num_threads', 1, 'torch.set_num_threads for this process.',
                          int_range=(1, 256))
        self.method = declare(self, 'method', 'norm', 'Adaptation method.', choices=METHODS)
        self.adapt_rate = declare(self, 'adapt_rate', 2.0, 'Adaptation steps per second.',
                                  float_range=(0.01, 1000.0))
        batch = declare(self, 'batch_size', 64, 'Latents per adaptation step.', int_range=(1, 4096))
        capacity = declare(self, 'memory_capacity', 512, 'Latents kept in memory.',
                           int_range=(1, 1_000_000))
        # The Adapter trains on its newest batch: a step with no new latents (camera stopped,
        # robot standing still) would re-train on the same frames and drift. Skip those steps.
        self.min_new_latents = declare(self, 'min_new_latents', 8, 'New latents needed since '
                                       'the last step before the next one runs.',
                                       int_range=(0, 1_000_000))
        self._latents_at_last_step = 0
        gate = declare(self, 'gate', True, 'Score every proposal with the reputation gate.')
        self.call_timeout = declare(self, 'call_timeout', 2.0, 'Seconds before an unanswered '
                                    'delta or state request counts as failed.',
                                    float_range=(0.01, 600.0))
        epochs = declare(self, 'train_epochs', 2, 'Source model: training epochs (cache key).',
                         int_range=(1, 100))
        seed = declare(self, 'seed', 0, 'Source model seed (cache key).', int_range=(0, 2**31 - 1))
        cache_dir = declare(self, 'cache_dir', '', 'Model cache ("" = default).')
        self.hmac_env = declare(self, 'hmac_key_env', '', 'Environment variable holding the HMAC '
                                'key to sign deltas with ("" = unsigned).')
        hmac_file = declare(self, 'hmac_key_file', '', 'File holding the HMAC key to sign deltas '
                            'with (wins over hmac_key_env; "" = not used).')
        max_delta_norm = declare(self, 'max_delta_norm', 1000.0, 'Deltas above this L2 norm are '
                                 'scaled down to it; use perception_node\'s bound.',
                                 float_range=(1e-6, 1e9))
        lr = declare(self, 'lr', 0.0, 'Learning rate of gradient methods (tent, eata, safe); '
                     '0 = the method default.', float_range=(0.0, 10.0))
        status_period = declare(self, 'status_period', 1.0, 'Seconds between status messages.',
                                float_range=(0.05, 3600.0))
        # The adapter is the slower clock: when it shares cores with perception (a 2-core robot
        # computer), the scheduler should run perception first. A positive niceness needs no
        # privileges; 0 leaves the process as started (e.g. when a launch prefix or a cgroup
        # already decides its priority).
        niceness = declare(self, 'niceness', 10, 'Lower this process\'s CPU priority by this much '
                           '(os.nice) at start-up, so perception wins shared cores; 0 = unchanged.',
                           int_range=(0, 19))
        self.niceness = int(niceness)
        torch.set_num_threads(int(threads))

        from ..core.adapter import Adapter
        from ..core.training import load_or_train
        source = load_or_train(self.arch, tap or None, epochs=epochs, seed=seed,
                               cache_dir=cache_dir or None, log=self.get_logger().info)
        self.tap = source.tap
        self.latent_shape = tuple(source.latent_shape)
        hmac_key = load_hmac_key(self.hmac_env, hmac_file)
        hp = {'lr': lr} if lr > 0 else {}
        # Owned by the adaptation thread: nothing else touches it after construction.
        self.adapter = Adapter(source, self.method, memory_capacity=capacity, batch_size=batch,
                               gate=gate, max_delta_norm=max_delta_norm, hmac_key=hmac_key,
                               proposer=self.get_fully_qualified_name(), **hp)

        # Hand-off from the executor thread to the adaptation thread. deque appends and pops
        # are atomic; maxlen bounds it (two steps' worth, at least 64 latents) and drops the
        # oldest when the adapter is slower than the camera.
        self._inbox: collections.deque = collections.deque(maxlen=max(2 * batch, 64))
        self._wake = threading.Event()      # a tick, a response or shutdown
        self._tick_due = False
        self._stopping = threading.Event()
        self._destroyed = False
        self.failure: BaseException | None = None

        # Counters: each is written by one thread only (the GIL makes the reads safe).
        self.latents_received = 0                                   # executor thread
        self.dropped_by_reason = {reason: 0 for reason in DROP_REASONS}
        # ^ tap/shape/nonfinite/busy: executor thread; version: adaptation thread. `version` =
        #   tagged with a model version perception never acknowledged to us.
        self.served_version = None      # adaptation thread; None until the first resync
        self._in_flight = None          # adaptation thread: (future, kind, t0)
        self._unknown_version_at = None
        self._last_resync_request = -1e9
        self.deltas_sent = 0
        self.deltas_accepted = 0
        self.deltas_refused = 0
        self.calls_failed = 0
        self.resyncs = 0
        self._adapter_status = self.adapter.status()   # snapshot for the status timer

        # Latents in a callback group of their own: in `main` one thread runs every callback,
        # but a user composing this node into a multi-threaded executor still gets latents
        # received beside the timers, and each callback kind stays single-threaded (the
        # counters above rely on it).
        self.create_subscription(LatentBatch, 'latents', self._on_latents, qos.latents_qos(),
                                 callback_group=MutuallyExclusiveCallbackGroup())
        clock_group = MutuallyExclusiveCallbackGroup()   # the tick and the service answers
        self.apply_client = self.create_client(ApplyParameterDelta, 'apply_parameter_delta',
                                               callback_group=clock_group)
        self.state_client = self.create_client(GetAdaptableState, 'get_adaptable_state',
                                               callback_group=clock_group)
        self.status_pub = self.create_publisher(AdaptationStatus, 'adaptation_status', qos.status_qos())
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', qos.diagnostics_qos())
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.create_timer(1.0 / self.adapt_rate, self._on_tick, callback_group=clock_group)
        self.create_timer(status_period, self._publish_status, clock=steady,
                          callback_group=MutuallyExclusiveCallbackGroup())
        # The adaptation thread reports its death through the executor, which owns the node's
        # lifetime (shutting the context down from that thread would destroy the node under it).
        self._failure_signal = self.create_guard_condition(self._on_adaptation_failure)
        self._worker = threading.Thread(target=self._adaptation_loop, name='adaptation',
                                        daemon=True)
        self._worker.start()
        self.get_logger().info(f'adaptation: {self.method} on {self.arch} tap={self.tap} at '
                               f'{self.adapt_rate:g} Hz, batch {batch}, gate {"on" if gate else "off"}, '
                               f'nice +{self.niceness}')

    def destroy_node(self) -> None:
        if self._destroyed:      # rclpy's context cleanup and the owner may both call it
            return
        self._destroyed = True
        self._stopping.set()
        self._wake.set()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=10.0)
        super().destroy_node()

    @property
    def latents_dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    # -- executor thread: input and wake-ups -----------------------------------------------------
    def _drop(self, reason: str, detail: str, n: int = 1) -> None:
        self.dropped_by_reason[reason] += n
        self.get_logger().warning(f'dropping latents ({reason}): {detail}', throttle_duration_sec=5.0)

    def _on_latents(self, msg: LatentBatch) -> None:
        self.latents_received += 1
        if msg.tap != self.tap:
            self._drop('tap', f'from tap {msg.tap!r}, this node adapts {self.tap!r}')
            return
        try:
            view = latents_from_msg(msg, self.tap, self.latent_shape)
        except LatentFormatError as exc:
            self._drop('nonfinite' if 'non-finite' in str(exc) else 'shape', str(exc))
            return
        predicted = list(msg.predicted_classes) or None
        if predicted is not None and len(predicted) != view.shape[0]:
            predicted = None
        if len(self._inbox) == self._inbox.maxlen:
            # Make room explicitly (the deque's own eviction is silent): the adaptation thread
            # may empty the inbox between the check and here, then nothing is lost.
            try:
                oldest = self._inbox.popleft()
            except IndexError:
                oldest = None
            if oldest is not None:
                self._drop('busy', 'the adapter is behind; oldest unprocessed latents dropped',
                           int(oldest[0].shape[0]))
        # copy: the view aliases the message buffer, which rclpy may reuse
        self._inbox.append((torch.from_numpy(view.copy()), int(msg.model_version), predicted))

    def _on_tick(self) -> None:
        self._tick_due = True
        self._wake.set()

    def _on_response(self, _future) -> None:
        self._wake.set()

    def _on_adaptation_failure(self) -> None:
        raise AdaptationThreadFailed(f'adaptation thread failed: {self.failure!r}')

    # -- the adaptation thread -------------------------------------------------------------------
    def _adaptation_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set() or not self.context.ok():
                return
            try:
                self._settle_request()
                self._ingest_inbox()
                if self._tick_due:
                    self._tick_due = False
                    self._tick()
                self._adapter_status = self.adapter.status()
            except Exception as exc:   # noqa: BLE001 - any failure ends the node, see below
                if self._stopping.is_set() or not self.context.ok():
                    return
                self.failure = exc
                self.get_logger().fatal(f'adaptation thread failed: {exc}\n'
                                        f'{traceback.format_exc()}')
                self._failure_signal.trigger()   # a dead learner must not look alive
                return

    def _ingest_inbox(self) -> None:
        for _ in range(len(self._inbox)):     # what is there now: a fast camera cannot pin us here
            latents, version, predicted = self._inbox.popleft()
            # Latents are only as good as the model version they are tagged with: one newer than
            # anything acknowledged to us means perception restarted, another adapter got a
            # delta in, or the message is forged. Never learn from it; resync instead.
            known = self.adapter.acked_version + (1 if self.adapter.pending is not None else 0)
            if version > known or version < 0:
                self._unknown_version_at = time.monotonic()
                self._drop('version', f'model_version {version}, newest known {known}',
                           int(latents.shape[0]))
                continue
            self.adapter.ingest(latents, version, predicted)

    def _settle_request(self) -> None:
        """Handle the answer to the request in flight, or abandon it after call_timeout."""
        if self._in_flight is None:
            return
        future, kind, t0 = self._in_flight
        if not future.done():
            if time.monotonic() - t0 < self.call_timeout:
                return
            # No answer: abandon it (perception may be gone), resync before proposing again.
            self._in_flight = None
            client = self.apply_client if kind == 'delta' else self.state_client
            client.remove_pending_request(future)
            future.cancel()
            self.calls_failed += 1
            self.served_version = None
            self.get_logger().warning(f'{kind} request timed out after {self.call_timeout:g} s',
                                      throttle_duration_sec=5.0)
            return
        self._in_flight = None
        if future.cancelled() or future.exception() is not None:
            self.calls_failed += 1
            self.served_version = None
            return
        if kind == 'delta':
            self._on_delta_answer(future.result())
        else:
            self._on_state_answer(future.result())

    def _tick(self) -> None:
        if self._in_flight is not None:
            return                    # still waiting for an answer
        if self.adapter.needs_resync:   # latents from a version we never acknowledged
            self.served_version = None
        # Unknown versions ask for a resync, at most once per call_timeout, so a stream of
        # bogus versions cannot keep the adapter resynchronising instead of adapting.
        if (self._unknown_version_at is not None and self.served_version is not None
                and time.monotonic() - self._last_resync_request > max(self.call_timeout, 2.0)):
            self.served_version = None
        self._unknown_version_at = None
        if self.served_version is None:
            self._request_state()
            return
        seen = self.adapter.counters['latents_received']
        if seen - self._latents_at_last_step < self.min_new_latents:
            return
        self._latents_at_last_step = seen
        proposal = self.adapter.step()
        if proposal is None or proposal.delta is None:
            return
        try:
            request = delta_to_request(proposal.delta)
        except DeltaFormatError as exc:   # a bug in the method, not a transport problem
            self.get_logger().error(f'cannot send delta: {exc}')
            self.adapter.refused(f'unsendable: {exc}')
            return
        if not self.apply_client.service_is_ready():
            self.adapter.refused('perception not reachable')
            self.served_version = None
            return
        self._send(self.apply_client, request, 'delta')
        self.deltas_sent += 1

    def _send(self, client, request, kind: str) -> None:
        future = client.call_async(request)
        self._in_flight = (future, kind, time.monotonic())
        future.add_done_callback(self._on_response)

    def _on_delta_answer(self, response) -> None:
        if response.accepted:
            self.adapter.acknowledge(int(response.version))
            self.served_version = int(response.version)
            self.deltas_accepted += 1
            return
        self.adapter.refused(str(response.reason))
        self.deltas_refused += 1
        self.served_version = None       # resync on the next tick
        self.get_logger().info(f'delta refused: {response.reason}', throttle_duration_sec=2.0)

    def _request_state(self) -> None:
        if not self.state_client.service_is_ready():
            self.get_logger().info('waiting for get_adaptable_state ...', throttle_duration_sec=10.0)
            return
        self._last_resync_request = time.monotonic()
        self._send(self.state_client, GetAdaptableState.Request(), 'state')

    def _on_state_answer(self, response) -> None:
        if response.tap != self.tap:
            self.get_logger().error(f'perception serves tap {response.tap!r}, this adapter is '
                                    f'configured for {self.tap!r}: not adapting',
                                    throttle_duration_sec=10.0)
            return
        try:
            version, state = state_from_response(response)
            self.adapter.resync(version, state)
        except (DeltaFormatError, ValueError, KeyError) as exc:
            self.calls_failed += 1
            self.get_logger().error(f'cannot adopt served state: {exc}', throttle_duration_sec=10.0)
            return
        self.served_version = version
        self.resyncs += 1
        self.get_logger().info(f'synchronised with served version {version}')

    # -- executor thread: status -----------------------------------------------------------------
    def _publish_status(self) -> None:
        if not self.context.ok():
            return
        st = self._adapter_status
        served = self.served_version
        msg = AdaptationStatus()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.method = self.method
        msg.served_version = int(served or 0)
        msg.memory_size = int(st['memory_size'])
        msg.latents_received = self.latents_received
        msg.latents_dropped = self.latents_dropped + int(st['latents_dropped'])
        msg.steps = int(st['steps'])
        msg.accepted = int(st['accepted'])
        msg.held = int(st['held'])
        msg.rolled_back = int(st['rolled_back'])
        msg.resets = int(st['resets'])
        msg.deltas_sent = self.deltas_sent
        msg.deltas_refused = self.deltas_refused
        msg.calls_failed = self.calls_failed
        msg.last_decision = str(st['last_decision'])
        msg.last_score = float(st['last_score'])
        msg.last_reason = str(st['last_reason'])[:200]
        msg.step_ms = float(st['step_ms'])
        self.status_pub.publish(msg)
        synced = served is not None
        self.diag_pub.publish(diagnostic_array(
            self, 'adaptation_node: adapter', DiagnosticStatus.OK if synced else DiagnosticStatus.WARN,
            f'{self.method}: served version {served}' if synced else 'not synchronised',
            {'served_version': served if synced else -1, 'steps': msg.steps,
             'memory_size': msg.memory_size, 'deltas_sent': self.deltas_sent,
             'deltas_accepted': self.deltas_accepted, 'deltas_refused': self.deltas_refused,
             'calls_failed': self.calls_failed, 'resyncs': self.resyncs,
             'latents_received': self.latents_received, 'latents_dropped': msg.latents_dropped,
             **{f'dropped_{k}': v for k, v in self.dropped_by_reason.items()},
             'step_ms': msg.step_ms,
             'last_decision': msg.last_decision}))


def main(args=None) -> int:
    # All callbacks are short (the learning runs on the node's own thread): a single-threaded
    # executor, whose per-callback overhead is a fraction of the multi-threaded one's.
    # AdaptationThreadFailed propagates out of the spin: the process exits non-zero.
    return run(_lowered_priority_node, args=args)


def _lowered_priority_node() -> AdaptationNode:
    # Applied here, not in __init__: os.nice changes the whole process, and a node constructed
    # inside another program (a test, a composed process) must not renice its host.
    node = AdaptationNode()
    if node.niceness:
        os.nice(node.niceness)
    return node


if __name__ == '__main__':
    raise SystemExit(main())
