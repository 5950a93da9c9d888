"""async_ttt_ros: asynchronous test-time adaptation for ROS 2 perception."""

__version__ = '0.1.0'
