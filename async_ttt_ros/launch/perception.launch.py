"""perception_node alone: classify a camera topic, serve deltas to an adaptation node.

    ros2 launch async_ttt_ros perception.launch.py camera_topic:=/camera/image_raw

Arguments: camera_topic, config (ros__parameters yaml), namespace, use_sim_time, fastdds_profile
(exported as FASTDDS_DEFAULT_PROFILES_FILE: large images over shared memory), log_level.
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
                              description='sensor_msgs/Image topic to classify'),
        DeclareLaunchArgument('config', default_value=os.path.join(share, 'config', 'async_ttt.yaml'),
                              description='ros__parameters yaml file'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the node'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='follow /clock (Gazebo, bag replay with --clock)'),
        DeclareLaunchArgument('fastdds_profile',
                              default_value=os.path.join(share, 'config', 'fastdds_large_images.xml'),
                              description='Fast DDS XML profile (FASTDDS_DEFAULT_PROFILES_FILE)'),
        DeclareLaunchArgument('log_level', default_value='info'),
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', LaunchConfiguration('fastdds_profile')),
        Node(
            package='async_ttt_ros', executable='perception_node', name='perception_node',
            namespace=LaunchConfiguration('namespace'), output='screen', emulate_tty=True,
            parameters=[LaunchConfiguration('config'), {'use_sim_time': use_sim_time}],
            remappings=[('image', LaunchConfiguration('camera_topic'))],
            arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')],
        ),
    ])
