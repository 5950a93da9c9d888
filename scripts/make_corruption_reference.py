#!/usr/bin/env python3
"""Build the corruption reference fixture from the real `imagecorruptions` 1.1.2 package.

The reference is unmaintained and pins an old stack (numpy<2, scipy<1.14, scikit-image<0.20,
setuptools<81 for pkg_resources), so it runs in an ISOLATED venv under /tmp and never touches
the product's environment. It corrupts a few fixed Fashion-MNIST test images with the protocol of
DESIGN.md (28x28 grey, zero-padded to 32x32, `imagecorruptions.corrupt`, uint8, grey via PIL
convert('L'), cropped to 28x28) for every corruption and severity, and writes
async_ttt_ros/test/data/corruption_reference.npz, which test_corruptions.py compares against.

Usage:  python scripts/make_corruption_reference.py [--python python3.10] [--venv DIR]
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / 'async_ttt_ros' / 'test' / 'data' / 'corruption_reference.npz'
REQUIREMENTS = ['imagecorruptions==1.1.2', 'numpy<2', 'scipy<1.14', 'scikit-image<0.20',
                'setuptools<81']
CORRUPTIONS = ['gaussian_noise', 'shot_noise', 'impulse_noise', 'speckle_noise', 'defocus_blur',
               'gaussian_blur', 'zoom_blur', 'fog', 'brightness', 'contrast', 'jpeg_compression',
               'pixelate']
# Fixed test-set indices: two items of several classes, dark and bright ones.
INDICES = [0, 1, 2, 3, 4, 8, 9, 11, 13, 18, 19, 20]

# Runs inside the isolated venv: only numpy + imagecorruptions + PIL there.
CHILD = r'''
import gzip, sys, json
import numpy as np
from PIL import Image
import imagecorruptions
from imagecorruptions import corrupt

data_dir, out = sys.argv[1], sys.argv[2]
names, indices = sys.argv[3].split(','), json.loads(sys.argv[4])
with gzip.open(data_dir + '/t10k-images-idx3-ubyte.gz', 'rb') as fh:
    raw = fh.read()
images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[indices]
result = {'clean': images, 'indices': np.array(indices)}
for name in names:
    for sev in range(1, 6):
        np.random.seed(1000 * sev + len(name))   # the reference uses the global numpy RNG
        outs = []
        for img in images:
            padded = np.pad(img, 2)
            rgb = corrupt(padded, severity=sev, corruption_name=name)       # uint8 HxWx3
            grey = np.asarray(Image.fromarray(rgb).convert('L'))
            outs.append(grey[2:30, 2:30])
        result[f'{name}/{sev}'] = np.stack(outs)
import numpy, scipy, skimage, cv2, PIL
versions = dict(imagecorruptions='1.1.2', numpy=numpy.__version__, scipy=scipy.__version__,
                skimage=skimage.__version__, cv2=cv2.__version__, pillow=PIL.__version__,
                python=sys.version.split()[0])
result['versions'] = np.array(json.dumps(versions))
np.savez_compressed(out, **result)
print('wrote', out, versions)
'''


def _works(python: str) -> tuple[int, int] | None:
    """(major, minor) of a runnable interpreter with venv support, else None."""
    try:
        out = subprocess.run([python, '-c', 'import sys, venv; print(*sys.version_info[:2])'],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    major, minor = map(int, out.stdout.split())
    return major, minor


def _find_python(requested: str | None) -> str:
    if requested:
        if not _works(requested):
            raise SystemExit(f'--python {requested}: not a working interpreter with venv')
        return requested
    # scikit-image 0.19 has wheels up to CPython 3.11; prefer 3.10 (the reference's era).
    # (3.11 may have to build scikit-image from source: slow, so it is the last resort.)
    candidates = [shutil.which('python3.10'),
                  *sorted(glob.glob(os.path.expanduser('~/.pyenv/versions/3.10.*/bin/python3'))),
                  shutil.which('python3.9'), shutil.which('python3.11'), sys.executable]
    for cand in filter(None, candidates):
        version = _works(cand)
        if version and (3, 8) <= version <= (3, 11):
            return cand
    raise SystemExit('no Python 3.8-3.11 interpreter found for the reference venv '
                     '(scikit-image<0.20 has no wheels for newer Pythons); pass --python')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--python', default=None, help='interpreter for the isolated venv')
    parser.add_argument('--venv', default='/tmp/async_ttt_imagecorruptions_ref')
    parser.add_argument('--data-dir', default=os.environ.get('ASYNC_TTT_FASHION_MNIST',
                                                             '/usr/share/datasets/fashion-mnist'))
    parser.add_argument('--out', default=str(OUT))
    args = parser.parse_args(argv)

    venv = Path(args.venv)
    py = venv / 'bin' / 'python'
    if not py.exists():
        base = _find_python(args.python)
        print(f'creating isolated venv {venv} with {base}')
        subprocess.run([base, '-m', 'venv', str(venv)], check=True)
        subprocess.run([str(py), '-m', 'pip', 'install', '-q', *REQUIREMENTS], check=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(py), '-c', CHILD, args.data_dir, args.out, ','.join(CORRUPTIONS),
                    str(INDICES).replace(' ', '')], check=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
