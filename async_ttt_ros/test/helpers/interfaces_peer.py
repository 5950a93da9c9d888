"""Test peer process for the interfaces round-trip test.

- echoes every LatentBatch received on `latents` back on `latents_echo`;
- serves `apply_parameter_delta`: accepts only base_version == its current version (then
  version += 1), otherwise answers accepted=false with a reason; writes what it received to
  RECEIVED_JSON so the test can compare content.
Usage: interfaces_peer.py RECEIVED_JSON
"""
import json
import sys

import rclpy
from rclpy.executors import ExternalShutdownException

from async_ttt_ros_interfaces.msg import LatentBatch
from async_ttt_ros_interfaces.srv import ApplyParameterDelta


def main() -> None:
    received_path = sys.argv[1]
    rclpy.init()
    node = rclpy.create_node('test_interfaces_peer')
    state = {'version': 3}
    echo = node.create_publisher(LatentBatch, 'latents_echo', 10)
    node.create_subscription(LatentBatch, 'latents', echo.publish, 10)

    def on_delta(request, response):
        with open(received_path, 'a') as f:
            f.write(json.dumps({
                'delta_id': request.delta_id, 'base_version': request.base_version,
                'names': list(request.names), 'ranks': list(request.ranks),
                'dims': list(request.dims), 'values': [float(v) for v in request.values],
                'score': request.score, 'proposer': request.proposer,
                'signature': list(request.signature)}) + '\n')
        if request.base_version != state['version']:
            response.accepted = False
            response.reason = (f"stale base_version {request.base_version}, "
                               f"serving {state['version']}")
        else:
            state['version'] += 1
            response.accepted = True
        response.version = state['version']
        return response

    node.create_service(ApplyParameterDelta, 'apply_parameter_delta', on_delta)
    print('peer ready', flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


if __name__ == '__main__':
    main()
