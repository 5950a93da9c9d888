"""The test harness's domain allocator: two live graphs must never share a ROS domain."""
import subprocess
import sys
from pathlib import Path

from ros_harness import _DOMAIN_REUSE_AFTER, free_domain_id


def test_domain_ids_are_not_reused_while_recent():
    ids = [free_domain_id() for _ in range(_DOMAIN_REUSE_AFTER)]
    assert len(set(ids)) == len(ids)
    assert all(1 <= d <= 100 for d in ids)


def test_another_process_never_gets_an_id_this_process_holds():
    mine = {free_domain_id() for _ in range(10)}
    code = ('import sys; sys.path.insert(0, sys.argv[1]); from ros_harness import free_domain_id;'
            'print(" ".join(str(free_domain_id()) for _ in range(40)))')
    out = subprocess.run([sys.executable, '-c', code, str(Path(__file__).parent)],
                         capture_output=True, text=True, check=True).stdout
    theirs = {int(x) for x in out.split()}
    assert len(theirs) == 40 and not (theirs & mine)
