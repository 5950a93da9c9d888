"""Core objects <-> async_ttt_ros_interfaces messages.

The only place that knows both the core's types (ParameterDelta, state dicts, latents tensors)
and the wire types. Large float arrays are moved with array.array('f').frombytes (one memcpy)
because rclpy's generated setters check list inputs element by element, which costs
milliseconds for a latent batch; incoming float32[] fields arrive as array.array('f') and are
viewed with np.frombuffer without copying.
"""
from __future__ import annotations

import array
import math

import numpy as np

from async_ttt_ros_interfaces.msg import LatentBatch, Prediction
from async_ttt_ros_interfaces.srv import ApplyParameterDelta, GetAdaptableState

from .core.delta import DeltaFormatError, ParameterDelta, flatten, unflatten

__all__ = [
    'LatentFormatError', 'delta_to_request', 'float_array', 'latents_from_msg', 'latents_to_msg',
    'prediction_msg', 'request_to_delta', 'state_from_response', 'state_to_response',
    'DeltaFormatError',
]

# A latent batch larger than this is refused: 64 frames of resnet18 layer3 latents are ~3.2 M.
MAX_LATENT_VALUES = 1 << 26


class LatentFormatError(ValueError):
    """A LatentBatch whose shape and data do not fit together."""


def float_array(values) -> array.array:
    """numpy/torch/sequence of floats -> array.array('f') with one copy."""
    if hasattr(values, 'detach'):  # torch.Tensor without importing torch here
        values = values.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.float32).ravel())
    out = array.array('f')
    out.frombytes(memoryview(arr.view(np.uint8)))
    return out


def _as_float32(values) -> np.ndarray:
    if isinstance(values, array.array) and values.typecode == 'f':
        return np.frombuffer(values, dtype=np.float32)
    return np.asarray(values, dtype=np.float32).ravel()


# ---------------------------------------------------------------------------------------------
# deltas and states

def delta_to_request(delta: ParameterDelta) -> ApplyParameterDelta.Request:
    names, ranks, dims, values = flatten(delta)
    req = ApplyParameterDelta.Request()
    req.delta_id = delta.delta_id
    req.base_version = int(delta.base_version)
    req.names = list(names)
    req.ranks = array.array('I', ranks)
    req.dims = array.array('I', dims)
    req.values = float_array(values)
    req.score = float(delta.score) if math.isfinite(delta.score) else 0.0
    req.proposer = delta.proposer
    req.signature = bytes(delta.signature)
    return req


def request_to_delta(req: ApplyParameterDelta.Request) -> ParameterDelta:
    """Raises DeltaFormatError when names/ranks/dims/values do not fit together."""
    return ParameterDelta(
        delta_id=str(req.delta_id), base_version=int(req.base_version),
        tensors=unflatten(list(req.names), list(req.ranks), list(req.dims), _as_float32(req.values)),
        score=float(req.score), proposer=str(req.proposer), signature=bytes(req.signature))


def state_to_response(version: int, tap: str, state: dict,
                      response: GetAdaptableState.Response) -> GetAdaptableState.Response:
    wire = ParameterDelta('state', int(version), {k: np.asarray(v, np.float32) for k, v in state.items()})
    names, ranks, dims, values = flatten(wire)
    response.version = int(version)
    response.tap = tap
    response.names = list(names)
    response.ranks = array.array('I', ranks)
    response.dims = array.array('I', dims)
    response.values = float_array(values)
    return response


def state_from_response(response: GetAdaptableState.Response) -> tuple[int, dict[str, np.ndarray]]:
    state = unflatten(list(response.names), list(response.ranks), list(response.dims),
                      _as_float32(response.values))
    return int(response.version), state


# ---------------------------------------------------------------------------------------------
# latents and predictions

def latents_to_msg(latents, model_version: int, tap: str, header=None,
                   predicted_classes=None) -> LatentBatch:
    """[N, ...] latents (numpy or torch) -> LatentBatch."""
    if hasattr(latents, 'detach'):
        latents = latents.detach().cpu().numpy()
    latents = np.asarray(latents, dtype=np.float32)
    msg = LatentBatch()
    if header is not None:
        msg.header = header
    msg.model_version = int(model_version)
    msg.tap = tap
    msg.shape = array.array('I', [int(d) for d in latents.shape])
    msg.data = float_array(latents)
    if predicted_classes is not None:
        msg.predicted_classes = array.array('i', [int(c) for c in np.asarray(predicted_classes).ravel()])
    return msg


def latents_from_msg(msg: LatentBatch, expected_tap: str | None = None,
                     expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """LatentBatch -> float32 [N, ...] view. Raises LatentFormatError on any inconsistency."""
    if expected_tap is not None and msg.tap != expected_tap:
        raise LatentFormatError(f'latents from tap {msg.tap!r}, this node expects {expected_tap!r}')
    shape = tuple(int(d) for d in msg.shape)
    if not shape or any(d <= 0 for d in shape):
        raise LatentFormatError(f'invalid latent shape {list(shape)}')
    size = int(np.prod(shape, dtype=np.int64))
    if size > MAX_LATENT_VALUES:
        raise LatentFormatError(f'latent batch of {size} values exceeds the limit {MAX_LATENT_VALUES}')
    data = _as_float32(msg.data)
    if data.size != size:
        raise LatentFormatError(f'shape {list(shape)} needs {size} values, got {data.size}')
    if expected_shape is not None and shape[1:] != tuple(expected_shape):
        raise LatentFormatError(f'per-frame latent shape {list(shape[1:])}, expected '
                                f'{list(expected_shape)}')
    out = data.reshape(shape)
    if not np.isfinite(out).all():
        raise LatentFormatError('latents contain non-finite values')
    return out


def prediction_msg(header, model_version: int, probabilities: np.ndarray, labels,
                   latency_ms: float) -> Prediction:
    """Prediction for one frame from its softmax probabilities."""
    probs = np.asarray(probabilities, dtype=np.float64).ravel()
    index = int(np.argmax(probs))
    msg = Prediction()
    msg.header = header
    msg.model_version = int(model_version)
    msg.class_index = index
    msg.label = str(labels[index]) if index < len(labels) else str(index)
    msg.confidence = float(probs[index])
    msg.entropy = float(-(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum())
    msg.probabilities = float_array(probs)
    msg.latency_ms = float(latency_ms)
    return msg
