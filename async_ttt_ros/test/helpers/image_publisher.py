"""Test helper process: publishes N rgb8 images of WxH at RATE Hz with SensorDataQoS, then exits.

Each frame carries its index in header.frame_id and in its first pixel bytes, so the receiver can
check content as well as count.
Usage: image_publisher.py N RATE WIDTH HEIGHT [TOPIC]
"""
import sys
import time

import numpy as np
import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image


def main() -> None:
    count, rate, width, height = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    topic = sys.argv[5] if len(sys.argv) > 5 else 'image'
    rclpy.init()
    node = rclpy.create_node('test_image_publisher')
    pub = node.create_publisher(Image, topic, qos_profile_sensor_data)
    # Wait for the subscriber to be discovered, so the count measures delivery, not discovery.
    deadline = time.monotonic() + 20.0
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    base = np.random.default_rng(0).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    period = 1.0 / rate
    start = time.monotonic()
    for i in range(count):
        frame = base.copy()
        frame[0, 0, :] = [i % 256, (i // 256) % 256, 7]
        msg = Image()
        msg.header.stamp = node.get_clock().now().to_msg()
        msg.header.frame_id = str(i)
        msg.height, msg.width, msg.encoding, msg.is_bigendian = height, width, 'rgb8', 0
        msg.step = width * 3
        msg.data = frame.tobytes()
        pub.publish(msg)
        next_t = start + (i + 1) * period
        time.sleep(max(0.0, next_t - time.monotonic()))
    time.sleep(1.0)  # let the last frames drain before the participant goes away
    node.destroy_node()
    rclpy.shutdown()


if __name__ == '__main__':
    main()
