"""ament_python package of async_ttt_ros (code lives under src/, launch and config are data)."""
import os
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'async_ttt_ros'

setup(
    name=PACKAGE,
    version='0.1.0',
    package_dir={'': 'src'},
    packages=find_packages('src'),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', glob('launch/*.py')),
        ('share/' + PACKAGE + '/config', [f for f in glob('config/*') if os.path.isfile(f)]),
        ('share/' + PACKAGE + '/config/sros2', glob('config/sros2/*')),
    ],
    # torch is left to the user on purpose: an unpinned resolve pulls a multi-GB CUDA build.
    install_requires=['setuptools', 'numpy', 'pyyaml', 'matplotlib', 'tqdm', 'rosbags>=0.10'],
    zip_safe=True,
    maintainer='async_ttt_ros maintainers',
    maintainer_email='maintainers@async-ttt-ros.dev',
    description='Asynchronous test-time adaptation for ROS 2 perception.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'async-ttt = async_ttt_ros.cli:main',
            'perception_node = async_ttt_ros.nodes.perception_node:main',
            'adaptation_node = async_ttt_ros.nodes.adaptation_node:main',
            'sim_camera_node = async_ttt_ros.nodes.sim_camera_node:main',
            'monitor_node = async_ttt_ros.nodes.monitor_node:main',
        ],
    },
)
