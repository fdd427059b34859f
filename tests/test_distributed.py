"""`nucleus_seg.distributed` on a `LocalCluster` of 2 workers: collections match the single-process path, a 6000×6000
slide segmented in 2×2 blocks matches the single-pass result across its seams, and a worker killed mid-run costs nothing.

The model runs without test-time augmentation (`tta=False`) throughout, to keep the run to a few minutes on 2 cores."""
import os, signal, threading, time
from pathlib import Path
import numpy as np, pandas as pd, pytest

pytest.importorskip('distributed', reason="Dask is not installed: pip install 'nucleus-seg[dask]'")
pytest.importorskip('zarr', reason="zarr is not installed: pip install 'nucleus-seg[dask]'")

import tifffile, torch
from nucleus_seg.distributed import dask_client, segment_collection, segment_slide, seam_matches
from nucleus_seg.inference import load_segmenter, Segmenter, segment_folder
from nucleus_seg.io import read_image, read_label, input_stats

_data = os.environ.get('NUCLEUS_SEG_DATA')
if os.environ.get('CI') != 'true' and not (_data and Path(_data).exists()):
    pytest.skip('DSB2018 data not found: set NUCLEUS_SEG_DATA', allow_module_level=True)

torch.set_num_threads(1) # as in the workers (Dask gives each one thread), so the in-process reference computes alike

@pytest.fixture(scope='module')
def client():
    c = dask_client('local', n_workers=2, threads_per_worker=1)
    yield c
    c.close()

@pytest.fixture(scope='module')
def train_df():
    from nucleus_seg.data import prepare_dsb
    return prepare_dsb(split='train')

@pytest.fixture(scope='module')
def collection(train_df, tmp_path_factory):
    "20 DSB2018 images of four sizes and two modalities, and their labels from the single-process `segment_folder`"
    sizes = [((256,256), 'fluorescence', 8), ((256,320), 'histology', 4), ((360,360), 'fluorescence', 4), ((520,696), 'fluorescence', 4)]
    picks = [train_df[(train_df.height==h) & (train_df.width==w) & (train_df.modality==m)].iloc[:n] for (h,w),m,n in sizes]
    src = tmp_path_factory.mktemp('collection')/'src'; src.mkdir()
    ids = []
    for df in picks:
        for r in df.itertuples(): (src/f'{r.image_id}.png').write_bytes(Path(r.image).read_bytes()); ids.append(r.image_id)
    assert len(ids) == 20
    ref = src.parent/'ref'
    segment_folder(load_segmenter(tta=False), src, ref, submission=ref/'submission.csv', show_progress=False)
    return src,ids,{i: read_label(ref/'labels'/f'{i}.png') for i in ids},ref

def _labels(dest, ids): return {i: read_label(Path(dest)/'labels'/f'{i}.png') for i in ids}

def test_collection_matches_single_process(client, collection, tmp_path):
    src,ids,ref,ref_dir = collection
    (src/'broken.png').write_bytes(b'not a png')
    said = []
    try: df = segment_collection(src, tmp_path/'out', client, submission=tmp_path/'out'/'submission.csv', tta=False,
                                 report=lambda i,m: said.append(m), show_progress=False)
    finally: (src/'broken.png').unlink()
    assert df.status.value_counts().to_dict() == {'ok': 20, 'failed': 1}
    assert [m for m in said if 'broken.png' in m and m.startswith('skipped')], said
    assert 'broken.png' in (tmp_path/'out'/'failures.csv').read_text()
    got = _labels(tmp_path/'out', ids)
    for i in ids: np.testing.assert_array_equal(got[i], ref[i], err_msg=i)
    assert (tmp_path/'out'/'submission.csv').read_text() == (ref_dir/'submission.csv').read_text()
    assert df[df.status=='ok'].worker.nunique() == 2 # both workers took part
    # a rerun skips every file already done, and still lists them and the failure
    again = segment_collection(src, tmp_path/'out', client, tta=False, report=lambda i,m: None, show_progress=False)
    assert again[again.status=='ok'].resumed.all() and len(again) == 20 # broken.png is gone from the folder now
    assert not (tmp_path/'out'/'failures.csv').exists()
    assert again.set_index('image_id').n_nuclei.to_dict() == df[df.status=='ok'].set_index('image_id').n_nuclei.to_dict()

def _mosaic(train_df, side=6000):
    "A `side`×`side` slide tiled from real 256×256 fluorescence images; seams at 3000 fall inside tiles, through nuclei"
    df = train_df[(train_df.modality=='fluorescence') & (train_df.height==256) & (train_df.width==256)]
    k = -(-side//256)
    tiles = [read_image(f) for f in df.image.iloc[np.arange(k*k) % len(df)]]
    return np.concatenate([np.concatenate(tiles[r*k:(r+1)*k], 1) for r in range(k)], 0)[:side, :side]

def test_slide_matches_single_pass(client, train_df, tmp_path):
    slide = _mosaic(train_df)
    tifffile.imwrite(tmp_path/'slide.tif', slide, tile=(512,512), compression='zlib')
    z = segment_slide(tmp_path/'slide.tif', tmp_path/'labels.zarr', client, block=3000, margin=128, tta=False, show_progress=False)
    assert z.shape == (6000,6000) and z.chunks == (3000,3000) and len(z.attrs['blocks']) == 4
    assert z.attrs['stats'] == input_stats(slide, 'grey') # the survey measures what the whole image gives
    lab = z[:]
    assert lab.max() == z.attrs['n_nuclei'] and len(np.unique(lab)) == lab.max()+1 # one global labelling, 1..N
    assert not Path(f"{tmp_path/'labels.zarr'}.blocks").exists()
    # the single pass: the seams' surroundings, bands 768 pixels wide centred on the seams, each segmented in one piece
    # with the whole slide's stats (a quarter of the slide's pixels; the network's context is far narrower than 384)
    seg = load_segmenter(tta=False)
    one = Segmenter(seg.model, seg.config, tta=False, max_pixels=10**9)
    torch.set_num_threads(2)
    try: across = one.segment(slide[2616:3384], z.attrs['stats']); along = one.segment(slide[:, 2616:3384], z.attrs['stats'])
    finally: torch.set_num_threads(1)
    sm = pd.concat([seam_matches(across, lab[2616:3384], rows=[384]), seam_matches(along, lab[:, 2616:3384], cols=[384])])
    # stated bounds: no single-pass nucleus crossing a seam is cut at it; 95% of them match one blocked nucleus at
    # IoU >= 0.8, and the median IoU is at least 0.95 (what differs is the context each block's network sees, not the merge:
    # the blocks give exactly `segment_windows`' labels, as the next test shows)
    assert len(sm) > 50
    assert not sm.cut.any(), sm[sm.cut]
    assert (sm.iou >= 0.8).mean() >= 0.95 and sm.iou.median() >= 0.95, sm.sort_values('iou').head()

def test_slide_blocks_equal_windows_and_margin_matters(client, train_df, tmp_path):
    "A 3×3 grid (corners, edges, a ragged last row) gives exactly `segment_windows`' labels; without margins nuclei are cut"
    slide = _mosaic(train_df, 1400)
    seg = load_segmenter(tta=False)
    win = seg.segment_windows(slide, window=600, margin=64, stats=input_stats(slide, seg.mode))
    z = segment_slide(slide, tmp_path/'a.zarr', client, block=600, margin=64, tta=False, show_progress=False)
    np.testing.assert_array_equal(z[:], win)
    cut = segment_slide(slide, tmp_path/'b.zarr', client, block=600, margin=0, tta=False, show_progress=False)[:]
    sm = seam_matches(win, cut, rows=[600, 1200], cols=[600, 1200])
    assert sm.cut.sum() > 5 # hard cuts at the seams, which `seam_matches` catches

def test_worker_killed_mid_run(client, collection, tmp_path):
    src,ids,ref,_ = collection
    out,res = tmp_path/'out',{}
    run = threading.Thread(target=lambda: res.update(df=segment_collection(src, out, client, tta=False, batch=1, show_progress=False)))
    before = client.run(os.getpid)
    run.start()
    t0 = time.time()
    while len(list((out/'labels').glob('*.png'))) < 2 and time.time()-t0 < 120: time.sleep(0.02)
    busy = [w for w,ks in client.processing().items() if ks] or list(before)
    os.kill(before[busy[0]], signal.SIGKILL)
    n_at_kill = len(list((out/'labels').glob('*.png')))
    run.join(600)
    assert not run.is_alive()
    assert n_at_kill < 20 # the worker died while there was work left
    df = res['df']
    assert (df.status=='ok').all() and len(df) == 20
    got = _labels(out, ids)
    for i in ids: np.testing.assert_array_equal(got[i], ref[i], err_msg=i)
    client.wait_for_workers(2, timeout=120)
    assert set(client.run(os.getpid).values()) != set(before.values()) # the nanny started a new worker in its place

def test_segment_folder_and_cli_on_the_cluster(client, collection, tmp_path, capsys):
    "`segment_folder(client=...)` ships a segmenter object to the workers; `nucleus-seg predict --scheduler` loads the model file on them"
    from nucleus_seg.cli import main
    src,ids,ref,_ = collection
    df = segment_folder(load_segmenter(tta=False), src, tmp_path/'folder', client=client, show_progress=False)
    assert (df.status=='ok').all() and df.worker.nunique() == 2
    for i,lbl in _labels(tmp_path/'folder', ids).items(): np.testing.assert_array_equal(lbl, ref[i], err_msg=i)
    assert main(['predict', str(src), '--out', str(tmp_path/'cli'), '--tta', 'False', '--scheduler', client.scheduler.address]) == 0
    assert 'Dask worker(s)' in capsys.readouterr().err
    for i,lbl in _labels(tmp_path/'cli', ids).items(): np.testing.assert_array_equal(lbl, ref[i], err_msg=i)
