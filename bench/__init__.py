"""Training-step benchmark of flax_resnet against torch_ref (eager and torch.compile).

Entry point: ``python -m bench`` (or ``python bench/run.py``); see ``bench/run.py``.
``bench/time_to_accuracy.py`` times ``train.py`` to a test accuracy; ``bench/gpu_run.sh``
is the one-shot GPU run.
"""
