"""Simulated pipeline: sim_camera_node -> perception_node <-> adaptation_node, + monitor_node.

    ros2 launch async_ttt_ros sim_pipeline.launch.py output_dir:=results/sim

The sim camera publishes `image` and `ground_truth` in the launch namespace; camera_topic
renames its image topic (and perception's input) together. With use_sim_time:=true the sim
camera publishes /clock itself (sim time = frame index / rate) and every node follows it.
Arguments: camera_topic, config, namespace, use_sim_time, fastdds_profile, output_dir, log_level.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, SetEnvironmentVariable
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description():
    share = get_package_share_directory('async_ttt_ros')
    config = LaunchConfiguration('config')
    namespace = LaunchConfiguration('namespace')
    sim_time = LaunchConfiguration('use_sim_time')
    use_sim_time = ParameterValue(sim_time, value_type=bool)
    forwarded = {name: LaunchConfiguration(name) for name in
                 ('camera_topic', 'config', 'namespace', 'use_sim_time', 'fastdds_profile', 'log_level')}
    include = lambda name: IncludeLaunchDescription(  # noqa: E731
        PythonLaunchDescriptionSource(os.path.join(share, 'launch', name)),
        launch_arguments=forwarded.items())
    log = ['--ros-args', '--log-level', LaunchConfiguration('log_level')]
    return LaunchDescription([
        DeclareLaunchArgument('camera_topic', default_value='image',
                              description='image topic between sim camera and perception'),
        DeclareLaunchArgument('config', default_value=os.path.join(share, 'config', 'sim_pipeline.yaml'),
                              description='ros__parameters yaml file shared by all four nodes'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the graph'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='sim camera publishes /clock, every node follows it'),
        DeclareLaunchArgument('fastdds_profile',
                              default_value=os.path.join(share, 'config', 'fastdds_large_images.xml'),
                              description='Fast DDS XML profile (FASTDDS_DEFAULT_PROFILES_FILE)'),
        DeclareLaunchArgument('output_dir', default_value='results/sim',
                              description='where monitor_node writes report.json and plot.png'),
        DeclareLaunchArgument('log_level', default_value='info'),
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', LaunchConfiguration('fastdds_profile')),
        Node(package='async_ttt_ros', executable='sim_camera_node', name='sim_camera_node',
             namespace=namespace, output='screen', emulate_tty=True, arguments=log,
             parameters=[config, {'use_sim_time': use_sim_time,
                                  'publish_clock': ParameterValue(sim_time, value_type=bool)}],
             remappings=[('image', LaunchConfiguration('camera_topic'))]),
        include('perception.launch.py'),
        include('adaptation.launch.py'),
        Node(package='async_ttt_ros', executable='monitor_node', name='monitor_node',
             namespace=namespace, output='screen', emulate_tty=True, arguments=log,
             parameters=[config, {'use_sim_time': use_sim_time,
                                  'output_dir': LaunchConfiguration('output_dir')}]),
    ])
