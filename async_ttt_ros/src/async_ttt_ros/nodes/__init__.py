"""Thin rclpy layers over the core: parameters, QoS, conversion, wiring."""
