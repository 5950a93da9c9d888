"""Test peer process: a "perception node" whose apply_parameter_delta never answers.

- serves `get_adaptable_state` honestly (the cached source model's adaptable state, version 0,
  its tap), so an adaptation node synchronises with it and starts proposing deltas;
- `apply_parameter_delta` takes the request and then never returns while the process lives
  (as a perception node stuck in a deadlock or a dead GPU driver would); every call is printed.
It publishes nothing: the test sends the latents itself. Test helper only, not product code.
Usage: hanging_perception_peer.py
"""
import sys
import time

import rclpy
import torch
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from async_ttt_ros.core.serving import ServedModel
from async_ttt_ros.core.training import load_or_train
from async_ttt_ros.ros_conversions import state_to_response
from async_ttt_ros_interfaces.srv import ApplyParameterDelta, GetAdaptableState


def main() -> None:
    torch.set_num_threads(1)
    model = load_or_train('fmnist_cnn')
    version, state = ServedModel(model).state()
    rclpy.init()
    node = rclpy.create_node('perception_node')   # the name a real one would have
    group = ReentrantCallbackGroup()              # a hung apply must not block get_state

    def on_state(_request, response):
        return state_to_response(version, model.tap, state, response)

    def on_apply(request, response):
        print(f'apply_parameter_delta called: {request.delta_id}', flush=True)
        while rclpy.ok():          # never answers while the process lives
            time.sleep(0.1)
        return response

    node.create_service(GetAdaptableState, 'get_adaptable_state', on_state, callback_group=group)
    node.create_service(ApplyParameterDelta, 'apply_parameter_delta', on_apply, callback_group=group)
    print('peer ready', flush=True)
    executor = MultiThreadedExecutor(num_threads=32)   # room for many hung calls
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        rclpy.try_shutdown()
    sys.exit(0)


if __name__ == '__main__':
    main()
