"""Evaluation protocols on frozen backbones (spec §5).

knn.py (weighted kNN), linear_probe.py (SwAV-setting and multi-head linear probes),
svm.py (VOC07 / low-shot SVM with scikit-learn), svm_jax.py (the same SVMs batched on device),
voc_ap.py (VOC average precision), features.py (taps, reference pooling, sharded extraction),
voc_data.py (VOC2007 from TFDS), jobs.py (the `python -m ssl_jax.main` eval jobs).
Modules are imported explicitly (`from ssl_jax.eval import knn`); nothing heavy loads here.
"""
