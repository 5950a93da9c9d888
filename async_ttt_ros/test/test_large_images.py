"""640x480 rgb8 best-effort images at 30 Hz cross processes with the shipped Fast DDS profile."""
import time
from pathlib import Path

import numpy as np
import pytest

from ros_harness import FASTDDS_PROFILE, python_process, rclpy_in_domain, ros_env, spin_until, stop

HELPER = Path(__file__).parent / 'helpers' / 'image_publisher.py'
FRAMES, RATE, WIDTH, HEIGHT = 120, 30.0, 640, 480


def test_profile_file_is_shipped():
    text = FASTDDS_PROFILE.read_text()
    assert '<segment_size>16777216</segment_size>' in text
    assert 'is_default_profile="true"' in text


def test_large_images_cross_processes_at_30hz(domain_id):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    received: dict[int, float] = {}
    bad_content = []
    with rclpy_in_domain(domain_id) as context:
        node = rclpy_create_node('test_large_image_sub', context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)

        def on_image(msg: Image) -> None:
            i = int(msg.header.frame_id)
            pixels = np.frombuffer(msg.data, dtype=np.uint8)
            if (msg.width, msg.height, len(pixels)) != (WIDTH, HEIGHT, WIDTH * HEIGHT * 3) or \
                    pixels[0] != i % 256 or pixels[2] != 7:
                bad_content.append(i)
            received[i] = time.monotonic()

        node.create_subscription(Image, 'image', on_image, qos_profile_sensor_data)
        pub = python_process([str(HELPER), str(FRAMES), str(RATE), str(WIDTH), str(HEIGHT)],
                             env=ros_env(domain_id))
        try:
            spin_until(executor, lambda: pub.poll() is not None, timeout=60.0)
            spin_until(executor, lambda: False, timeout=0.5)
        finally:
            out = stop(pub)
        node.destroy_node()
    ratio = len(received) / FRAMES
    print(f'large images: {len(received)}/{FRAMES} received ({ratio:.1%})')
    assert not bad_content, f'frames with wrong content: {bad_content[:10]}'
    assert ratio >= 0.95, f'only {len(received)}/{FRAMES} frames arrived; publisher said:\n{out}'


def rclpy_create_node(name, context):
    import rclpy
    return rclpy.create_node(name, context=context)
