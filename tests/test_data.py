"Tests of `nucleus_seg.data` on the real DSB2018 zips: merging, cache, download over loopback, bad inputs."
import io, os, shutil, threading, warnings, zipfile, functools, pickle
from collections import Counter
from pathlib import Path

import numpy as np, pytest
from PIL import Image
from skimage.measure import label as cc_label

import nucleus_seg.data as D
from nucleus_seg.data import *

DATA = Path(os.environ.get('NUCLEUS_SEG_DATA', Path(__file__).parents[1]/'..'/'shared'/'data'/'dsb2018'))
TRAIN_ZIP = DATA/'stage1_train.zip'
pytestmark = pytest.mark.skipif(not TRAIN_ZIP.exists(), reason='DSB2018 data not found (set NUCLEUS_SEG_DATA)')


# ---------- helpers ----------
@functools.lru_cache
def _zip_layout():
    "`{image_id: (image entry, [mask entries])}` of the real training zip."
    with zipfile.ZipFile(TRAIN_ZIP) as z: names = z.namelist()
    out = {}
    for n in names:
        iid, kind, _ = n.split('/')
        img, ms = out.setdefault(iid, [None, []])
        if kind == 'images': out[iid][0] = n
        else: ms.append(n)
    return {k: (v[0], sorted(v[1])) for k, v in out.items()}

def _small_ids(k=3):
    "Ids of `k` real training images with few (but at least 3) masks: fast to build."
    lay = _zip_layout()
    return sorted(lay, key=lambda i: (len(lay[i][1]) < 3, len(lay[i][1]), i))[:k]

def _make_zip(fn, ids, edit=None, prefix=''):
    "Copy the entries of `ids` from the real zip into `fn`; `edit(name, bytes)` may change or drop (None) entries."
    fn = Path(fn); fn.parent.mkdir(parents=True, exist_ok=True)
    lay = _zip_layout()
    with zipfile.ZipFile(TRAIN_ZIP) as zin, zipfile.ZipFile(fn, 'w') as zout:
        for i in ids:
            img, ms = lay[i]
            for n in [img, *ms]:
                b = zin.read(n)
                if edit is not None: b = edit(n, b)
                if b is not None: zout.writestr(prefix+n, b)
    return fn

def _png(a):
    buf = io.BytesIO(); Image.fromarray(a).save(buf, 'PNG'); return buf.getvalue()

def _cache_state(d:Path):
    "Relative path -> bytes of every file under `d`."
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}


@pytest.fixture(scope='session')
def train_df():
    return prepare_dsb(DATA, progress=False)

@pytest.fixture
def small(tmp_path):
    "A data folder holding a 3-image training zip, and a fresh cache folder."
    _make_zip(tmp_path/'data'/'stage1_train.zip', _small_ids())
    return tmp_path/'data', tmp_path/'cache'


# ---------- merging: the whole training set ----------
def test_merged_labels_equal_union_of_masks(train_df):
    "For every training image the cached label image is the union of its masks, one instance per mask file."
    lay = _zip_layout()
    assert len(train_df) == len(lay) == 664
    n_overlap_images = 0
    with zipfile.ZipFile(TRAIN_ZIP) as z:
        for r in train_df.itertuples():
            lbl = read_label(r.label)
            img_entry, mask_entries = lay[r.image_id]
            assert lbl.dtype == np.uint16 and lbl.shape == (r.height, r.width)
            ref = np.zeros(lbl.shape, np.uint16)
            overlap = 0
            for i, n in enumerate(mask_entries, 1):
                m = np.asarray(Image.open(io.BytesIO(z.read(n)))) > 0
                overlap += int((m & (ref > 0)).sum())
                ref[m & (ref == 0)] = i
            n_overlap_images += overlap > 0
            assert r.overlap_px == overlap
            np.testing.assert_array_equal(lbl > 0, ref > 0, err_msg=r.image_id)   # union
            np.testing.assert_array_equal(lbl, ref, err_msg=r.image_id)           # instance by instance
            assert len(np.unique(lbl[lbl > 0])) == len(mask_entries) == r.n_nuclei == lbl.max()
    assert train_df.n_nuclei.sum() == 28986
    assert n_overlap_images == 6   # measured: six images where two masks share a few pixels


def test_modality_counts(train_df):
    assert dict(Counter(train_df.modality)) == {'fluorescence': 541, 'brightfield': 16, 'histology': 107}
    # af576e8e looks grey in a thumbnail but is pale lavender stained tissue (channels differ by ~35 levels)
    pale = train_df[train_df.image_id.str.startswith('af576e8e')]
    assert len(pale) == 1 and pale.modality.iloc[0] == 'histology'
    a = read_image(pale.image.iloc[0]).astype(np.int16)
    assert np.abs(np.diff(a, axis=-1)).mean() > 30


# ---------- cache ----------
def test_second_load_reads_no_mask(train_df, monkeypatch):
    "With a current cache, prepare_dsb opens no PNG and reads nothing from the zip."
    calls = Counter()
    def counting(name, f):
        @functools.wraps(f)
        def g(*a, **k): calls[name] += 1; return f(*a, **k)
        return g
    monkeypatch.setattr(Image, 'open', counting('open', Image.open))
    monkeypatch.setattr(D, 'read_mask', counting('read_mask', D.read_mask))
    monkeypatch.setattr(zipfile.ZipFile, 'read', counting('zipread', zipfile.ZipFile.read))
    df = prepare_dsb(DATA, progress=False)
    assert len(df) == 664 and not calls, calls


def test_cache_built_once_and_invalidated(small, monkeypatch):
    data, cache = small
    df = prepare_dsb(data, cache=cache, progress=False)
    assert len(df) == 3 and (cache/'train'/'index.csv').exists()
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name.startswith('.')]   # no temporary folders left
    n, read_mask = Counter(), D.read_mask
    monkeypatch.setattr(D, 'read_mask', lambda *a, **k: n.update(['mask']) or read_mask(*a, **k))
    prepare_dsb(data, cache=cache, progress=False)
    assert not n
    # a changed source (one image fewer) is detected and rebuilt
    _make_zip(data/'stage1_train.zip', _small_ids()[:2])
    assert len(prepare_dsb(data, cache=cache, progress=False)) == 2
    assert len(list((cache/'train'/'images').iterdir())) == 2


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
    assert n['build'] == 1 and all(len(r) == 3 for r in res)


def test_folder_source_matches_zip(small, tmp_path):
    data, cache = small
    zdf = prepare_dsb(data, cache=cache, progress=False)
    folder = tmp_path/'extracted'
    with zipfile.ZipFile(data/'stage1_train.zip') as z: z.extractall(folder/'stage1_train')
    fdf = prepare_dsb(folder, cache=tmp_path/'c2', progress=False)
    assert list(fdf.image_id) == list(zdf.image_id)
    for a, b in zip(zdf.label, fdf.label): np.testing.assert_array_equal(read_label(a), read_label(b))
    # removing a mask file changes the listing fingerprint
    iid = fdf.image_id[0]
    next((folder/'stage1_train'/iid/'masks').iterdir()).unlink()
    fdf2 = prepare_dsb(folder, cache=tmp_path/'c2', progress=False)
    assert fdf2.n_nuclei[0] == fdf.n_nuclei[0] - 1


def test_zip_file_path_and_prefix(tmp_path):
    "A zip passed directly, with its entries under a top folder, is read too."
    fn = _make_zip(tmp_path/'my.zip', _small_ids(2), prefix='stage1_train/')
    df = prepare_dsb(fn, cache=tmp_path/'c', progress=False)
    assert len(df) == 2 and df.n_nuclei.min() >= 1


def test_test_split(tmp_path):
    df = prepare_dsb(DATA, split='test', cache=tmp_path/'c', progress=False)
    assert len(df) == 65 and df.label.isna().all() and df.n_nuclei.isna().all()
    assert all(p.exists() for p in df.image)


def test_label_png_roundtrip(tmp_path):
    a = np.array([[0, 1, 255], [256, 1000, 65535]], np.uint16)
    D._save_png(a, tmp_path/'l.png')
    np.testing.assert_array_equal(read_label(tmp_path/'l.png'), a)


# ---------- download over loopback ----------
@pytest.fixture
def server(tmp_path, serve_folder):
    "An HTTP server on 127.0.0.1 serving a small DSB2018 copy."
    root = tmp_path/'served'
    _make_zip(root/'stage1_train.zip', _small_ids())
    _make_zip(root/'stage1_test.zip', _small_ids(2), edit=lambda n, b: None if '/masks/' in n else b)
    (root/'stage1_solution.csv').write_text('ImageId,EncodedPixels,Height,Width,Usage\n')
    base, stop = serve_folder(root)
    yield base
    stop()


def test_download(server, tmp_path, monkeypatch):
    monkeypatch.setenv('no_proxy', '127.0.0.1')
    dest = dsb_path(tmp_path/'dl', download=True, base_url=server)
    assert sorted(p.name for p in dest.iterdir()) == ['stage1_solution.csv', 'stage1_test.zip', 'stage1_train.zip']
    df = prepare_dsb(dest, cache=tmp_path/'c', progress=False)
    assert len(df) == 3
    assert len(prepare_dsb(dest, split='test', cache=tmp_path/'c', progress=False)) == 2


def test_download_into_default_folder(server, tmp_path, monkeypatch):
    "With no path and no NUCLEUS_SEG_DATA, the default folder under home is filled by download."
    monkeypatch.setenv('no_proxy', '127.0.0.1')
    monkeypatch.setenv('HOME', str(tmp_path/'home'))
    monkeypatch.delenv('NUCLEUS_SEG_DATA', raising=False)
    p = dsb_path(base_url=server)
    assert p == tmp_path/'home'/'.nucleus_seg'/'data' and (p/'stage1_train.zip').exists()
    assert dsb_path(base_url='http://127.0.0.1:9/') == p   # second call: local, no download


def test_download_errors(server, tmp_path, monkeypatch):
    monkeypatch.setenv('no_proxy', '127.0.0.1')
    with pytest.raises(DSBDataError, match='missing.zip: download failed'):
        download_dsb(tmp_path/'dl', base_url=server, files=['missing.zip'], show_progress=False)
    assert not list((tmp_path/'dl').iterdir())   # no partial file left


# ---------- bad input ----------
def test_missing_folder(tmp_path):
    with pytest.raises(DSBDataError, match=f"{tmp_path/'nope'}: data folder does not exist"): prepare_dsb(tmp_path/'nope', cache=tmp_path/'c')
    (tmp_path/'empty').mkdir()
    with pytest.raises(DSBDataError, match='no stage1_train.zip'): prepare_dsb(tmp_path/'empty', cache=tmp_path/'c')


def test_zip_without_layout(tmp_path):
    fn = tmp_path/'d'/'stage1_train.zip'; fn.parent.mkdir()
    with zipfile.ZipFile(fn, 'w') as z: z.writestr('pictures/cat.png', _png(np.zeros((4, 4), np.uint8)))
    with pytest.raises(DSBDataError, match=r'stage1_train.zip: no .*not the DSB2018 layout'): prepare_dsb(fn.parent, cache=tmp_path/'c')


def test_not_a_zip(tmp_path):
    fn = tmp_path/'d'/'stage1_train.zip'; fn.parent.mkdir(); fn.write_bytes(b'hello')
    with pytest.raises(DSBDataError, match='stage1_train.zip: not a readable zip'): prepare_dsb(fn.parent, cache=tmp_path/'c')


def test_empty_dataset(tmp_path):
    fn = tmp_path/'d'/'stage1_train.zip'; fn.parent.mkdir()
    zipfile.ZipFile(fn, 'w').close()
    with pytest.raises(DSBDataError, match=f'{fn}: empty dataset'): prepare_dsb(fn.parent, cache=tmp_path/'c')
    (tmp_path/'e'/'stage1_train').mkdir(parents=True)
    with pytest.raises(DSBDataError, match=f"{tmp_path/'e'/'stage1_train'}: empty dataset"): prepare_dsb(tmp_path/'e', cache=tmp_path/'c')


def test_corrupt_image(tmp_path):
    ids = _small_ids()
    bad = _zip_layout()[ids[1]][0]
    fn = _make_zip(tmp_path/'d'/'stage1_train.zip', ids, edit=lambda n, b: b[:len(b)//2] if n == bad else b)
    with pytest.raises(DSBDataError, match=f'{bad}: cannot decode image'): prepare_dsb(fn.parent, cache=tmp_path/'c', progress=False)


def test_corrupt_mask(tmp_path):
    ids = _small_ids()
    bad = _zip_layout()[ids[0]][1][0]
    fn = _make_zip(tmp_path/'d'/'stage1_train.zip', ids, edit=lambda n, b: b'\x89PNG\r\n\x1a\n garbage' if n == bad else b)
    with pytest.raises(DSBDataError, match=f'{bad}: cannot decode mask'): prepare_dsb(fn.parent, cache=tmp_path/'c', progress=False)


def test_mask_size_mismatch(tmp_path):
    ids = _small_ids()
    bad = _zip_layout()[ids[2]][1][0]
    def crop(n, b): return _png(np.asarray(Image.open(io.BytesIO(b)))[:-3]) if n == bad else b
    fn = _make_zip(tmp_path/'d'/'stage1_train.zip', ids, edit=crop)
    with pytest.raises(DSBDataError, match=f'mask {Path(bad).name} is .*image is'): prepare_dsb(fn.parent, cache=tmp_path/'c', progress=False)


def test_image_without_masks(tmp_path):
    ids = _small_ids()
    fn = _make_zip(tmp_path/'d'/'stage1_train.zip', ids, edit=lambda n, b: None if n.startswith(f'{ids[0]}/masks/') else b)
    with pytest.raises(DSBDataError, match=f'{ids[0]}.png: image without masks'): prepare_dsb(fn.parent, cache=tmp_path/'c', progress=False)


def test_masks_without_image(tmp_path):
    ids = _small_ids()
    fn = _make_zip(tmp_path/'d'/'stage1_train.zip', ids, edit=lambda n, b: None if n.startswith(f'{ids[0]}/images/') else b)
    with pytest.raises(DSBDataError, match=f'{ids[0]}/masks/.*: masks without an image'): prepare_dsb(fn.parent, cache=tmp_path/'c', progress=False)


def _no_masks(ids): return lambda n, b: None if n.startswith(f'{ids[0]}/masks/') else b
def _no_image(ids): return lambda n, b: None if n.startswith(f'{ids[0]}/images/') else b
def _corrupt_image(ids):
    bad = _zip_layout()[ids[0]][0]
    return lambda n, b: b[:100] if n == bad else b
def _corrupt_mask(ids):
    bad = _zip_layout()[ids[0]][1][0]
    return lambda n, b: b'\x89PNG\r\n\x1a\n garbage' if n == bad else b
def _small_mask(ids):
    bad = _zip_layout()[ids[0]][1][0]
    return lambda n, b: _png(np.asarray(Image.open(io.BytesIO(b)))[:-3]) if n == bad else b

def _break(data:Path, how:str):
    "Replace the training source in `data` by bad input `how`; return the file the error must name."
    fn, ids = data/'stage1_train.zip', _small_ids()
    lay = _zip_layout()
    if how == 'missing_folder':
        fn.unlink(); return data
    if how in ('empty_dataset', 'not_a_zip', 'zip_without_layout'):
        fn.unlink()
        if how == 'not_a_zip': fn.write_bytes(b'hello')
        else:
            with zipfile.ZipFile(fn, 'w') as z:
                if how == 'zip_without_layout': z.writestr('pictures/cat.png', _png(np.zeros((4, 4), np.uint8)))
        return fn
    edit = dict(corrupt_image=_corrupt_image, corrupt_mask=_corrupt_mask, mask_size=_small_mask,
                no_masks=_no_masks, no_image=_no_image)[how](ids)
    _make_zip(fn, ids, edit=edit)
    return {'corrupt_image': lay[ids[0]][0], 'no_masks': lay[ids[0]][0], 'no_image': lay[ids[0]][1][0],
            'corrupt_mask': lay[ids[0]][1][0], 'mask_size': Path(lay[ids[0]][1][0]).name}[how]   # with its image's path

@pytest.mark.parametrize('how', ['missing_folder', 'empty_dataset', 'not_a_zip', 'zip_without_layout', 'corrupt_image',
                                 'corrupt_mask', 'mask_size', 'no_masks', 'no_image'])
def test_bad_input_keeps_cache(small, how):
    "Every bad input raises a DSBDataError naming the file, and leaves the previous cache exactly as it was."
    data, cache = small
    df = prepare_dsb(data, cache=cache, progress=False)
    before = _cache_state(cache)
    named = _break(data, how)
    for force in (False, True):
        with pytest.raises(DSBDataError) as e: prepare_dsb(data, cache=cache, force=force, progress=False)
        assert str(named) in str(e.value), (how, str(e.value))
        assert _cache_state(cache) == before, how
    assert all(p.exists() for p in df.image) and all(p.exists() for p in df.label)


# ---------- images ----------
@pytest.fixture(scope='module')
def real_rgb():
    lay = _zip_layout()
    with zipfile.ZipFile(TRAIN_ZIP) as z:
        return {i: read_image(z.read(lay[i][0])) for i in sorted(lay)[:40]}

def _enc(a, fmt='PNG', **kw):
    buf = io.BytesIO(); (a if isinstance(a, Image.Image) else Image.fromarray(a)).save(buf, fmt, **kw); return buf.getvalue()

def test_read_image_formats(real_rgb, tmp_path):
    img = next(v for v in real_rgb.values() if np.ptp(v.astype(int), axis=-1).any())   # a colour image
    g = img[..., 0]
    same = {'rgb png': _enc(img), 'rgba png': _enc(np.dstack([img, np.full_like(g, 255)])), 'tiff': _enc(img, 'TIFF'),
            'palette': _enc(Image.fromarray(img).quantize(256)), }
    for k, b in same.items():
        out = read_image(b)
        assert out.dtype == np.uint8 and out.shape == img.shape, k
        if k != 'palette': np.testing.assert_array_equal(out, img, err_msg=k)
    grey3 = g[..., None].repeat(3, -1)
    for k, b in {'grey png': _enc(g), 'grey+alpha': _enc(Image.fromarray(g).convert('LA')),
                 '16-bit x257': _enc(g.astype(np.uint16)*257), '16-bit tiff': _enc(g.astype(np.uint16)*257, 'TIFF')}.items():
        np.testing.assert_array_equal(read_image(b), grey3, err_msg=k)
    jpg = read_image(_enc(img, 'JPEG', quality=95))
    assert jpg.shape == img.shape and np.abs(jpg.astype(int) - img).mean() < 4
    (tmp_path/'x.png').write_bytes(_enc(img))
    np.testing.assert_array_equal(read_image(tmp_path/'x.png'), read_image(str(tmp_path/'x.png')))


def test_16bit_scaling_and_normalise_consistency(real_rgb):
    "12-bit data uses the 8-bit range; normalisation is the same whatever the bit depth."
    g = next(v for v in real_rgb.values() if v[..., 0].max() > 100)[..., 0]
    g12 = g.astype(np.uint16)*16 + 7   # 12-bit camera data
    r = read_image(_enc(g12))
    assert r.max() > 200
    n8, n12 = normalise_image(g[..., None].repeat(3, -1)), normalise_image(r)
    assert np.abs(n8.astype(int) - n12).mean() < 1.5
    f = read_image(g.astype(np.float32)/255)
    np.testing.assert_array_equal(f[..., 0], g)


def test_normalise_image(real_rgb):
    for img in real_rgb.values():
        n = normalise_image(img)
        assert n.dtype == np.uint8 and n.shape == img.shape
        assert (n[..., 0] == n[..., 1]).all() and (n[..., 1] == n[..., 2]).all()
        assert np.median(n) < 128   # dark background after normalisation, whatever the modality
    # inverting the image gives the same normalised image (bright background is inverted)
    img = next(iter(real_rgb.values()))
    np.testing.assert_allclose(normalise_image(255 - img).astype(int), normalise_image(img), atol=2)
    assert (normalise_image(np.full((8, 8, 3), 7, np.uint8)) == 0).all()   # flat image


def test_read_image_errors(tmp_path):
    with pytest.raises(DSBDataError, match='nothing.png: cannot read file'): read_image(tmp_path/'nothing.png')
    (tmp_path/'bad.png').write_bytes(b'not an image')
    with pytest.raises(DSBDataError, match='bad.png: cannot decode image'): read_image(tmp_path/'bad.png')
    with pytest.raises(DSBDataError, match='bad.png: cannot decode label'): read_label(tmp_path/'bad.png')


def test_image_modality_synthetic():
    rng = np.random.default_rng(0)
    dark = (rng.random((64, 64)) * 20).astype(np.uint8); dark[20:30, 20:30] = 200
    assert image_modality(dark) == 'fluorescence'
    assert image_modality(255 - dark) == 'brightfield'
    he = np.dstack([255 - dark, 200 - dark//2, 255 - dark//3]).astype(np.uint8)
    assert image_modality(he) == 'histology'


# ---------- merging and targets ----------
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
    with pytest.raises(DSBDataError, match='img3: mask b.png is 4x5, image is 5x5'):
        merge_masks([a, b[:4]], ['a.png', 'b.png'], 'img3')
    with pytest.raises(DSBDataError, match='no masks'): merge_masks([], image_id='img4')
    c = np.zeros((5, 5), np.uint8); c[4, :] = 255
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # disjoint masks: no warning
        assert merge_masks([a, c], shape=(5, 5)).max() == 2


def test_instance_target_separates_touching():
    lbl = np.zeros((10, 14), np.uint16); lbl[2:8, 2:7] = 1; lbl[2:8, 7:12] = 2   # two touching nuclei
    t = instance_target(lbl)
    assert t.dtype == np.uint8 and set(np.unique(t)) == {0, 1, 2}
    assert cc_label(t == 1).max() == 2                  # interiors apart
    assert (t[:, 6:8][2:8] == 2).all()                  # both sides of the contact are boundary
    np.testing.assert_array_equal(t > 0, lbl > 0)        # boundary lies inside the nuclei
    np.testing.assert_array_equal(instance_target(lbl, 'binary'), (lbl > 0).astype(np.uint8))
    with pytest.raises(ValueError, match='kind'): instance_target(lbl, 'classes4')


# ---------- DataLoaders ----------
@pytest.mark.parametrize('target', ['classes3', 'binary'])
def test_dataloaders(train_df, target):
    dls = dsb_dataloaders(DATA, target=target, bs=4, crop=128, n_items=12, num_workers=0)
    x, y = dls.one_batch()
    assert x.shape == (4, 3, 128, 128) and y.shape == (4, 128, 128)
    assert int(y.max()) < len(TARGET_CODES[target])
    assert set(dls.valid_items.modality) == set(MODALITIES) and set(dls.train_items.modality) == set(MODALITIES)
    assert {'image_id', 'modality', 'label'} <= set(dls.valid_items.columns)
    assert not set(dls.train_items.image_id) & set(dls.valid_items.image_id)
    pickle.dumps(dls.train.after_item)   # item getters and transforms pickle (learner export)


def test_crop_larger_than_image_pads(train_df):
    dls = dsb_dataloaders(DATA, bs=2, crop=300, n_items=6, num_workers=0, normalise=False)
    x, y = dls.valid.one_batch()
    assert x.shape[-2:] == (300, 300) and y.shape[-2:] == (300, 300)


def test_split_stratified(train_df):
    tr, va = ModalitySplitter(0.2, seed=1)(train_df)
    assert len(set(tr) | set(va)) == 664 and not set(tr) & set(va)
    vc = train_df.iloc[va].modality.value_counts()
    allc = train_df.modality.value_counts()
    assert ((vc/allc[vc.index] - 0.2).abs() < 0.05).all()
    assert ModalitySplitter(0.2, seed=1)(train_df) == (tr, va)
