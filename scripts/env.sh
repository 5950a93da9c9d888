# Source this file to use the project's environment in a shell:  source scripts/env.sh
# (the venv with rclpy, torch and the installed interfaces; the Fast DDS profile for large images)
_ATTT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
# shellcheck disable=SC1091
. "$_ATTT_ROOT/.venv/bin/activate"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$_ATTT_ROOT/async_ttt_ros/config/fastdds_large_images.xml}"
unset _ATTT_ROOT
