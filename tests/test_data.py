"""Tests of `nucleus_seg.data` (01_data): merging masks, the cache (built once, invalidated, safe under concurrency and
bad input), download over loopback, targets, splits, the resident loader's crops, and the DataLoaders.

Most tests build small DSB2018-layout zips from synthetic masks (known by construction) and need no download; the
ones marked by the `dsb_data`/`train_df` fixtures check the real DSB2018 (skipped without it, failing under CI)."""
import io, os, threading, warnings, zipfile, functools
from collections import Counter
from pathlib import Path

import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from skimage.measure import label as cc_label

import nucleus_seg.data as D
from nucleus_seg.data import *
from nucleus_seg.io import read_image, read_label, save_image, save_label, MODALITIES, DSBDataError
from synthetic import fake_image, random_label, disks, png

torch.set_num_threads(1)


# ---------- synthetic zips ----------
def entries(n=3, seed=0, shape=(40, 56)) -> dict:
    "Zip entries (name -> bytes) of `n` synthetic training images in DSB2018's layout, 3 to 5 masks each."
    rng, out = np.random.default_rng(seed), {}
    for i in range(n):
        iid = f'id{i:02d}'
        lbl = random_label(shape, 3 + i % 3, rng)
        out[f'{iid}/images/{iid}.png'] = png(np.dstack([fake_image(lbl, MODALITIES[i % 3], seed=i), np.full(shape, 255, np.uint8)]))
        for k in range(1, int(lbl.max())+1): out[f'{iid}/masks/m{k}.png'] = png(((lbl == k)*255).astype(np.uint8))
    return out


def make_zip(fn, ents:dict, edit=None, prefix='') -> Path:
    "Write `ents` to zip `fn`; `edit(name, bytes)` may change an entry or drop it (None)."
    fn = Path(fn); fn.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(fn, 'w') as z:
        for n, b in ents.items():
            if edit is not None: b = edit(n, b)
            if b is not None: z.writestr(prefix+n, b)
    return fn


def cache_state(d:Path) -> dict:
    "Relative path -> bytes of every file under `d`."
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}


@pytest.fixture
def small(tmp_path):
    "A data folder holding a 3-image synthetic training zip, and a fresh cache folder."
    make_zip(tmp_path/'data'/'stage1_train.zip', entries())
    return tmp_path/'data', tmp_path/'cache'


def first(ents, kind):
    "The first entry of `kind` ('images' or 'masks') of image id00."
    return next(n for n in ents if n.startswith(f'id00/{kind}/'))


# ---------- merging ----------
def test_merged_labels_and_overlaps_from_zip(tmp_path):
    "Masks that overlap: the first keeps the shared pixels; the index counts nuclei and overlapping pixels."
    a, b, c = (np.zeros((20, 30), np.uint8) for _ in range(3))
    a[2:8, 2:8] = 255; b[5:12, 5:12] = 255; c[15:18, 20:28] = 255   # a and b share 3x3 = 9 pixels
    img = fake_image(((a | b | c) > 0).astype(np.uint16))
    ents = {'x/images/x.png': png(img), 'x/masks/a.png': png(a), 'x/masks/b.png': png(b), 'x/masks/c.png': png(c)}
    make_zip(tmp_path/'d'/'stage1_train.zip', ents)
    with pytest.warns(DSBOverlapWarning, match=r'1 overlapping mask.*b.png overlaps a.png \(9 px\)'):
        df = prepare_dsb(tmp_path/'d', cache=tmp_path/'c', progress=False)
    r = df.iloc[0]
    assert (r.image_id, r.height, r.width, r.n_nuclei, r.overlap_px) == ('x', 20, 30, 3, 9)
    lbl = read_label(r.label)
    want = np.zeros((20, 30), np.uint16); want[c > 0] = 3; want[b > 0] = 2; want[a > 0] = 1
    np.testing.assert_array_equal(lbl, want)
    np.testing.assert_array_equal(read_image(r.image), img)


def test_merge_masks_overlap_and_errors():
    a = np.zeros((5, 5), np.uint8); a[1:3, 1:3] = 255
    b = np.zeros((5, 5), np.uint8); b[2:4, 2:4] = 255
    with pytest.warns(DSBOverlapWarning, match=r'img1: 1 overlapping .*b.png overlaps a.png \(1 px\)'):
        lbl = merge_masks([a, b], ['a.png', 'b.png'], 'img1')
    assert lbl.dtype == np.uint16 and lbl[2, 2] == 1 and (lbl == 2).sum() == 3
    with pytest.warns(DSBOverlapWarning) as rec:
        lbl = merge_masks([a, a, b], ['a.png', 'c.png', 'b.png'], 'img2')
    assert 'c.png overlaps a.png (4 px)' in str(rec[0].message) and 'empty after merging, dropped: c.png' in str(rec[1].message)
    assert sorted(np.unique(lbl)) == [0, 1, 2]
    with pytest.raises(DSBDataError, match='img3: mask b.png is 4x5, image is 5x5'): merge_masks([a, b[:4]], ['a.png', 'b.png'], 'img3')
    with pytest.raises(DSBDataError, match='no masks'): merge_masks([], image_id='img4')
    c = np.zeros((5, 5), np.uint8); c[4, :] = 255
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # disjoint masks: no warning
        assert merge_masks([a, c], shape=(5, 5)).max() == 2


def test_instance_target_separates_touching():
    lbl = np.zeros((10, 14), np.uint16); lbl[2:8, 2:7] = 1; lbl[2:8, 7:12] = 2   # two touching nuclei
    t = instance_target(lbl)
    assert t.dtype == np.uint8 and set(np.unique(t)) == {0, 1, 2}
    assert cc_label(t == 1, connectivity=1).max() == 2   # interiors apart
    assert (t[2:8, 6:8] == 2).all()                      # both sides of the contact are boundary
    np.testing.assert_array_equal(t > 0, lbl > 0)        # the boundary lies inside the nuclei
    np.testing.assert_array_equal(instance_target(lbl, 'binary'), (lbl > 0).astype(np.uint8))
    with pytest.raises(ValueError, match='kind'): instance_target(lbl, 'classes4')


# ---------- cache ----------
def test_cache_built_once_and_invalidated(small, monkeypatch):
    data, cache = small
    df = prepare_dsb(data, cache=cache, progress=False)
    assert len(df) == 3 and (cache/'train'/'index.csv').exists() and list(df.modality) == list(MODALITIES)
    assert not [p for p in cache.iterdir() if p.name.startswith('.') and p.is_dir()]   # no temporary folders left
    calls = Counter()
    monkeypatch.setattr(D, 'read_mask', lambda *a, **k: calls.update(['mask']))
    monkeypatch.setattr(zipfile.ZipFile, 'read', lambda *a, **k: calls.update(['zip']))
    df2 = prepare_dsb(data, cache=cache, progress=False)
    assert not calls and df2.equals(df)   # a current cache reads nothing from the zip
    monkeypatch.undo()
    make_zip(data/'stage1_train.zip', dict(list(entries().items())[:-1]))   # changed source: one mask fewer
    df3 = prepare_dsb(data, cache=cache, progress=False)
    assert df3.n_nuclei.sum() == df.n_nuclei.sum() - 1
    assert prepare_dsb(data, cache=cache, force=True, progress=False).equals(df3)


def test_concurrent_callers_build_once(small, monkeypatch):
    "Parallel callers on a cold cache wait for one build (as notebooks tested in parallel do)."
    data, cache = small
    n, build = Counter(), D._build
    monkeypatch.setattr(D, '_build', lambda *a, **k: n.update(['build']) or build(*a, **k))
    res = [None]*3
    def run(i): res[i] = prepare_dsb(data, cache=cache, progress=False)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert n['build'] == 1 and all(r is not None and len(r) == 3 for r in res)


def test_folder_source_matches_zip(small, tmp_path):
    data, cache = small
    zdf = prepare_dsb(data, cache=cache, progress=False)
    folder = tmp_path/'extracted'
    with zipfile.ZipFile(data/'stage1_train.zip') as z: z.extractall(folder/'stage1_train')
    fdf = prepare_dsb(folder, cache=tmp_path/'c2', progress=False)
    assert list(fdf.image_id) == list(zdf.image_id)
    for a, b in zip(zdf.label, fdf.label): np.testing.assert_array_equal(read_label(a), read_label(b))
    next((folder/'stage1_train'/'id00'/'masks').iterdir()).unlink()   # the listing's fingerprint changes
    assert prepare_dsb(folder, cache=tmp_path/'c2', progress=False).n_nuclei[0] == fdf.n_nuclei[0] - 1


def test_zip_file_path_prefix_and_junk(tmp_path):
    "A zip passed directly, with its entries under a top folder and macOS junk beside them, is read too."
    ents = {**entries(2), '__MACOSX/id00/._id00.png': b'junk', 'id00/images/.DS_Store': b'junk'}
    fn = make_zip(tmp_path/'my.zip', ents, prefix='stage1_train/')
    df = prepare_dsb(fn, cache=tmp_path/'c', progress=False)
    assert list(df.image_id) == ['id00', 'id01'] and df.n_nuclei.tolist() == [3, 4]


def test_test_split_and_load_item(fake):
    assert len(fake.test) == 3 and fake.test.label.isna().all() and fake.test.n_nuclei.isna().all()
    img, lbl = load_dsb_item('train01', path=fake.path, cache=fake.cache)
    assert lbl is None or (lbl == fake.truth['train01'][1]).all()
    assert img.shape == (96, 128, 3) and (load_dsb_item('test00', 'test', fake.path, fake.cache)[1] is None)
    with pytest.raises(DSBDataError, match='nope: no such image'): load_dsb_item('nope', path=fake.path, cache=fake.cache)


def test_fake_labels_round_trip(fake):
    "The cache of the synthetic zip holds exactly the label images the masks were drawn from."
    for r in fake.train.itertuples():
        mod, lbl = fake.truth[r.image_id]
        np.testing.assert_array_equal(read_label(r.label), lbl)
        assert r.modality == mod and r.n_nuclei == lbl.max() and r.overlap_px == 0


# ---------- bad input ----------
def _break(data:Path, how:str):
    "Replace the training source in `data` by bad input `how`; return what the error must name."
    fn, ents = data/'stage1_train.zip', entries()
    img, mask = first(ents, 'images'), first(ents, 'masks')
    if how == 'missing_folder':
        fn.unlink(); return data
    if how in ('empty_dataset', 'not_a_zip', 'zip_without_layout'):
        fn.unlink()
        if how == 'not_a_zip': fn.write_bytes(b'hello')
        else:
            with zipfile.ZipFile(fn, 'w') as z:
                if how == 'zip_without_layout': z.writestr('pictures/cat.png', png(np.zeros((4, 4), np.uint8)))
        return fn
    edit = dict(corrupt_image=lambda n, b: b[:100] if n == img else b,
                corrupt_mask=lambda n, b: b'\x89PNG\r\n\x1a\n garbage' if n == mask else b,
                mask_size=lambda n, b: png(np.asarray(Image.open(io.BytesIO(b)))[:-3]) if n == mask else b,
                no_masks=lambda n, b: None if n.startswith('id00/masks/') else b,
                no_image=lambda n, b: None if n == img else b,
                second_image=lambda n, b: b)[how]
    extra = {'id00/images/other.png': ents[img]} if how == 'second_image' else {}
    make_zip(fn, {**ents, **extra}, edit=edit)
    return {'corrupt_image': img, 'no_masks': img, 'no_image': mask, 'corrupt_mask': mask, 'mask_size': Path(mask).name,
            'second_image': 'id00/images/other.png'}[how]


@pytest.mark.parametrize('how', ['missing_folder', 'empty_dataset', 'not_a_zip', 'zip_without_layout', 'corrupt_image',
                                 'corrupt_mask', 'mask_size', 'no_masks', 'no_image', 'second_image'])
def test_bad_input_names_the_file_and_keeps_cache(small, how):
    "Every bad input raises a DSBDataError naming the file, and leaves the previous cache exactly as it was."
    data, cache = small
    df = prepare_dsb(data, cache=cache, progress=False)
    before = cache_state(cache)
    named = _break(data, how)
    for force in (False, True):
        with pytest.raises(DSBDataError) as e: prepare_dsb(data, cache=cache, force=force, progress=False)
        assert str(named) in str(e.value), (how, str(e.value))
        assert cache_state(cache) == before, how
    assert all(p.exists() for p in df.image) and all(p.exists() for p in df.label)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DSBDataError, match=f"{tmp_path/'nope'}: data folder does not exist"): prepare_dsb(tmp_path/'nope', cache=tmp_path/'c')
    (tmp_path/'empty').mkdir()
    with pytest.raises(DSBDataError, match='no stage1_train.zip'): prepare_dsb(tmp_path/'empty', cache=tmp_path/'c')
    make_zip(tmp_path/'only_test'/'stage1_test.zip', entries(1))
    with pytest.raises(DSBDataError, match='no stage1_train.zip or stage1_train/ found'): prepare_dsb(tmp_path/'only_test', cache=tmp_path/'c')


# ---------- locating and downloading ----------
@pytest.fixture
def server(tmp_path, serve_folder, monkeypatch):
    "An HTTP server on 127.0.0.1 serving a small synthetic DSB2018 copy."
    monkeypatch.setenv('no_proxy', '127.0.0.1')
    root = tmp_path/'served'
    make_zip(root/'stage1_train.zip', entries())
    make_zip(root/'stage1_test.zip', entries(2), edit=lambda n, b: None if '/masks/' in n else b)
    (root/'stage1_solution.csv').write_text('ImageId,EncodedPixels,Height,Width,Usage\n')
    (root/'bad.zip').write_text('an error page, not a zip')
    base, stop = serve_folder(root)
    yield base
    stop()


def test_download(server, tmp_path):
    dest = dsb_path(tmp_path/'dl', download=True, base_url=server)
    assert sorted(p.name for p in dest.iterdir()) == ['stage1_solution.csv', 'stage1_test.zip', 'stage1_train.zip']
    assert len(prepare_dsb(dest, cache=tmp_path/'c', progress=False)) == 3
    assert len(prepare_dsb(dest, split='test', cache=tmp_path/'c', progress=False)) == 2


def test_download_into_default_folder(server, tmp_path, monkeypatch):
    "With no path and no NUCLEUS_SEG_DATA, the default folder under home is filled by download."
    monkeypatch.setenv('HOME', str(tmp_path/'home'))
    monkeypatch.delenv('NUCLEUS_SEG_DATA', raising=False)
    p = dsb_path(base_url=server)
    assert p == tmp_path/'home'/'.nucleus_seg'/'data' and (p/'stage1_train.zip').exists()
    assert dsb_path(base_url='http://127.0.0.1:9/') == p   # second call: local, no download
    monkeypatch.setenv('NUCLEUS_SEG_DATA', str(tmp_path/'elsewhere'))
    with pytest.raises(DSBDataError, match='elsewhere: data folder does not exist'): dsb_path()   # named: no download


def test_download_errors(server, tmp_path):
    with pytest.raises(DSBDataError, match='missing.zip: download failed'):
        download_dsb(tmp_path/'dl', base_url=server, files=['missing.zip'], show_progress=False)
    assert not list((tmp_path/'dl').iterdir())   # no partial file left
    with pytest.raises(DSBDataError, match='bad.zip: downloaded file is not a zip'):
        download_dsb(tmp_path/'dl2', base_url=server, files=['bad.zip'], show_progress=False)
    assert not list((tmp_path/'dl2').iterdir())


# ---------- splits and subsets ----------
def test_modality_splitter():
    items = pd.DataFrame(dict(modality=['a']*50 + ['b']*10 + ['c']*2 + ['d']))
    tr, va = ModalitySplitter(0.2, seed=1)(items)
    assert sorted(tr + va) == list(range(63)) and not set(tr) & set(va)
    assert Counter(items.modality[va]) == {'a': 10, 'b': 2, 'c': 1}   # 20% of each, at least one, never all; 'd' alone stays in training
    assert ModalitySplitter(0.2, seed=1)(items) == (tr, va) and ModalitySplitter(0.2, seed=2)(items) != (tr, va)
    assert ModalitySplitter(0.0)(items)[1] == []


def test_modality_subset_takes_modalities_in_turn():
    df = pd.DataFrame(dict(image_id=[f'i{k}' for k in range(13)], modality=['a']*10 + ['b']*2 + ['c']))
    sub = modality_subset(df, 6)
    assert Counter(sub.modality) == {'a': 3, 'b': 2, 'c': 1}   # rounds: a b c, a b, a
    assert list(sub.image_id) == sorted(sub.image_id, key=lambda s: int(s[1:]))   # in the index's order
    assert modality_subset(df, 6).equals(sub) and len(modality_subset(df, 3).modality.unique()) == 3


# ---------- decoding and the resident loader ----------
def test_decode_row(tmp_path):
    lbl = disks((30, 40), [(10, 10), (10, 19)], [5, 5])
    img = fake_image(lbl, 'histology')
    save_image(img, tmp_path/'i.png'); save_label(lbl, tmp_path/'l.png')
    row = dict(image=tmp_path/'i.png', label=tmp_path/'l.png')
    x, t = decode_row(row)
    assert x.shape == (1, 30, 40) and x.dtype == np.uint8 and (t == instance_target(lbl)).all()
    from nucleus_seg.io import normalise_image
    np.testing.assert_array_equal(decode_row(row, 'hed')[0][0], normalise_image(img, 'hed')[..., 0])
    assert decode_row(row, 'rgb')[0].shape == (3, 30, 40)
    col = decode_row(row, 'colour')[0]   # the colour view keeps three distinct channels of a colour image, nuclei bright
    assert col.shape == (3, 30, 40) and (col[0] != col[1]).any()
    assert col.astype(float).mean(0)[lbl > 0].mean() > col.astype(float).mean(0)[lbl == 0].mean()
    save_image(fake_image(lbl, 'fluorescence'), tmp_path/'f.png')   # a grey image: three copies of its 'grey' view
    frow = dict(row, image=tmp_path/'f.png')
    np.testing.assert_array_equal(decode_row(frow, 'colour')[0], decode_row(frow)[0].repeat(3, 0))
    assert (decode_row(row, target='binary')[1] == (lbl > 0)).all()
    for missing in (None, float('nan'), ''):
        assert (decode_row(dict(image=tmp_path/'i.png', label=missing))[1] == 0).all()


def _coded(h, w):
    "Image whose pixel value encodes its position (y*16+x+1, h,w <= 15) and a target of y%3."
    y, x = np.mgrid[:h, :w]
    return (y*16+x+1).astype(np.uint8)[None], (y % 3).astype(np.uint8)


def _dihedrals(a):
    "The 8 dihedral transforms of a square 2-D array."
    return [np.flip(np.flip(t, 0) if fy else t, 1) if fx else (np.flip(t, 0) if fy else t)
            for t in (a, a.T) for fy in (0, 1) for fx in (0, 1)]


def test_random_crops_are_dihedral_windows():
    "Every random crop is one of the 8 flips/rotations of a window of the (zero-padded) image, target alike; all 8 occur."
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
    assert len(seen) == 8


def test_crops_never_wait_for_the_device():
    "Padded or not, random or centred: no call in `crops` would make the host wait for a GPU (see `host_syncs`)."
    from nucleus_seg.learner import host_syncs
    data = [_coded(12, 15), _coded(5, 7)]
    rd, g = ResidentData([i for i, _ in data], [t for _, t in data]), torch.Generator().manual_seed(0)
    with host_syncs() as hs:
        for idxs in ([0], [0, 1], torch.arange(2)): rd.crops(idxs, 8, gen=g); rd.crops(idxs, 8, random=False)
    assert hs.n == 0, hs.calls


def test_centre_crop_and_loader():
    data = [_coded(12, 15), _coded(6, 6)]
    rd = ResidentData([i for i, _ in data], [t for _, t in data], split_idx=1)
    x, y = rd.crops([0, 1], 8, random=False)
    assert (x[0, 0].numpy() == data[0][0][0, 2:10, 3:11]).all() and (y[0].numpy() == data[0][1][2:10, 3:11]).all()
    assert (x[1, 0].numpy()[1:7, 1:7] == data[1][0][0]).all() and x[1, 0, 0].sum() == 0   # small image centred, zero-padded
    dl = ResidentDL(rd, bs=2, crop=8, device='cpu')
    assert not dl.random and not dl.shuffle
    xb, yb = dl.one_batch()
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.shape == (2, 3, 8, 8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    want = ((x.float()/255 - mean[None, :, None, None])/std[None, :, None, None])
    assert torch.allclose(xb, want, atol=1e-5)   # /255, then ImageNet statistics
    assert all(torch.equal(a, b) for a, b in zip(dl.one_batch(), (xb, yb)))   # validation: the same every time
    tr = ResidentDL(ResidentData([i for i, _ in data], [t for _, t in data]), bs=2, crop=8, n=6, device='cpu')
    assert tr.random and tr.shuffle and len(tr) == 3 and sum(len(b[0]) for b in tr) == 6


def test_batch_tfms():
    from fastai.vision.augment import Dihedral, Zoom, Saturation, Hue
    from fastai.data.transforms import Normalize
    t = dsb_batch_tfms('grey', zoom=(0.5, 1.5))
    assert isinstance(t[0], Dihedral) and isinstance(t[-1], Normalize) and any(isinstance(o, Zoom) for o in t)
    assert not any(isinstance(o, (Saturation, Hue)) for o in t) and all(any(isinstance(o, Hue) for o in dsb_batch_tfms(m)) for m in ('rgb', 'colour'))
    assert not any(isinstance(o, (Dihedral, Zoom)) for o in dsb_batch_tfms(dihedral=False))


def _zoomed_sides(zoom) -> set:
    "Sides of a 16 px square after `dsb_batch_tfms(zoom=zoom)`'s rescaling, over a batch of 32 (some left unscaled)."
    from fastai.vision.augment import Zoom
    from fastai.torch_core import TensorImage
    z = next(o for o in dsb_batch_tfms(zoom=zoom, dihedral=False) if isinstance(o, Zoom))
    z.pad_mode = 'zeros'
    x = torch.zeros(32, 3, 64, 64); x[..., 24:40, 24:40] = 1
    torch.manual_seed(0)
    y = z(TensorImage(x), split_idx=0)
    return {int(round(float((o[0] > 0.5).sum().sqrt()))) for o in y}


def test_fastai_zoom_scales_content_by_its_factor():
    "The ground truth of the next test: fastai's `Zoom(f)` makes a 16 px square 16*f px."
    from fastai.vision.augment import Zoom
    from fastai.torch_core import TensorImage
    x = torch.zeros(1, 3, 64, 64); x[..., 24:40, 24:40] = 1
    for f in (0.5, 2.):
        y = Zoom(f, f, p=1., draw_x=0.5, draw_y=0.5, pad_mode='zeros')(TensorImage(x), split_idx=0)   # centred
        assert float((y[0, 0] > 0.5).sum().sqrt()) == pytest.approx(16*f, abs=0.1)


def test_zoom_scales_nuclei_as_documented():
    "`zoom=(a, b)` shows nuclei from a to b times their size (01_data: 'from half to one and a half times their size')."
    assert _zoomed_sides((0.5, 0.5)) == {16, 8}    # unscaled (p=0.75) or halved
    assert max(_zoomed_sides((2., 2.))) == 32     # doubled (squares near the border are cut)
    assert min(_zoomed_sides((0.5, 1.5))) >= 8 and max(_zoomed_sides((0.5, 1.5))) <= 24


@pytest.mark.parametrize('resident', [True, False])
def test_dataloaders(fake, resident):
    dls = dsb_dataloaders(fake.path, cache=fake.cache, bs=4, crop=64, n_items=9, input_mode='hed', resident=resident, device='cpu')
    x, y = dls.one_batch()
    assert x.shape == (4, 3, 64, 64) and y.shape == (4, 64, 64) and int(y.max()) <= 2
    assert dls.input_mode == 'hed'
    assert set(dls.valid_items.modality) == set(dls.train_items.modality) == set(MODALITIES)
    assert not set(dls.train_items.image_id) & set(dls.valid_items.image_id)
    assert len(dls.valid_items) == 3 and {'image_id', 'modality', 'label'} <= set(dls.valid_items.columns)
    vx, vy = dls.valid.one_batch()
    assert vx.shape[-2:] == (64, 64) and (dls.valid.one_batch()[1] == vy).all()
    assert dl_throughput(dls.train, n_batches=1, repeats=1) > 0


def test_resident_and_datablock_agree(fake):
    "The two paths split alike and give the same validation batches (centre crops, same preparation, same normalisation)."
    kw = dict(cache=fake.cache, bs=3, crop=64, n_items=9, input_mode='hed', device='cpu')
    res, blk = dsb_dataloaders(fake.path, **kw), dsb_dataloaders(fake.path, resident=False, **kw)
    assert list(res.train_items.image_id) == list(blk.train_items.image_id)
    assert list(res.valid_items.image_id) == list(blk.valid_items.image_id)
    assert list(res.vocab) == TARGET_CODES['classes3']
    (xr, yr), (xb, yb) = res.valid.one_batch(), blk.valid.one_batch()
    assert torch.allclose(xr, xb, atol=1e-4) and torch.equal(yr.long(), yb.long())


def test_crop_larger_than_image_pads(fake):
    dls = dsb_dataloaders(fake.path, cache=fake.cache, bs=2, crop=160, n_items=6, device='cpu')
    x, y = dls.valid.one_batch()
    assert x.shape[-2:] == (160, 160) and y.shape[-2:] == (160, 160)
    assert (y[:, :16] == 0).all() and (y[:, -16:] == 0).all()   # 96 rows centred in 160: 32 rows of padding each side


def test_show_target():
    import matplotlib; matplotlib.use('Agg')
    lbl = disks((30, 30), [(15, 15)], [8])
    axs = show_target(fake_image(lbl), instance_target(lbl))
    assert [a.get_title() for a in axs] == ['image', 'target', 'outlines']


# ---------- the real DSB2018 ----------
def test_real_merged_labels_equal_union_of_masks(train_df, dsb_data):
    """For every real training image the cached label image is its masks, one instance per mask file (the first mask
    keeps shared pixels), and the cached modality follows from the raw pixels. Counts from independent sources:
    664 images and 28,986 masks (the data's README, and this loop over the zip); the modalities from the raw RGB:
    histology = the 107 images with any pixel whose channels differ (the rest are exactly grey), brightfield = the 16
    grey images with a median above mid-grey (medians 226+, every fluorescence one is 44 or less)."""
    with zipfile.ZipFile(dsb_data/'stage1_train.zip') as z:
        names = z.namelist()
        lay = {}
        for n in names:
            iid, kind, _ = n.split('/')
            lay.setdefault(iid, [None, []])
            if kind == 'images': lay[iid][0] = n
            else: lay[iid][1].append(n)
        assert len(train_df) == len(lay) == 664
        n_overlap_images, mods = 0, {}
        for r in train_df.itertuples():
            img_entry, mask_entries = lay[r.image_id][0], sorted(lay[r.image_id][1])
            lbl = read_label(r.label)
            assert lbl.dtype == np.uint16 and lbl.shape == (r.height, r.width)
            ref, overlap = np.zeros(lbl.shape, np.uint16), 0
            for i, n in enumerate(mask_entries, 1):
                m = np.asarray(Image.open(io.BytesIO(z.read(n)))) > 0
                overlap += int((m & (ref > 0)).sum())
                ref[m & (ref == 0)] = i
            n_overlap_images += overlap > 0
            assert r.overlap_px == overlap
            np.testing.assert_array_equal(lbl, ref, err_msg=r.image_id)
            assert len(mask_entries) == r.n_nuclei == lbl.max()
            rgb = np.asarray(Image.open(io.BytesIO(z.read(img_entry))))[..., :3]
            colour = bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())
            mods[r.image_id] = 'histology' if colour else 'brightfield' if np.median(rgb[..., 0]) > 128 else 'fluorescence'
    assert train_df.n_nuclei.sum() == 28986
    assert dict(zip(train_df.image_id, train_df.modality)) == mods
    assert Counter(mods.values()) == {'fluorescence': 541, 'brightfield': 16, 'histology': 107}
    # no independent source: counted by the loop above from the raw masks (not by merge_masks). The README says the
    # masks do not overlap; in these few images two masks share a few pixels.
    assert n_overlap_images == 6


def test_real_second_load_reads_no_mask(train_df, dsb_data, monkeypatch):
    "With a current cache, prepare_dsb opens no PNG and reads nothing from the zip."
    calls = Counter()
    def counting(name, f):
        @functools.wraps(f)
        def g(*a, **k): calls[name] += 1; return f(*a, **k)
        return g
    monkeypatch.setattr(Image, 'open', counting('open', Image.open))
    monkeypatch.setattr(D, 'read_mask', counting('read_mask', D.read_mask))
    monkeypatch.setattr(zipfile.ZipFile, 'read', counting('zipread', zipfile.ZipFile.read))
    assert len(prepare_dsb(dsb_data, progress=False)) == 664 and not calls, calls


def test_real_test_split(dsb_data):
    df = prepare_dsb(dsb_data, split='test', progress=False)
    assert len(df) == 65 and df.label.isna().all() and all(p.exists() for p in df.image)   # 65: the data's README


def test_real_split_is_stratified(train_df):
    tr, va = ModalitySplitter(0.2, seed=1)(train_df)
    assert len(set(tr) | set(va)) == 664 and not set(tr) & set(va)
    vc, allc = train_df.iloc[va].modality.value_counts(), train_df.modality.value_counts()
    assert ((vc/allc[vc.index] - 0.2).abs() < 0.05).all() and set(vc.index) == set(MODALITIES)


def test_real_dataloaders(train_df, dsb_data):
    dls = dsb_dataloaders(dsb_data, bs=4, crop=128, n_items=12, device='cpu')
    x, y = dls.one_batch()
    assert x.shape == (4, 3, 128, 128) and y.shape == (4, 128, 128) and int(y.max()) <= 2
    assert set(dls.valid_items.modality) == set(dls.train_items.modality) == set(MODALITIES)


# ---------- your own labelled images ----------
def test_labelled_dataloaders_on_an_annotated_folder(fake, tmp_path):
    """A folder of the synthetic images and labels (images/ + labels/): the modalities are guessed and the split is
    stratified by them, the targets are the labels' classes, and the rows keep the files for evaluation."""
    from nucleus_seg.io import labelled_pairs
    from synthetic import annotated_folder
    root = annotated_folder(fake.train, tmp_path/'own')
    items = labelled_pairs(root)
    assert 'modality' not in items
    dls = labelled_dataloaders(items, bs=3, crop=64, device='cpu')
    assert dls.input_mode == 'grey' and len(dls.valid_items) == 3 and len(dls.train_items) == 6
    assert sorted(dls.valid_items.modality) == sorted(MODALITIES)   # guessed: one per modality to validation
    assert dict(zip(dls.train_items.image_id, dls.train_items.modality)) == {i: fake.truth[i][0] for i in dls.train_items.image_id}
    x, y = dls.valid.one_batch()
    assert x.shape == (3, 3, 64, 64)
    for k, r in enumerate(dls.valid_items.itertuples()):   # centre crops of the label images' classes
        t = instance_target(fake.truth[r.image_id][1])
        y0, x0 = (t.shape[0]-64)//2, (t.shape[1]-64)//2
        assert np.array_equal(y[k].numpy(), t[y0:y0+64, x0:x0+64])


def test_labelled_dataloaders_mix_other_images_into_training_only(fake, tmp_path):
    """`mix_with` rows join the training split alone, as many as make `mix` of it (all of them at most), flagged
    `mixed`; the folder's own split is the one without mixing, and the `DataBlock` path gets the same split."""
    from nucleus_seg.io import labelled_pairs
    from synthetic import annotated_folder
    own = labelled_pairs(annotated_folder(fake.train.groupby('modality').head(2), tmp_path/'own'))   # two of each modality
    others = fake.train[~fake.train.image_id.isin(own.image_id)]
    plain = labelled_dataloaders(own, bs=2, crop=64, device='cpu')
    dls = labelled_dataloaders(own, bs=2, crop=64, device='cpu', mix_with=others, mix=0.5)
    tr = dls.train_items
    assert list(dls.valid_items.image_id) == list(plain.valid_items.image_id) and not dls.valid_items.mixed.any()
    assert list(tr.image_id[~tr.mixed]) == list(plain.train_items.image_id)
    assert tr.mixed.sum() == len(plain.train_items) == 3 and set(tr.image_id[tr.mixed]) <= set(others.image_id)
    assert len(dls.train.dataset) == 6 and dls.train.one_batch()[0].shape == (2, 3, 64, 64)
    block = labelled_dataloaders(own, bs=2, crop=64, device='cpu', mix_with=others, mix=0.5, resident=False)
    assert list(block.train_items.image_id) == list(tr.image_id) and list(block.valid_items.image_id) == list(dls.valid_items.image_id)
    assert [len(mixed_rows(others, 3, s)) for s in (0, 0.25, 0.5, 0.9)] == [0, 1, 3, len(others)]
    with pytest.raises(ValueError, match='at least 0 and below 1'): labelled_dataloaders(own, mix_with=others, mix=1)
    with pytest.raises(ValueError, match='needs labelled rows to mix in'): labelled_dataloaders(own, mix=0.5)


def test_labelled_dataloaders_refuse_bad_folders(fake, tmp_path):
    from nucleus_seg.io import labelled_pairs
    from synthetic import annotated_folder
    root = annotated_folder(fake.train.iloc[:3], tmp_path/'own')
    with pytest.raises(DSBDataError, match='training needs at least two'): labelled_dataloaders(labelled_pairs(root).iloc[:1])
    two = labelled_dataloaders(fake.train.groupby('modality').head(1).iloc[:2], bs=1, crop=64, device='cpu')
    assert len(two.train_items) == len(two.valid_items) == 1   # one image of each of two modalities: one validates
    first = labelled_pairs(root).label[0]
    save_label(np.zeros((5, 7), np.uint16), first)
    with pytest.raises(DSBDataError, match=rf'{first.name}: label image is 5×7, its image 96×128'):
        labelled_dataloaders(labelled_pairs(root), bs=2, crop=64, device='cpu')
