"""The project's interfaces cross real processes over DDS on loopback, content intact."""
import json
from pathlib import Path

import numpy as np
import pytest

from ros_harness import python_process, rclpy_in_domain, ros_env, spin_until, stop

PEER = Path(__file__).parent / 'helpers' / 'interfaces_peer.py'


def test_interfaces_import_and_fields():
    from async_ttt_ros_interfaces.msg import AdaptationStatus, GroundTruth, LatentBatch, Prediction
    from async_ttt_ros_interfaces.srv import ApplyParameterDelta, GetAdaptableState
    assert {'header', 'model_version', 'class_index', 'label', 'confidence', 'entropy',
            'probabilities', 'latency_ms'} <= set(Prediction.get_fields_and_field_types())
    assert {'model_version', 'tap', 'shape', 'data'} <= set(LatentBatch.get_fields_and_field_types())
    assert {'delta_id', 'base_version', 'names', 'ranks', 'dims', 'values', 'score',
            'signature'} <= set(ApplyParameterDelta.Request.get_fields_and_field_types())
    assert {'accepted', 'version', 'reason'} <= set(
        ApplyParameterDelta.Response.get_fields_and_field_types())
    assert 'values' in GetAdaptableState.Response.get_fields_and_field_types()
    assert 'severity' in GroundTruth.get_fields_and_field_types()
    assert 'rolled_back' in AdaptationStatus.get_fields_and_field_types()


def test_latents_and_delta_round_trip_between_processes(domain_id, tmp_path):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from async_ttt_ros_interfaces.msg import LatentBatch
    from async_ttt_ros_interfaces.srv import ApplyParameterDelta

    received_file = tmp_path / 'received.jsonl'
    peer = python_process([str(PEER), str(received_file)], env=ros_env(domain_id))
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((4, 16, 7, 7)).astype(np.float32)
    echoed = []
    try:
        with rclpy_in_domain(domain_id) as context:
            node = rclpy.create_node('test_interfaces_client', context=context)
            executor = SingleThreadedExecutor(context=context)
            executor.add_node(node)
            pub = node.create_publisher(LatentBatch, 'latents', 10)
            node.create_subscription(LatentBatch, 'latents_echo', echoed.append, 10)
            client = node.create_client(ApplyParameterDelta, 'apply_parameter_delta')
            assert spin_until(executor, lambda: client.service_is_ready()
                              and pub.get_subscription_count() > 0, timeout=30.0), \
                'peer never appeared on the graph'

            msg = LatentBatch()
            msg.header.frame_id = 'camera'
            msg.header.stamp.sec, msg.header.stamp.nanosec = 12, 345
            msg.model_version, msg.tap = 7, 'conv1'
            msg.shape = list(latents.shape)
            msg.data = latents.ravel().tolist()
            msg.predicted_classes = [1, 2, 3, 4]
            # Publish until the echo arrives: the first message may race the peer's matching.
            assert spin_until(executor, lambda: echoed or pub.publish(msg), timeout=15.0)
            back = echoed[0]
            assert (back.model_version, back.tap, back.header.frame_id) == (7, 'conv1', 'camera')
            assert (back.header.stamp.sec, back.header.stamp.nanosec) == (12, 345)
            assert list(back.shape) == [4, 16, 7, 7]
            assert np.array_equal(np.asarray(back.data, dtype=np.float32).reshape(latents.shape),
                                  latents)
            assert list(back.predicted_classes) == [1, 2, 3, 4]

            values = rng.standard_normal(3 * 4 + 5).astype(np.float32)

            def call(base_version, delta_id):
                req = ApplyParameterDelta.Request()
                req.delta_id, req.base_version = delta_id, base_version
                req.names = ['bn1.weight', 'bn1.running_mean']
                req.ranks, req.dims = [2, 1], [3, 4, 5]
                req.values = values.tolist()
                req.score, req.proposer, req.signature = 0.25, 'test', [1, 2, 255]
                future = client.call_async(req)
                assert spin_until(executor, future.done, timeout=15.0), 'service never answered'
                return future.result()

            ok = call(3, 'delta-1')
            assert ok.accepted and ok.version == 4 and ok.reason == ''
            stale = call(3, 'delta-2')
            assert not stale.accepted
            assert stale.version == 4
            assert 'stale base_version 3' in stale.reason
            node.destroy_node()
    finally:
        out = stop(peer)
    lines = [json.loads(line) for line in received_file.read_text().splitlines()]
    assert [line['delta_id'] for line in lines] == ['delta-1', 'delta-2'], out
    first = lines[0]
    assert first['names'] == ['bn1.weight', 'bn1.running_mean']
    assert first['ranks'] == [2, 1] and first['dims'] == [3, 4, 5]
    assert np.array_equal(np.asarray(first['values'], dtype=np.float32), values)
    assert first['signature'] == [1, 2, 255] and first['score'] == pytest.approx(0.25)
