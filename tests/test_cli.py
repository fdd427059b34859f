"""Tests of the `nucleus-seg` console script (09_cli): help, one-line errors and exit statuses (0, 1, 2, 3, 130), the
`--debug` traceback, every subcommand end to end on synthetic data (TTA on, `--tile`, `--solution`, `--force`,
`--tensorboard`, tuning, killed and interrupted training), and on the real DSB2018 when it is there.

Most commands run in this process through `main(argv)` (what the console script calls); the ones that are about the
process itself (exit statuses, signals, tracebacks) run the console script."""
import os, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np, pandas as pd, pytest

from nucleus_seg.cli import main, COMMANDS, command_parser
from nucleus_seg.io import read_image, read_label, save_image
from nucleus_seg.rle import write_submission, validate_submission

EXE = shutil.which('nucleus-seg')
TINY = ['--n-items', '8', '--crop', '64', '--bs', '4']


def run(*args, env=None, timeout=300):
    "Run `nucleus-seg ARGS` (the console script, else `python -c main()`) and return the completed process."
    cmd = [EXE] if EXE else [sys.executable, '-c', 'import sys; from nucleus_seg.cli import main; sys.exit(main())']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg', **(env or {})}
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)


def popen(*args, env=None):
    cmd = [EXE] if EXE else [sys.executable, '-c', 'import sys; from nucleus_seg.cli import main; sys.exit(main())']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}
    # Ctrl+C's default for the command even when the tests run in the background (`cmd &` ignores SIGINT, and children inherit that)
    return subprocess.Popen(cmd + [str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def one_line_error(err:str) -> str:
    "The single `nucleus-seg: error: ...` line that `err` must be (no traceback)."
    lines = err.strip().splitlines()
    assert 'Traceback' not in err and len(lines) >= 1 and lines[-1].startswith('nucleus-seg: error: '), err[-2000:]
    assert sum(l.startswith('nucleus-seg: error') for l in lines) == 1, err[-2000:]   # (progress lines may precede it)
    return lines[-1]


def wait_for(fn, proc, timeout=240):
    "Wait until file `fn` exists (or `proc` ends)."
    t0 = time.time()
    while not fn.exists() and proc.poll() is None and time.time()-t0 < timeout: time.sleep(0.05)
    return fn.exists()


@pytest.fixture
def fake_env(fake, monkeypatch):
    "Point this process (and the console scripts started with `env=fake_env`) at the synthetic data."
    env = dict(NUCLEUS_SEG_DATA=str(fake.path), NUCLEUS_SEG_CACHE=str(fake.cache))
    for k, v in env.items(): monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope='module')
def sample_images(fake, tmp_path_factory):
    "A folder holding copies of the synthetic test images."
    d = tmp_path_factory.mktemp('cli_images')
    for f in fake.test.image: shutil.copy(f, d/f.name)
    return d


# ---------- help ----------
def test_help_lists_subcommands():
    p = run('--help')
    assert p.returncode == 0
    for c in ('prepare', 'train', 'tune', 'predict', 'evaluate', 'submit', 'app'): assert f'\n  {c} ' in p.stdout
    assert 'Exit status: 0 done, 1 error, 2 bad arguments, 3 done but some files skipped, 130 interrupted' in p.stdout
    assert run().returncode == 2


@pytest.mark.parametrize('cmd', ['prepare', 'train', 'tune', 'predict', 'evaluate', 'submit'])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e: main([cmd, '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f'usage: nucleus-seg {cmd}')
    need = dict(train=['--n-items', '--crop', '--epochs', '--arch', '--resume', '--tensorboard', '--scratch', '--tune', '--input-mode'],
                predict=['--model', '--tta', '--tile', '--planes', '--cpu', '--input-mode'], evaluate=['--solution', '--model', '--tta', '--tile', '--input-mode'],
                submit=['--model', '--tta', '--input-mode'], prepare=['--force', '--download'])
    for o in need.get(cmd, []): assert o in out, o


def test_app_is_registered():
    assert COMMANDS['app'] == 'nucleus_seg.app:app'
    assert '--port' in command_parser('app').format_help()


def test_app_without_voila_says_what_to_install(monkeypatch, capsys):
    "A core install has no Voila: `nucleus-seg app` names the extra in one line instead of Voila's traceback."
    monkeypatch.setitem(sys.modules, 'voila', None)   # what `importlib.util.find_spec` reports for a missing module
    assert main(['app', '--port', '0']) == 1
    err = one_line_error(capsys.readouterr().err)
    assert "pip install 'nucleus-seg[app]'" in err and '--api' in err, err


@pytest.mark.parametrize('args,msg', [(['--api', '--input-mode', 'colour'], "only a grey model takes another grey view"),
                                      (['--scale', 'huge'], "scale must be 'auto' or a number")])
def test_app_refuses_a_bad_setting_before_serving(args, msg, capsys):
    "`nucleus-seg app --scale/--input-mode` check the setting as an upload's is, and say why in one line before anything serves."
    assert main(['app', '--port', '0', *args]) == 1
    err = one_line_error(capsys.readouterr().err)
    assert msg in err, err


# ---------- one-line errors ----------
@pytest.mark.parametrize('args,code,msg', [
    (['frobnicate'], 2, "unknown command 'frobnicate'"),
    (['train', '--epochs', 'many'], 2, "invalid int value: 'many'"),
    (['train', '--no-such-option'], 2, 'unrecognized arguments'),
    (['predict'], 2, 'the following arguments are required'),
    (['train', '--epochs', '0'], 1, '--epochs must be positive, got 0'),
    (['train', '--lr', '-1'], 1, '--lr must be positive'),
    (['train', '--arch', 'vgg_nonsense'], 1, "unknown --arch 'vgg_nonsense'"),
    (['train', '--input-mode', 'cmyk'], 1, "unknown --input-mode 'cmyk'"),
    (['train', '--zoom', '2'], 1, '--zoom takes two numbers'),
    (['train', '--pad-in', '2'], 1, "--pad-in is the channels to pad the input's 3 to, more than 3"),
    (['train', '--zoom', '1.5,0.5'], 1, '--zoom needs 0 < smallest <= largest'),
    (['train', '--init', 'default', '--arch', 'resnet34'], 1, "--arch resnet34 differs from default.safetensors's compact: fine-tuning keeps the model's own"),
    (['train', '--init', 'default', '--input-mode', 'rgb'], 1, "--input-mode rgb differs from default.safetensors's grey"),
    (['train', '--init', 'missing.safetensors'], 1, 'model file not found: missing.safetensors'),
    # the positive-number checks of the other commands, before anything is loaded
    (['predict', '.', '--tile', '0'], 1, '--tile must be positive, got 0'),
    (['evaluate', '.', '--tile', '-5'], 1, '--tile must be positive, got -5'),
    (['evaluate', '.', '--n-items', '0'], 1, '--n-items must be positive'),
    (['submit', '--n-items', '0'], 1, '--n-items must be positive'),
    (['tune', 'model.safetensors', '--n-workers', '0'], 1, '--n-workers must be positive'),
    (['predict', '.', '--planes', 'time'], 1, "unknown --planes 'time'"),
    (['predict', '.', '--scale', 'big'], 1, "--scale must be 'auto', 'folder' or a number from 1/8 to 8, not 'big'"),
    (['evaluate', '.', '--scale', '0'], 1, "--scale must be 'auto', 'folder' or a number from 1/8 to 8, not '0'"),
    (['submit', '--scale', 'everything'], 1, "--scale must be 'auto', 'folder' or a number from 1/8 to 8, not 'everything'"),
    (['predict', '.', '--model', 'missing.safetensors'], 1, 'model file not found: missing.safetensors'),
    (['prepare', '--data', '/nonexistent/dsb'], 1, '/nonexistent/dsb: data folder does not exist'),
])
def test_bad_arguments_give_one_line(args, code, msg, capsys):
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('nucleus-seg: error: ') and msg in err[0], err


def test_pickle_model_refused(tmp_path, capsys):
    import pickle
    class Payload:
        def __reduce__(self): return (Path.touch, (tmp_path/'pwned',))
    (tmp_path/'model.pkl').write_bytes(pickle.dumps(Payload()))
    assert main(['predict', str(tmp_path), '--model', str(tmp_path/'model.pkl')]) == 1
    assert 'refused' in one_line_error(capsys.readouterr().err) and not (tmp_path/'pwned').exists()


def test_console_script_error_is_one_line():
    p = run('evaluate', '.', '--model', 'nothing.safetensors')
    assert p.returncode == 1
    assert 'model file not found' in one_line_error(p.stderr)


def test_debug_shows_the_traceback(monkeypatch, capsys):
    "`--debug` (or NUCLEUS_SEG_DEBUG) re-raises instead of the one-line error; bad arguments still give status 2."
    with pytest.raises(FileNotFoundError, match='model file not found'):
        main(['predict', '.', '--model', 'missing.safetensors', '--debug'])
    assert main(['train', '--epochs', 'many', '--debug']) == 2
    monkeypatch.setenv('NUCLEUS_SEG_DEBUG', '1')
    with pytest.raises(FileNotFoundError): main(['predict', '.', '--model', 'missing.safetensors'])
    monkeypatch.delenv('NUCLEUS_SEG_DEBUG')
    p = run('predict', '.', '--model', 'missing.safetensors', '--debug')
    assert p.returncode == 1 and 'Traceback' in p.stderr and 'FileNotFoundError: model file not found' in p.stderr


def test_ctrl_c_returns_130(fake, tmp_path, monkeypatch, capsys):
    import nucleus_seg.data
    def interrupted(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(nucleus_seg.data, 'prepare_dsb', interrupted)
    assert main(['prepare', '--data', str(fake.path), '--cache', str(tmp_path)]) == 130
    assert one_line_error(capsys.readouterr().err) == 'nucleus-seg: error: interrupted'


def test_sigint_during_training_exits_130(fake, fake_env, tmp_path):
    "A real Ctrl+C (SIGINT) in the middle of training: status 130, one line, the last checkpoint intact."
    out = tmp_path/'run'
    proc = popen('train', '--out', out, '--epochs', '60', *TINY, '--tune', 'False', env=fake_env)
    try:
        assert wait_for(out/'models'/'last.pth', proc), 'no checkpoint before the interrupt'
        if proc.poll() is not None: pytest.fail('training ended before it could be interrupted')
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert one_line_error(err) == 'nucleus-seg: error: interrupted'
    assert not (out/'model.safetensors').exists()
    import torch
    assert torch.load(out/'models'/'last.pth', weights_only=False)['n_epoch'] == 60



def test_killed_training_resumes(fake, fake_env, tmp_path):
    "SIGKILL a run once its first checkpoint is written; `--resume` continues from the epoch after it."
    out = tmp_path/'run'
    args = ['train', '--out', out, '--epochs', '30', *TINY, '--tune', 'False']
    proc = popen(*args, env=fake_env)
    try:
        assert wait_for(out/'models'/'last.pth', proc), 'no checkpoint before the kill'
        proc.send_signal(signal.SIGKILL); proc.wait()
    finally:
        if proc.poll() is None: proc.kill()
    import torch
    done = torch.load(out/'models'/'last.pth', weights_only=False)['epoch']   # a complete file, whenever the kill came
    if done == 29: pytest.skip('the run finished before it could be killed')
    p = run(*args, '--resume', env=fake_env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"Resuming from {out/'models'/'last.pth'} at epoch {done+1} of 30" in p.stdout
    assert torch.load(out/'models'/'last.pth', weights_only=False)['epoch'] == 29
    assert (out/'model.safetensors').exists()


# ---------- end to end, synthetic data ----------
def test_prepare_and_force(fake, tmp_path, capsys):
    data = tmp_path/'data'; shutil.copytree(fake.path, data)
    cache = tmp_path/'cache'
    n = sum(int(l.max()) for iid, (_, l) in fake.truth.items() if iid.startswith('train'))
    assert main(['prepare', '--data', str(data), '--cache', str(cache)]) == 0
    assert capsys.readouterr().out.splitlines() == [f'train: 9 images, {n} nuclei', 'test: 3 images']
    marker = cache/'train'/'marker'; marker.write_text('x')
    index = (cache/'train'/'index.csv').read_text()
    assert main(['prepare', '--data', str(data), '--cache', str(cache)]) == 0
    assert marker.exists()                                   # current cache: kept as it is
    assert main(['prepare', '--data', str(data), '--cache', str(cache), '--force']) == 0
    assert not marker.exists() and (cache/'train'/'index.csv').read_text() == index   # rebuilt, same result
    assert len(list((cache/'train'/'labels').iterdir())) == 9


@pytest.fixture(scope='module')
def cli_model(fake, tmp_path_factory):
    """`nucleus-seg train` on the synthetic data ('hed' inputs, default --tune True, with --tensorboard): `(run folder,
    stdout, stderr)`."""
    out = tmp_path_factory.mktemp('cli_train')/'run'
    env = dict(NUCLEUS_SEG_DATA=str(fake.path), NUCLEUS_SEG_CACHE=str(fake.cache))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import contextlib, io
        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            code = main(['train', '--out', str(out), '--epochs', '8', '--lr', '0.01', *TINY, '--input-mode', 'hed', '--tensorboard'])
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    assert code == 0, e.getvalue()[-2000:]
    return out, o.getvalue(), e.getvalue()


def test_train_writes_tuned_model_and_tensorboard(cli_model):
    out, stdout, stderr = cli_model
    from nucleus_seg.learner import read_model
    cfg = read_model(out/'model.safetensors')[1]
    assert cfg['recipe']['epochs'] == 8 and cfg['input']['mode'] == 'hed' and cfg['tta'] is True
    s = cfg['scores']
    assert f"validation DSB {s['valid_dsb']:.4f}" in stdout and f"{s['default_thresholds_dsb']:.4f}" in stdout
    assert s['test_mix'] == pytest.approx({m: 1/3 for m in ('fluorescence', 'histology', 'brightfield')})
    assert set(cfg['valid_ids']) == set(pd.read_csv(out/'valid.csv').image_id)
    import importlib.util
    if importlib.util.find_spec('tensorboard') is None:
        assert 'nucleus-seg: TensorBoard logging skipped' in stderr   # said in one line, training went on
    else: assert list((out/'tb').rglob('events.out.tfevents.*'))


def test_tune_and_evaluate_default_to_the_models_validation_images(cli_model, fake, fake_env, capsys):
    out, _, _ = cli_model
    model = str(out/'model.safetensors')
    assert main(['tune', model, '--n-workers', '1', '--cpu']) == 0
    stdout = capsys.readouterr().out
    from nucleus_seg.learner import read_model
    s = read_model(model)[1]['scores']
    assert f"validation DSB {s['before_tuning_dsb']:.4f} -> {s['valid_dsb']:.4f} on {s['n_valid']} images" in stdout
    assert main(['evaluate', '--model', model, '--cpu']) == 0   # TTA on: the model's setting
    stdout = capsys.readouterr().out
    from nucleus_seg.inference import load_segmenter, evaluate_model
    valid = fake.train[fake.train.image_id.isin(read_model(model)[1]['valid_ids'])]
    score, _ = evaluate_model(load_segmenter(model, device='cpu'), valid, show_progress=False)
    assert f'DSB score: {score:.4f}' in stdout and score == pytest.approx(s['valid_dsb'], abs=1e-4)


def test_predict_with_tta_and_tiles(cli_model, sample_images, tmp_path, capsys):
    "Labels written by `predict` are the in-process segmenter's, with TTA (the model's default) and with `--tile`."
    model = str(cli_model[0]/'model.safetensors')
    from nucleus_seg.inference import load_segmenter
    imgs = sorted(sample_images.iterdir())
    # 96x128 images: --tile 96 splits them in two overlapping tiles (the overlap is fixed at 64)
    for args, kw in [([], dict(tta=True)), (['--tile', '96'], dict(tta=True, tile=96)), (['--tta', 'False'], dict(tta=False)),
                     (['--scale', '1.5'], dict(tta=True, scale=1.5)), (['--scale', 'auto'], dict(tta=True, scale='auto'))]:
        dest = tmp_path/'-'.join(['pred', *args])
        assert main(['predict', str(sample_images), '--model', model, '--out', str(dest), '--cpu', *args]) == 0
        seg = load_segmenter(model, device='cpu', **kw)
        assert seg.tta == kw['tta'] and (seg.tile == 96) == ('tile' in kw) and seg.scale == kw.get('scale', 1.0)
        factors = []
        for f in imgs:
            np.testing.assert_array_equal(read_label(dest/'labels'/f.name), seg.segment(f), err_msg=str(args))
            factors.append(seg.last_scale)
        if kw.get('scale') == 'auto': auto_factors = factors
        assert validate_submission(dest/'submission.csv', {f.stem: read_image(f).shape[:2] for f in imgs})['n_images'] == len(imgs)
        assert sorted(p.name for p in dest.iterdir()) == ['labels', 'nuclei', 'overlays', 'submission.csv']
    err = capsys.readouterr().err
    assert 'using the model model.safetensors' in err and 'on cpu' in err
    assert err.count("scale 'auto' resized") == 1 and f"resized {sum(f != 1 for f in auto_factors)} of {len(imgs)} image(s)" in err


def test_predict_several_files_and_folders(sample_images, tmp_path, capsys):
    """`predict a.png b.png folder` (what a shell makes of `*.png`) segments them all into one OUT; a path that does not
    exist or two images of the same name are refused before the model is loaded."""
    imgs = sorted(sample_images.iterdir())
    other = tmp_path/'other'; other.mkdir(); shutil.copy(imgs[0], other/'copy.png')
    args = [str(imgs[0]), str(imgs[1]), str(imgs[0]), str(other)]   # the same file twice is segmented once
    assert main(['predict', *args, '--out', str(tmp_path/'out'), '--cpu', '--overlays', 'False']) == 0
    assert sorted(p.name for p in (tmp_path/'out'/'labels').iterdir()) == sorted([imgs[0].name, imgs[1].name, 'copy.png'])
    assert '3 images' in capsys.readouterr().out
    np.testing.assert_array_equal(read_label(tmp_path/'out'/'labels'/'copy.png'), read_label(tmp_path/'out'/'labels'/imgs[0].name))
    shutil.copy(imgs[0], other/imgs[0].name)
    for bad, msg in [([str(imgs[0]), str(tmp_path/'gone.png')], 'no such file or folder'), ([str(sample_images), str(other)], f"two images are named '{imgs[0].stem}'")]:
        assert main(['predict', *bad, '--out', str(tmp_path/'bad'), '--cpu']) == 1
        err = capsys.readouterr().err
        assert msg in err and 'using the bundled model' not in err and not (tmp_path/'bad').exists()


def test_predict_bundled_model_and_skipped_files(sample_images, tmp_path, capsys):
    src = tmp_path/'src'; shutil.copytree(sample_images, src)
    (src/'broken.png').write_bytes(b'not a png')
    assert main(['predict', str(src), '--out', str(tmp_path/'out'), '--cpu', '--overlays', 'False']) == 3
    err = capsys.readouterr().err
    assert 'using the bundled model default.safetensors' in err
    assert 'broken.png' in err and '1 file(s) skipped, listed in' in err
    assert pd.read_csv(tmp_path/'out'/'failures.csv').image_id.tolist() == ['broken']
    assert not (tmp_path/'out'/'overlays').exists() and len(list((tmp_path/'out'/'labels').iterdir())) == len(list(sample_images.iterdir()))


def test_predict_input_mode_red_reaches_the_network(tmp_path, capsys):
    "`--input-mode red` shows the bundled (grey) model the red channel: pink (eosin) disks vanish, purple ones stay; a colour view is refused."
    from synthetic import disks
    lbl = disks((160, 160), [(20+40*(k//4), 20+40*(k%4)) for k in range(16)], [7]*16)
    img = np.full((160, 160, 3), (235, 225, 235), np.uint8)
    img[(lbl > 0) & (lbl % 2 == 0)] = (235, 70, 190)   # eosin: dark in green only
    img[lbl % 2 == 1] = (80, 50, 140)                   # hematoxylin: dark in every channel
    save_image(img, tmp_path/'he.png')
    found = {}
    for mode in ('grey', 'red'):
        assert main(['predict', str(tmp_path/'he.png'), '--out', str(tmp_path/mode), '--cpu', '--input-mode', mode]) == 0
        found[mode] = read_label(tmp_path/mode/'labels'/'he.png')
    hit = lambda pred: {int(k) for k in np.unique(lbl[pred > 0]) if k}   # the true disks a prediction covers
    assert hit(found['grey']) == set(range(1, 17)) and hit(found['red']) == set(range(1, 17, 2))
    capsys.readouterr()
    assert main(['predict', str(tmp_path/'he.png'), '--out', str(tmp_path/'c'), '--cpu', '--input-mode', 'colour']) == 1
    assert 'only a grey model takes another grey view' in capsys.readouterr().err and not (tmp_path/'c').exists()


def test_evaluate_with_solution_matches_labels(cli_model, fake, tmp_path, capsys):
    "`evaluate IMAGES --solution CSV` scores what `evaluate INDEX.csv` (labels beside) scores, image by image."
    model = str(cli_model[0]/'model.safetensors')
    rows = fake.train.iloc[:4]
    rows.to_csv(tmp_path/'labelled.csv', index=False)
    sol = write_submission({r.image_id: read_label(r.label) for r in rows.itertuples()}, tmp_path/'solution.csv')
    pd.read_csv(sol).merge(rows[['image_id', 'height', 'width']].set_axis(['ImageId', 'Height', 'Width'], axis=1)).to_csv(sol, index=False)
    imgs = tmp_path/'imgs'; imgs.mkdir()
    for f in rows.image: shutil.copy(f, imgs/f.name)
    assert main(['evaluate', str(tmp_path/'labelled.csv'), '--model', model, '--out', str(tmp_path/'a.csv'), '--cpu']) == 0
    a = capsys.readouterr().out
    assert main(['evaluate', str(imgs), '--solution', str(sol), '--model', model, '--out', str(tmp_path/'b.csv'), '--cpu']) == 0
    b = capsys.readouterr().out
    score = [l for l in a.splitlines() if l.startswith('DSB score:')]
    assert score and score == [l for l in b.splitlines() if l.startswith('DSB score:')]
    ta, tb = pd.read_csv(tmp_path/'a.csv'), pd.read_csv(tmp_path/'b.csv')
    assert list(ta.image_id) == list(tb.image_id) == list(rows.image_id)
    np.testing.assert_allclose(ta.dsb, tb.dsb)
    assert (ta.n_true == tb.n_true).all() and (ta.n_true == [int(fake.truth[i][1].max()) for i in rows.image_id]).all()
    assert main(['evaluate', str(imgs), '--model', model, '--cpu']) == 1   # no labels and no solution
    assert 'no label file or Kaggle masks' in one_line_error(capsys.readouterr().err)


def test_submit(cli_model, fake, fake_env, tmp_path, capsys):
    model = str(cli_model[0]/'model.safetensors')
    assert main(['submit', '--model', model, '--out', str(tmp_path/'sub.csv'), '--n-items', '2', '--cpu']) == 0
    assert f"{tmp_path/'sub.csv'}: 2 images" in capsys.readouterr().out
    assert validate_submission(tmp_path/'sub.csv', fake.test.iloc[:2])['n_images'] == 2   # the validator, not just the CLI's word
    assert main(['submit', '--model', model, '--out', str(tmp_path/'c.csv'), '--n-items', '2', '--cpu', '--input-mode', 'colour']) == 1
    assert 'only a grey model takes another grey view' in capsys.readouterr().err and not (tmp_path/'c.csv').exists()


# ---------- end to end, real data ----------
def test_real_data_end_to_end(dsb_data, tmp_path, capsys, monkeypatch):
    """On DSB2018: prepare (counts from the data's README: 664 training images with 28,986 nuclei, 65 test images),
    train a tiny compact U-Net, predict real images with TTA, evaluate and submit."""
    monkeypatch.setenv('NUCLEUS_SEG_DATA', str(dsb_data))
    assert main(['prepare']) == 0
    assert capsys.readouterr().out.splitlines() == ['train: 664 images, 28986 nuclei', 'test: 65 images']
    run_dir = tmp_path/'run'
    assert main(['train', '--out', str(run_dir), '--epochs', '1', *TINY, '--tune', 'False']) == 0
    model = str(run_dir/'model.safetensors')
    from nucleus_seg.data import prepare_dsb
    from nucleus_seg.inference import load_segmenter
    test_df, train_df = prepare_dsb(dsb_data, 'test', progress=False), prepare_dsb(dsb_data, 'train', progress=False)
    imgs = tmp_path/'imgs'; imgs.mkdir()
    small = test_df[test_df.height == 256].iloc[:2]
    for f in small.image: shutil.copy(f, imgs/f.name)
    assert main(['predict', str(imgs), '--model', model, '--out', str(tmp_path/'pred'), '--cpu']) == 0
    seg = load_segmenter(model, device='cpu')
    assert seg.tta
    for r in small.itertuples(): np.testing.assert_array_equal(read_label(tmp_path/'pred'/'labels'/f'{r.image_id}.png'), seg.segment(r.image))
    train_df[train_df.height == 256].iloc[:2].to_csv(tmp_path/'small.csv', index=False)
    assert main(['evaluate', str(tmp_path/'small.csv'), '--model', model, '--out', str(tmp_path/'scores.csv'), '--cpu']) == 0
    out = capsys.readouterr().out
    assert 'DSB score:' in out and 'fluorescence' in out
    assert len(pd.read_csv(tmp_path/'scores.csv')) == 2
    assert main(['submit', '--model', model, '--out', str(tmp_path/'submission.csv'), '--n-items', '2', '--cpu']) == 0
    assert validate_submission(tmp_path/'submission.csv', test_df.iloc[:2])['n_images'] == 2


def test_info_describes_a_model_file(cli_model, tmp_path, capsys):
    "`info` names the network, the recipe, the scores and the sizes 'auto' aims for; --json is the file's configuration."
    import json
    from nucleus_seg.learner import read_model
    model = str(cli_model[0]/'model.safetensors')
    cfg = read_model(model)[1]
    assert main(['info', model]) == 0
    out = capsys.readouterr().out
    lo, hi = cfg['diameters']
    assert out.startswith('model.safetensors: ') and 'compact U-Net (xresnet18, widen 0.25)' in out
    assert f"{cfg['recipe']['epochs']} epochs at lr {cfg['recipe']['lr']}" in out and f'{lo:g}-{hi:g} px (its training images)' in out
    assert f"DSB {cfg['scores']['valid_dsb']:.3f} on {cfg['scores']['n_valid']} images" in out
    assert main(['info', model, '--json']) == 0 and json.loads(capsys.readouterr().out) == cfg
    assert main(['info']) == 0 and "the file records none" in capsys.readouterr().out   # the bundled model
    from nucleus_seg.learner import load_model, save_model
    net, pcfg = load_model(model, pad_in=8)
    padded = save_model(net, tmp_path/'padded.safetensors', pcfg)
    assert main(['info', str(padded)]) == 0 and f"{cfg['input']['mode']} input padded to 8 channels in the network" in capsys.readouterr().out
    (tmp_path/'x.pkl').write_bytes(b'\x80\x04junk')
    assert main(['info', str(tmp_path/'x.pkl')]) == 1 and 'a Python pickle' in capsys.readouterr().err


def test_predict_scale_folder_measures_one_factor_for_all(tmp_path, capsys):
    "`--scale folder`: the factor `measure_scale` gives on the folder's images, said once and used for every image."
    from nucleus_seg.inference import load_segmenter
    from synthetic import fake_image, grid_label
    src = tmp_path/'small'; src.mkdir()
    for i in range(3):   # nuclei 10 pixels across, half DSB2018's typical size
        save_image(fake_image(grid_label((120, 160), radius=5, step=20, seed=i), seed=i), src/f'img{i}.png')
    imgs = sorted(src.iterdir())
    f = load_segmenter(device='cpu').measure_scale(imgs)
    assert 1.7 < f < 2.2, f
    assert main(['predict', str(src), '--out', str(tmp_path/'out'), '--cpu', '--scale', 'folder']) == 0
    assert f"scale 'folder': {f:.2f} for every image (measured on 3 of 3)" in capsys.readouterr().err
    seg = load_segmenter(device='cpu', scale=f)
    for p in imgs: np.testing.assert_array_equal(read_label(tmp_path/'out'/'labels'/p.name), seg.segment(p))


def test_fine_tune_the_bundled_model_on_an_annotated_folder(fake, tmp_path, capsys):
    """`train --data FOLDER --init default`: says what it fine-tunes, writes a model of the bundled network that records
    the folder and the starting model (`info` shows both), and `evaluate`/`predict` take the same folder: without SRC,
    evaluate scores the run's own validation images from it; predict segments its images, not its label images."""
    from nucleus_seg.learner import read_model
    from nucleus_seg.inference import DEFAULT_MODEL, load_segmenter, evaluate_model
    from nucleus_seg.io import labelled_pairs
    from synthetic import annotated_folder
    folder, run = annotated_folder(fake.train, tmp_path/'own'), tmp_path/'run'
    assert main(['train', '--data', str(folder), '--init', 'default', '--out', str(run), '--epochs', '1', '--crop', '64', '--bs', '4']) == 0
    err = capsys.readouterr().err
    assert 'nucleus-seg: fine-tuning default.safetensors (compact U-Net, grey input)' in err
    model = str(run/'model.safetensors')
    cfg, bundled = read_model(model)[1], read_model(DEFAULT_MODEL)[1]
    assert (cfg['arch'], cfg['input']) == (bundled['arch'], bundled['input']) and cfg['recipe']['init']['file'] == 'default.safetensors'
    assert main(['info', model]) == 0
    out = capsys.readouterr().out
    assert f"in {folder.resolve()}" in out and f"started from default.safetensors (validation DSB {bundled['scores']['valid_dsb']:.3f}" in out
    assert main(['evaluate', '--model', model, '--cpu']) == 0
    out = capsys.readouterr().out
    pairs = labelled_pairs(folder)
    score, _ = evaluate_model(load_segmenter(model, device='cpu'), pairs[pairs.image_id.isin(cfg['valid_ids'])], show_progress=False)
    assert f'DSB score: {score:.4f}' in out and len(cfg['valid_ids']) == 3
    assert main(['predict', str(folder), '--model', model, '--out', str(tmp_path/'pred'), '--cpu']) == 0
    assert sorted(p.name for p in (tmp_path/'pred'/'labels').iterdir()) == sorted(f'{i}.png' for i in fake.train.image_id)
    shutil.rmtree(folder)
    assert main(['evaluate', '--model', model]) == 1 and 'which is gone: give SRC' in capsys.readouterr().err


def test_fine_tune_mixing_in_another_folder(fake, tmp_path, capsys):
    """`train --mix 0.5 --mix-with OTHER`: half the training images come from the other folder, and `info` says so;
    a share of 1 or more is refused before anything is read."""
    from synthetic import annotated_folder
    own = annotated_folder(fake.train.groupby('modality').head(2), tmp_path/'own')
    other = annotated_folder(fake.train.groupby('modality').tail(1), tmp_path/'other')
    run = tmp_path/'run'
    assert main(['train', '--data', str(own), '--init', 'default', '--mix', '0.5', '--mix-with', str(other), '--out', str(run),
                 '--epochs', '1', '--crop', '64', '--bs', '4', '--tune', 'false']) == 0
    capsys.readouterr()
    assert main(['info', str(run/'model.safetensors')]) == 0
    assert f"mixed in     3 images of {other.resolve()} (50% of the training images)" in capsys.readouterr().out
    assert main(['train', '--data', str(own), '--mix', '1', '--out', str(tmp_path/'no')]) != 0
    assert '--mix is the share of mixed-in training images' in capsys.readouterr().err and not (tmp_path/'no').exists()
    assert main(['train', '--data', str(own), '--mix-with', str(other), '--out', str(tmp_path/'no')]) != 0
    assert '--mix-with needs --mix' in capsys.readouterr().err and not (tmp_path/'no').exists()


def test_valid_items_of_a_model_trained_from_given_dataloaders(fake, tiny_run):
    """A model trained from `DataLoaders` it was given records no data source: its validation images are looked up in
    DSB2018, as before folders were a source (not an error about a missing folder)."""
    from nucleus_seg.cli import _valid_items
    from nucleus_seg.learner import read_model
    fn = tiny_run[1]/'model.safetensors'
    cfg = read_model(fn)[1]
    assert cfg['recipe']['data'] is None
    items = _valid_items(fn, fake.path, fake.cache)
    assert sorted(items.image_id) == sorted(cfg['valid_ids']) and len(items) > 0
