"""Tests of `nucleus_seg.io` (00_io): reading any image as uint8 RGB (formats, bit depths, planes), label and mask
files, atomic writes, the network's input modes, modality guesses, nucleus tables and progress. Synthetic images
only: expected values are computed here from the pixels written."""
import io, subprocess, sys, warnings

import numpy as np, pytest
from PIL import Image

from nucleus_seg.io import *
from synthetic import fake_image, grid_label, disks


def enc(a, fmt='PNG', **kw) -> bytes:
    buf = io.BytesIO(); (a if isinstance(a, Image.Image) else Image.fromarray(a)).save(buf, fmt, **kw); return buf.getvalue()


def tiff(a, **kw) -> bytes:
    import tifffile
    buf = io.BytesIO(); tifffile.imwrite(buf, a, **kw); return buf.getvalue()


@pytest.fixture(scope='module')
def colour():
    "A histology-like colour image with texture in every channel."
    rng = np.random.default_rng(0)
    return np.clip(fake_image(grid_label(), 'histology') + rng.integers(-20, 20, (96, 128, 3)), 0, 255).astype(np.uint8)


# ---------- bit depths and shapes ----------
def test_to_uint8_scales_by_effective_bit_depth():
    assert to_uint8(np.array([0, 255], np.uint8)).tolist() == [0, 255]
    assert to_uint8(np.array([False, True])).tolist() == [0, 255]
    assert to_uint8(np.array([0, 100, 255], np.int32)).tolist() == [0, 100, 255]           # 8-bit values: kept
    assert to_uint8(np.array([0, 257*100, 65535], np.uint16)).tolist() == [0, 100, 255]   # 8-bit data stored x257
    assert to_uint8(np.array([0, 4095], np.uint16)).tolist() == [0, 255]                  # 12-bit: 4095 is white
    assert to_uint8(np.array([0, 2048], np.uint16)).tolist() == [0, round(2048*255/4095)]
    assert to_uint8(np.array([0., 0.5, 1.])).tolist() == [0, 128, 255]                     # floats in [0, 1]
    assert to_uint8(np.array([-1., 1.])).tolist() == [0, 255]                              # other floats: stretched
    assert to_uint8(np.array([-5, 3], np.int16)).tolist() == [0, 3]                        # negatives clipped


def test_to_rgb_shapes():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert (to_rgb(g) == g[..., None]).all() and to_rgb(g).shape == (3, 4, 3)
    rgba = np.dstack([g, g+1, g+2, g*0])
    np.testing.assert_array_equal(to_rgb(rgba), rgba[..., :3])                  # alpha dropped
    np.testing.assert_array_equal(to_rgb(rgba[..., :3].transpose(2, 0, 1).repeat(2, 2)[:, :, :8]).shape, (3, 8, 3))   # CHW
    for bad in (np.zeros((2, 3, 4, 5)), np.zeros((0, 4)), np.zeros((5, 5, 6))):
        with pytest.raises(DSBDataError, match='unsupported image shape'): to_rgb(bad, 'x.png')


# ---------- reading ----------
def test_read_image_formats(colour, tmp_path):
    img, g = colour, colour[..., 0]
    same = {'rgb png': enc(img), 'rgba png': enc(np.dstack([img, np.full_like(g, 255)])), 'tiff': enc(img, 'TIFF'),
            'bmp': enc(img, 'BMP'), 'rgb16 tiff': tiff(img.astype(np.uint16)*257, photometric='rgb')}
    for k, b in same.items():
        out = read_image(b)
        assert out.dtype == np.uint8 and out.shape == img.shape, k
        np.testing.assert_array_equal(out, img, err_msg=k)
    pal = read_image(enc(Image.fromarray(img).quantize(256)))
    assert pal.shape == img.shape and np.abs(pal.astype(int) - img).mean() < 8
    grey3 = g[..., None].repeat(3, -1)
    for k, b in {'grey png': enc(g), 'grey+alpha': enc(Image.fromarray(g).convert('LA')), '16-bit x257': enc(g.astype(np.uint16)*257),
                 '16-bit tiff': tiff(g.astype(np.uint16)*257), 'float tiff': tiff(g.astype(np.float32)/255)}.items():
        np.testing.assert_array_equal(read_image(b), grey3, err_msg=k)
    jpg = read_image(enc(img, 'JPEG', quality=95))
    assert jpg.shape == img.shape and np.abs(jpg.astype(int) - img).mean() < 12   # lossy, on a noisy texture
    (tmp_path/'x.png').write_bytes(enc(img))
    np.testing.assert_array_equal(read_image(tmp_path/'x.png'), img)
    np.testing.assert_array_equal(read_image(str(tmp_path/'x.png')), img)
    np.testing.assert_array_equal(read_image(img), img)


def test_read_image_errors(tmp_path):
    with pytest.raises(DSBDataError, match='nothing.png: cannot read file'): read_image(tmp_path/'nothing.png')
    (tmp_path/'bad.png').write_bytes(b'not an image')
    with pytest.raises(DSBDataError, match='bad.png: cannot decode image .not a PNG, JPEG, TIFF or BMP'): read_image(tmp_path/'bad.png')
    (tmp_path/'empty.png').write_bytes(b'')
    with pytest.raises(DSBDataError, match='empty.png: empty file'): read_image(tmp_path/'empty.png')
    with pytest.raises(DSBDataError, match='bad.png: cannot decode label'): read_label(tmp_path/'bad.png')
    with pytest.raises(DSBDataError, match='bad.png: cannot decode mask'): read_mask(tmp_path/'bad.png')
    (tmp_path/'rgb.png').write_bytes(enc(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(DSBDataError, match='label image has shape'): read_label(tmp_path/'rgb.png')


def test_planes_z_stack_and_channels():
    rng = np.random.default_rng(1)
    z = rng.integers(0, 200, (5, 20, 30)).astype(np.uint8)
    with pytest.warns(PlanesWarning, match='5 planes .* read as a z-stack'):
        got = read_image(tiff(z))
    np.testing.assert_array_equal(got[..., 0], z.max(0))                      # maximum projection
    c = rng.integers(0, 200, (3, 20, 30)).astype(np.uint8)
    with pytest.warns(PlanesWarning, match='read as channels'):
        got = read_image(tiff(c, metadata={'axes': 'CYX'}))
    np.testing.assert_array_equal(got, c.transpose(1, 2, 0))
    with pytest.warns(PlanesWarning): got = read_image(tiff(c, metadata={'axes': 'CYX'}), planes='z')
    np.testing.assert_array_equal(got[..., 0], c.max(0))
    with pytest.raises(DSBDataError, match='5 planes cannot be read as channels'), warnings.catch_warnings():
        warnings.simplefilter('ignore'); read_image(tiff(z), planes='channels')
    with pytest.raises(ValueError, match='planes must be one of'): read_planes(z, planes='t')
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # one plane, or RGB samples: nothing to say
        assert read_image(tiff(z[:1])).shape == (20, 30, 3) and read_image(tiff(c.transpose(1, 2, 0), photometric='rgb')).shape == (20, 30, 3)


def test_label_and_mask_files(tmp_path):
    a = np.array([[0, 1, 255], [256, 1000, 65535]], np.uint16)
    assert save_label(a, tmp_path/'sub'/'l.png') == tmp_path/'sub'/'l.png'
    got = read_label(tmp_path/'sub'/'l.png')
    assert got.dtype == np.uint16 and (got == a).all()
    assert (read_label(label_png(a)) == a).all()
    with pytest.raises(ValueError, match='0..65535'): label_png(np.array([[70000]]))
    with pytest.raises(ValueError, match='0..65535'): label_png(np.array([[-1]]))
    m = np.zeros((5, 6), np.uint8); m[1:3, 2:5] = 255
    assert (read_mask(enc(m)) == (m > 0)).all()
    assert (read_mask(enc(np.dstack([m*0, m, m*0]))) == (m > 0)).all()   # a colour mask: any channel
    assert not list(tmp_path.rglob('.*.tmp'))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    fn = atomic_write(tmp_path/'f.txt', lambda t: t.write_text('old'))
    def fail(t): t.write_text('half'); raise RuntimeError('killed')
    with pytest.raises(RuntimeError): atomic_write(fn, fail)
    assert fn.read_text() == 'old' and [p.name for p in tmp_path.iterdir()] == ['f.txt']
    save_image(np.zeros((3, 4, 3), np.uint8), tmp_path/'d'/'i.png')
    assert read_image(tmp_path/'d'/'i.png').shape == (3, 4, 3)


# ---------- the network's input ----------
def test_normalise_grey_stretches_percentiles():
    "Grey mode: the mean of the channels, percentiles 1 and 99.8 mapped to 0 and 255 (computed here with NumPy)."
    rng = np.random.default_rng(2)
    img = rng.integers(20, 120, (60, 80, 3)).astype(np.uint8)
    g = img.astype(np.float32).mean(-1)
    lo, hi = np.percentile(g, (1, 99.8))
    want = (np.clip((g-lo)/(hi-lo), 0, 1)*255).round().astype(np.uint8)
    st = input_stats(img)
    assert st['channel'] == 'grey' and not st['invert'] and (st['lo'], st['hi']) == pytest.approx((lo, hi))
    n = normalise_image(img)
    assert n.dtype == np.uint8 and n.shape == img.shape and (n == n[..., :1]).all()
    np.testing.assert_array_equal(n[..., 0], want)


def test_normalise_inverts_bright_backgrounds():
    "Brightfield (dark nuclei on bright) becomes bright nuclei on dark, like fluorescence: dark background for every modality."
    lbl = grid_label()
    fl, bf = fake_image(lbl, 'fluorescence', seed=1), fake_image(lbl, 'brightfield', seed=1)
    assert input_stats(bf)['invert'] and not input_stats(fl)['invert']
    for img in (fl, bf):
        n = normalise_image(img)[..., 0]
        assert n[lbl > 0].mean() > 200 and n[lbl == 0].mean() < 60
    np.testing.assert_allclose(normalise_image(255 - fl).astype(int), normalise_image(fl), atol=2)   # inverted image, same view
    assert (normalise_image(np.full((8, 8, 3), 7, np.uint8)) == 0).all()   # a flat image


def test_input_modes_hed_and_rgb(colour):
    lbl = grid_label()
    he = fake_image(lbl, 'histology', seed=3)
    st = input_stats(he, 'hed')
    assert st == dict(mode='hed', channel='hematoxylin', invert=False, lo=pytest.approx(st['lo']), hi=pytest.approx(st['hi']))
    n = normalise_image(he, 'hed')[..., 0]
    assert n[lbl > 0].mean() > 200 and n[lbl == 0].mean() < 60   # hematoxylin: nuclei bright
    np.testing.assert_allclose(hematoxylin(he), __import__('skimage.color', fromlist=['rgb2hed']).rgb2hed(he)[..., 0])
    grey = fake_image(lbl, 'fluorescence', seed=3)
    assert input_stats(grey, 'hed')['channel'] == 'grey'   # 'hed' reads grey images as grey
    np.testing.assert_array_equal(normalise_image(grey, 'hed'), normalise_image(grey, 'grey'))
    assert input_stats(colour, 'rgb') == dict(mode='rgb') and (normalise_image(colour, 'rgb') == colour).all()
    with pytest.raises(ValueError, match='input mode must be one of'): input_stats(colour, 'lab')


def test_input_mode_red():
    "'red': a colour image's grey view is its red channel, inverted and stretched as in 'grey'; grey images as in 'grey'."
    lbl = grid_label()
    he = fake_image(lbl, 'histology', seed=3)
    st = input_stats(he, 'red')
    assert st['channel'] == 'red' and st['invert'] and input_stats(he)['invert']   # stained tissue: inverted, as in 'grey'
    r = 255 - he[..., 0].astype(np.float32)
    lo, hi = np.percentile(r, (1, 99.8))
    assert (st['lo'], st['hi']) == pytest.approx((lo, hi))
    n = normalise_image(he, 'red')
    assert (n == n[..., :1]).all()
    np.testing.assert_array_equal(n[..., 0], (np.clip((r-lo)/(hi-lo), 0, 1)*255).round().astype(np.uint8))
    assert (n != normalise_image(he)).any()   # not the mean's view
    grey = fake_image(lbl, 'fluorescence', seed=3)
    assert input_stats(grey, 'red')['channel'] == 'grey'
    np.testing.assert_array_equal(normalise_image(grey, 'red'), normalise_image(grey))


def stained(lbl, nucleus, cytoplasm, seed=0):
    "Tissue of two colours: `nucleus` RGB inside `lbl`'s nuclei, `cytoplasm` elsewhere, with noise."
    a = np.where((lbl > 0)[..., None], np.array(nucleus, np.float32), np.array(cytoplasm, np.float32))
    return np.clip(a + np.random.default_rng(seed).normal(0, 6, a.shape), 0, 255).astype(np.uint8)


def test_input_mode_auto_gives_pink_tissue_the_red_view():
    "'auto': the red view for tissue stained pink (redder than blue, green absorbed where stained), the grey view otherwise."
    lbl = grid_label()
    pink = stained(lbl, (120, 60, 150), (235, 140, 190))     # purple nuclei in eosin-pink cytoplasm
    purple = stained(lbl, (90, 60, 150), (200, 170, 220))    # purple nuclei in pale lilac cytoplasm: bluer than red
    pale = stained(lbl, (200, 195, 190), (225, 220, 215))    # brightfield in faint colour: green barely absorbed
    assert [is_pink(a) for a in (pink, purple, pale)] == [True, False, False]
    assert input_stats(pink, 'auto')['channel'] == 'red' and input_stats(purple, 'auto')['channel'] == 'grey'
    np.testing.assert_array_equal(normalise_image(pink, 'auto'), normalise_image(pink, 'red'))
    assert (normalise_image(pink, 'red') != normalise_image(pink)).any()   # the two views differ on it
    for a in (purple, pale, fake_image(lbl, 'fluorescence', seed=3)):
        np.testing.assert_array_equal(normalise_image(a, 'auto'), normalise_image(a))
    assert not is_pink(np.repeat(pink.mean(-1, keepdims=True), 3, -1).astype(np.uint8))   # the same pixels in grey
    sparse = np.zeros((64, 64, 3), np.uint8); sparse[:8, :8] = (235, 140, 190)   # mostly black: no pixel below the median
    with warnings.catch_warnings():
        warnings.simplefilter('error'); assert not is_pink(sparse)


def test_window_normalised_with_whole_image_stats():
    "A window prepared with the whole image's statistics is the window of the prepared whole image (tiles rely on it)."
    img = (fake_image(grid_label((96, 128)), seed=4)*np.linspace(0.5, 1, 128)[None, :, None]).astype(np.uint8)
    st = input_stats(img)
    np.testing.assert_array_equal(normalise_image(img[10:60, 70:], stats=st), normalise_image(img)[10:60, 70:])
    assert (normalise_image(img[10:60, 70:]) != normalise_image(img)[10:60, 70:]).any()   # its own statistics differ


def test_bit_depth_does_not_change_the_input(colour):
    g = colour[..., 0]
    g12 = g.astype(np.uint16)*16 + 7   # 12-bit camera data
    r = read_image(enc(g12))
    assert r.max() > 200
    assert np.abs(normalise_image(g[..., None].repeat(3, -1)).astype(int) - normalise_image(r)).mean() < 1.5


def test_zoom_image_sizes_brightness_and_errors():
    "Sides scale by the factor (rounded, at least 1); a flat image stays flat; 1 is the image itself; enlarging then shrinking returns it."
    img = fake_image(disks((40, 60), [(20, 30)], [12]), seed=1)
    assert zoom_image(img, 2).shape == (80, 120, 3) and zoom_image(img, 0.5).shape == (20, 30, 3)
    assert zoom_image(img, 1/3).shape == (13, 20, 3) and zoom_image(img, 0.001).shape == (1, 1, 3)
    assert zoom_image(img, 1) is img
    flat = np.full((10, 14, 3), 77, np.uint8)
    for f in (0.3, 1.7, 4): assert (zoom_image(flat, f) == 77).all()
    ramp = np.add.outer(np.arange(40)*2, np.arange(60)).astype(np.uint8)[..., None].repeat(3, -1)
    for f in (2, 0.5):   # a linear ramp stays the same ramp, sampled at the new pixel centres (away from the edges)
        z = zoom_image(ramp, f).astype(float)[..., 0]
        want = np.add.outer(((np.arange(z.shape[0])+0.5)/f-0.5)*2, (np.arange(z.shape[1])+0.5)/f-0.5)
        assert np.abs(z - want)[4:-4, 4:-4].max() <= 1
    assert zoom_image(img[..., 0], 2).shape == (80, 120, 3)           # grey in, RGB out, like `read_image`
    for bad in (0, -1, float('nan')):
        with pytest.raises(ValueError, match='positive'): zoom_image(img, bad)

def test_image_modality_synthetic():
    lbl = grid_label()
    for m in MODALITIES: assert image_modality(fake_image(lbl, m, seed=5)) == m
    pale = np.full((40, 40, 3), 200, np.uint8); pale[..., 2] = 235   # pale lavender: channels 35 levels apart
    assert image_modality(pale) == 'histology'


def test_nucleus_table():
    lbl = disks((40, 50), [(10, 10), (25, 35)], [4, 6]); lbl[0, 49] = 7   # label 7 at one pixel; labels 3..6 absent
    t = nucleus_table(lbl)
    assert list(t.columns) == ['nucleus', 'area', 'centroid_y', 'centroid_x'] and list(t.nucleus) == [1, 2, 7]
    assert list(t.area) == [int((lbl == k).sum()) for k in (1, 2, 7)]
    assert t.iloc[:2][['centroid_y', 'centroid_x']].values.tolist() == [[10, 10], [25, 35]]   # disks: centred
    assert len(nucleus_table(np.zeros((4, 4), np.uint16))) == 0


def test_progress_plain_lines_and_silence():
    buf = io.StringIO()
    assert list(progress(range(20), desc='work', file=buf, every=0.25)) == list(range(20))
    lines = buf.getvalue().splitlines()
    assert lines[0] == 'work: 0/20' and lines[-1].startswith('work: 20/20 done in')
    assert [l.split(' (')[0] for l in lines[1:-1]] == ['work: 5/20', 'work: 10/20', 'work: 15/20']
    buf = io.StringIO()
    assert list(progress(iter('abc'), show=False, file=buf)) == list('abc') and buf.getvalue() == ''
    assert not interactive(io.StringIO())


def test_io_does_not_import_torch():
    code = "import sys, nucleus_seg.io; print('torch' in sys.modules or 'fastai' in sys.modules)"
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip() == 'False'


# ---------- your own labelled images ----------
def _annotated(root, names=('a', 'b'), label_dir='labels', label_ext='.png'):
    import tifffile
    for sub in ('images', label_dir): (root/sub).mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        lbl = grid_label(seed=i)
        save_image(fake_image(lbl), root/'images'/f'{n}.png')
        if label_ext == '.png': save_label(lbl, root/label_dir/f'{n}.png')
        else: tifffile.imwrite(root/label_dir/f'{n}{label_ext}', lbl.astype(np.int32))
    return root


def test_labelled_pairs_in_both_layouts(tmp_path):
    "images/ + labels/ (16-bit PNG) and images/ + masks/ (int32 TIFF named like the images) give the same pairs."
    for d, kw in (('png', {}), ('tif', dict(label_dir='masks', label_ext='.tif'))):
        root = _annotated(tmp_path/d, ('b', 'a'), **kw)
        assert label_folder(root) == root/kw.get('label_dir', 'labels')
        df = labelled_pairs(root)
        assert list(df.columns) == ['image_id', 'image', 'label'] and df.image_id.tolist() == ['a', 'b']
        for r, seed in zip(df.itertuples(), (1, 0)):
            assert r.image == root/'images'/f'{r.image_id}.png'
            np.testing.assert_array_equal(read_label(r.label), grid_label(seed=seed))


def test_kaggle_layout_and_plain_folders_are_not_labelled(tmp_path):
    "A DSB2018 image folder (per-nucleus masks named otherwise) and a folder of images alone are not labelled folders."
    k = tmp_path/'0a1b'
    for sub in ('images', 'masks'): (k/sub).mkdir(parents=True)
    save_image(fake_image(grid_label()), k/'images'/'0a1b.png'); save_image(np.zeros((4, 4), np.uint8), k/'masks'/'c3d4.png')
    assert label_folder(k) is None and label_folder(k/'images') is None
    with pytest.raises(DSBDataError, match='not a folder of labelled images'): labelled_pairs(k)


def test_labelled_pairs_errors_name_the_file(tmp_path):
    root = _annotated(tmp_path/'own', ('a', 'b', 'c'))
    (root/'labels'/'b.png').unlink()
    with pytest.raises(DSBDataError, match=r'b\.png: no label image in .* \(1 of 3 images have none\)'): labelled_pairs(root)
    save_label(grid_label(), root/'labels'/'b.png'); save_label(grid_label(), root/'labels'/'zz.png')
    with pytest.raises(DSBDataError, match=r'zz\.png: a label image without an image'): labelled_pairs(root)
    (root/'labels'/'zz.png').unlink(); save_image(fake_image(grid_label()), root/'images'/'a.tif')
    with pytest.raises(DSBDataError, match=r"two files named 'a'"): labelled_pairs(root)
    for f in (root/'images').iterdir(): f.unlink()
    with pytest.raises(DSBDataError, match='no images'): labelled_pairs(root)


def test_read_label_refuses_values_outside_uint16(tmp_path):
    import tifffile
    for name, a in (('neg.tif', np.array([[0, -1]], np.int32)), ('big.tif', np.array([[0, 70000]], np.int32))):
        tifffile.imwrite(tmp_path/name, a)
        with pytest.raises(DSBDataError, match=rf'{name}: label values must lie in 0\.\.65535'): read_label(tmp_path/name)
    tifffile.imwrite(tmp_path/'ok.tif', np.array([[0, 65535]], np.int32))
    assert read_label(tmp_path/'ok.tif').tolist() == [[0, 65535]]
