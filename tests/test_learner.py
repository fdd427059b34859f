"""Tests of `nucleus_seg.learner` (05_learner): the loss and metric, ImageNet weights over loopback, model files
(safetensors only, pickles refused), an exported model predicting exactly what the trained learner predicts, the best
epoch kept and carried over on resume, resumed schedules, `compile_unet` against eager, and a two-process CPU run.

Training runs use the synthetic DSB2018 stand-in (`synthetic.fake_dsb`), so none of these tests needs the real data."""
import importlib.util, json, os, pickle, subprocess, sys, warnings
from pathlib import Path

import numpy as np, pytest, torch
from collections import Counter
from fastai.vision.all import Callback, Metric, MixedPrecision

from nucleus_seg.io import read_image, input_stats
from nucleus_seg.data import dsb_dataloaders, instance_target, ResidentData, ResidentDL
from nucleus_seg.learner import *
from nucleus_seg.inference import load_segmenter
from synthetic import disks, in_ci, tiny_dls

torch.set_num_threads(1)  # CI's 2 cores are shared: one thread each is several times faster than two


def _tiny(fake, **kw):
    "Arguments of a tiny `train_nucleus` run on the synthetic data, on the CPU."
    return dict(dls=tiny_dls(fake), tune=False) | kw


@pytest.fixture(scope='module')
def dls(fake): return tiny_dls(fake)


class KillAfter(Callback):
    "Raise `KeyboardInterrupt` at the end of epoch `epoch`, after the checkpoints are written (a killed run)."
    order = 100
    def __init__(self, epoch): self.kill_epoch = epoch
    def after_epoch(self):
        if self.epoch == self.kill_epoch: raise KeyboardInterrupt('simulated kill')


class ScriptedDSB(Metric):
    "A 'dsb' metric that reports `scores[epoch]`: the best epoch is known before training."
    def __init__(self, scores): self.scores, self.epoch = scores, None
    def reset(self): pass
    def accumulate(self, learn): self.epoch = learn.epoch
    @property
    def value(self): return self.scores[self.epoch] if self.epoch is not None else float('nan')
    @property
    def name(self): return 'dsb'


class Snapshots(Callback):
    "The model's weights at the end of every epoch."
    order = 99
    def before_fit(self): self.states = {}
    def after_epoch(self): self.states[self.epoch] = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}


def same_weights(a:dict, b:dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].float(), b[k].float()) for k in a)


# ---------- the network, loss and metric ----------
def test_archs_and_unet_model():
    assert ARCHS['compact'] == ('xresnet18', {'widen': 0.25})
    m = unet_model('compact').eval()
    with torch.no_grad(): assert m(torch.randn(2, 3, 64, 96)).shape == (2, 3, 64, 96)
    n = sum(p.numel() for p in m.parameters())
    assert 1.5e6 < n < 3e6   # a quarter-width xresnet18 encoder (11.7M at full width) and its decoder
    with pytest.raises(ValueError, match="unknown arch 'vgg'"): unet_model('vgg')


def test_loss_weights_boundary_and_gradient():
    targ = torch.zeros(2, 16, 16, dtype=torch.long); targ[:, 4:12, 4:12] = 1; targ[:, 4, 4:12] = 2
    pred = torch.randn(2, 3, 16, 16, requires_grad=True)
    loss = NucleusLoss()(pred, targ)
    loss.backward()
    assert loss.item() > 0 and pred.grad.abs().sum() > 0
    good = torch.nn.functional.one_hot(targ, 3).permute(0, 3, 1, 2).float()*10
    assert NucleusLoss()(good, targ).item() < 0.01
    bad_b, bad_i = good.clone(), good.clone()   # one pixel wrong: a boundary one, or an interior one
    bad_b[:, :, 4, 5] = torch.tensor([10., 0, 0]); bad_i[:, :, 8, 8] = torch.tensor([10., 0, 0])
    ce = NucleusLoss(dice_weight=0)
    # class weights 1/1/3: a wrong boundary pixel adds three times what a wrong interior one adds
    base = ce(good, targ).item()
    assert ce(bad_b, targ).item() - base == pytest.approx(3*(ce(bad_i, targ).item() - base), rel=1e-4)
    assert NucleusLoss()(torch.randn(2, 2, 16, 16), (targ > 0).long()).item() > 0   # binary targets
    assert torch.equal(NucleusLoss().decodes(good), targ)


def _metric(pred, y):
    m = DSBMetric(); m.reset()
    m.accumulate(type('FakeLearner', (), dict(pred=pred, y=y))())
    return m.value


def test_dsb_metric_perfect_wrong_and_empty_crops():
    lbl = disks((64, 64), [(16, 16), (16, 44), (46, 30)], [8, 7, 9])   # well apart: recovery is exact
    y = torch.from_numpy(instance_target(lbl)).long()[None]
    perfect = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float()*20
    assert _metric(perfect, y) == 1.0
    empty = torch.zeros_like(y)
    assert _metric(torch.cat([perfect, perfect]), torch.cat([y, empty])) == 1.0   # crops without nuclei are not scored
    assert np.isnan(_metric(perfect[:1]*0, empty))
    # predicting only the first nucleus: TP 1, FN 2 at every threshold, so 1/3
    one = torch.from_numpy(instance_target(np.where(lbl == 1, 1, 0))).long()[None]
    assert _metric(torch.nn.functional.one_hot(one, 3).permute(0, 3, 1, 2).float()*20, y) == pytest.approx(1/3)


# ---------- ImageNet weights over loopback ----------
@pytest.fixture(scope='module')
def weights_server(tmp_path_factory, serve_folder):
    "A 127.0.0.1 HTTP server serving a randomly initialised resnet18 state dict: (url, state dict, stop)."
    import torchvision
    d = tmp_path_factory.mktemp('weights')
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, d/'resnet18-random.pth')
    base, stop = serve_folder(d)
    return base + 'resnet18-random.pth', sd, stop


def test_weights_downloaded_and_loaded(dls, weights_server, tmp_path):
    url, sd, _ = weights_server
    got = load_imagenet_weights('resnet18', url, model_dir=tmp_path)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    learn = nucleus_learner(dls, 'resnet18', weights_url=url, model_dir=tmp_path)
    assert learn.nucleus['pretrained']
    body = learn.model[0]
    assert torch.equal(body[0].weight, sd['conv1.weight'])                    # stem conv
    assert torch.equal(body[7][1].conv2.weight, sd['layer4.1.conv2.weight'])  # last block
    assert torch.equal(body[1].running_mean, sd['bn1.running_mean'])
    padded = nucleus_learner(dls, 'resnet18', weights_url=url, model_dir=tmp_path, pad_in=8)
    stem = padded.model[0][0].weight
    assert padded.nucleus['pad_in'] == 8 and stem.shape[1] == 8
    assert torch.equal(stem[:, :3], sd['conv1.weight']) and not stem[:, 3:].any()   # the ImageNet stem, zero for the padding
    assert torch.equal(padded.model[0][7][1].conv2.weight, sd['layer4.1.conv2.weight'])


def test_weights_url_from_env(monkeypatch):
    monkeypatch.setenv(WEIGHTS_URL_ENV, 'http://127.0.0.1:1/w.pth')
    assert imagenet_weights_url('resnet18') == 'http://127.0.0.1:1/w.pth'
    assert imagenet_weights_url('resnet18', 'http://x/y.pth') == 'http://x/y.pth'
    monkeypatch.delenv(WEIGHTS_URL_ENV)
    assert imagenet_weights_url('resnet18').startswith('https://download.pytorch.org/')


def test_weights_server_down_warns_once_and_trains_from_scratch(dls, weights_server, tmp_path):
    url, _, stop = weights_server
    stop()
    url = url.replace('resnet18-random', 'resnet18-gone')   # a URL not warned about yet
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        assert load_imagenet_weights('resnet18', url, model_dir=tmp_path, timeout=5) is None
        learn = nucleus_learner(dls, 'resnet18', weights_url=url, model_dir=tmp_path)
    msgs = [str(w.message) for w in ws if 'ImageNet weights unavailable' in str(w.message)]
    assert len(msgs) == 1 and url in msgs[0] and 'from scratch' in msgs[0]
    assert not learn.nucleus['pretrained'] and not list(tmp_path.glob('*.pth'))


def test_learner_needs_normalised_dls():
    from fastai.data.core import DataLoaders
    from fastai.data.transforms import IntToFloatTensor
    rd = ResidentData([np.zeros((1, 64, 64), np.uint8)]*2, [np.zeros((64, 64), np.uint8)]*2)
    raw = DataLoaders(ResidentDL(rd, bs=2, crop=64, after_batch=[IntToFloatTensor()]),
                      ResidentDL(rd, bs=2, crop=64, random=False, after_batch=[IntToFloatTensor()]), device='cpu')
    with pytest.raises(ValueError, match='Normalize'): nucleus_learner(raw)


def test_learner_on_datablock_dataloaders(fake):
    dls = dsb_dataloaders(fake.path, cache=fake.cache, n_items=8, bs=4, crop=64, resident=False, device='cpu')
    learn = nucleus_learner(dls)
    assert learn.nucleus['classes'] == ['background', 'nucleus', 'boundary']
    learn.fit(1, 1e-3)


class RawLosses(Callback):
    "The loss of every training batch, read back (tests only: this waits for the device)."
    order = 100
    def before_fit(self): self.raw = []
    def after_batch(self):
        if self.training: self.raw.append(self.learn.loss.item())


def test_sync_free_recorder_records_fastais_smoothed_loss(dls):
    learn, raw = nucleus_learner(dls, metrics=[]), RawLosses()
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-3, cbs=raw)
    val, smooth = 0., []
    for k, l in enumerate(raw.raw, 1): val = l + 0.98*(val-l); smooth.append(val/(1-0.98**k))  # torch.lerp(l, val, 0.98)
    assert all(isinstance(o, torch.Tensor) and o.device.type == 'cpu' for o in learn.recorder.losses)
    np.testing.assert_allclose([float(o) for o in learn.recorder.losses], smooth, rtol=1e-5)
    np.testing.assert_allclose(learn.recorder.values[-1][0], smooth[-1], rtol=1e-5)  # the epoch's train_loss


def _six_batches(fake):
    "CPU dataloaders of 6 training batches an epoch, on the synthetic data."
    return dsb_dataloaders(fake.path, cache=fake.cache, n_items=8, crop=32, bs=2, n=12, device='cpu')


def test_progress_bar_reads_the_loss_every_few_batches(fake):
    dls = _six_batches(fake)
    learn, cb = nucleus_learner(dls, metrics=[]), HostSyncCounter()
    learn.sync_free_recorder.every = 2
    with learn.no_logging(): learn.fit(2, 1e-3, cbs=cb)
    assert cb.batches == 12 and cb.calls == Counter(item=6)  # batches 0, 2 and 4 of each epoch
    assert isinstance(learn.smooth_loss, torch.Tensor)
    cb = HostSyncCounter()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)
    assert cb.batches == 6 and cb.calls == Counter()


class SeenLoss(Callback):
    "What `learn.smooth_loss` holds after each training batch, beside the `Recorder`'s current value."
    order = 59  # before the LR finder and the progress bar read it
    def before_fit(self): self.pairs = []
    def after_batch(self):
        if self.training: self.pairs.append((float(self.learn.smooth_loss), float(self.recorder.smooth_loss.value)))


def test_lr_finder_sees_the_current_loss(fake):
    dls = _six_batches(fake)
    learn, seen = nucleus_learner(dls, metrics=[]), SeenLoss()
    learn.add_cb(seen)
    lrs = learn.lr_find(num_it=12, show_plot=False)   # with its progress bar
    assert len(seen.pairs) >= 6 and all(a == b for a, b in seen.pairs) and np.isfinite(lrs.valley)
    assert all(o.device.type == 'cpu' for o in learn.recorder.losses)


class Inputs(Callback):
    "dtype of the network's input and of the U-Net's last cross-connection, batch by batch, under CPU bf16 autocast."
    order = MixedPrecision.order
    def before_fit(self):
        self.seen, merge = [], [m for m in self.learn.model.modules() if type(m).__name__ == 'MergeLayer'][-1]
        merge.register_forward_hook(lambda m, i, o: self.seen.append(o.dtype))
        self.learn.model.register_forward_pre_hook(lambda m, i: self.seen.append(i[0].dtype))
    def before_batch(self): self.ac = torch.autocast('cpu', dtype=torch.bfloat16); self.ac.__enter__()
    def after_loss(self): self.ac.__exit__(None, None, None)


def test_bf16_input_makes_the_last_cross_connection_bf16(dls):
    for cbs, want in (([], torch.float32), ([BF16Input()], torch.bfloat16)):
        learn, ins = nucleus_learner(dls, metrics=[], cbs=cbs), Inputs()
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=ins)
        assert ins.seen[:2] == [want, want], ins.seen[:2]
    learn = nucleus_learner(dls, metrics=[], cbs=[BF16Input()])   # no autocast: inputs left as they are
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)


# ---------- model files ----------
def test_model_files_refuse_pickles_and_foreign_files(tmp_path):
    class Payload:
        def __reduce__(self): return (Path.touch, (tmp_path/'pwned',))
    files = {'model.pkl': pickle.dumps(Payload()), 'empty.safetensors': b'', 'notes.safetensors': b'hello world',
             'image.safetensors': b'\x89PNG\r\n\x1a\n' + b'\0'*40}
    for n, b in files.items(): (tmp_path/n).write_bytes(b)
    torch.save(unet_model('compact').state_dict(), tmp_path/'weights.pth')   # a zip with a pickle inside
    for n in [*files, 'weights.pth']:
        with pytest.raises(ModelFileError, match='refused'): read_model(tmp_path/n)
    assert not (tmp_path/'pwned').exists()   # the pickle was never loaded
    from safetensors.torch import save_file
    save_file({'w': torch.zeros(2)}, tmp_path/'foreign.safetensors')
    with pytest.raises(ModelFileError, match='without nucleus-seg'): read_model(tmp_path/'foreign.safetensors')
    with pytest.raises(FileNotFoundError, match='model file not found'): read_model(tmp_path/'missing.safetensors')


def test_model_file_round_trip_half_update_and_newer_format(tmp_path):
    torch.manual_seed(0)
    m = unet_model('compact', img_size=(64, 64)).eval()
    cfg = dict(arch='compact', arch_params={'widen': 0.25}, n_out=3, img_size=[64, 64], input=dict(mode='grey', mean=[0.5]*3, std=[0.25]*3))
    fn = save_model(m, tmp_path/'m.safetensors', cfg)
    assert [p.name for p in tmp_path.iterdir()] == ['m.safetensors']   # written atomically, no temporary file left
    loaded, cfg2 = load_model(fn)
    assert cfg2 == cfg and same_weights(loaded.state_dict(), m.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x).softmax(1)
        assert torch.allclose(loaded(x).softmax(1), ref, atol=1e-6)
        half = save_model(m, tmp_path/'h.safetensors', cfg, half=True)
        assert half.stat().st_size < 0.6*fn.stat().st_size
        assert (load_model(half)[0](x).softmax(1) - ref).abs().max() < 5e-3
    new = update_model(fn, postprocess=dict(min_size=20))
    sd, cfg3 = read_model(fn)
    assert cfg3 == new == {**cfg, 'postprocess': dict(min_size=20)} and same_weights(sd, m.state_dict())
    from safetensors.torch import save
    future = save(m.state_dict(), metadata=dict(format=MODEL_FORMAT, format_version=str(MODEL_FORMAT_VERSION+1), nucleus_seg=json.dumps(cfg)))
    (tmp_path/'future.safetensors').write_bytes(future)
    with pytest.raises(ModelFileError, match='newer'): read_model(tmp_path/'future.safetensors')


def _odd_convs(m): return [(c.in_channels, c.out_channels) for c in m.modules() if isinstance(c, torch.nn.Conv2d) and (c.in_channels % 8 or c.out_channels % 8)]


def test_pad_in_leaves_only_the_output_unaligned_and_keeps_a_model_files_outputs(dls, tmp_path):
    """`pad_in=8`: every convolution but the 3-class output has channels in multiples of 8; a 3-channel model file
    opened padded (`load_model`, `learner_from_file`) predicts what it predicted, and a padded file reopens padded."""
    assert _odd_convs(unet_model('resnet18')) == [(3, 64), (99, 99), (99, 99), (99, 3)]
    assert _odd_convs(unet_model('resnet18', pad_in=8)) == [(104, 3)] and _odd_convs(unet_model('compact', pad_in=8)) == [(56, 3)]
    with pytest.raises(ValueError, match='more than 3'): unet_model('compact', pad_in=3)
    torch.manual_seed(0)
    m = unet_model('compact', img_size=(64, 64))
    for bn in m.modules():   # trained-looking statistics: a wrong copy of them would show in the outputs
        if isinstance(bn, torch.nn.BatchNorm2d): bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2); torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
    cfg = dict(arch='compact', arch_params={'widen': 0.25}, n_out=3, img_size=[64, 64], input=dict(mode='grey', mean=[0.5]*3, std=[0.25]*3))
    fn = save_model(m.eval(), tmp_path/'m.safetensors', cfg)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        padded, pcfg = load_model(fn, pad_in=8)
        assert pcfg == {**cfg, 'pad_in': 8} and _odd_convs(padded) == [(56, 3)]
        assert torch.equal(padded(x), ref)
        again, acfg = load_model(save_model(padded, tmp_path/'p.safetensors', pcfg))   # the file says pad_in: built padded
        assert acfg['pad_in'] == 8 and _odd_convs(again) == [(56, 3)] and torch.equal(again(x), ref)
        ft = learner_from_file(fn, dls, pad_in=8)
        assert ft.nucleus['pad_in'] == 8 and torch.allclose(ft.model.eval()(x), ref, atol=1e-6)
    with pytest.raises(ValueError, match='does not fit'): widen_state(padded.state_dict(), unet_model('compact', img_size=(64, 64)))


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    fn = atomic_save({'a': 1}, tmp_path/'x.pth')
    with pytest.raises(Exception): atomic_save({'f': lambda: 0}, fn)   # lambdas can't be pickled
    assert torch.load(fn, weights_only=False) == {'a': 1}
    assert [p.name for p in tmp_path.iterdir()] == ['x.pth']


def test_check_run_folder(tmp_path, monkeypatch):
    assert check_run_folder(tmp_path/'a'/'b').is_dir()
    (tmp_path/'file').write_text('x')
    with pytest.raises(OSError, match='cannot write the run folder'): check_run_folder(tmp_path/'file'/'run')
    import shutil, collections
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: collections.namedtuple('U', 'total used free')(1, 1, 2**20))
    with pytest.raises(OSError, match='1 MiB free, training needs about'): check_run_folder(tmp_path/'c', unet_model('compact'))


def test_tensorboard_optional(tmp_path):
    from nucleus_seg.learner import _tensorboard_cb
    if importlib.util.find_spec('tensorboard') is None:
        with pytest.warns(UserWarning, match='TensorBoard logging skipped'): assert _tensorboard_cb(tmp_path) is None
    else: assert _tensorboard_cb(tmp_path) is not None


# ---------- training: export, best model, resume ----------
def test_exported_model_predicts_what_the_learner_predicts(tiny_run):
    """The model file, loaded by `load_segmenter`, gives the trained learner's own validation probabilities: same
    weights, same input mode ('hed': hematoxylin for the histology image), same normalisation, to float tolerance."""
    learn, run = tiny_run
    dl = learn.dls.valid
    assert not dl.random and set(dl.dataset.items.modality) == {'fluorescence', 'histology', 'brightfield'}
    ref, _ = learn.get_preds(dl=dl)   # the learner's pipeline: decoded once, centre crops, Normalize, softmax
    seg = load_segmenter(run/'model.safetensors', tta=False, device='cpu')
    assert seg.mode == 'hed' and seg.config['input']['mode'] == 'hed'
    c = dl.crop
    for k, r in enumerate(dl.dataset.items.itertuples()):
        img = read_image(r.image)
        y0, x0 = (img.shape[0]-c)//2, (img.shape[1]-c)//2    # the validation crop: centred
        got = seg.predict_probs(img[y0:y0+c, x0:x0+c], stats=input_stats(img, 'hed'))   # normalised as the whole image
        np.testing.assert_allclose(got, ref[k].numpy(), atol=1e-4, err_msg=r.modality)
    assert float(ref.std()) > 0.05   # the predictions vary: the comparison has teeth
    ft = learner_from_file(run/'model.safetensors', learn.dls)
    assert torch.allclose(ft.get_preds(dl=dl)[0], ref, atol=1e-5)


def test_checkpoint_loads_safely(fake, tmp_path):
    "A checkpoint written by `CheckpointCallback` loads back with `load_checkpoint` (weights only, no pickled code)."
    run = tmp_path/'run'
    with pytest.raises(KeyboardInterrupt): train_nucleus(run, **_tiny(fake, epochs=2), cbs=KillAfter(0))
    learn = nucleus_learner(tiny_dls(fake))
    state = load_checkpoint(learn, run/'models'/'last.pth')
    assert (state['epoch'], state['n_epoch']) == (0, 2)


def test_best_epoch_kept_and_carried_over_on_resume(fake, tmp_path, capsys):
    """best.pth and the model file hold the best epoch's weights (not the last epoch's), and a resumed run starts
    from the best score so far: a worse epoch after resuming does not replace the best model."""
    run, scores = tmp_path/'run', [0.2, 0.6, 0.4]
    first = Snapshots()
    with pytest.raises(KeyboardInterrupt):
        train_nucleus(run, **_tiny(fake, epochs=3), metrics=ScriptedDSB(scores), cbs=[first, KillAfter(1)])
    last = read_checkpoint(run/'models'/'last.pth')
    assert (last['epoch'], last['n_epoch'], last['best']) == (1, 3, pytest.approx(0.6))
    best = torch.load(run/'models'/'best.pth', weights_only=True)
    assert same_weights(best, first.states[1]) and not same_weights(best, first.states[0])
    assert not (run/'model.safetensors').exists()

    resumed = Snapshots()
    learn = train_nucleus(run, **_tiny(fake, epochs=3), metrics=ScriptedDSB(scores), cbs=[resumed], resume=True)
    assert f"Resuming from {run/'models'/'last.pth'} at epoch 2 of 3" in capsys.readouterr().out
    assert not same_weights(resumed.states[2], first.states[1])   # epoch 2 trained (and scored 0.4)
    assert same_weights(torch.load(run/'models'/'best.pth', weights_only=True), first.states[1])
    last = read_checkpoint(run/'models'/'last.pth')
    assert (last['epoch'], last['best']) == (2, pytest.approx(0.6))
    assert same_weights(learn.model.state_dict(), first.states[1])   # the learner ends on the best epoch
    sd, cfg = read_model(run/'model.safetensors')
    assert same_weights(sd, first.states[1])
    assert cfg['recipe']['best_crop_dsb'] == 0.6 and cfg['recipe']['resumed_at_epoch'] == 2


def test_killed_run_resumes_and_rewrites_model_file(fake, tmp_path):
    run = tmp_path/'run'
    with pytest.raises(KeyboardInterrupt): train_nucleus(run, **_tiny(fake, epochs=2), cbs=KillAfter(0))
    st = read_checkpoint(run/'models'/'last.pth')
    assert (st['epoch'], st['n_epoch']) == (0, 2) and {'model', 'opt', 'best'} <= set(st)
    assert not (run/'model.safetensors').exists() and (run/'valid.csv').exists()
    with pytest.raises(ValueError, match='2 epochs, not 5'): train_nucleus(run, **_tiny(fake, epochs=5), resume=True)
    learn = train_nucleus(run, **_tiny(fake, epochs=2), resume=True)
    assert [len(v) > 0 for v in learn.recorder.values] == [False, True]   # epoch 0 skipped, epoch 1 trained
    assert read_checkpoint(run/'models'/'last.pth')['epoch'] == 1
    assert sorted(p.name for p in (run/'models').iterdir()) == ['best.pth', 'last.pth']   # no temporary files
    assert {'model.safetensors', 'models', 'valid.csv'} <= {p.name for p in run.iterdir()}
    assert not [p for p in run.rglob('*') if p.name.startswith('.')]   # no temporary files


def test_a_resumed_run_keeps_its_input_padding(fake, tmp_path):
    """`resume=True` rebuilds the network that wrote the checkpoint, padded or not, whether the run was killed or
    finished; asked for another padding, it refuses."""
    run = tmp_path/'run'
    with pytest.raises(KeyboardInterrupt): train_nucleus(run, **_tiny(fake, epochs=2), pad_in=8, cbs=KillAfter(0))
    assert read_checkpoint(run/'models'/'last.pth')['pad_in'] == 8
    learn = train_nucleus(run, **_tiny(fake, epochs=2), resume=True)   # pad_in not given
    assert learn.nucleus['pad_in'] == 8 and read_model(run/'model.safetensors')[1]['pad_in'] == 8
    assert train_nucleus(run, **_tiny(fake, epochs=2), resume=True).nucleus['pad_in'] == 8   # finished: nothing trained
    plain = tmp_path/'plain'
    with pytest.raises(KeyboardInterrupt): train_nucleus(plain, **_tiny(fake, epochs=2), cbs=KillAfter(0))
    with pytest.raises(ValueError, match='written by a run with pad_in=None, not 8'): train_nucleus(plain, **_tiny(fake, epochs=2), pad_in=8, resume=True)


def test_resuming_a_finished_run_rewrites_model_file(fake, tmp_path):
    "Resuming a finished run trains nothing and writes the model file again, from the best weights."
    run = tmp_path/'run'
    train_nucleus(run, **_tiny(fake, epochs=1))
    (run/'model.safetensors').unlink()
    before = {p.name: p.read_bytes() for p in (run/'models').iterdir()}
    train_nucleus(run, **_tiny(fake, epochs=1), resume=True)
    assert {p.name: p.read_bytes() for p in (run/'models').iterdir()} == before   # nothing trained
    assert same_weights(read_model(run/'model.safetensors')[0], torch.load(run/'models'/'best.pth', weights_only=True))


def test_resume_needs_no_imagenet_weights(fake, serve_folder, tmp_path):
    """A resumed run takes its weights from the checkpoint: it fetches nothing (offline, it says nothing of ImageNet),
    and its model file still says the run started from ImageNet weights."""
    import torchvision
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path/'r18.pth')
    base, stop = serve_folder(tmp_path)
    run, kw = tmp_path/'run', dict(arch='resnet18', model_dir=tmp_path/'hub')
    with pytest.raises(KeyboardInterrupt):
        train_nucleus(run, **_tiny(fake, epochs=2), weights_url=base+'r18.pth', cbs=KillAfter(0), **kw)
    stop()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn = train_nucleus(run, **_tiny(fake, epochs=2), weights_url=base+'gone.pth', resume=True, **kw)
    assert not [w for w in ws if 'ImageNet weights unavailable' in str(w.message)]
    assert [len(v) > 0 for v in learn.recorder.values] == [False, True]   # epoch 1 trained from the checkpoint
    assert learn.nucleus['pretrained'] is True and read_model(run/'model.safetensors')[1]['pretrained'] is True


def test_resume_continues_schedule_and_optimiser(fake, tmp_path):
    "A resumed run trains the remaining epochs at the learning rates of an uninterrupted run, with the optimiser's state."
    kw = _tiny(fake, epochs=3, model_file=None)
    whole = train_nucleus(tmp_path/'whole', **kw)
    with pytest.raises(KeyboardInterrupt): train_nucleus(tmp_path/'cut', cbs=KillAfter(1), **kw)
    resumed = train_nucleus(tmp_path/'cut', resume=True, **kw)
    n = len(resumed.dls.train)
    assert [len(v) > 0 for v in resumed.recorder.values] == [False, False, True]
    assert len(resumed.recorder.lrs) == n and len(whole.recorder.lrs) == 3*n
    assert np.allclose(resumed.recorder.lrs, whole.recorder.lrs[-n:])   # the one-cycle schedule's last third
    p = resumed.opt.param_lists[0][0]
    assert int(resumed.opt.opt.state[p]['step']) == 3*n                 # AdamW's state carried over, not restarted
    assert not list(tmp_path.rglob('*.safetensors'))                   # model_file=None writes none


def test_resume_with_another_optimiser_keeps_the_weights(fake, tmp_path):
    """A checkpoint written with fastai's `Adam` (the optimiser before `fused_adamw`) resumes with the default
    optimiser: a warning names the one that wrote it, the weights and epoch load and only the moments start afresh.
    With the optimiser that wrote it, its state loads without a warning."""
    from fastai.optimizer import Adam
    kw, ckpt = _tiny(fake, epochs=2, model_file=None), tmp_path/'run'/'models'/'last.pth'
    with pytest.raises(KeyboardInterrupt): train_nucleus(tmp_path/'run', cbs=KillAfter(0), opt_func=Adam, **kw)
    learn = nucleus_learner(tiny_dls(fake))
    with pytest.warns(UserWarning, match=r"written by fastai's `Adam`, not by fused_adamw.*weights, epoch and best score load"):
        state = load_checkpoint(learn, ckpt)
    assert state['epoch'] == 0 and same_weights(learn.model.state_dict(), read_checkpoint(ckpt)['model'])
    assert not learn.opt.opt.state                                      # fresh moments
    adam = nucleus_learner(tiny_dls(fake), opt_func=Adam)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        load_checkpoint(adam, ckpt)
    assert int(adam.opt.state[adam.opt.param_lists[0][0]]['step']) == len(adam.dls.train)   # Adam's own state, loaded
    with pytest.warns(UserWarning, match="written by fastai's `Adam`"): resumed = train_nucleus(tmp_path/'run', resume=True, **kw)
    assert [len(v) > 0 for v in resumed.recorder.values] == [False, True]   # epoch 1 trained from the checkpoint


# ---------- speed: compile_unet, two processes ----------
def test_compile_unet_matches_eager():
    "`compile_unet` fixes the dynamo failure at fastai's TensorBase boundary (aot_eager: the graph without inductor)."
    from fastai.torch_core import TensorImage, TensorBase
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = unet_model('compact', img_size=(64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): ref = m(x)
    backend = 'inductor' if os.environ.get('NUCLEUS_SEG_INDUCTOR') else 'aot_eager'
    cm = compile_unet(m, backend=backend, fullgraph=True)
    with torch.no_grad(): out = cm(TensorImage(x))
    assert type(out) is TensorBase
    assert ((out-ref).abs().max()/ref.abs().max()).item() < 1e-4


def test_compile_unet_train_only_compiles_one_graph():
    "Training batches share one graph; eval mode, whatever its shapes, runs eagerly (no recompiles for validation)."
    torch._dynamo.reset(); torch._dynamo.utils.counters.clear()
    m = compile_unet(unet_model('compact', img_size=(64, 64)), train_only=True, backend='aot_eager')
    for _ in range(2): m.train()(torch.randn(2, 3, 64, 64)).sum().backward()
    with torch.no_grad():
        for x in (torch.randn(1, 3, 64, 64), torch.randn(3, 3, 96, 96)): assert m.eval()(x).shape == (x.shape[0], 3, *x.shape[2:])
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1


TRAIN = '''
import json, sys
from pathlib import Path
import numpy as np, torch
from fastai.data.core import DataLoaders
from fastai.distributed import rank_distrib, num_distrib, teardown_distrib
from nucleus_seg.data import ResidentData, ResidentDL
from nucleus_seg.learner import nucleus_learner, fix_gloo_broadcast
fix_gloo_broadcast()   # fastai's DistributedDL broadcasts on CUDA; on the CPU (gloo) it must not
out = Path(sys.argv[1]); torch.set_num_threads(1)
rng = np.random.default_rng(0)
imgs = [rng.integers(0, 255, (1, 40, 48), dtype=np.uint8) for _ in range(8)]
tgts = [rng.integers(0, 3, (40, 48), dtype=np.uint8) for _ in range(8)]
dls = DataLoaders(ResidentDL(ResidentData(imgs, tgts), bs=2, crop=32),
                  ResidentDL(ResidentData(imgs[:4], tgts[:4], split_idx=1), bs=2, crop=32), device='cpu')
learn = nucleus_learner(dls, 'compact', metrics=[], path=out)
seen = []
learn.model.register_forward_pre_hook(lambda m, a: seen.append(float(a[0].float().sum())) if m.training else None)
with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(1, 1e-3)
learn.save('tiny')
r = rank_distrib()
(out/f'rank{r}.json').write_text(json.dumps(dict(rank=r, world=num_distrib(), backend=torch.distributed.get_backend(),
    batch_sums=seen, valid_loss=float(learn.recorder.values[-1][1]))))
# distrib_ctx frees the process group only when it made it (in notebooks); one left to interpreter exit can abort a
# rank under load ("terminate called without an active exception", seen once in CI)
teardown_distrib()
'''


def test_two_process_cpu_training(tmp_path):
    "`accelerate launch` with 2 processes on the CPU (gloo): both ranks train on their half of each epoch, rank 0 saves."
    if importlib.util.find_spec('accelerate') is None:
        if in_ci(): pytest.fail('accelerate (the dev extra) is not installed')
        pytest.skip('accelerate not installed (dev extra)')
    (tmp_path/'train.py').write_text(TRAIN)
    # `--cpu` makes accelerate 1.x run a single process; `--multi_gpu` goes through torch.distributed.run and the
    # script's `Accelerator(cpu=True)` then uses gloo. This interpreter, so the ranks import the code under test.
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '29517', str(tmp_path/'train.py'), str(tmp_path)]
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path/f'rank{i}.json').read_text()) for i in range(2)]
    assert [o['rank'] for o in ranks] == [0, 1] and all(o['world'] == 2 and o['backend'] == 'gloo' for o in ranks)
    assert [len(o['batch_sums']) for o in ranks] == [2, 2]      # 8 crops, bs 2, split over 2 ranks
    assert ranks[0]['batch_sums'] != ranks[1]['batch_sums']     # different data on each rank
    assert ranks[0]['valid_loss'] == pytest.approx(ranks[1]['valid_loss'])   # gathered validation
    assert (tmp_path/'models'/'tiny.pth').exists()


def test_plot_history_marks_the_kept_epoch(tmp_path):
    import pandas as pd, matplotlib.pyplot as plt
    pd.DataFrame(dict(epoch=[0, 1, 2], train_loss=[1., .8, .7], valid_loss=[.9, .85, .8], dsb=[.1, .3, .2])).to_csv(tmp_path/'history.csv', index=False)
    ax = plot_history(tmp_path)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['train loss', 'valid loss', 'valid DSB (crops)', 'kept: epoch 1 (0.300)']
    plt.close(ax.figure)
    with pytest.raises(FileNotFoundError, match='no training history'): plot_history(tmp_path/'elsewhere')


def test_learner_trains_channels_last_on_the_cpu(dls):
    "Without mixed precision the network still trains in the channels-last layout (faster on CPUs); `channels_last=False` keeps NCHW."
    def layouts(learn):
        learn.fit(1, 1e-3)
        ws = [p for p in learn.model.parameters() if p.ndim == 4]
        return {w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in ws if w.shape[-1] > 1}
    assert layouts(nucleus_learner(dls)) == {True}
    assert layouts(nucleus_learner(dls, channels_last=False)) == {False}


# ---------- fine-tuning on your own images ----------
class StartWeights(Callback):
    "The model's weights when fitting starts."
    def before_fit(self): self.state = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}


def test_fine_tune_a_model_file_on_an_annotated_folder(fake, tiny_run, tmp_path):
    """`train_nucleus(data=folder, init=model)` starts from the model file's weights, keeps its network and input mode
    (not the ones asked for), splits the folder's own images, and records the folder and the starting model; the
    starting model's scores are not carried over, and its thresholds are unless the run tunes its own."""
    from synthetic import annotated_folder
    _, src_run = tiny_run
    import shutil
    init = shutil.copy(src_run/'model.safetensors', tmp_path/'start.safetensors')
    sd0, cfg0 = read_model(init)
    post = dict(method='auto', fg_thresh=0.7, interior_thresh=0.6, min_size=25, fill_holes=True)
    update_model(init, scores=dict(valid_dsb=0.5), postprocess=post)   # a scored and tuned starting model
    folder = annotated_folder(fake.train, tmp_path/'own')
    start = StartWeights()
    learn = train_nucleus(tmp_path/'run', data=folder, init=init, input_mode='grey', arch='resnet18', epochs=1, bs=3, crop=64,
                          tune=False, cbs=start)
    assert same_weights(start.state, sd0)   # fine-tuned from the file, not from scratch
    sd, cfg = read_model(tmp_path/'run'/'model.safetensors')
    assert not same_weights(sd, sd0)         # and trained
    assert cfg['input']['mode'] == 'hed' and cfg['arch'] == cfg0['arch'] and cfg['arch_params'] == cfg0['arch_params']
    r = cfg['recipe']
    assert r['data'] == str(folder.resolve()) and (r['n_train'], r['n_valid']) == (6, 3)
    assert r['init'] == dict(file='start.safetensors', date=cfg0['date'], valid_dsb=0.5)
    assert 'scores' not in cfg and set(cfg['valid_ids']) <= set(fake.train.image_id) and len(cfg['diameters']) == 2
    assert cfg['postprocess'] == post   # not tuned: the starting model's thresholds, not the defaults
    plain = read_model(src_run/'model.safetensors')[1]['recipe']
    assert plain['data'] is None and plain['init'] is None   # a run given its dls records neither


def test_fine_tune_mixing_in_dsb2018(fake, tiny_run, tmp_path, monkeypatch):
    """`mix=0.5` adds as many DSB2018 training images as the folder trains on, never the starting model's validation
    images, and the recipe records them; mixing needs a folder of one's own, and DSB2018 unless `mix_with` is given."""
    from synthetic import annotated_folder
    from nucleus_seg.io import DSBDataError
    init = tiny_run[1]/'model.safetensors'
    held = set(read_model(init)[1]['valid_ids'])
    folder = annotated_folder(fake.train.groupby('modality').head(2), tmp_path/'own')
    monkeypatch.setenv('NUCLEUS_SEG_DATA', str(fake.path))
    learn = train_nucleus(tmp_path/'run', data=folder, init=init, mix=0.5, cache=fake.cache, epochs=1, bs=3, crop=64, tune=False)
    tr = learn.dls.train_items
    assert tr.mixed.sum() == (~tr.mixed).sum() == 3 and not learn.dls.valid_items.mixed.any()
    assert set(tr.image_id[tr.mixed]) <= set(fake.train.image_id) - held
    r = read_model(tmp_path/'run'/'model.safetensors')[1]['recipe']
    assert r['mix'] == dict(share=0.5, n=3, source='DSB2018') and r['n_train'] == 6
    with pytest.raises(ValueError, match='mixing applies to training on a folder of your own'):
        train_nucleus(tmp_path/'r2', data=fake.path, cache=fake.cache, mix=0.5, epochs=1)
    with pytest.raises(ValueError, match='mix_with needs mix'): train_nucleus(tmp_path/'r2', data=folder, mix_with=folder, epochs=1)
    monkeypatch.setenv('NUCLEUS_SEG_DATA', str(tmp_path/'nowhere'))
    with pytest.raises(DSBDataError, match="mixing DSB2018's images in needs DSB2018"):
        train_nucleus(tmp_path/'r3', data=folder, init=init, mix=0.5, cache=tmp_path/'cache', epochs=1)
