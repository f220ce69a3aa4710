"""Code shared by every benchmark, experiment and notebook.

- ``data``: datasets that ship with the install (digits, Python's own text), batching on host and device.
- ``models``: small Flax NNX models (MLP, ResNet, character LSTM, Transformers).
- ``translation``: the one translation task (English -> German number words) and its metrics.
- ``train``: models as pure functions, losses, the plain one-run training loop.
- ``grid``: a grid of runs (learning rates, alphas, seeds) trained as one compiled program.
- ``tuning``: the protocol of every optimizer comparison: equal tuning budgets, tuned against tuned.
- ``verdicts``: the tables, verdicts and figures of such a comparison.
- ``baselines``: Polyak averaging.
- ``stats``: Welch's t-test and interval, verdicts, learning-rate range widths.
- ``timing``: step timing, compile time apart from run time.
- ``jaxpr``: where a program's collectives sit.
- ``report``: results folders, environment, tables, figures.
"""
