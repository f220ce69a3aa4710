"""Transformer translation, data parallel over every device ``jax.devices()`` offers: Adam vs Lookahead(Adam).

The paper's neural machine translation experiment (section 5.4: a Transformer
trained with Adam under a warmup-then-decay schedule, with and without
Lookahead) at CPU scale: an encoder-decoder Transformer
(``models.Seq2SeqTransformer``) translating English number words into German
ones (``data.number_words``: "twenty one" -> "einundzwanzig").

Data parallel through a ``jax.sharding.Mesh`` over all devices with one axis,
``"data"``: the params (and so the slow weights and optimizer state, which
follow them) are replicated, each batch is split over the devices with a
``NamedSharding``, and ``jax.jit`` inserts the gradient all-reduce. The same
code runs on 1 CPU device, on 8 simulated ones
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and on a TPU slice;
the global batch must divide by the number of devices.

Regenerate ``benchmarks/results/nmt.json`` and ``nmt.md``:

    python -m benchmarks.nmt                       # defaults below, all local devices
    python -m benchmarks.nmt --steps 20 --seeds 1 --dim 16 --layers 1  # a smoke run

Reusable pieces (for the paper experiments): ``make_translation_task``,
``warmup_rsqrt_schedule``, ``optimizers``, ``train_translation``,
``greedy_decode``, ``exact_match``, ``evaluate``.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import data, harness, models
from lookahead_optax import lookahead


class TranslationTask(NamedTuple):
  """The number-word translation task and a freshly initialised model for it."""

  data: data.TranslationData
  graphdef: Any
  """The NNX graph definition of the ``Seq2SeqTransformer`` (``nnx.merge(graphdef, params)``)."""
  params: Any
  """Initial params (an ``nnx.State``)."""

  def model(self, params) -> models.Seq2SeqTransformer:
    return nnx.merge(self.graphdef, params)

  def loss(self, params, batch: data.Split) -> jax.Array:
    """Teacher-forced token cross-entropy; ``batch.x`` source tokens, ``batch.y`` target with BOS/EOS."""
    return translation_loss(self.graphdef, params, batch)


def translation_loss(graphdef, params, batch: data.Split) -> jax.Array:
  logits = nnx.merge(graphdef, params)(batch.x, batch.y[:, :-1])
  labels = batch.y[:, 1:]
  return harness.cross_entropy(logits, labels, labels != data.PAD)


@functools.lru_cache(maxsize=None)
def _jitted_loss(graphdef):
  return jax.jit(functools.partial(translation_loss, graphdef))


def make_translation_task(seed: int = 0, n_train: int = 4000, n_test: int = 500, dim: int = 64, heads: int = 4,
                          layers: int = 2, data_seed: int = 0) -> TranslationTask:
  """Number-word data (fixed by ``data_seed``) and a Transformer initialised from ``seed``."""
  ds = data.number_words(n_train=n_train, n_test=n_test, seed=data_seed)
  max_len = max(ds.train.x.shape[1], ds.train.y.shape[1])
  model = models.Seq2SeqTransformer(len(ds.src_vocab), len(ds.tgt_vocab), dim=dim, heads=heads, layers=layers,
                                    max_len=max_len, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  return TranslationTask(ds, graphdef, params)


def warmup_rsqrt_schedule(peak: float, warmup: int) -> optax.Schedule:
  r"""Vaswani et al.'s warmup-then-decay: :math:`\eta_t = \eta \min(t / w, \sqrt{w / t})`.

  Linear warmup to ``peak`` over ``warmup`` steps, then inverse square root decay.

  >>> s = warmup_rsqrt_schedule(1e-3, 100)
  >>> float(s(50)), float(s(100)), float(s(400))
  (0.0005, 0.001, 0.0005)
  """
  if warmup < 1:
    raise ValueError(f"warmup_rsqrt_schedule: warmup must be an int >= 1, got {warmup!r}.")

  def schedule(count):
    t = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
    return peak * jnp.minimum(t / warmup, jnp.sqrt(warmup / t))

  return schedule


def optimizers(lr: float = 2e-3, warmup: int = 200, k: int = 5, alpha: float = 0.5) -> dict:
  """The two optimizers of the paper's NMT figure, as factories: Adam, and Lookahead around the same Adam."""
  adam = lambda: optax.adam(warmup_rsqrt_schedule(lr, warmup), b1=0.9, b2=0.98, eps=1e-9)
  return {
      "Adam": adam,
      f"Lookahead(Adam, k={k}, alpha={alpha})": lambda: lookahead(adam(), k=k, alpha=alpha),
  }


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh, axis ``"data"``, over ``devices`` (default: all of ``jax.devices()``)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(np.array(devices), ("data",))


def sharded_batches(split: data.Split, batch_size: int, rng: np.random.Generator,
                    mesh: jax.sharding.Mesh) -> Iterator[data.Split]:
  """``data.batches`` placed on ``mesh``: each batch split over ``"data"`` along its first axis."""
  n = mesh.shape["data"]
  if batch_size % n:
    raise ValueError(f"batch_size must be divisible by the number of devices ({n}), got batch_size={batch_size}.")
  sharding = NamedSharding(mesh, P("data"))
  for batch in data.batches(split, batch_size, rng):
    yield data.Split(*jax.device_put((batch.x, batch.y), sharding))


@functools.lru_cache(maxsize=None)
def _decoder(graphdef, length: int):
  @jax.jit
  def decode(params, src):
    model = nnx.merge(graphdef, params)
    memory, mask = model.encode(src)
    tgt = jnp.zeros((src.shape[0], length), jnp.int32).at[:, 0].set(data.BOS)

    def step(i, tgt):
      logits = model.decode(memory, mask, tgt[:, :-1])  # causal: positions > i do not matter
      return tgt.at[:, i + 1].set(jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32))

    return jax.lax.fori_loop(0, length - 1, step, tgt)

  return decode


def greedy_decode(task: TranslationTask, params, src, length: Optional[int] = None) -> jax.Array:
  """Greedy decoding: target tokens ``[batch, length]`` starting with BOS (``length`` defaults to the data's)."""
  return _decoder(task.graphdef, length or task.data.test.y.shape[1])(params, jnp.asarray(src))


def exact_match(pred, target) -> float:
  """Fraction of sequences translated exactly: every token up to and including EOS, nothing after it.

  Tokens ``pred`` emits after its first EOS are ignored; both start with BOS.

  >>> import numpy as np
  >>> exact_match(np.array([[1, 5, 2, 7], [1, 5, 6, 2]]), np.array([[1, 5, 2, 0], [1, 5, 2, 0]]))
  0.5
  """
  pred, target = np.asarray(pred), np.asarray(target)
  if pred.shape != target.shape:
    raise ValueError(f"exact_match: pred and target must have one shape, got {pred.shape} and {target.shape}.")
  after_eos = np.cumsum(pred == data.EOS, axis=1) - (pred == data.EOS) > 0
  pred = np.where(after_eos, data.PAD, pred)
  return float(np.mean(np.all(pred == target, axis=1)))


def evaluate(task: TranslationTask, params, n: int = 500) -> dict:
  """Test loss (teacher forced) and greedy exact match on the first ``n`` test sentences."""
  test = data.Split(task.data.test.x[:n], task.data.test.y[:n])
  params = jax.device_get(params)
  return {
      "test_loss": float(_jitted_loss(task.graphdef)(params, test)),
      "exact_match": exact_match(greedy_decode(task, params, test.x), test.y),
  }


def train_translation(task: TranslationTask, tx: optax.GradientTransformation, steps: int, *, batch_size: int = 128,
                      seed: int = 0, mesh: Optional[jax.sharding.Mesh] = None, eval_every: int = 0,
                      eval_n: int = 200, desc: str = "", progress: bool = True):
  """Train data parallel over ``mesh`` (default: all devices); returns ``harness.train``'s ``(params, opt_state, History)``.

  Evaluation (``evaluate``) runs on the slow weights of a lookahead optimizer.
  """
  mesh = data_mesh() if mesh is None else mesh
  params = jax.device_put(task.params, NamedSharding(mesh, P()))  # replicated; the optimizer state follows
  batches = sharded_batches(task.data.train, batch_size, np.random.default_rng(seed), mesh)
  eval_fn = functools.partial(evaluate, task, n=eval_n) if eval_n else None
  return harness.train(task.loss, params, tx, batches, steps, eval_fn=eval_fn, eval_every=eval_every, desc=desc,
                       progress=progress)


def run(steps: int = 800, seeds: int = 2, batch_size: int = 64, lr: float = 2e-3, warmup: int = 100,
        eval_every: int = 200, eval_n: int = 200, dim: int = 32, heads: int = 4, layers: int = 2,
        n_train: int = 4000, only: str = "", progress: bool = True) -> dict:
  config = dict(steps=steps, seeds=seeds, batch_size=batch_size, lr=lr, warmup=warmup, dim=dim, heads=heads,
                layers=layers, n_train=n_train, devices=jax.device_count())
  results = {"config": config, "runs": {}}
  for name, make in optimizers(lr, warmup).items():
    if only.lower() not in name.lower():
      continue
    rows = []
    for seed in range(seeds):
      task = make_translation_task(seed=seed, n_train=n_train, dim=dim, heads=heads, layers=layers)
      _, _, hist = train_translation(task, make(), steps, batch_size=batch_size, seed=seed, eval_every=eval_every,
                                     eval_n=eval_n, desc=f"{name} seed {seed}", progress=progress)
      rows.append({"train_loss_last_100": float(hist.losses[-100:].mean()), "steps": len(hist.losses),
                   "losses": hist.losses[:: max(1, steps // 100)].tolist(),
                   "evals": hist.evals, "seconds": hist.seconds, **(hist.evals[-1][1] if hist.evals else {})})
    results["runs"][name] = rows
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=800, help="training steps per run (default 800)")
  parser.add_argument("--seeds", type=int, default=2, help="model-initialisation seeds per optimizer (default 2)")
  parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the devices (default 64)")
  parser.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (default 2e-3)")
  parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps before 1/sqrt decay (default 100)")
  parser.add_argument("--eval-every", type=int, default=200, help="evaluate every N steps (default 200)")
  parser.add_argument("--eval-n", type=int, default=200, help="test sentences per evaluation; 0: none (default 200)")
  parser.add_argument("--only", default="", help="run only the optimizers whose name contains this (e.g. lookahead)")
  parser.add_argument("--dim", type=int, default=32, help="model width (default 32)")
  parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
  parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers (default 2)")
  parser.add_argument("--n-train", type=int, default=4000, help="training sentence pairs (default 4000)")
  parser.add_argument("--out", default=os.path.join(harness.RESULTS, "nmt"),
                      help="results path without extension: writes .json and .md (default benchmarks/results/nmt)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  results = run(args.steps, args.seeds, args.batch_size, args.lr, args.warmup, args.eval_every, args.eval_n,
                args.dim, args.heads, args.layers, args.n_train, args.only, progress=not args.no_progress)
  results["environment"] = harness.environment()
  harness.write_json(args.out + ".json", results)
  metric = lambda rs, key, scale=1.0: harness.mean_std([scale * r[key] for r in rs]) if key in rs[0] else "-"
  rows = [[name, metric(rs, "train_loss_last_100"), metric(rs, "test_loss"), metric(rs, "exact_match", 100.0)]
          for name, rs in results["runs"].items()]
  env = results["environment"]
  table = harness.markdown_table(["optimizer", "train loss (last 100)", "test loss", "test exact match %"], rows)
  text = (f"Number-word translation, Seq2SeqTransformer, {args.steps} steps, batch {args.batch_size}, "
          f"{args.seeds} seeds (mean ± std), data parallel over {env['devices']} {env['platform']} device(s)\n\n"
          f"{table}\n")
  with open(args.out + ".md", "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
