"Tests of the `nucleus-seg` console script: help, clean errors, a tiny end-to-end run, a killed-and-resumed training."
import os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pandas as pd, pytest

from nucleus_seg.cli import main, COMMANDS, command_parser

DATA = Path(os.environ.get('NUCLEUS_SEG_DATA', Path(__file__).parents[1]/'..'/'shared'/'data'/'dsb2018'))
needs_data = pytest.mark.skipif(not (DATA/'stage1_train.zip').exists(), reason='DSB2018 data not found (set NUCLEUS_SEG_DATA)')
EXE = shutil.which('nucleus-seg')
ENV = {**os.environ, 'NUCLEUS_SEG_DATA': str(DATA), 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
TINY = ['--n-items', '8', '--crop', '64', '--bs', '4', '--arch', 'resnet18', '--scratch']


def run(*args, timeout=300):
    "Run `nucleus-seg ARGS` (the console script, else `python -c main()`) and return the completed process"
    cmd = [EXE] if EXE else [sys.executable, '-c', 'import sys; from nucleus_seg.cli import main; sys.exit(main())']
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=ENV, timeout=timeout)


def one_line_error(p, code):
    assert p.returncode == code, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert 'Traceback' not in p.stderr and len(lines) == 1 and lines[0].startswith('nucleus-seg: error: '), p.stderr
    return lines[0]


# ---------- help ----------
def test_help_lists_subcommands():
    p = run('--help')
    assert p.returncode == 0
    for c in ('prepare', 'train', 'predict', 'evaluate', 'submit', 'app'): assert f'\n  {c} ' in p.stdout
    assert run().returncode == 2


@pytest.mark.parametrize('cmd', ['prepare', 'train', 'predict', 'evaluate', 'submit'])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e: main([cmd, '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f'usage: nucleus-seg {cmd}')
    if cmd == 'train':
        for o in ('--n-items', '--crop', '--epochs', '--arch', '--resume', '--tensorboard', '--scratch'): assert o in out


def test_app_is_registered():
    assert COMMANDS['app'] == 'nucleus_seg.app:app'
    assert '--port' in command_parser('app').format_help()


# ---------- clean errors ----------
@pytest.mark.parametrize('args,code,msg', [
    (['frobnicate'], 2, "unknown command 'frobnicate'"),
    (['train', '--epochs', 'many'], 2, "invalid int value: 'many'"),
    (['train', '--no-such-option'], 2, 'unrecognized arguments'),
    (['predict'], 2, 'the following arguments are required'),
    (['train', '--epochs', '0'], 1, '--epochs must be positive'),
    (['train', '--arch', 'vgg_nonsense', '--epochs', '1'], 1, "unknown --arch 'vgg_nonsense'"),
    (['predict', 'missing-model.pkl', '.'], 1, 'model file not found: missing-model.pkl'),
    (['prepare', '--data', '/nonexistent/dsb'], 1, '/nonexistent/dsb'),
])
def test_bad_arguments_give_one_line(args, code, msg, capsys):
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('nucleus-seg: error: ') and msg in err[0], err


def test_console_script_error_is_one_line():
    line = one_line_error(run('evaluate', 'nothing.pkl', '.'), 1)
    assert 'model file not found' in line


# ---------- end to end ----------
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A tiny model trained through the console script: `(tmp folder, model path)`."
    tmp = tmp_path_factory.mktemp('cli')
    p = run('prepare')
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'train: 664 images' in p.stdout and 'test: 65 images' in p.stdout
    p = run('train', '--out', tmp/'run', '--epochs', '1', *TINY)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp/'run'/'model.pkl').exists() and (tmp/'run'/'valid.csv').exists()
    return tmp, tmp/'run'/'model.pkl'


@needs_data
def test_predict_evaluate_submit(trained):
    tmp, model = trained
    from nucleus_seg.data import prepare_dsb, read_label
    test_df = prepare_dsb(DATA, 'test')
    imgs = tmp/'imgs'; imgs.mkdir(exist_ok=True)
    small = test_df[test_df.height == 256].iloc[:2]
    for f in small.image: shutil.copy(f, imgs/f.name)
    (imgs/'broken.png').write_bytes(b'not a png')
    one_line_error(run('predict', model, imgs, '--out', tmp/'bad', '--tta', 'False'), 1)
    (imgs/'broken.png').unlink()
    p = run('predict', model, imgs, '--out', tmp/'pred', '--tta', 'False')
    assert p.returncode == 0, p.stderr[-2000:]
    for iid in small.image_id:
        lbl = read_label(tmp/'pred'/'labels'/f'{iid}.png')
        assert lbl.shape == (256, 256)
        assert (tmp/'pred'/'overlays'/f'{iid}.png').exists()
    assert set(pd.read_csv(tmp/'pred'/'submission.csv').ImageId) == set(small.image_id)

    train_df = prepare_dsb(DATA, 'train')
    train_df[train_df.height == 256].iloc[:2].to_csv(tmp/'small.csv', index=False)
    p = run('evaluate', model, tmp/'small.csv', '--out', tmp/'scores.csv', '--tta', 'False')
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'DSB score:' in p.stdout and 'fluorescence' in p.stdout
    scores = pd.read_csv(tmp/'scores.csv')
    assert len(scores) == 2 and {'image_id', 'modality', 'dsb', 'n_true', 'n_pred'} <= set(scores.columns)

    p = run('submit', model, '--out', tmp/'submission.csv', '--n-items', '2', '--tta', 'False')
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'valid' in p.stdout
    assert pd.read_csv(tmp/'submission.csv').ImageId.nunique() == 2
    from nucleus_seg.rle import validate_submission
    assert validate_submission(tmp/'submission.csv', test_df.iloc[:2])['n_images'] == 2   # the validator, not just the CLI's word


@needs_data
def test_killed_training_resumes(trained):
    "SIGKILL a 3-epoch run once its first checkpoint is written; `--resume` continues from it."
    tmp, _ = trained
    out = tmp/'killed'
    args = ['train', '--out', out, '--epochs', '3', *TINY]
    cmd = [EXE] if EXE else [sys.executable, '-c', 'import sys; from nucleus_seg.cli import main; sys.exit(main())']
    proc = subprocess.Popen(cmd + [str(a) for a in args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, t0 = out/'models'/'last.pth', time.time()
    while not ckpt.exists() and proc.poll() is None and time.time()-t0 < 240: time.sleep(0.2)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert ckpt.exists(), 'no checkpoint before the kill'
    import torch
    done = torch.load(ckpt, weights_only=False)['epoch']
    if done == 2: pytest.skip('the run finished before it could be killed')
    p = run(*args, '--resume')
    assert p.returncode == 0, p.stderr[-2000:]
    assert f'Resuming from {ckpt} at epoch {done+1} of 3' in p.stdout
    assert torch.load(ckpt, weights_only=False)['epoch'] == 2
    assert (out/'model.pkl').exists()
