"""The graph on a Gazebo (gz sim) camera: ros_gz_bridge for the camera and /clock + async_ttt.

Start Gazebo with a world that has a camera sensor, then:

    ros2 launch async_ttt_ros gazebo.launch.py gz_camera_topic:=/camera

The bridge turns the gz topic into a sensor_msgs/Image topic of the same name and /clock into
rosgraph_msgs/Clock; perception and adaptation run on sim time. On Humble with Gazebo Fortress
pass gz_msgs:=ignition.msgs.
Arguments: gz_camera_topic, gz_msgs, config, namespace, use_sim_time (default true),
fastdds_profile, log_level.
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
    gz_topic = LaunchConfiguration('gz_camera_topic')
    gz_msgs = LaunchConfiguration('gz_msgs')
    use_sim_time = ParameterValue(LaunchConfiguration('use_sim_time'), value_type=bool)
    return LaunchDescription([
        DeclareLaunchArgument('gz_camera_topic', default_value='/camera',
                              description='gz image topic of the camera sensor'),
        DeclareLaunchArgument('gz_msgs', default_value='gz.msgs',
                              description='gz message namespace (ignition.msgs on Fortress)'),
        DeclareLaunchArgument('camera_topic', default_value=gz_topic,
                              description='ROS image topic (defaults to the gz topic name)'),
        DeclareLaunchArgument('config', default_value=os.path.join(share, 'config', 'async_ttt.yaml'),
                              description='ros__parameters yaml file'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the graph'),
        DeclareLaunchArgument('use_sim_time', default_value='true', description='follow /clock'),
        DeclareLaunchArgument('fastdds_profile',
                              default_value=os.path.join(share, 'config', 'fastdds_large_images.xml'),
                              description='Fast DDS XML profile (FASTDDS_DEFAULT_PROFILES_FILE)'),
        DeclareLaunchArgument('log_level', default_value='info'),
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', LaunchConfiguration('fastdds_profile')),
        Node(
            package='ros_gz_bridge', executable='parameter_bridge', name='camera_bridge',
            output='screen',
            # '[' = gz -> ROS only. The image keeps its gz name; /clock drives use_sim_time.
            arguments=[[gz_topic, '@sensor_msgs/msg/Image[', gz_msgs, '.Image'],
                       ['/clock@rosgraph_msgs/msg/Clock[', gz_msgs, '.Clock']],
            remappings=[(gz_topic, LaunchConfiguration('camera_topic'))],
            parameters=[{'use_sim_time': use_sim_time}],
        ),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, 'launch', 'async_ttt.launch.py')),
            launch_arguments={name: LaunchConfiguration(name) for name in (
                'camera_topic', 'config', 'namespace', 'use_sim_time', 'fastdds_profile',
                'log_level')}.items()),
    ])
