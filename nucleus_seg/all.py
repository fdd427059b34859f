"Everything public in `nucleus_seg`, as `fastai.vision.all` gathers fastai: `from nucleus_seg.all import *`."
from .io import *
from .data import *
from .instances import *
from .metrics import *
from .rle import *
from .learner import *
from .inference import *
from .viewers import *
from .app import *
# `nucleus_seg.cli` stays out: its command names (`train`, `predict`, `main`...) would shadow fastai's and others.
