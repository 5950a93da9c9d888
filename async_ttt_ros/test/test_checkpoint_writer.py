"""CheckpointWriter: writes on its own thread, newest state wins, nothing lost at close."""
import threading
import time

import torch

from async_ttt_ros.core.checkpoint_writer import CheckpointWriter
from async_ttt_ros.core.delta import ParameterDelta
from async_ttt_ros.core.model import build_model
from async_ttt_ros.core.serving import ServedModel


def test_request_returns_while_a_slow_write_runs_and_the_file_ends_at_the_newest_state(tmp_path):
    started, release = threading.Event(), threading.Event()
    written, in_write = [], []

    def slow_save(path):
        snapshot = state['v']          # like ServedModel.save_checkpoint: snapshot, then write
        in_write.append(True)
        started.set()
        release.wait(10)
        in_write.pop()
        written.append(snapshot)

    state = {'v': 1}
    writer = CheckpointWriter(slow_save, tmp_path / 'x.pt', on_error=lambda exc: None)
    writer.request()
    assert started.wait(5)
    for v in range(2, 6):           # arrive while the first write blocks on the "disk"
        state['v'] = v
        writer.request()
    assert in_write == [True]       # every request returned while the first write was running
    release.set()
    assert writer.close()
    assert written == [1, 5]        # the queued requests collapsed into one write of the newest


def test_errors_are_reported_and_the_next_request_retries(tmp_path):
    errors, calls = [], []

    def flaky_save(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError('disk full')

    writer = CheckpointWriter(flaky_save, tmp_path / 'x.pt', on_error=errors.append)
    writer.request()
    deadline = time.monotonic() + 5
    while not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.request()
    assert writer.close()
    assert [str(e) for e in errors] == ['disk full'] and len(calls) == 2 and writer.writes == 1


def test_served_model_checkpoint_written_in_background_resumes_the_latest_version(tmp_path):
    served = ServedModel(build_model('fmnist_cnn'))
    path = tmp_path / 'served.pt'
    writer = CheckpointWriter(served.save_checkpoint, path, on_error=lambda exc: None)
    for i in range(5):
        version, st = served.state()
        bias = {'bn1.bias': st['bn1.bias'] + 0.01}
        assert served.apply(ParameterDelta(f'd{i}', version, bias, proposer='t')).accepted
        writer.request()
    assert writer.close()
    resumed = ServedModel(build_model('fmnist_cnn'))
    assert resumed.load_checkpoint(path).accepted
    assert resumed.version == served.version == 5
    torch.testing.assert_close(torch.from_numpy(resumed.state()[1]['bn1.bias']),
                               torch.from_numpy(served.state()[1]['bn1.bias']))
