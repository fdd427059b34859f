"Tests of `nucleus_seg.learner` and `nucleus_seg.inference`: weights over loopback, loss, instances, resume, export, inference sizes."
import os, threading, warnings, functools
from pathlib import Path

import numpy as np, pytest, torch, torchvision
from fastai.vision.all import Callback, load_learner, resnet18

from nucleus_seg.data import dsb_dataloaders, prepare_dsb, read_label, instance_target, DSBDataError
from nucleus_seg.learner import *
from nucleus_seg.inference import Segmenter, load_segmenter, evaluate_model, segment_folder, image_items
from nucleus_seg.metrics import dsb_score
from nucleus_seg.instances import target_to_instances

DATA = Path(os.environ.get('NUCLEUS_SEG_DATA', Path(__file__).parents[1]/'..'/'shared'/'data'/'dsb2018'))
pytestmark = pytest.mark.skipif(not (DATA/'stage1_train.zip').exists(), reason='DSB2018 data not found (set NUCLEUS_SEG_DATA)')
torch.set_num_threads(1)  # the CI machine's 2 cores are shared: one thread is several times faster than two


@pytest.fixture(scope='module')
def dls():
    return dsb_dataloaders(DATA, n_items=8, bs=4, crop=64, num_workers=0)


@pytest.fixture(scope='module')
def weights_server(tmp_path_factory, serve_folder):
    "A 127.0.0.1 HTTP server serving the state dict of a randomly initialised resnet18; returns (url, state dict, stop)."
    d = tmp_path_factory.mktemp('weights')
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, d/'resnet18-random.pth')
    base, stop = serve_folder(d)
    return base + 'resnet18-random.pth', sd, stop


# ---------- ImageNet weights ----------
def test_weights_downloaded_and_loaded(dls, weights_server, tmp_path):
    url, sd, _ = weights_server
    got = load_imagenet_weights(resnet18, url, model_dir=tmp_path)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert (tmp_path/'resnet18-random.pth').exists()
    learn = nucleus_learner(dls, resnet18, weights_url=url, model_dir=tmp_path)
    assert learn.nucleus['pretrained']
    body = learn.model[0]
    assert torch.equal(body[0].weight, sd['conv1.weight'])            # stem conv
    assert torch.equal(body[7][1].conv2.weight, sd['layer4.1.conv2.weight'])  # last block
    assert torch.equal(body[1].running_mean, sd['bn1.running_mean'])


def test_weights_url_from_env(monkeypatch):
    monkeypatch.setenv(WEIGHTS_URL_ENV, 'http://127.0.0.1:1/w.pth')
    assert imagenet_weights_url(resnet18) == 'http://127.0.0.1:1/w.pth'
    assert imagenet_weights_url(resnet18, 'http://x/y.pth') == 'http://x/y.pth'
    monkeypatch.delenv(WEIGHTS_URL_ENV)
    assert imagenet_weights_url(resnet18).startswith('https://download.pytorch.org/')


def test_weights_server_down_warns_once_and_trains_from_scratch(dls, weights_server, tmp_path):
    url, _, stop = weights_server
    stop()
    url = url.replace('resnet18-random', 'resnet18-gone')  # a URL not warned about yet
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        assert load_imagenet_weights(resnet18, url, model_dir=tmp_path, timeout=5) is None
        learn = nucleus_learner(dls, resnet18, weights_url=url, model_dir=tmp_path)
    msgs = [str(w.message) for w in ws if 'ImageNet weights unavailable' in str(w.message)]
    assert len(msgs) == 1 and url in msgs[0] and 'from scratch' in msgs[0]
    assert not learn.nucleus['pretrained']
    assert not list(tmp_path.glob('*.pth'))


# ---------- loss, targets, metric ----------
def test_loss_weights_and_gradient():
    targ = torch.zeros(2, 16, 16, dtype=torch.long); targ[:, 4:12, 4:12] = 1; targ[:, 4, 4:12] = 2
    pred = torch.randn(2, 3, 16, 16, requires_grad=True)
    loss = NucleusLoss()(pred, targ)
    loss.backward()
    assert loss.item() > 0 and pred.grad.abs().sum() > 0
    # a boundary pixel wrong costs more than an interior pixel wrong
    good = torch.nn.functional.one_hot(targ, 3).permute(0, 3, 1, 2).float()*10
    bad_b, bad_i = good.clone(), good.clone()
    bad_b[:, :, 4, 5] = torch.tensor([10., 0, 0]); bad_i[:, :, 8, 8] = torch.tensor([10., 0, 0])
    ce = NucleusLoss(dice_weight=0)
    assert ce(bad_b, targ) > ce(bad_i, targ)
    # binary targets work too
    assert NucleusLoss()(torch.randn(2, 2, 16, 16), (targ > 0).long()).item() > 0


def test_target_to_instances_touching_and_tiny():
    lbl = np.zeros((20, 30), np.uint16)
    lbl[2:10, 2:10] = 1; lbl[2:10, 10:18] = 2   # two touching squares
    lbl[15:17, 25:27] = 3                        # a 2x2 nucleus: boundary only
    rec = target_to_instances(instance_target(lbl))
    assert rec.max() == 3 and dsb_score(lbl, rec) == 1.0
    assert target_to_instances(instance_target(lbl), min_size=5).max() == 2


def test_target_to_instances_on_real_labels():
    df = prepare_dsb(DATA, 'train')
    scores = [dsb_score(l, target_to_instances(instance_target(l))) for l in map(read_label, df.label[:10])]
    assert np.mean(scores) > 0.95


def test_boundary_convention_matches_instance_extraction():
    "`DSBMetric` (and `Segmenter`) score a perfect prediction of a real target close to 1."
    l = read_label(prepare_dsb(DATA, 'train').label[0])
    probs = np.eye(3, dtype=np.float32)[instance_target(l)].transpose(2, 0, 1)
    from nucleus_seg.instances import probs_to_instances
    assert dsb_score(l, probs_to_instances(probs)) > 0.9


# ---------- training: checkpoints, resume, export ----------
class _Kill(Callback):
    order = 100
    def after_epoch(self):
        if self.epoch == 0: raise KeyboardInterrupt('simulated kill')


def test_killed_run_resumes_and_exports(dls, tmp_path):
    run = tmp_path/'run'
    with pytest.raises(KeyboardInterrupt):
        train_nucleus(run, dls=dls, arch=resnet18, epochs=2, pretrained=False, cbs=_Kill())
    st = torch.load(run/'models'/'last.pth', weights_only=False)
    assert (st['epoch'], st['n_epoch']) == (0, 2) and {'model', 'opt', 'best'} <= set(st)
    assert not (run/'model.pkl').exists()
    with pytest.raises(ValueError, match='2 epochs, not 5'):
        train_nucleus(run, dls=dls, arch=resnet18, epochs=5, pretrained=False, resume=True)
    learn = train_nucleus(run, dls=dls, arch=resnet18, epochs=2, pretrained=False, resume=True)
    assert [len(v) > 0 for v in learn.recorder.values] == [False, True]   # epoch 0 skipped, epoch 1 trained
    assert torch.load(run/'models'/'last.pth', weights_only=False)['epoch'] == 1
    assert sorted(p.name for p in (run/'models').iterdir()) == ['best.pth', 'last.pth']  # no temporary files left
    assert (run/'valid.csv').exists()
    # the exported model loads and segments whole images of any size
    loaded = load_learner(run/'model.pkl')
    assert loaded.nucleus['arch'] == 'resnet18'
    seg = load_segmenter(run/'model.pkl', tta=False)
    img = np.random.default_rng(0).integers(0, 255, (70, 45, 3), dtype=np.uint8)
    lbl = seg.segment(img)
    assert lbl.shape == (70, 45) and lbl.dtype == np.uint16
    grey16 = (np.random.default_rng(1).random((100, 130))*65535).astype(np.uint16)
    assert seg.segment(grey16).shape == (100, 130)
    # tiling covers the image; TTA keeps probabilities normalised
    tiled = Segmenter(loaded, tta=True, tile=64, overlap=16).predict_probs(np.zeros((150, 97, 3), np.uint8)+40)
    assert tiled.shape == (3, 150, 97) and np.allclose(tiled.sum(0), 1, atol=1e-4)
    assert Segmenter(loaded, tile=64, overlap=16)._tiles(150) == [0, 48, 86]
    with pytest.raises(ValueError, match='overlap'): Segmenter(loaded, tile=64)
    with pytest.raises(DSBDataError): seg.segment(b'garbage')
    with pytest.raises(FileNotFoundError): load_segmenter(run/'missing.pkl')
    # resume of a finished run trains nothing and re-exports the best model
    (run/'model.pkl').unlink()
    train_nucleus(run, dls=dls, arch=resnet18, epochs=2, pretrained=False, resume=True)
    assert (run/'model.pkl').exists()


class _KillAfter(Callback):
    order = 100
    def __init__(self, epoch): self.kill_epoch = epoch
    def after_epoch(self):
        if self.epoch == self.kill_epoch: raise KeyboardInterrupt('simulated kill')


def test_resume_continues_schedule_and_optimiser(dls, tmp_path):
    "A resumed run trains the remaining epochs at the learning rates of an uninterrupted run, with the optimiser's state."
    kw = dict(dls=dls, arch=resnet18, epochs=3, pretrained=False, export=None)
    whole = train_nucleus(tmp_path/'whole', **kw)
    with pytest.raises(KeyboardInterrupt): train_nucleus(tmp_path/'cut', cbs=_KillAfter(1), **kw)
    resumed = train_nucleus(tmp_path/'cut', resume=True, **kw)
    n = len(dls.train)
    assert [len(v) > 0 for v in resumed.recorder.values] == [False, False, True]
    assert len(resumed.recorder.lrs) == n and len(whole.recorder.lrs) == 3*n
    assert np.allclose(resumed.recorder.lrs, whole.recorder.lrs[-n:])      # the one-cycle schedule's last third
    p = resumed.opt.param_lists[0][0]
    assert int(resumed.opt.state[p]['step']) == 3*n                           # Adam's state carried over, not restarted


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    fn = atomic_save({'a': 1}, tmp_path/'x.pth')
    with pytest.raises(Exception): atomic_save({'f': lambda: 0}, fn)  # lambdas can't be pickled
    assert torch.load(fn, weights_only=False) == {'a': 1}
    assert [p.name for p in tmp_path.iterdir()] == ['x.pth']


def test_tensorboard_optional(tmp_path):
    try: import tensorboard  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match='TensorBoard logging skipped'):
            from nucleus_seg.learner import _tensorboard_cb
            assert _tensorboard_cb(tmp_path) is None
    else:
        from nucleus_seg.learner import _tensorboard_cb
        assert _tensorboard_cb(tmp_path) is not None


# ---------- evaluation sources ----------
def test_image_items_sources(tmp_path):
    df = prepare_dsb(DATA, 'test')
    assert len(image_items(df.image[0].parent.parent)) == len(df)          # prepared split folder (index.csv)
    assert len(image_items(df.image[0].parent)) == len(df)                 # plain folder of images
    df.iloc[:3].to_csv(tmp_path/'idx.csv', index=False)
    assert list(image_items(tmp_path/'idx.csv').image_id) == list(df.image_id[:3])
    with pytest.raises(FileNotFoundError): image_items(tmp_path/'nope')
    (tmp_path/'empty').mkdir()
    with pytest.raises(FileNotFoundError): image_items(tmp_path/'empty')
