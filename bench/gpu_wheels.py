"""Download the cp312 wheels a lent GPU machine lacks for this project (fastai, nbdev and what they need) into `.whl/`.

    python bench/gpu_wheels.py            # then carry `.whl` (git-ignored) with the device call

The device image already has torch, torchvision, scikit-image, scipy, pandas, matplotlib, pillow, tifffile,
safetensors, psutil, accelerate and tensorboard (its package list is `DEVICE_HAS`); everything else that the roots
need, by their `Requires-Dist` metadata (extras and non-Linux markers skipped), is fetched here with pip, one
version each.
"""
import re, subprocess, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ['fastai', 'fastcore', 'fasttransform', 'fastprogress', 'fastdownload', 'plum-dispatch', 'beartype',
         'python-fasthtml', 'nbdev', 'execnb', 'ipywidgets']
DEVICE_HAS = set(canonicalize_name(n) for n in '''absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx
onnxruntime opencv-python-headless optax opt-einsum packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pytest
python-dateutil pytorch-lightning pyyaml regex requests rich safetensors scikit-image scikit-learn scipy seaborn sentencepiece
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp'''.split())
# not imported by what runs there: spacy (fastai.text), jedi/parso (IPython's completion), the widget front-end bundles
SKIP = {'spacy', 'jedi', 'parso', 'widgetsnbextension', 'jupyterlab-widgets'}
ENV = dict(python_version='3.12', python_full_version='3.12.3', sys_platform='linux', platform_system='Linux',
           implementation_name='cpython', platform_machine='x86_64', os_name='posix', extra='')
PIP = [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:', '--python-version', '3.12',
       '--implementation', 'cp', '--abi', 'cp312', '--abi', 'abi3', '--abi', 'none'] + sum(
      [['--platform', p] for p in ('manylinux_2_28_x86_64', 'manylinux_2_27_x86_64', 'manylinux_2_17_x86_64',
                                   'manylinux2014_x86_64', 'manylinux1_x86_64', 'any')], [])

def requires(whl:Path)->list:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(l.split(':', 1)[1].strip()) for l in lines if l.startswith('Requires-Dist:')]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(ENV)]

def main(dest='.whl'):
    dest = Path(dest); dest.mkdir(exist_ok=True)
    todo, seen = [canonicalize_name(n) for n in ROOTS], set()
    while todo:
        n = todo.pop()
        if n in seen or n in DEVICE_HAS or n in SKIP: continue
        seen.add(n)
        have = [f for f in dest.glob('*.whl') if canonicalize_name(re.split(r'-\d', f.name, 1)[0]) == n]
        if not have:
            subprocess.run(PIP + ['-d', str(dest), n], check=True)
            have = [f for f in dest.glob('*.whl') if canonicalize_name(re.split(r'-\d', f.name, 1)[0]) == n]
        todo += [canonicalize_name(r.name) for r in requires(have[0])]
    size = sum(f.stat().st_size for f in dest.glob('*.whl'))/2**20
    print(f'{len(list(dest.glob("*.whl")))} wheels, {size:.1f} MiB in {dest}')

if __name__ == '__main__': main(*sys.argv[1:])
