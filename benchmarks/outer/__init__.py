"""Beyond Lookahead: SNOO and DiLoCo, every method tuned alike (``python -m benchmarks.outer``).

- ``snoo``: AdamW, Lookahead(AdamW) and SNOO(AdamW) (a Nesterov outer step on
  the pseudo-gradient) at equal steps, on a character Transformer language
  model and on the translation task.
- ``diloco``: DiLoCo against synchronous data parallelism at equal samples,
  replicas simulated on one device, communication rounds counted from the
  program each replica runs.

Both use the protocol of the paper suite (``common.tuning``): the same number
of tuning settings for every method on the validation split, every setting
over the same seeds, verdicts from Welch's t-test.
"""
