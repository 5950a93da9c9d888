"""Shared pytest fixtures. ROS tests use real rclpy and DDS (see ros_harness.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from ros_harness import free_domain_id, ros_env  # noqa: E402

# Each test process (and every subprocess it starts) keeps torch to one thread: 2-core machines.
os.environ.setdefault('OMP_NUM_THREADS', '1')


@pytest.fixture
def domain_id() -> int:
    return free_domain_id()


@pytest.fixture
def env(domain_id):
    """Environment for ROS subprocesses of this test: own domain, localhost discovery."""
    return ros_env(domain_id)
