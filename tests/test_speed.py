"Tests of `nucleus_seg.speed`: batched crops against a reference, compile_unet against eager, a 2-process CPU run."
import importlib.util, json, os, subprocess, sys, textwrap
from pathlib import Path
import numpy as np, pytest, torch
from nucleus_seg.speed import ResidentData, ResidentDL, compile_unet

def _coded(h, w):
    "Image whose pixel value encodes its position (y*16+x, h,w <= 15) and a target of y%3."
    y, x = np.mgrid[:h, :w]
    return (y*16+x+1).astype(np.uint8)[None], (y % 3).astype(np.uint8)

def _dihedrals(a):
    "The 8 dihedral transforms of a square 2-D array."
    return [np.flip(np.flip(t, 0) if fy else t, 1) if fx else (np.flip(t, 0) if fy else t)
            for t in (a, a.T) for fy in (0, 1) for fx in (0, 1)]

def test_random_crops_are_dihedral_windows():
    shapes = [(12, 15), (8, 8), (15, 9), (5, 7)]
    data = [_coded(*s) for s in shapes]
    rd = ResidentData([i for i, _ in data], [t for _, t in data])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        x, y = rd.crops(torch.arange(4), 8, gen=g)
        assert x.shape == (4, 3, 8, 8) and y.shape == (4, 8, 8) and (x[:, 0] == x[:, 2]).all()
        for k, (h, w) in enumerate(shapes):
            img, tgt = data[k][0][0], data[k][1]
            ph, pw = max(8-h, 0), max(8-w, 0)
            # every crop is a dihedral transform of an 8x8 window of the zero-padded image (image placed anywhere)
            ok = False
            for oy in range(ph+1):
                for ox in range(pw+1):
                    pad = np.zeros((max(h, 8), max(w, 8)), np.uint8); pad[oy:oy+h, ox:ox+w] = img
                    padt = np.zeros_like(pad); padt[oy:oy+h, ox:ox+w] = tgt
                    for y0 in range(pad.shape[0]-7):
                        for x0 in range(pad.shape[1]-7):
                            for j, (a, b) in enumerate(zip(_dihedrals(pad[y0:y0+8, x0:x0+8]), _dihedrals(padt[y0:y0+8, x0:x0+8]))):
                                if (a == x[k, 0].numpy()).all() and (b == y[k].numpy()).all(): ok = True; seen.add(j)
            assert ok, f'crop {k} is not a dihedral window'
    assert len(seen) == 8  # all transforms occur

def test_centre_crop_and_loader():
    data = [_coded(12, 15), _coded(6, 6)]
    rd = ResidentData([i for i, _ in data], [t for _, t in data], split_idx=1)
    x, y = rd.crops([0, 1], 8, random=False)
    assert (x[0, 0].numpy() == data[0][0][0, 2:10, 3:11]).all() and (y[0].numpy() == data[0][1][2:10, 3:11]).all()
    assert (x[1, 0].numpy()[1:7, 1:7] == data[1][0][0]).all() and x[1, 0, 0].sum() == 0
    dl = ResidentDL(rd, bs=2, crop=8, device='cpu')
    assert not dl.random and not dl.shuffle
    xb, yb = dl.one_batch()
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.shape == (2, 3, 8, 8)

def test_compile_unet_matches_eager():
    "compile_unet fixes the dynamo failure at the TensorBase boundary; `NUCLEUS_SEG_INDUCTOR=1` uses inductor (slow on CPU)."
    from torchvision.models import resnet18
    from fastai.vision.all import create_unet_model
    from fastai.torch_core import TensorImage, TensorBase
    torch._dynamo.reset()
    m = create_unet_model(resnet18, 3, (32, 32), pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): ref = m(x)
    backend = 'inductor' if os.environ.get('NUCLEUS_SEG_INDUCTOR') else 'aot_eager'
    cm = compile_unet(m, backend=backend, fullgraph=True)
    with torch.no_grad(): out = cm(TensorImage(x))
    assert type(out) is TensorBase
    assert ((out-ref).abs().max()/ref.abs().max()).item() < 1e-4

TRAIN = '''
import json, sys
from pathlib import Path
import numpy as np, torch
from fastai.vision.all import unet_learner, resnet18, CrossEntropyLossFlat, DataLoaders
from fastai.distributed import rank_distrib, num_distrib
from nucleus_seg.speed import ResidentData, ResidentDL
out = Path(sys.argv[1]); torch.set_num_threads(1)
rng = np.random.default_rng(0)
imgs = [rng.integers(0, 255, (1, 40, 48), dtype=np.uint8) for _ in range(8)]
tgts = [rng.integers(0, 3, (40, 48), dtype=np.uint8) for _ in range(8)]
dls = DataLoaders(ResidentDL(ResidentData(imgs, tgts), bs=2, crop=32),
                  ResidentDL(ResidentData(imgs[:4], tgts[:4], split_idx=1), bs=2, crop=32), device='cpu')
learn = unet_learner(dls, resnet18, pretrained=False, n_out=3, loss_func=CrossEntropyLossFlat(axis=1), path=out)
seen = []
learn.model.register_forward_pre_hook(lambda m, a: seen.append(float(a[0].float().sum())) if m.training else None)
with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(1, 1e-3)
learn.save('tiny')
r = rank_distrib()
(out/f'rank{r}.json').write_text(json.dumps(dict(rank=r, world=num_distrib(), backend=torch.distributed.get_backend(),
    batch_sums=seen, valid_loss=float(learn.recorder.values[-1][1]))))
'''

@pytest.mark.skipif(importlib.util.find_spec('accelerate') is None, reason='accelerate not installed (dev extra)')
def test_two_process_cpu_training(tmp_path):
    "`accelerate launch` with 2 processes on the CPU (gloo): both ranks train on their half of each epoch, rank 0 saves."
    (tmp_path/'train.py').write_text(TRAIN)
    # `--cpu` makes accelerate 1.x run a single process; `--multi_gpu` goes through torch.distributed.run and the
    # script's `Accelerator(cpu=True)` then uses gloo
    # this interpreter (not whichever `accelerate` script is first on PATH), so the ranks import the code under test
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
           '--dynamo_backend', 'no', '--main_process_port', '29517', str(tmp_path/'train.py'), str(tmp_path)]
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path/f'rank{i}.json').read_text()) for i in range(2)]
    assert [o['rank'] for o in ranks] == [0, 1] and all(o['world'] == 2 and o['backend'] == 'gloo' for o in ranks)
    assert [len(o['batch_sums']) for o in ranks] == [2, 2]  # 8 crops, bs 2, split over 2 ranks
    assert ranks[0]['batch_sums'] != ranks[1]['batch_sums']  # different data on each rank
    assert ranks[0]['valid_loss'] == pytest.approx(ranks[1]['valid_loss'])  # gathered validation
    assert (tmp_path/'models'/'tiny.pth').exists()
