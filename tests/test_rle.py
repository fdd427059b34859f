"""Tests of `nucleus_seg.rle` (04_rle): run-length encoding against a plain loop encoder, round trips, and strict
submission/solution CSV checks naming the row."""
import csv, tempfile, warnings
from pathlib import Path
import numpy as np, pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from nucleus_seg.rle import (rle_encode, rle_decode, label_to_rles, write_submission, rle_csv, read_submission,
                             validate_submission, read_solution, SubmissionError)

def ref_encode(mask):
    "Plain loop encoder: walk the pixels column by column, 1-based."
    flat, runs, start = [bool(v) for v in np.asarray(mask).T.ravel()], [], None
    for i,v in enumerate(flat + [False]):
        if v and start is None: start = i
        if not v and start is not None: runs += [start+1, i-start]; start = None
    return ' '.join(map(str, runs))

odd_shapes = st.tuples(st.integers(1, 37), st.integers(1, 29))
masks = odd_shapes.flatmap(lambda s: arrays(bool, s, elements=st.booleans()))

@settings(max_examples=300, deadline=None)
@given(masks)
def test_rle_round_trip(mask):
    rle = rle_encode(mask)
    assert rle == ref_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, mask.shape), mask)

@settings(max_examples=100, deadline=None)
@given(odd_shapes.flatmap(lambda s: arrays(np.uint16, s, elements=st.integers(0, 9))))
def test_label_to_rles_matches_per_label_encoding(label):
    ids = [i for i in np.unique(label) if i]
    assert label_to_rles(label) == [rle_encode(label==i) for i in ids]

@settings(max_examples=50, deadline=None)
@given(st.lists(odd_shapes.flatmap(lambda s: arrays(np.uint16, s, elements=st.integers(0, 4))), min_size=1, max_size=4))
def test_submission_round_trip(labels):
    preds = {f'img{i}': l for i,l in enumerate(labels)}
    shapes = {k: v.shape for k,v in preds.items()}
    with tempfile.TemporaryDirectory() as d:
        fn = write_submission(preds, Path(d)/'sub.csv')
        back = read_submission(fn, shapes)
        rows = list(csv.reader(open(fn)))
    assert rows[0] == ['ImageId', 'EncodedPixels']
    assert {r[0] for r in rows[1:]} == set(preds)          # every image listed, empty ones included
    for k,l in preds.items():
        # same partition of pixels into nuclei (ids are renumbered in row order)
        ids = [i for i in np.unique(l) if i]
        assert back[k].max() == len(ids)
        for new,old in enumerate(ids, 1): np.testing.assert_array_equal(back[k]==new, l==old)

def test_known_encodings():
    m = np.array([[0,0,1,0],[1,0,1,0],[1,0,1,0]])
    assert rle_encode(m) == '2 2 7 3'
    assert rle_encode(np.zeros((2,2))) == ''
    assert rle_decode(float('nan'), (2,2)).sum() == 0
    with pytest.raises(ValueError): rle_encode(np.zeros((2,2,2)))

@pytest.mark.parametrize('rle,msg', [('7 3 2 2', 'out of order'), ('2 3 3 2', 'overlapping'), ('11 3', 'past the image'),
                                     ('2 2 7', 'odd number'), ('0 2', 'below 1'), ('2 0', 'below 1'), ('2 x', 'non-integer')])
def test_decode_rejects(rle, msg):
    with pytest.raises(SubmissionError, match=msg): rle_decode(rle, (3,4))

def _csv(tmp_path, *rows, header='ImageId,EncodedPixels'):
    fn = tmp_path/'f.csv'; fn.write_text('\n'.join([header, *rows]) + '\n'); return fn

SHAPES = {'a': (3,4), 'b': (3,4)}

@pytest.mark.parametrize('rows,msg', [
    (('a,2 2', 'a,3 2', 'b,'), "line 3, image 'a': nucleus overlaps the one on line 2"),
    (('a,7 3 2 2', 'b,'), "line 2, image 'a': runs '7 3' and '2 2' are out of order"),
    (('a,1 1', 'b,1 20'), "line 3, image 'b': run '1 20' ends at pixel 20"),
    (('a,1 1', 'b,1 x'), "line 3, image 'b': run-length encoding has a non-integer"),
    (('a,1 1', 'b,1 1 3'), "line 3, image 'b': run-length encoding has an odd number"),
    (('a,1 1',), "no row, e.g. 'b'"),
    (('c,1 1', 'a,', 'b,'), "line 2, image 'c': unknown image id"),
    (('a,1 1,9', 'b,'), "line 2, image 'a': expected 2 fields"),
])
def test_validator_names_the_row(tmp_path, rows, msg):
    with pytest.raises(SubmissionError, match=msg): validate_submission(_csv(tmp_path, *rows), SHAPES)

def test_validator_header_and_table_shapes(tmp_path):
    with pytest.raises(SubmissionError, match='missing column'):
        validate_submission(_csv(tmp_path, 'a,1 1', header='Id,Pixels'), SHAPES)
    import pandas as pd
    idx = pd.DataFrame(dict(image_id=['a','b'], height=[3,3], width=[4,4]))
    assert validate_submission(_csv(tmp_path, 'a,1 1 5 2', 'a,', 'b,12 1'), idx) == dict(n_images=2, n_nuclei=2)

def test_read_solution(tmp_path):
    fn = _csv(tmp_path, 'a,1 2,3,4,Public', 'a,10 3,3,4,Public', 'b,,2,2,Private',
              header='ImageId,EncodedPixels,Height,Width,Usage')
    sol = read_solution(fn)
    assert sol['a'].shape == (3,4) and sol['b'].shape == (2,2) and sol['b'].max() == 0
    assert sol['a'].T.ravel().tolist() == [1,1,0,0,0,0,0,0,0,2,2,2]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        sol = read_solution(_csv(tmp_path, 'a,1 3,3,4', 'a,3 2,3,4', header='ImageId,EncodedPixels,Height,Width'))
    assert len(w) == 1 and 'line 3' in str(w[0].message)
    assert sol['a'].T.ravel()[:5].tolist() == [1,1,1,2,0]
    with pytest.raises(SubmissionError, match='missing column'): read_solution(_csv(tmp_path, 'a,1 1'))
    with pytest.raises(SubmissionError, match='line 2.*not integers'):
        read_solution(_csv(tmp_path, 'a,1 1,x,4', header='ImageId,EncodedPixels,Height,Width'))

def test_write_submission_rejects_non_labels(tmp_path):
    with pytest.raises(ValueError, match='img'): write_submission({'img': np.zeros((2,2,3), np.uint8)}, tmp_path/'s.csv')
    with pytest.raises(ValueError, match='img'): write_submission({'img': np.zeros((2,2))}, tmp_path/'s.csv')
    assert not list(tmp_path.iterdir())   # no file, no temporary file left

def test_rle_csv():
    lbl = np.array([[0,2,2],[0,0,2],[1,0,0]], np.uint16)   # column-major pixels 1..9: nucleus 1 is pixel 3, nucleus 2 is 4, 7, 8
    assert rle_csv(lbl, 'x') == 'ImageId,EncodedPixels\nx,3 1\nx,4 1 7 2\n'
    assert rle_csv(np.zeros((4,4), np.uint16), 'e') == 'ImageId,EncodedPixels\ne,\n'
    with pytest.raises(ValueError, match='img'): rle_csv(np.zeros((2,2), float), 'img')
