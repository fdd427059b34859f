"""Synthetic DSB2018-like data for the tests: label images of disks, images of the three modalities drawn from them,
zips in DSB2018's layout, and the small models and configurations the inference tests use. Everything here is
known by construction, so the tests that use it need no download and check values that do not come from the code
under test."""
import io, os, zipfile
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(os.environ.get('NUCLEUS_SEG_DATA') or Path(__file__).resolve().parents[1]/'..'/'shared'/'data'/'dsb2018')
IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
MODALITIES = ('fluorescence', 'histology', 'brightfield')


def in_ci() -> bool:
    "Whether this is a CI run (`CI` set to anything but '', 0, false, no): there a skip is a failure."
    return os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no')


def has_dsb(path=DATA) -> bool:
    "Whether the real DSB2018 training split is at `path`."
    return (Path(path)/'stage1_train.zip').exists() or (Path(path)/'stage1_train').is_dir()


def disks(shape, centres, radii) -> np.ndarray:
    "uint16 label image with disk `i+1` of radius `radii[i]` at `centres[i]`; later disks cover earlier ones."
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    lbl = np.zeros(shape, np.uint16)
    for i, ((cy, cx), r) in enumerate(zip(centres, radii), 1): lbl[(yy-cy)**2 + (xx-cx)**2 <= r*r] = i
    return lbl


def random_label(shape, n, rng, rmin=5, rmax=9) -> np.ndarray:
    "`n` random disks (some touching or overlapping, as real nuclei do), relabelled 1..N in order."
    cs, rs = [], []
    for _ in range(n):
        r = int(rng.integers(rmin, rmax+1))
        cs.append((int(rng.integers(r, shape[0]-r)), int(rng.integers(r, shape[1]-r)))); rs.append(r)
    lbl = disks(shape, cs, rs)
    ids = np.unique(lbl[lbl > 0])
    lut = np.zeros(n+1, np.uint16); lut[ids] = np.arange(1, len(ids)+1)
    return lut[lbl]


def fake_image(lbl, modality='fluorescence', seed=0, gain=1.0) -> np.ndarray:
    """uint8 RGB image of label image `lbl`: bright nuclei on dark (fluorescence), dark on bright (brightfield), or
    purple on pink (histology), with Gaussian noise; `gain` scales a fluorescence image's brightness."""
    rng = np.random.default_rng(seed)
    fg, noise = np.asarray(lbl) > 0, rng.normal(0, 6, np.shape(lbl))
    if modality == 'fluorescence': g = np.where(fg, 170, 15)*gain + noise
    elif modality == 'brightfield': g = np.where(fg, 70, 200) + noise
    else:
        a = np.where(fg[..., None], [90, 50, 140], [235, 190, 215]) + noise[..., None]
        return np.clip(a, 0, 255).astype(np.uint8)
    return np.clip(g, 0, 255).astype(np.uint8)[..., None].repeat(3, -1)


def png(a) -> bytes:
    buf = io.BytesIO(); Image.fromarray(np.asarray(a)).save(buf, 'PNG'); return buf.getvalue()


def fake_dsb(folder, n_train=9, n_test=3, shape=(96, 128), n_nuclei=8, seed=0) -> dict:
    """Write `stage1_train.zip` (images cycling through `MODALITIES`, one mask PNG per nucleus, RGBA images as in
    DSB2018) and `stage1_test.zip` (images only) into `folder`. Returns `{image_id: (modality, label)}` of both."""
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    rng, truth = np.random.default_rng(seed), {}
    for split, n in (('train', n_train), ('test', n_test)):
        with zipfile.ZipFile(folder/f'stage1_{split}.zip', 'w') as z:
            for i in range(n):
                iid, mod = f'{split}{i:02d}', MODALITIES[i % 3]
                lbl = random_label(shape, n_nuclei, rng)
                img = fake_image(lbl, mod, seed=1000*(split == 'test') + i)
                z.writestr(f'{iid}/images/{iid}.png', png(np.dstack([img, np.full(shape, 255, np.uint8)])))
                if split == 'train':
                    for k in range(1, int(lbl.max())+1): z.writestr(f'{iid}/masks/m{k:03d}.png', png(((lbl == k)*255).astype(np.uint8)))
                truth[iid] = (mod, lbl)
    return truth


def model_config(mode='grey', **kw) -> dict:
    """A model file's configuration: input mode and ImageNet statistics (what `nucleus_learner` records), the compact
    U-Net's architecture, and `kw`."""
    return dict(arch='compact', arch_params={'widen': 0.25}, n_out=3, img_size=[256, 256],
                input=dict(mode=mode, mean=IMAGENET_STATS[0], std=IMAGENET_STATS[1])) | kw


def grid_label(shape=(96, 128), radius=7, step=24, jitter=3, seed=0) -> np.ndarray:
    "Disks on a jittered grid, well apart: a thresholded image recovers every one exactly."
    rng = np.random.default_rng(seed)
    cs = [(y + int(rng.integers(-jitter, jitter+1)), x + int(rng.integers(-jitter, jitter+1)))
          for y in range(step//2, shape[0]-radius, step) for x in range(step//2, shape[1]-radius, step)]
    return disks(shape, cs, [radius]*len(cs))


def tiny_dls(fake, input_mode='grey', **kw):
    """`dsb_dataloaders` of a tiny run on the synthetic data (`fake` fixture): 8 images, 64 px crops, batches of 4, the
    default zoom, on the CPU even where there is a GPU (so that comparisons stay in float32)."""
    from nucleus_seg.data import dsb_dataloaders
    return dsb_dataloaders(fake.path, cache=fake.cache, n_items=8, crop=64, bs=4, input_mode=input_mode, zoom=(0.5, 1.5),
                           device='cpu', **kw)


def annotated_folder(rows, dest, label_dir='labels', label_ext='.png'):
    """Write index rows (`image`, `label` files) into `dest` as a user keeps annotated images: `images/<id>.png` and
    `<label_dir>/<id><label_ext>` (16-bit PNG, or a TIFF of int32 labels). Returns `dest`."""
    import tifffile
    from nucleus_seg.io import read_image, read_label, save_image, save_label
    dest = Path(dest)
    for sub in ('images', label_dir): (dest/sub).mkdir(parents=True, exist_ok=True)
    for r in rows.itertuples():
        save_image(read_image(r.image), dest/'images'/f'{r.image_id}.png')
        lbl, fn = read_label(r.label), dest/label_dir/f'{r.image_id}{label_ext}'
        if label_ext == '.png': save_label(lbl, fn)
        else: tifffile.imwrite(fn, lbl.astype(np.int32))
    return dest
