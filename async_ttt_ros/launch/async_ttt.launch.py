"""The whole graph on a real camera: perception_node + adaptation_node (separate processes).

    ros2 launch async_ttt_ros async_ttt.launch.py camera_topic:=/camera/image_raw

Arguments (passed on to perception.launch.py and adaptation.launch.py): camera_topic, config,
namespace, use_sim_time, fastdds_profile, log_level.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, SetEnvironmentVariable
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration

ARGUMENTS = ('camera_topic', 'config', 'namespace', 'use_sim_time', 'fastdds_profile', 'log_level')


def generate_launch_description():
    share = get_package_share_directory('async_ttt_ros')
    forwarded = {name: LaunchConfiguration(name) for name in ARGUMENTS}
    include = lambda name: IncludeLaunchDescription(  # noqa: E731
        PythonLaunchDescriptionSource(os.path.join(share, 'launch', name)),
        launch_arguments=forwarded.items())
    return LaunchDescription([
        DeclareLaunchArgument('camera_topic', default_value='/camera/image_raw',
                              description='sensor_msgs/Image topic to classify'),
        DeclareLaunchArgument('config', default_value=os.path.join(share, 'config', 'async_ttt.yaml'),
                              description='ros__parameters yaml file shared by both nodes'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the graph'),
        DeclareLaunchArgument('use_sim_time', default_value='false', description='follow /clock'),
        DeclareLaunchArgument('fastdds_profile',
                              default_value=os.path.join(share, 'config', 'fastdds_large_images.xml'),
                              description='Fast DDS XML profile (FASTDDS_DEFAULT_PROFILES_FILE)'),
        DeclareLaunchArgument('log_level', default_value='info'),
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', LaunchConfiguration('fastdds_profile')),
        include('perception.launch.py'),
        include('adaptation.launch.py'),
    ])
