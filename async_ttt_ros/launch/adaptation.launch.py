"""adaptation_node alone (e.g. on another machine than perception, or restarted on its own).

    ros2 launch async_ttt_ros adaptation.launch.py namespace:=/robot1

Arguments: camera_topic (unused here, accepted so every launch file takes the same arguments),
config, namespace, use_sim_time, fastdds_profile, log_level.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description():
    share = get_package_share_directory('async_ttt_ros')
    use_sim_time = ParameterValue(LaunchConfiguration('use_sim_time'), value_type=bool)
    return LaunchDescription([
        DeclareLaunchArgument('camera_topic', default_value='/camera/image_raw',
                              description='unused by this node (kept for a uniform interface)'),
        DeclareLaunchArgument('config', default_value=os.path.join(share, 'config', 'async_ttt.yaml'),
                              description='ros__parameters yaml file'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the node'),
        DeclareLaunchArgument('use_sim_time', default_value='false', description='follow /clock'),
        DeclareLaunchArgument('fastdds_profile',
                              default_value=os.path.join(share, 'config', 'fastdds_large_images.xml'),
                              description='Fast DDS XML profile (FASTDDS_DEFAULT_PROFILES_FILE)'),
        DeclareLaunchArgument('log_level', default_value='info'),
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', LaunchConfiguration('fastdds_profile')),
        Node(
            package='async_ttt_ros', executable='adaptation_node', name='adaptation_node',
            namespace=LaunchConfiguration('namespace'), output='screen', emulate_tty=True,
            parameters=[LaunchConfiguration('config'), {'use_sim_time': use_sim_time}],
            arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')],
            # The adapter may crash on a bad batch without harming perception; bring it back.
            respawn=True, respawn_delay=2.0,
        ),
    ])
