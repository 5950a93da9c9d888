#!/usr/bin/env python3
"""Repair the ROS 2 PyPI wheels' export_*__rosidl_generator_pyExport.cmake files.

The wheels were built on a manylinux machine and hard-code its Python include directory
(/opt/python/cp311-cp311/include/python3.11) and its numpy include directory. Building any
interface package against them then fails. This rewrites both paths to this interpreter's
include directory and numpy.get_include(). Idempotent: files already repaired are left alone.
Usage: fix_rosidl_wheel_paths.py VENV
"""
import re
import sys
import sysconfig
from pathlib import Path

import numpy


def main(venv: str) -> int:
    py_include = sysconfig.get_paths()['include']
    np_include = numpy.get_include()
    share = Path(venv)
    files = list(share.glob('share/*/cmake/export_*__rosidl_generator_pyExport.cmake'))
    files += list(share.glob('lib/python*/site-packages/**/share/*/cmake/'
                             'export_*__rosidl_generator_pyExport.cmake'))
    changed = 0
    for path in sorted(set(files)):
        text = path.read_text()
        new = text.replace('/opt/python/cp311-cp311/include/python3.11', py_include)
        # The numpy include path of the build machine: any .../numpy/.../include that is not ours.
        new = re.sub(r'[^";\s]*/site-packages/numpy/(?:_core|core)/include', np_include, new)
        if new != text:
            path.write_text(new)
            changed += 1
    print(f'[setup] rosidl wheel paths: {len(files)} export files, {changed} repaired')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else sys.prefix))
