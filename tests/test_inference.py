"""Tests of `nucleus_seg.inference` (06_inference) against references that do not come from the code under test:
TTA against the mean of the flipped predictions flipped back, padding against an explicitly padded image, tiles
against the whole image (exact with a local model, within stated tolerances with a trained U-Net), windows against
the whole image, and evaluation of segmenters that are right, or wrong by a known amount, by construction.

Models: a compact U-Net at random initialisation saved as a model file (mechanics), small hand-made networks with a
known receptive field or a known answer, and the session's tiny U-Net trained on synthetic data (`tiny_run`)."""
import shutil, zipfile

import numpy as np, pandas as pd, pytest, torch, torch.nn as nn

from nucleus_seg.io import DSBDataError, read_image, read_label, save_image, save_label
from nucleus_seg.learner import unet_model, save_model, load_model, read_model
from nucleus_seg.metrics import dsb_score, image_report
from nucleus_seg.rle import write_submission, validate_submission
from nucleus_seg.inference import (DEFAULT_MODEL, Segmenter, load_segmenter, paste_instances, ClassicalSegmenter,
                                   image_items, SkippedImageWarning, segment_folder, evaluate_model, modality_scores,
                                   tune_thresholds, tune_model, _core_instances, DSB_DIAMETERS, AUTO_MIN_CHANGE)
from nucleus_seg.instances import nucleus_diameter, resize_labels
from nucleus_seg.inference import test_mix as modality_mix   # (a `test_` name pytest would collect)
from synthetic import model_config, fake_image, random_label, grid_label, disks, png, IMAGENET_STATS
from nucleus_seg.io import zoom_image, input_stats

torch.set_num_threads(1)  # CI's 2 cores are shared: one thread each is several times faster than two


def flip(a, axes): return np.ascontiguousarray(np.flip(a, axes)) if axes else a


@pytest.fixture(scope='module')
def random_model(tmp_path_factory):
    "A compact U-Net at random initialisation, saved as a model file (TTA on, default thresholds)."
    torch.manual_seed(0)
    fn = tmp_path_factory.mktemp('models')/'random.safetensors'
    return save_model(unet_model('compact'), fn, model_config('grey', tta=True, postprocess=dict(min_size=15)))


class LocalNet(nn.Module):
    "Two random 3x3 convolutions: each output pixel depends only on the input within `radius` = 2 pixels."
    radius = 2
    def __init__(self):
        super().__init__(); torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1))
    def forward(self, x): return self.net(x)*4


class ThresholdNet(nn.Module):
    """Right by construction on bright, well separated nuclei (grey input mode): 'interior' where the normalised
    intensity is above the middle grey, 'background' elsewhere, never 'boundary'."""
    def forward(self, x):
        mid = (0.5 - IMAGENET_STATS[0][0])/IMAGENET_STATS[1][0]   # grey 127.5 after ImageNet normalisation
        z = 20*(x[:, :1] - mid)
        return torch.cat([-z, z, torch.full_like(z, -40.)], 1)


def seam_distance(seg, h, w) -> np.ndarray:
    "Distance of every pixel from the nearest tile edge inside the image (`Segmenter._tiles`)."
    def edges(n): starts,size = seg._tiles(n); return sorted({e for i in starts for e in (i, i+size)} - {0, n}) or [10**9]
    dy = np.abs(np.arange(h)[:, None] - np.array(edges(h))[None]).min(1)
    dx = np.abs(np.arange(w)[:, None] - np.array(edges(w))[None]).min(1)
    return np.minimum(dy[:, None], dx[None])


def ramp_image(shape, n, seed=0) -> tuple:
    "A fluorescence image whose brightness doubles from left to right (so every tile has its own statistics), and its labels."
    lbl = random_label(shape, n, np.random.default_rng(seed))
    img = fake_image(lbl, seed=seed).astype(np.float32)*np.linspace(0.55, 1.2, shape[1])[None, :, None]
    return np.clip(img, 0, 255).astype(np.uint8), lbl


# ---------- loading ----------
def test_load_segmenter_file_bundled_and_errors(random_model, tmp_path, monkeypatch):
    seg = load_segmenter(random_model, device='cpu')
    assert seg.tta is True and seg.mode == 'grey' and seg.post == dict(min_size=15)
    assert seg.name.startswith('model random.safetensors')
    seg = load_segmenter(random_model, device='cpu', tta=False, min_size=7, fg_thresh=0.4)
    assert seg.tta is False and seg.post == dict(min_size=7, fg_thresh=0.4)
    bundled = load_segmenter(device='cpu')
    assert bundled.name.startswith('bundled model default.safetensors') and bundled.config == read_model(DEFAULT_MODEL)[1]
    with pytest.raises(FileNotFoundError, match='model file not found'): load_segmenter(tmp_path/'missing.safetensors')
    import nucleus_seg.inference as I
    monkeypatch.setattr(I, 'DEFAULT_MODEL', tmp_path/'gone.safetensors')
    with pytest.raises(FileNotFoundError, match='bundled model is missing'): I.load_segmenter()
    with pytest.raises(ValueError, match='overlap'): Segmenter(LocalNet(), model_config(), tile=64, overlap=64)


# ---------- TTA and padding ----------
def test_tta_is_the_mean_of_flipped_back_predictions(random_model):
    """With TTA the probabilities are the mean of the predictions of the four flips, each flipped back (a TTA that
    does not undo its flips, or undoes the wrong one, fails). 64x96: a multiple of the stride, so no padding."""
    tta = load_segmenter(random_model, device='cpu', tta=True)
    plain = load_segmenter(random_model, device='cpu', tta=False)
    img = fake_image(random_label((64, 96), 6, np.random.default_rng(3)))
    back = [flip(plain.predict_probs(flip(img, ax)), tuple(a+1 for a in ax)) for ax in [(), (1,), (0,), (0, 1)]]
    np.testing.assert_allclose(tta.predict_probs(img), np.mean(back, 0), atol=1e-5)
    # teeth: the flips' predictions differ, so averaging them un-flipped (or not at all) gives another answer
    assert min(np.abs(b - back[0]).max() for b in back[1:]) > 0.05
    np.testing.assert_allclose(plain.predict_probs(img), back[0], atol=1e-6)


def test_tta_batches_keep_images_apart(random_model):
    "A batch of different images with TTA gives each image's own probabilities."
    seg = load_segmenter(random_model, device='cpu', tta=True, bs=2)
    rng = np.random.default_rng(4)
    xs = np.stack([seg.prepare(fake_image(random_label((64, 64), 5, rng), seed=i)) for i in range(3)])
    batch = seg._probs(xs)
    for i in range(3): np.testing.assert_allclose(batch[i], seg._probs(xs[i:i+1])[0], atol=1e-5)


def test_padding_to_the_stride(random_model):
    "A 50x70 image is predicted as its reflection-padded 64x96 version, cropped back; tiny images are replicated."
    seg = load_segmenter(random_model, device='cpu', tta=False)
    x = seg.prepare(fake_image(random_label((50, 70), 4, np.random.default_rng(5))))
    ref = seg._probs(np.pad(x, ((0, 14), (0, 26), (0, 0)), mode='reflect')[None])[0][:, :50, :70]
    np.testing.assert_allclose(seg._probs(x[None])[0], ref, atol=1e-5)
    p = seg.predict_probs(np.full((10, 40), 200, np.uint8))   # padding 22 rows > 10: replicate, not reflect
    assert p.shape == (3, 10, 40) and np.allclose(p.sum(0), 1, atol=1e-5)


# ---------- tiles ----------
def test_tile_positions_cover_the_image():
    "The fewest tiles of at most `tile` pixels, all of one side (a multiple of 32), from the first pixel to the last, overlapping by `overlap` or more"
    seg = Segmenter(LocalNet(), model_config(), tile=64, overlap=16, device='cpu')
    assert seg._tiles(150) == ([0, 43, 86], 64) and seg._tiles(64) == ([0], 64) and seg._tiles(65) == ([0, 1], 64)
    assert Segmenter(LocalNet(), model_config(), device='cpu')._tiles(2048) == ([0, 656, 1312], 736)   # not 3 of 1024
    for n in range(65, 400, 7):
        starts, size = seg._tiles(n)
        assert starts[0] == 0 and starts[-1] + size == n and size <= 64 and size % 32 == 0
        assert all(16 <= a + size - b < size for a, b in zip(starts, starts[1:]))   # overlap at least 16, no gap
        k = len(starts)
        assert (k-1)*64 - (k-2)*16 < n                    # one tile fewer, even of the largest side, would not cover it


@pytest.mark.parametrize('shape,tile,overlap', [((192, 288), 96, 32), ((1088, 1120), 1024, 64)])
def test_tiles_match_whole_image_away_from_seams(shape, tile, overlap):
    """With a network that looks only `radius` pixels around each pixel, the tiled prediction equals the whole-image
    prediction wherever no tile edge is within the radius; at the seams it differs (zero padding at a tile edge).
    Tiles are normalised with the whole image's statistics: the brightness ramp would show per-tile statistics.
    The second case is larger than the default tile (1024). Sizes are multiples of 32: no stride padding. Tiled
    probabilities are accumulated in float16 (half the memory): "equal" is to float16 rounding, 1e-3 for values <= 1."""
    img, _ = ramp_image(shape, shape[0]*shape[1]//1500)
    whole = Segmenter(LocalNet(), model_config(), tta=False, tile=max(shape), device='cpu')
    tiled = Segmenter(LocalNet(), model_config(), tta=False, tile=tile, overlap=overlap, device='cpu')
    a, b = whole.predict_probs(img), tiled.predict_probs(img)
    assert len(tiled._tiles(shape[0])[0]) > 1 and len(tiled._tiles(shape[1])[0]) > 1
    d, dist = np.abs(a - b).max(0), seam_distance(tiled, *shape)
    assert d[dist > LocalNet.radius].max() < 1e-3
    assert d[dist <= LocalNet.radius].max() > 0.05   # teeth: the seams are visible to this comparison


def test_tiled_unet_seams_within_tolerance():
    """A trained U-Net sees far beyond a 128-pixel tile, so tiles change its output a little everywhere. With the bundled
    model (deterministic, unlike a freshly trained tiny one) on a brightness ramp, tiles of 128 overlapping by 48, the
    stated tolerances: away from the seams (16+ px from a tile edge) mean |tiled - whole| < 0.002 and its 99th
    percentile < 0.03; over the seam bands the mean < 0.01; the nuclei agree (DSB of one against the other > 0.95).
    Measured with the bundled model trained on 256-pixel crops (torch 2.14 CPU): 0.0009, 0.020, 0.0036 and 0.984;
    tiles normalised with their own statistics give 0.0041 and 0.13 on the first two. This model uses more context
    than its predecessor (trained on 128-pixel crops): 96-pixel tiles move its 99th percentile to 0.037 (0.010 before)."""
    seg = load_segmenter()
    img, _ = ramp_image((192, 288), 60, seed=0)
    whole = Segmenter(seg.model, seg.config, tta=False, device='cpu')
    tiled = Segmenter(seg.model, seg.config, tta=False, tile=128, overlap=48, device='cpu')
    a, b = whole.predict_probs(img), tiled.predict_probs(img)
    d, dist = np.abs(a - b).max(0), seam_distance(tiled, *img.shape[:2])
    far = d[dist >= 16]
    assert far.mean() < 0.002 and np.quantile(far, 0.99) < 0.03
    assert d[dist < 16].mean() < 0.01
    assert dsb_score(whole.extract(a), tiled.extract(b)) > 0.95


# ---------- windows, batches ----------
def test_windows_keep_straddling_nuclei_whole():
    "Windows of 40 px cut through nuclei; each nucleus is still found once and whole (right-by-construction network)."
    lbl = grid_label((96, 128))
    img = fake_image(lbl, seed=2)
    seg = Segmenter(ThresholdNet(), model_config(), tta=False, device='cpu', min_size=15)
    assert dsb_score(lbl, seg.segment(img)) == 1.0
    win = seg.segment_windows(img, window=40, margin=12)
    rep = image_report(lbl, win)
    assert rep['score'] == 1.0 and rep['n_pred'] == rep['n_true'] == lbl.max()
    small = Segmenter(ThresholdNet(), model_config(), tta=False, device='cpu', min_size=15, max_pixels=40*40)
    assert dsb_score(lbl, small.segment(img)) == 1.0   # larger than max_pixels: segmented in windows


def test_core_instances_and_paste():
    lbl = np.zeros((10, 10), np.uint16); lbl[0:2, 0:2] = 1; lbl[4:6, 4:6] = 2; lbl[8:10, 8:10] = 3
    assert list(_core_instances(lbl, (3, 7, 3, 7))) == [2]
    out = np.zeros((12, 12), np.uint32); out[5, 5] = 9
    nxt = paste_instances(out, lbl, np.array([2, 3]), (1, 1), 20)
    assert nxt == 22
    assert out[5, 5] == 9 and (out == 20).sum() == 3 and (out == 21).sum() == 4   # background pixels only
    assert not (out[1:3, 1:3]).any()   # id 1 was not pasted


def test_segment_many_equals_segment(random_model):
    "Batched, grouped by size, in order; images larger than the tile go through `segment`."
    seg = load_segmenter(random_model, device='cpu', tta=True, bs=2, tile=96, overlap=32)
    rng = np.random.default_rng(6)
    shapes = [(64, 64), (64, 96), (64, 64), (128, 100), (64, 64), (64, 96)]
    imgs = [fake_image(random_label(s, 5, rng), seed=i) for i, s in enumerate(shapes)]
    one = [seg.segment(a) for a in imgs]
    many = list(seg.segment_many(iter(imgs), lookahead=4))
    assert len(many) == len(one)
    for a, b in zip(one, many): np.testing.assert_array_equal(a, b)



# ---------- scale ----------
def test_scale_segments_the_resized_image_and_returns_the_image_size():
    "A factor is the resized image segmented at scale 1 (stretched as the whole image), labels brought back by nearest neighbour; windows keep it."
    lbl = grid_label((96, 128))
    img = fake_image(lbl, seed=4)
    st = input_stats(img, 'grey')
    one = Segmenter(ThresholdNet(), model_config(), tta=False, device='cpu', min_size=15)
    for f in (0.5, 2):
        seg = Segmenter(ThresholdNet(), model_config(), tta=False, device='cpu', min_size=15, scale=f)
        out = seg.segment(img)
        np.testing.assert_array_equal(out, resize_labels(one.segment(zoom_image(img, f), st), img.shape[:2]))
        rep = image_report(lbl, out)   # every nucleus found; at half size its outline is coarser
        assert rep['n_pred'] == rep['n_true'] and rep['score'] > (0.9 if f > 1 else 0.7)
    win = Segmenter(ThresholdNet(), model_config(), tta=False, device='cpu', min_size=15, scale=2, max_pixels=64*64)
    rep = image_report(lbl, win.segment(img))   # 4x the pixels: more than max_pixels, so windows, each at scale 2
    assert rep['n_pred'] == rep['n_true'] and rep['score'] > 0.9


def test_auto_scale_aims_for_the_training_range():
    seg = Segmenter(ThresholdNet(), model_config(), device='cpu')
    lo, hi = DSB_DIAMETERS
    def disc(r): return disks((400, 400), [(200, 200)], [r])
    assert seg.auto_scale(disc(10)) == 1.0 and seg.auto_scale(np.zeros((9, 9), np.uint16)) == 1.0
    assert hi < nucleus_diameter(disc(16)) < hi*AUTO_MIN_CHANGE and seg.auto_scale(disc(16)) == 1.0   # just outside: left alone
    assert seg.auto_scale(disc(40)) == pytest.approx(hi/nucleus_diameter(disc(40)))      # large: shrunk to the top end
    assert seg.auto_scale(disc(4)) == pytest.approx(lo/nucleus_diameter(disc(4)))        # small: enlarged to the bottom
    assert seg.auto_scale(disc(190)) == 0.25 and seg.auto_scale(disc(1)) == 4.0          # within 1/4 to 4


def test_auto_scale_segments_once_in_range_and_twice_outside(monkeypatch):
    "Nuclei in the range: one pass at the image's size. Large nuclei: a second pass at the factor the first pass gives."
    seg = Segmenter(ThresholdNet(), model_config(), tta=False, device='cpu', scale='auto')
    calls, orig = [], Segmenter.segment_scaled
    monkeypatch.setattr(Segmenter, 'segment_scaled', lambda self, a, st, f: calls.append(f) or orig(self, a, st, f))
    small = fake_image(grid_label((96, 128)), seed=5)
    seg.segment(small)
    assert calls == [1.0]
    big_lbl = disks((300, 300), [(80, 80), (80, 220), (220, 150)], [40, 40, 40])
    big = fake_image(big_lbl, seed=5)
    f = seg.auto_scale(Segmenter(ThresholdNet(), model_config(), tta=False, device='cpu').segment(big))
    calls.clear(); out = seg.segment(big)
    assert calls == [1.0, f] and f < 0.5
    assert out.shape == big.shape[:2] and dsb_score(big_lbl, out) > 0.9
    assert seg.last_scale == f
    seg.segment(small); assert seg.last_scale == 1.0


def test_auto_scale_aims_for_the_range_the_model_file_records():
    "A model trained on larger nuclei records their range; 'auto' aims for it, not for DSB2018's."
    disc = disks((400, 400), [(200, 200)], [20])   # 40 pixels across: above DSB2018's range, inside 30-60
    dsb = Segmenter(ThresholdNet(), model_config(), device='cpu')
    own = Segmenter(ThresholdNet(), {**model_config(), 'diameters': [30.0, 60.0]}, device='cpu')
    assert dsb.diameters == DSB_DIAMETERS and own.diameters == (30.0, 60.0)
    assert dsb.auto_scale(disc) == pytest.approx(DSB_DIAMETERS[1]/nucleus_diameter(disc)) and own.auto_scale(disc) == 1.0
    assert own.auto_scale(disks((400, 400), [(200, 200)], [8])) == pytest.approx(30/nucleus_diameter(disks((400, 400), [(200, 200)], [8])))


def test_measure_scale_brings_a_collections_median_to_the_middle_of_the_range(monkeypatch):
    "One factor from the median of up to n images' median diameters (evenly spread, unreadable ones passed over), to the geometric middle of `diameters`."
    seg = Segmenter(ThresholdNet(), model_config(), tta=False, device='cpu', min_size=5)
    small = [fake_image(grid_label((96, 128), radius=5, seed=i), seed=i) for i in range(3)]    # 10 pixels across: ThresholdNet finds them exactly
    mid = float(np.sqrt(DSB_DIAMETERS[0]*DSB_DIAMETERS[1]))
    assert seg.measure_scale(small) == pytest.approx(mid/nucleus_diameter(grid_label((96, 128), radius=5)))
    assert seg.measure_scale([b'broken'] + small) == seg.measure_scale(small)               # passed over
    assert seg.measure_scale([fake_image(grid_label((96, 128), radius=9), seed=1)]) == 1.0  # 18 px: near the middle, left alone
    own = Segmenter(ThresholdNet(), model_config(diameters=[5.0, 20.0]), tta=False, device='cpu', min_size=5)
    assert own.measure_scale(small) == 1.0                                                    # the model's own range: 10 px is its middle
    seen = []
    monkeypatch.setattr(Segmenter, '_segment_at', lambda self, a, st, f: seen.append((a.shape, f)) or np.zeros(a.shape[:2], np.uint16))
    imgs = [np.full((8+i, 8, 3), 255, np.uint8) for i in range(40)]
    assert seg.measure_scale(imgs, n=5) == 1.0                                               # no nuclei: left alone
    assert [s[0][0] for s in seen] == [8, 18, 28, 37, 47] and {s[1] for s in seen} == {1.0}  # 5 of 40, evenly spread, at their own size


@pytest.mark.parametrize('scale', ['auto', 0.6])
def test_segment_many_equals_segment_with_scale(random_model, scale):
    seg = load_segmenter(random_model, device='cpu', tta=False, bs=2, tile=96, overlap=32, scale=scale)
    rng = np.random.default_rng(8)
    shapes = [(64, 64), (64, 96), (64, 64), (200, 140)]
    imgs = [fake_image(random_label(s, 5, rng), seed=i) for i, s in enumerate(shapes)]
    imgs.append(fake_image(disks((120, 120), [(60, 60)], [45]), seed=9))   # one large nucleus: 'auto' shrinks it
    singles = [(seg.segment(a), seg.last_scale) for a in imgs]
    for (a, f), b in zip(singles, seg.segment_many(imgs)):
        np.testing.assert_array_equal(a, b); assert seg.last_scale == f   # `last_scale` follows each image yielded
    fs = [f for _, f in singles]
    assert fs == [scale]*len(imgs) if scale != 'auto' else all(f == 1 or 1/4 <= f <= 1/AUTO_MIN_CHANGE or AUTO_MIN_CHANGE <= f <= 4 for f in fs), fs


@pytest.mark.parametrize('bad', [0, 1/9, 9, 'big', None, '2x'])
def test_scale_errors(bad):
    with pytest.raises(ValueError, match="scale must be 'auto' or a number"): Segmenter(ThresholdNet(), model_config(), device='cpu', scale=bad)

def test_bf16_is_opt_in_on_a_cpu_and_close_to_float32():
    "bfloat16 on a GPU by default, on a CPU when asked; the bundled model's probabilities stay close to float32's."
    img = fake_image(random_label((128, 128), 8, np.random.default_rng(7)), seed=7)
    f32, b16 = load_segmenter(device='cpu'), load_segmenter(device='cpu', bf16=True)
    assert not f32.bf16 and b16.bf16
    p32, p16 = f32.predict_probs(img), b16.predict_probs(img)
    assert not np.array_equal(p32, p16)                    # bfloat16 arithmetic did run
    assert np.abs(p32 - p16).mean() < 1e-3 and np.abs(p32 - p16).max() < 0.05
    assert abs(int(f32.segment(img).max()) - int(b16.segment(img).max())) <= 1   # the same nuclei, give or take one


def test_classical_segmenter_contract():
    lbl = grid_label((96, 128))
    img = fake_image(lbl, 'brightfield', seed=3)
    cs = ClassicalSegmenter()
    p = cs.predict_probs(img)
    assert p.shape == (3, 96, 128) and np.allclose(p.sum(0), 1, atol=1e-5)
    out = cs.segment(img)
    assert out.dtype == np.uint16 and dsb_score(lbl, out) > 0.8   # easy, well separated nuclei
    assert [o.shape for o in cs.segment_many([img, img[:50]])] == [(96, 128), (50, 128)]


def test_errors():
    seg = Segmenter(ThresholdNet(), model_config(), device='cpu')
    with pytest.raises(DSBDataError, match='cannot decode'): seg.segment(b'garbage')
    with pytest.raises(DSBDataError, match='unsupported image shape'): seg.segment(np.zeros((0, 4), np.uint8))


# ---------- folders ----------
def test_image_items_sources(fake, tmp_path):
    split = fake.test.image[0].parent.parent
    assert list(image_items(split).image_id) == list(fake.test.image_id)           # prepared split (index.csv)
    assert sorted(image_items(split/'images').image_id) == sorted(fake.test.image_id)   # folder of images
    fake.test.iloc[:2].to_csv(tmp_path/'idx.csv', index=False)
    assert list(image_items(tmp_path/'idx.csv').image_id) == list(fake.test.image_id[:2])
    assert list(image_items([fake.test.image[1]]).image_id) == [fake.test.image_id[1]]
    assert list(image_items(fake.test.image[2]).image_id) == [fake.test.image_id[2]]
    with zipfile.ZipFile(fake.path/'stage1_train.zip') as z: z.extractall(tmp_path/'kaggle')
    assert len(image_items(tmp_path/'kaggle')) == len(fake.train)                   # masks/ are not images
    with pytest.raises(FileNotFoundError): image_items(tmp_path/'nope')
    (tmp_path/'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no images'): image_items(tmp_path/'empty')


def test_segment_folder_outputs_and_skips(tmp_path):
    src = tmp_path/'src'; src.mkdir()
    labels = {f'img{i}': grid_label((96, 128), seed=i) for i in range(3)}
    for k, l in labels.items(): save_image(fake_image(l, seed=7), src/f'{k}.png')
    (src/'truncated.png').write_bytes((src/'img0.png').read_bytes()[:300])
    (src/'empty.tif').write_bytes(b'')
    seg = Segmenter(ThresholdNet(), model_config(), tta=True, device='cpu', min_size=15)
    said = []
    res = segment_folder(seg, src, tmp_path/'out', submission=tmp_path/'out'/'sub.csv',
                         report=lambda i, m: said.append(m), show_progress=False)
    assert res.status.value_counts().to_dict() == {'ok': 3, 'failed': 2}
    assert sorted(p.name for p in (tmp_path/'out').iterdir()) == ['failures.csv', 'labels', 'nuclei', 'overlays', 'sub.csv']
    assert set(pd.read_csv(tmp_path/'out'/'failures.csv').image_id) == {'truncated', 'empty'}
    assert len(said) == 2 and all('skipped' in m for m in said)
    for k, l in labels.items():
        out = read_label(tmp_path/'out'/'labels'/f'{k}.png')
        assert dsb_score(l, out) == 1.0
        t = pd.read_csv(tmp_path/'out'/'nuclei'/f'{k}.csv')
        assert list(t.area) == list(np.bincount(out.ravel())[1:])
        assert read_image(tmp_path/'out'/'overlays'/f'{k}.png').shape == (96, 128, 3)
    assert res.set_index('image_id').loc[list(labels), 'n_nuclei'].tolist() == [int(l.max()) for l in labels.values()]
    assert validate_submission(tmp_path/'out'/'sub.csv', {k: l.shape for k, l in labels.items()}) == \
        dict(n_images=3, n_nuclei=sum(int(l.max()) for l in labels.values()))



def test_segment_folder_and_evaluate_record_each_images_scale(tmp_path):
    "With scale='auto' the tables give the factor each image was segmented at: 1 for DSB-sized nuclei, less for large ones."
    src = tmp_path/'src'; src.mkdir()
    lbls = {'grid': grid_label((96, 128)), 'big': disks((300, 300), [(80, 80), (80, 220), (220, 150)], [40, 40, 40])}
    for k, l in lbls.items(): save_image(fake_image(l, seed=5), src/f'{k}.png')
    seg = Segmenter(ThresholdNet(), model_config(), tta=False, device='cpu', scale='auto')
    want = {}
    for k in lbls: seg.segment(src/f'{k}.png'); want[k] = seg.last_scale
    assert want['grid'] == 1.0 and want['big'] < 0.5
    res = segment_folder(seg, src, show_progress=False)
    assert res.set_index('image_id').scale.to_dict() == want
    items = pd.DataFrame(dict(image_id=list(lbls), image=[src/f'{k}.png' for k in lbls]))
    for k, l in lbls.items(): save_label(l, tmp_path/f'{k}_label.png')
    _, table = evaluate_model(seg, items.assign(label=[tmp_path/f'{k}_label.png' for k in lbls]), show_progress=False)
    assert table.set_index('image_id').scale.to_dict() == want
    _, oracle = evaluate_model(Oracle({src/f'{k}.png': l for k, l in lbls.items()}), items.assign(label=[tmp_path/f'{k}_label.png' for k in lbls]), show_progress=False)
    assert oracle.scale.isna().all()   # a segmenter without a scale has none to report

# ---------- evaluation ----------
class Oracle:
    "Knows the true labels: returns them (right by construction), or them with nucleus 1 dropped and a false one added."
    def __init__(self, truths:dict, wrong=False): self.truths, self.wrong = {read_image(k).tobytes(): v for k, v in truths.items()}, wrong
    def segment(self, img):
        y = self.truths[img.tobytes()].copy()
        if self.wrong:
            y[y == 1] = 0
            ys, xs = np.nonzero(y == 0)
            y[ys[0], xs[0]] = y.max() + 1   # a one-pixel nucleus on the background
        return y


def test_evaluation_right_and_wrong_by_construction(fake):
    "The right segmenter scores 1.0; the wrong one TP = n-1, FP = 1, FN = 1 on every image: (n-1)/(n+1) each."
    truths = {r.image: read_label(r.label) for r in fake.train.itertuples()}
    score, df = evaluate_model(Oracle(truths), fake.train, show_progress=False)
    assert score == 1.0 and (df.n_true == df.n_pred).all() and (df.tp == df.n_true).all()
    assert list(df.modality) == list(fake.train.modality)
    score, df = evaluate_model(Oracle(truths, wrong=True), fake.train, show_progress=False)
    n = np.array([int(l.max()) for l in truths.values()])
    np.testing.assert_allclose(df.dsb, (n-1)/(n+1))
    assert score == pytest.approx(np.mean((n-1)/(n+1)))
    assert (df.tp == n-1).all() and (df.n_pred == n).all()


def test_evaluation_sources_agree(tmp_path):
    """A segmenter right by construction (`ThresholdNet`, through the whole `Segmenter` path with TTA) scores 1.0 on a
    Kaggle-layout folder (masks merged), on an index CSV, and on images plus a solution CSV."""
    kaggle, rows = tmp_path/'kaggle', []
    for i, mod in enumerate(['fluorescence', 'fluorescence', 'fluorescence']):
        lbl = grid_label((96, 128), seed=10+i); iid = f'k{i}'
        (kaggle/iid/'images').mkdir(parents=True); (kaggle/iid/'masks').mkdir()
        save_image(fake_image(lbl, seed=i), kaggle/iid/'images'/f'{iid}.png')
        for k in range(1, int(lbl.max())+1): (kaggle/iid/'masks'/f'{k}.png').write_bytes(png(((lbl == k)*255).astype(np.uint8)))
        rows.append(dict(image_id=iid, image=f'kaggle/{iid}/images/{iid}.png', height=96, width=128, label=lbl))
    seg = Segmenter(ThresholdNet(), model_config(), tta=True, device='cpu', min_size=15)
    assert evaluate_model(seg, kaggle, show_progress=False)[0] == 1.0
    sol = write_submission({r['image_id']: r['label'] for r in rows}, tmp_path/'solution.csv')
    pd.read_csv(sol).merge(pd.DataFrame(rows)[['image_id', 'height', 'width']].set_axis(['ImageId', 'Height', 'Width'], axis=1)).to_csv(sol, index=False)
    (tmp_path/'flat').mkdir()   # the images alone, no masks beside them
    for r in rows: shutil.copy(tmp_path/r['image'], tmp_path/'flat'/f"{r['image_id']}.png")
    pd.DataFrame(rows).assign(image=lambda d: 'flat/' + d.image_id + '.png')[['image_id', 'image']].to_csv(tmp_path/'images.csv', index=False)
    assert evaluate_model(seg, tmp_path/'images.csv', solution=sol, show_progress=False)[0] == 1.0
    # and the sources give the same labels: an empty segmenter scores 0 on each
    class Empty:
        def segment(self, img): return np.zeros(img.shape[:2], np.uint16)
    for src, kw in [(kaggle, {}), (tmp_path/'images.csv', dict(solution=sol))]:
        s, df = evaluate_model(Empty(), src, show_progress=False, **kw)
        assert s == 0.0 and df.n_true.tolist() == [int(r['label'].max()) for r in rows]
    with pytest.raises(DSBDataError, match='no label file or Kaggle masks'): evaluate_model(seg, tmp_path/'images.csv', show_progress=False)


def test_evaluation_skips_unreadable(fake, tmp_path):
    items = fake.train.iloc[:2].copy()
    (tmp_path/'bad.png').write_bytes(b'nope')
    items = pd.concat([items, pd.DataFrame([dict(image_id='bad', image=tmp_path/'bad.png', label=items.label.iloc[0], modality='fluorescence')])])
    truths = {r.image: read_label(r.label) for r in fake.train.iloc[:2].itertuples()}
    with pytest.warns(SkippedImageWarning, match='bad.png'):
        score, df = evaluate_model(Oracle(truths), items, show_progress=False)
    assert score == 1.0 and len(df) == 2 and [f['image_id'] for f in df.attrs['failed']] == ['bad']


def test_modality_scores_and_test_mix(fake, monkeypatch):
    df = pd.DataFrame(dict(modality=['fluorescence', 'fluorescence', 'histology'], dsb=[1.0, 0.5, 0.0]))
    res = modality_scores(df, dict(fluorescence=0.75, histology=0.25, brightfield=0.1))
    assert res.dsb.to_dict() == pytest.approx({'fluorescence': 0.75, 'histology': 0.0, 'all': 0.5,
                                               'test mix': (0.75*0.75 + 0.0*0.25)/(0.75+0.25)})   # no brightfield image: weight dropped
    assert res.n_images.to_dict() == {'fluorescence': 2, 'histology': 1, 'all': 3, 'test mix': 3}
    assert 'test mix' not in modality_scores(df).index
    assert modality_mix(fake.path, fake.cache) == pytest.approx({m: 1/3 for m in ('fluorescence', 'histology', 'brightfield')})


# ---------- tuning ----------
def _soft_probs(lbl, interior=0.55):
    "Probabilities of separated nuclei whose interior class has probability `interior` (background: the rest)."
    from nucleus_seg.data import instance_target
    t = instance_target(lbl)
    p = np.zeros((3, *lbl.shape), np.float32)
    p[0][t == 0] = 1
    p[1][t == 1], p[2][t == 1] = interior, 1-interior
    p[2][t == 2] = 1
    return p


def touching_pairs(shape=(96, 128), seed=0) -> np.ndarray:
    "Four pairs of touching disks (radius 7, centres 14 apart): told apart only by their interiors (watershed markers)."
    rng = np.random.default_rng(seed)
    pairs = [(y + int(rng.integers(-4, 5)), x + int(rng.integers(-4, 5))) for y in (24, 68) for x in (24, 80)]
    return disks(shape, [c for y, x in pairs for c in [(y, x), (y, x+14)]], [7]*8)


def test_tune_thresholds_finds_the_working_setting():
    """Touching nuclei whose interiors have probability 0.55: with an interior threshold of 0.6 or more there are no
    markers and each pair comes out as one nucleus; the search must settle at or below 0.5 (score 1)."""
    truths = [touching_pairs(seed=s) for s in range(2)]
    probs = [_soft_probs(t) for t in truths]
    start = dict(fg_thresh=0.5, interior_thresh=0.7, min_size=15, fill_holes=True)
    best, table = tune_thresholds(probs, truths, start=start, grid=dict(interior_thresh=[0.3, 0.5, 0.7, 0.8]),
                                  n_workers=0, show_progress=False)
    assert best['interior_thresh'] in (0.3, 0.5)
    # a merged pair overlaps each of its nuclei with IoU about 0.5: matched, at best, at the 0.5 threshold only, with
    # TP 4, FP 0, FN 4 there (0.5) and 0 above: at most 0.5/10
    assert table.dsb.iloc[0] == 1.0 and table.set_index('interior_thresh').dsb[0.7] <= 0.05 + 1e-12


def test_tune_thresholds_keeps_a_compared_setting_that_beats_the_search():
    """The search moves the parameters of its grid only: from an interior threshold that finds no markers, a grid over
    `min_size` cannot recover; the defaults passed in `also` score 1 and must be the result."""
    truths = [touching_pairs(seed=s) for s in range(2)]
    probs = [_soft_probs(t) for t in truths]
    start = dict(fg_thresh=0.5, interior_thresh=0.7, min_size=15, fill_holes=True)
    good = {**start, 'interior_thresh': 0.5}
    best, table = tune_thresholds(probs, truths, start=start, grid=dict(min_size=[10, 15]), also=[good], n_workers=0, show_progress=False)
    assert best == good and table.dsb.iloc[0] == 1.0
    assert tune_thresholds(probs, truths, start=start, grid=dict(min_size=[10, 15]), n_workers=0, show_progress=False)[0]['interior_thresh'] == 0.7


def test_tune_model_writes_thresholds_and_scores(tiny_run, fake, tmp_path, monkeypatch):
    monkeypatch.setenv('NUCLEUS_SEG_DATA', str(fake.path)); monkeypatch.setenv('NUCLEUS_SEG_CACHE', str(fake.cache))
    _, run = tiny_run
    fn = tmp_path/'m.safetensors'; shutil.copy(run/'model.safetensors', fn)
    sd0, cfg0 = read_model(fn)
    cfg = tune_model(fn, fake.train.iloc[:4], grid=dict(interior_thresh=[0.4, 0.5, 0.6], min_size=[10, 15]), n_workers=0,
                     show_progress=False, device='cpu')
    sd, on_disk = read_model(fn)
    assert on_disk == cfg and all(torch.equal(sd[k], sd0[k]) for k in sd0)   # thresholds and scores written, weights kept
    s = cfg['scores']
    assert s['n_valid'] == 4 and s['valid_dsb'] >= max(s['before_tuning_dsb'], s['default_thresholds_dsb']) - 1e-9
    assert s['test_mix'] == pytest.approx({m: 1/3 for m in ('fluorescence', 'histology', 'brightfield')})
    assert cfg['postprocess']['interior_thresh'] in (0.4, 0.5, 0.6) and cfg['tuning']['tried'] >= 4
    seg = load_segmenter(fn, device='cpu')
    per = [dsb_score(read_label(r.label), seg.segment(r.image)) for r in fake.train.iloc[:4].itertuples()]
    assert s['valid_dsb'] == pytest.approx(np.mean(per), abs=1e-3)   # the score written is the tuned model's score


# ---------- real data ----------
def test_real_evaluation_sources_agree(train_df, dsb_data, tmp_path):
    "On real images: the cached labels, the Kaggle masks merged from the zip and a solution CSV give the same scores."
    rows = train_df[train_df.height <= 360].groupby('modality').head(1)
    seg = ClassicalSegmenter()
    score, df = evaluate_model(seg, rows, show_progress=False)
    with zipfile.ZipFile(dsb_data/'stage1_train.zip') as z:
        z.extractall(tmp_path/'kaggle', [n for n in z.namelist() if n.split('/')[0] in set(rows.image_id)])
    assert evaluate_model(seg, tmp_path/'kaggle', show_progress=False)[0] == pytest.approx(score)
    sol = write_submission({r.image_id: read_label(r.label) for r in rows.itertuples()}, tmp_path/'solution.csv')
    pd.read_csv(sol).merge(rows[['image_id', 'height', 'width']].set_axis(['ImageId', 'Height', 'Width'], axis=1)).to_csv(sol, index=False)
    assert evaluate_model(seg, rows[['image_id', 'image']], solution=sol, show_progress=False)[0] == pytest.approx(score)
    truths = {r.image: read_label(r.label) for r in rows.itertuples()}
    assert evaluate_model(Oracle(truths), rows, show_progress=False)[0] == 1.0
