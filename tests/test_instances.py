"""Tests of `nucleus_seg.instances` (02_instances): clean-up, connected components, watershed, probabilities to
instances, targets back to instances, outlines. Hand-made label images whose answer is known; one real-data check."""
import subprocess, sys

import numpy as np, pytest
from skimage.segmentation import find_boundaries

from nucleus_seg.instances import *
from nucleus_seg.data import instance_target, TARGET_CODES
from nucleus_seg.metrics import dsb_score
from synthetic import disks


def one_hot(lbl, kind='classes3'):
    "Probabilities of a perfectly confident network: one-hot of `instance_target(lbl, kind)`, (C,H,W)."
    return np.eye(len(TARGET_CODES[kind]), dtype=np.float32)[instance_target(lbl, kind)].transpose(2, 0, 1)


def same_partition(a, b) -> bool:
    "Whether two label images split the pixels into the same nuclei (ids may differ)."
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b)) and ((pairs[0] == 0) == (pairs[1] == 0)).all()


TOUCHING = disks((40, 60), [(20, 15), (20, 29), (20, 45)], [7, 7, 6])   # three nuclei in a row, the first two touching


def test_remove_small_instances_renumbers():
    lbl = np.array([[0, 5, 5, 5], [9, 0, 2, 2], [9, 9, 0, 0]])
    out = remove_small_instances(lbl, min_size=3)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [[0, 1, 1, 1], [2, 0, 0, 0], [2, 2, 0, 0]])   # 2 (2 px) gone; 5, 9 -> 1, 2


def test_fill_instance_holes():
    lbl = np.zeros((9, 12), np.uint16)
    lbl[1:8, 1:6] = 1; lbl[4, 3] = 0                       # a hole inside nucleus 1
    lbl[1:8, 6:11] = 2; lbl[3:6, 5:7] = 0                   # a hole between nuclei 1 and 2
    out = fill_instance_holes(lbl)
    assert out[4, 3] == 1 and (out[3:6, 5:7] == 0).all()     # only holes inside one nucleus are filled
    np.testing.assert_array_equal(fill_instance_holes(np.zeros((3, 3), np.uint8)), 0)


def test_label_components_four_connected():
    m = np.zeros((8, 8), bool); m[0:3, 0:3] = True; m[3:6, 3:6] = True   # touching at a corner only
    out = label_components(m, min_size=1)
    assert out.max() == 2 and out[0, 0] != out[4, 4]
    assert label_components(m, min_size=10).max() == 0
    ring = np.zeros((7, 7), bool); ring[1:6, 1:6] = True; ring[3, 3] = False
    assert label_components(ring, min_size=1)[3, 3] == 1 and label_components(ring, 1, fill_holes=False)[3, 3] == 0


def test_watershed_separates_by_markers_and_keeps_orphans():
    fg = TOUCHING > 0
    markers = np.zeros_like(fg); markers[20, 15] = markers[20, 29] = True   # no marker in the third nucleus
    out = watershed_instances(markers, fg, min_size=1)
    assert out.max() == 3 and out[20, 15] != out[20, 29] and out[20, 45] > 0   # the unmarked one becomes its own
    assert dsb_score(TOUCHING, label_components(fg, min_size=1)) < dsb_score(TOUCHING, out)


def test_perfect_classes3_probabilities_recover_touching_nuclei():
    out = probs_to_instances(one_hot(TOUCHING))
    assert out.dtype == np.uint16 and same_partition(out, TOUCHING) and dsb_score(TOUCHING, out) == 1.0
    merged = probs_to_instances(one_hot(TOUCHING, 'binary'))   # two classes: components, the touching pair merges
    # the third nucleus matches at every threshold; the merged blob overlaps the pair's larger nucleus with
    # IoU = a2/(a1+a2) (just above 0.5): TP = 1 + (IoU > t) of 3 true and 2 predicted, so TP/(5-TP) at threshold t
    a1, a2 = sorted([(TOUCHING == 1).sum(), (TOUCHING == 2).sum()])
    tp = 1 + (a2/(a1+a2) > np.round(np.arange(0.5, 0.96, 0.05), 2))
    assert merged.max() == 2 and dsb_score(TOUCHING, merged) == pytest.approx(np.mean(tp/(5-tp)))
    split = probs_to_instances(one_hot(TOUCHING, 'binary'), method='watershed', min_distance=4)   # distance peaks
    assert split.max() == 3 and dsb_score(TOUCHING, split) > 0.8


def test_probs_thresholds_are_strict_and_min_size_applies():
    p = one_hot(TOUCHING)*0.0
    p[0] = 1.0; fg = TOUCHING > 0
    p[0][fg], p[1][fg] = 0.5, 0.5   # foreground probability exactly 0.5: not above fg_thresh 0.5
    assert probs_to_instances(p).max() == 0
    assert probs_to_instances(p, fg_thresh=0.49, interior_thresh=0.49).max() >= 1
    small = disks((30, 30), [(8, 8), (20, 20)], [1, 5])   # 5 and 81 pixels
    assert probs_to_instances(one_hot(small), min_size=15).max() == 1 and probs_to_instances(one_hot(small), min_size=1).max() == 2


def test_outer_boundary_ring_is_dropped():
    "With `outer_boundary`, the boundary class is a ring outside each nucleus: the instances shrink back to the nuclei."
    from skimage.segmentation import expand_labels
    grown = expand_labels(TOUCHING, 1)
    p = np.zeros((3, *TOUCHING.shape), np.float32)
    p[0][grown == 0] = 1; p[1][TOUCHING > 0] = 1; p[2][(grown > 0) & (TOUCHING == 0)] = 1
    assert dsb_score(TOUCHING, probs_to_instances(p, outer_boundary=True)) > dsb_score(TOUCHING, probs_to_instances(p))


def test_probs_errors():
    with pytest.raises(ValueError, match='C=2 or 3'): probs_to_instances(np.zeros((4, 5, 5)))
    with pytest.raises(ValueError, match='C=2 or 3'): probs_to_instances(np.zeros((5, 5)))
    with pytest.raises(ValueError, match='unknown method'): probs_to_instances(one_hot(TOUCHING), method='magic')


def test_target_to_instances_touching_and_tiny():
    lbl = np.zeros((20, 30), np.uint16)
    lbl[2:10, 2:10] = 1; lbl[2:10, 10:18] = 2   # two touching squares
    lbl[15:17, 25:27] = 3                        # a 2x2 nucleus: boundary only
    rec = target_to_instances(instance_target(lbl))
    assert rec.max() == 3 and dsb_score(lbl, rec) == 1.0
    assert target_to_instances(instance_target(lbl), min_size=5).max() == 2
    assert same_partition(target_to_instances(instance_target(TOUCHING)), TOUCHING)


def test_target_to_instances_on_real_labels(train_df):
    "Real nuclei come back from their targets almost exactly (the ceiling a perfect network could reach)."
    from nucleus_seg.io import read_label
    rows = train_df.groupby('modality').head(4)
    scores = [dsb_score(l, target_to_instances(instance_target(l))) for l in map(read_label, rows.label)]
    assert np.mean(scores) > 0.95
    assert np.mean([dsb_score(l, probs_to_instances(one_hot(l))) for l in map(read_label, rows.label)]) > 0.95


def test_nucleus_diameter_is_the_median_disc_diameter():
    lbl = disks((200, 200), [(30, 30), (30, 120), (120, 60)], [5, 10, 30])
    areas = np.bincount(lbl.ravel())[1:]
    assert nucleus_diameter(lbl) == pytest.approx(np.sqrt(4*areas[1]/np.pi))   # the middle disc's
    assert nucleus_diameter(lbl) == pytest.approx(20, abs=0.5)
    assert np.isnan(nucleus_diameter(np.zeros((5, 5), np.uint16)))


def test_resize_labels_keeps_ids_and_round_trips():
    lbl = disks((60, 80), [(20, 20), (40, 55)], [8, 12]).astype(np.uint16); lbl[lbl == 2] = 700
    big = resize_labels(lbl, (180, 240))
    assert big.dtype == lbl.dtype and set(np.unique(big)) == {0, 1, 700}
    np.testing.assert_array_equal(big[1::3, 1::3], lbl)                 # every block of 3x3 is its source pixel
    np.testing.assert_array_equal(resize_labels(big, lbl.shape), lbl)   # and back, exactly
    assert resize_labels(lbl, (7, 9)).shape == (7, 9)
    assert set(np.unique(resize_labels(lbl, (31, 41)))) <= {0, 1, 700}

def test_outline_overlay():
    img = np.full((40, 60), 100, np.uint8)
    out = outline_overlay(img, TOUCHING, color=(255, 0, 0))
    edge = find_boundaries(TOUCHING, mode='inner')
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert (out[edge] == (255, 0, 0)).all() and (out[~edge] == 100).all()
    with pytest.raises(ValueError, match='does not match'): outline_overlay(img, TOUCHING[:10])


def test_instances_module_does_not_import_torch():
    code = "import sys, nucleus_seg.instances, nucleus_seg.metrics, nucleus_seg.rle; print('torch' in sys.modules or 'fastai' in sys.modules)"
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip() == 'False'
