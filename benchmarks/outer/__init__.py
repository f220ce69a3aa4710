"""Beyond Lookahead: SNOO, DiLoCo and other alternatives, every method tuned alike (``python -m benchmarks.outer``).

- ``snoo``: AdamW, Lookahead(AdamW) and SNOO(AdamW) (a Nesterov outer step on
  the pseudo-gradient) at equal steps, on a character Transformer language
  model and on the translation task.
- ``diloco``: DiLoCo against synchronous data parallelism at equal samples,
  replicas simulated on one device, communication rounds counted from the
  program each replica runs.
- ``alternatives`` (run only when named): AdamW, Lookahead, SNOO, Schedule-Free
  AdamW and AdamW with an EMA or LAWA average of its weights, each evaluated on
  the weights it hands a user; their cost and compute factor against AdamW.

All use the protocol of the paper suite (``common.tuning``): the same number
of tuning settings for every method on the validation split, every setting
over the same seeds, verdicts from Welch's t-test.
"""
