"""DPM-Solver (fast, noise prediction) and DPM-Solver++ (data prediction) as one scan each.

Reproduces the two solvers U-ViT's eval scripts use (`research/dit_uvit.md` B5, B6; Lu et al.
2022, DPM-Solver eq. 3.7 / Alg. 1-2 and DPM-Solver++ Alg. 1):

* `dpm_solver_pytorch.DPM_Solver(...).sample(x, steps, eps=1e-4, fast_version=True)` on the
  continuous VP-SDE: K = steps // 3 + 1 steps with orders [3]*(K-1)+[2] / [3]*(K-1)+[1] /
  [3]*(K-2)+[2, 1], a logSNR-uniform grid `inverse_lambda(linspace(lambda(1), lambda(eps), K+1))`
  and intermediate points `lambda_s + r h` with (r1, r2) = (1/3, 2/3) or r1 = 1/2. The network gets
  `999 t`.
* `dpm_solver_pp.DPM_Solver(..., predict_x0=True).sample(x, steps, eps=1/1000, T=1)` with method
  'fast' on the discrete SD schedule: the same 'fast' orders but a *time-uniform* grid
  `linspace(1, eps, steps + 1)`, where step k goes from grid[i] to grid[i + order] with
  `r_j = (lambda(grid[i+j]) - lambda(grid[i])) / h`. Epsilon is turned into data prediction
  `x0 = (x - sigma_t eps) / alpha_t`. The network gets `1000 t`.

All time points and step coefficients are computed on the host in float32, following the
originals' operation order. Each stage of a step is

    x_stage = a x - c m_s + d (m_prev - m_s)

(`m` the noise or data prediction; `d` carries the sign of the original formula). The jitted loop
scans the order-3 steps and unrolls the (at most two) lower-order tail steps; the orders are
read from the table shapes, so they need no static argument.
"""
import functools
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from jaxee.diffusion import sampler_core
from jaxee.diffusion import schedules

def fast_orders(steps: int) -> List[int]:
  """Orders of the 'fast' DPM-Solver: K = steps // 3 + 1 steps summing to `steps`."""
  k = steps // 3 + 1
  if steps % 3 == 0:
    return [3] * (k - 2) + [2, 1]
  if steps % 3 == 1:
    return [3] * (k - 1) + [1]
  return [3] * (k - 1) + [2]


def _vec(v):
  return np.asarray(v, np.float32).reshape(1)


def _step_coefs(ns, s, t, order: int, r1, r2, predict_x0: bool) -> Dict[str, np.ndarray]:
  """Host coefficients of one single-step update of `order` from s to t (float32).

  Returns:
    dict of (order,) arrays: `t_net`, `alpha`, `sigma` (for the data conversion) at the NFE
    times (s, s1, s2), and the stage coefficients `a`, `c`, `d` (stage j produces x_{s_{j+1}},
    the last stage x_t).
  """
  s, t = _vec(s), _vec(t)
  lam_s, lam_t = ns.marginal_lambda(s), ns.marginal_lambda(t)
  h = lam_t - lam_s
  times = [s]
  if order >= 2:
    times.append(ns.inverse_lambda(lam_s + r1 * h))
  if order >= 3:
    times.append(ns.inverse_lambda(lam_s + r2 * h))
  stage_t = times[1:] + [t]
  log_a = [ns.marginal_log_mean_coeff(u) for u in times]
  lmc_stage = [ns.marginal_log_mean_coeff(u) for u in stage_t]
  sig_s = ns.marginal_std(s)
  sig = [ns.marginal_std(u) for u in stage_t]
  r = [r1, r2][:order - 1] + [1.0]  # stage j sits at lambda_s + r[j] h.
  a, c, d = [], [], []
  for j in range(order):
    rh = h if j == order - 1 else r[j] * h
    if predict_x0:
      alpha_j = np.exp(lmc_stage[j])
      phi = np.expm1(-rh)
      a.append(sig[j] / sig_s)
      c.append(alpha_j * phi)
    else:
      phi = np.expm1(rh)
      a.append(np.exp(lmc_stage[j] - log_a[0]))
      c.append(sig[j] * phi)
    if j == 0:
      d.append(np.zeros_like(a[0]))
      continue
    # phi_2-type coefficient of stage j against the previous stage's prediction.
    if predict_x0:
      phi2 = (np.expm1(-rh) / rh + 1.0) if j < order - 1 else (phi / h + 1.0)
    else:
      phi2 = (np.expm1(rh) / rh - 1.0) if j < order - 1 else (np.expm1(h) / h - 1.0)
    scale = (alpha_j if predict_x0 else sig[j]) * (phi2 if order == 3 else phi)
    if order == 2:
      ratio = 0.5 / r1
      dj = -(ratio * scale)
    elif j == 1:
      ratio = r2 / r1
      dj = ratio * scale if predict_x0 else -(ratio * scale)
    else:
      ratio = 1.0 / r2
      dj = ratio * scale if predict_x0 else -(ratio * scale)
    d.append(dj)
  cat = lambda vs: np.concatenate([_vec(v) for v in vs]).astype(np.float32)
  out = {"t_net": cat([ns.net_time(u) for u in times]), "a": cat(a), "c": cat(c), "d": cat(d)}
  if predict_x0:
    out["alpha"] = cat([np.exp(la) for la in log_a])
    out["sigma"] = cat([ns.marginal_std(u) for u in times])
  return out


def dpm_solver_fast_steps(ns: schedules.VPSDE, steps: int, eps: float = 1e-4,
                          T: float = 1.0) -> List[Dict[str, np.ndarray]]:
  """Per-step host coefficients of `dpm_solver_pytorch` fast (logSNR grid, noise prediction)."""
  orders = fast_orders(steps)
  lam_T = ns.marginal_lambda(np.float32(T))
  lam_0 = ns.marginal_lambda(np.float32(eps))
  grid = ns.inverse_lambda(schedules.torch_linspace_f32(lam_T, lam_0, len(orders) + 1))
  out = []
  for i, order in enumerate(orders):
    r1, r2 = (1.0 / 3.0, 2.0 / 3.0) if order == 3 else (0.5, None)
    out.append(_step_coefs(ns, grid[i], grid[i + 1], order, r1, r2, predict_x0=False))
  return out


def dpm_solver_pp_steps(ns: schedules.SDDiscreteSchedule, steps: int, eps: float = 1.0 / 1000,
                        T: float = 1.0) -> List[Dict[str, np.ndarray]]:
  """Per-step host coefficients of `dpm_solver_pp` 'fast' (time-uniform grid, data prediction)."""
  orders = fast_orders(steps)
  grid = schedules.torch_linspace_f32(T, eps, steps + 1)
  lam = lambda u: ns.marginal_lambda(_vec(u))[0]
  out, i = [], 0
  for order in orders:
    h = lam(grid[i + order]) - lam(grid[i])
    r1 = None if order <= 1 else (lam(grid[i + 1]) - lam(grid[i])) / h
    r2 = None if order <= 2 else (lam(grid[i + 2]) - lam(grid[i])) / h
    out.append(_step_coefs(ns, grid[i], grid[i + order], order, r1, r2, predict_x0=True))
    i += order
  return out


def pack_tables(step_list: List[Dict[str, np.ndarray]]) -> Dict[str, Any]:
  """Stacks the leading order-3 steps into `main` (n, 3) tables; the rest go to `tail`."""
  n3 = 0
  while n3 < len(step_list) and step_list[n3]["t_net"].shape[0] == 3:
    n3 += 1
  keys = step_list[0].keys()
  if n3:
    main = {k: np.stack([st[k] for st in step_list[:n3]]) for k in keys}
  else:
    main = {k: np.zeros((0, 3), np.float32) for k in keys}
  main["nfe0"] = (3 * np.arange(n3)).astype(np.int32)
  tail, nfe = [], 3 * n3
  for st in step_list[n3:]:
    if st["t_net"].shape[0] == 3:
      raise ValueError("order-3 steps must come first")
    tail.append(dict(st, nfe0=np.int32(nfe)))
    nfe += st["t_net"].shape[0]
  return {"main": main, "tail": tail}


def _solver_step(denoise, x, cache, c):
  """One single-step update; the order is `c['t_net'].shape[0]` (static)."""
  order = c["t_net"].shape[0]
  x_s, preds, stats = x, [], []
  for j in range(order):
    out, cache, st = sampler_core.call_denoiser(denoise, x, c["t_net"][j], c["nfe0"] + j, cache)
    m = sampler_core.first_channels(out, x)
    if "alpha" in c:
      m = (x - c["sigma"][j] * m) / c["alpha"][j]
    preds.append(m)
    stats.append(st)
    m_s = preds[0]
    x = c["a"][j] * x_s - c["c"][j] * m_s
    if j > 0:
      x = x + c["d"][j] * (preds[j] - m_s)
  return x, cache, sampler_core.stack_stats(stats)


@functools.partial(jax.jit, static_argnames=("denoise",))
def solver_loop(denoise, x, cache, tables):
  """The jitted solver: a scan over the order-3 steps plus the unrolled tail.

  Args:
    denoise: the denoiser (static).
    x: x_T.
    cache: initial cache.
    tables: `pack_tables(...)` output (as arrays).

  Returns:
    (x, cache, stats) with stats leaves of shape (num_nfe,).
  """

  def body(carry, c):
    x, cache = carry
    x, cache, stats = _solver_step(denoise, x, cache, c)
    return (x, cache), stats

  (x, cache), stats = jax.lax.scan(body, (x, cache), tables["main"])
  parts = [sampler_core.flatten_stats(stats)]
  for c in tables["tail"]:
    x, cache, st = _solver_step(denoise, x, cache, c)
    parts.append(st)
  return x, cache, sampler_core.concat_stats(parts)


def _run(step_list, denoise, rng, x_T, shape, cache):
  x, _ = sampler_core.start_state(rng, x_T, shape)
  tables = sampler_core.as_jnp(pack_tables(step_list))
  return solver_loop(denoise, x, cache, tables)


def dpm_solver_sample(denoise, schedule: schedules.VPSDE, rng, x_T=None, *, steps: int = 50,
                      eps: float = 1e-4, T: float = 1.0,
                      shape: Optional[Sequence[int]] = None, cache: Any = None):
  """DPM-Solver fast (noise prediction, logSNR grid), deterministic given x_T.

  Args:
    denoise: noise-predicting denoiser; receives `t_net = 999 t`.
    schedule: the `VPSDE`.
    rng: PRNG key, only used to draw x_T when it is None.
    x_T: optional start; drawn with `shape` when None.
    steps: NFE budget (50 in U-ViT's eval).
    eps: end time.
    T: start time.
    shape: start shape when `x_T` is None.
    cache: initial cache.

  Returns:
    (x, cache, stats) with stats leaves of shape (steps,).
  """
  return _run(dpm_solver_fast_steps(schedule, steps, eps, T), denoise, rng, x_T, shape, cache)


def dpm_solver_pp_sample(denoise, schedule: schedules.SDDiscreteSchedule, rng, x_T=None, *,
                         steps: int = 50, eps: float = 1.0 / 1000, T: float = 1.0,
                         shape: Optional[Sequence[int]] = None, cache: Any = None):
  """DPM-Solver++ 'fast' (data prediction, time-uniform grid); arguments as `dpm_solver_sample`.

  The denoiser still predicts noise and receives `t_net = 1000 t`.
  """
  return _run(dpm_solver_pp_steps(schedule, steps, eps, T), denoise, rng, x_T, shape, cache)


def nfe_times_fast(schedule: schedules.VPSDE, steps: int, eps: float = 1e-4, T: float = 1.0,
                   **unused) -> np.ndarray:
  """Network times per NFE of `dpm_solver_sample` (float32, 999 t)."""
  del unused
  return np.concatenate([st["t_net"] for st in dpm_solver_fast_steps(schedule, steps, eps, T)])


def nfe_times_pp(schedule: schedules.SDDiscreteSchedule, steps: int, eps: float = 1.0 / 1000,
                 T: float = 1.0, **unused) -> np.ndarray:
  """Network times per NFE of `dpm_solver_pp_sample` (float32, 1000 t)."""
  del unused
  return np.concatenate([st["t_net"] for st in dpm_solver_pp_steps(schedule, steps, eps, T)])


def num_nfe(schedule=None, steps: int = 50, **unused) -> int:
  del schedule, unused
  return steps

