"Everything public in `nucleus_seg`, as `fastai.vision.all` gathers fastai: `from nucleus_seg.all import *`."
