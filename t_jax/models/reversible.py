"""Reversible residual layers (RevNet, used by Reformer): activation memory independent of depth.

Each layer maps (x1, x2) to y1 = x1 + f(x2), y2 = x2 + g(y1) (f: normed self-attention, g: normed
feed-forward). The backward pass keeps only the last layer's outputs and rebuilds each layer's inputs
from its outputs (x2 = y2 - g(y1), x1 = y1 - f(x2)) while it differentiates, so no per-layer activations
are stored. `plain` is the same computation under ordinary autodiff (the gradient reference).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Half = Callable[[Any, Array, Any], Array]  # (layer params, x, aux) -> f(x)


def plain(f: Half, g: Half, params: list, x1: Array, x2: Array, aux: Any) -> tuple[Array, Array]:
  """The reversible stack with ordinary autodiff (stores every layer's activations)."""
  for pf, pg in params:
    x1 = x1 + f(pf, x2, aux)
    x2 = x2 + g(pg, x1, aux)
  return x1, x2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def reversible(f: Half, g: Half, params: list, x1: Array, x2: Array, aux: Any) -> tuple[Array, Array]:
  """`plain`, with a backward pass that recomputes inputs from outputs (O(1) layers of activations)."""
  return plain(f, g, params, x1, x2, aux)


def _fwd(f: Half, g: Half, params: list, x1: Array, x2: Array, aux: Any) -> tuple:
  y1, y2 = plain(f, g, params, x1, x2, aux)
  return (y1, y2), (params, y1, y2, aux)


def _bwd(f: Half, g: Half, res: tuple, cotangents: tuple) -> tuple:
  params, y1, y2, aux = res
  dy1, dy2 = cotangents
  grads = []
  for pf, pg in reversed(params):
    gy, g_vjp = jax.vjp(lambda p, h: g(p, h, aux), pg, y1)
    x2 = y2 - gy
    dpg, dgy1 = g_vjp(dy2)
    dy1 = dy1 + dgy1
    fx, f_vjp = jax.vjp(lambda p, h: f(p, h, aux), pf, x2)
    x1 = y1 - fx
    dpf, dfx2 = f_vjp(dy1)
    dy2 = dy2 + dfx2
    grads.append((dpf, dpg))
    y1, y2 = x1, x2
  zero = lambda a: (np.zeros(np.shape(a), jax.dtypes.float0) if not jnp.issubdtype(jnp.result_type(a), jnp.inexact)
                    else jnp.zeros_like(a))
  return grads[::-1], dy1, dy2, jax.tree.map(zero, aux)


reversible.defvjp(_fwd, _bwd)
