"""Tracing a model and walking its jaxpr for the uses of every params leaf."""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core

from jaxsparse.tracing.origins import (
  Origin,
  Use,
  call_jaxpr,
  closed_jaxpr,
  origin_of_leaf,
  propagate,
  scanned_origin,
)


def walk(
  jaxpr: Any,
  in_origins: Sequence[Origin | None],
  leaf_shapes: Sequence[tuple],
  uses: dict[int, list[Use]],
) -> list[Origin | None]:
  """Records the uses of tracked values in ``jaxpr``; returns out origins."""
  env: dict[Any, Origin] = {}
  for var, origin in zip(jaxpr.invars, in_origins):
    if origin is not None:
      env[var] = origin
  record = lambda leaf, use: uses.setdefault(leaf, []).append(use)
  for eqn in jaxpr.eqns:
    origins = [
      env.get(v) if isinstance(v, core.Var) else None for v in eqn.invars
    ]
    if not any(o is not None for o in origins):
      continue
    outs = walk_eqn(eqn, origins, leaf_shapes, uses, record)
    for var, origin in zip(eqn.outvars, outs):
      if origin is not None and not isinstance(var, core.DropVar):
        env[var] = origin
  return [
    env.get(v) if isinstance(v, core.Var) else None for v in jaxpr.outvars
  ]


def walk_eqn(eqn, origins, leaf_shapes, uses, record) -> list[Origin | None]:
  """:func:`walk` for one eqn with tracked inputs (recursing into calls)."""
  name = eqn.primitive.name
  inner = call_jaxpr(eqn)
  if inner is not None:
    sub, _ = closed_jaxpr(inner)
    return walk(sub, origins, leaf_shapes, uses)
  if name == "scan":
    nc, ncarry = eqn.params["num_consts"], eqn.params["num_carry"]
    body, _ = closed_jaxpr(eqn.params["jaxpr"])
    inner_origins = list(origins[:nc])
    for o in origins[nc : nc + ncarry]:
      if o is not None:
        record(o.leaf, Use("other", primitive="scan carry"))
      inner_origins.append(None)
    x_origins = [
      None if o is None else scanned_origin(o, id(eqn))
      for o in origins[nc + ncarry :]
    ]
    outs = walk(body, inner_origins + x_origins, leaf_shapes, uses)
    through = passed_through(outs[ncarry:], x_origins, origins[nc + ncarry :])
    _returned(outs[:ncarry], record, "scan")
    _returned(
      [o for o, t in zip(outs[ncarry:], through) if t is None], record, "scan"
    )
    return [None] * ncarry + through
  if name == "while":
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    carry = origins[cn + bn :]
    for o in carry:
      if o is not None:
        record(o.leaf, Use("other", primitive="while carry"))
    cond, _ = closed_jaxpr(eqn.params["cond_jaxpr"])
    body, _ = closed_jaxpr(eqn.params["body_jaxpr"])
    walk(cond, list(origins[:cn]) + [None] * len(carry), leaf_shapes, uses)
    body_in = list(origins[cn : cn + bn]) + [None] * len(carry)
    _returned(walk(body, body_in, leaf_shapes, uses), record, "while")
    return [None] * len(eqn.outvars)
  if name == "cond":
    if origins[0] is not None:
      record(origins[0].leaf, Use("other", primitive="cond index"))
    for branch in eqn.params["branches"]:
      sub, _ = closed_jaxpr(branch)
      _returned(walk(sub, origins[1:], leaf_shapes, uses), record, "cond")
    return [None] * len(eqn.outvars)
  if any(
    isinstance(v, (core.Jaxpr, core.ClosedJaxpr)) for v in eqn.params.values()
  ):
    # An unknown higher-order primitive (shard_map, pallas_call, ...).
    for o in origins:
      if o is not None:
        record(o.leaf, Use("other", primitive=name))
    return [None] * len(eqn.outvars)
  outs, found = propagate(eqn, origins, leaf_shapes)
  for leaf, use in found:
    record(leaf, use)
  return outs


def passed_through(
  ys: Sequence[Origin | None],
  x_origins: Sequence[Origin | None],
  outer: Sequence[Origin | None],
) -> list[Origin | None]:
  """The outer origins of scan outputs that return an ``xs`` slice as it
  came in (nnx scans hand their layers' state back): stacked again, the
  output is the scanned param itself."""
  out = []
  for y in ys:
    hit = [o for x, o in zip(x_origins, outer) if y is not None and y == x]
    out.append(hit[0] if hit else None)
  return out


def _returned(origins, record, where: str) -> None:
  for o in origins:
    if o is not None:
      record(o.leaf, Use("other", primitive=f"returned by {where}"))


class Traced(NamedTuple):
  """A traced model: its jaxpr and how the params' leaves enter it.

  Attributes:
    jaxpr: the ``ClosedJaxpr`` of ``apply_fn(params, *args)``; its first
      ``len(leaf_shapes)`` inputs are the params' leaves.
    leaf_shapes: the params' leaf shapes.
    out_tree: the output's tree structure.
  """

  jaxpr: Any
  leaf_shapes: tuple[tuple[int, ...], ...]
  out_tree: Any


def trace(
  apply_fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
) -> Traced:
  """Traces ``apply_fn(params, *args, **kwargs)``; ``kwargs`` are static.

  ``params`` and ``args`` may be arrays, tracers or ``ShapeDtypeStruct``s.
  """
  leaves, treedef = jax.tree.flatten(params)

  def flat_fn(leaves, args):
    return apply_fn(jax.tree.unflatten(treedef, leaves), *args, **kwargs)

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
    list(leaves), args
  )
  return Traced(
    closed,
    tuple(tuple(jnp.shape(leaf)) for leaf in leaves),
    jax.tree.structure(out_shape),
  )


def param_uses(traced: Traced) -> dict[int, list[Use]]:
  """Every use of every params leaf in the traced computation.

  Returns:
    ``{leaf index: [Use, ...]}``; a leaf never consumed is absent. A leaf
    returned by the model (or part of its output) gets an ``other`` use.
  """
  jaxpr = traced.jaxpr.jaxpr
  n = len(traced.leaf_shapes)
  origins = [
    origin_of_leaf(i, len(shape)) for i, shape in enumerate(traced.leaf_shapes)
  ]
  origins += [None] * (len(jaxpr.invars) - n)
  uses: dict[int, list[Use]] = {}
  outs = walk(jaxpr, origins, traced.leaf_shapes, uses)
  record = lambda leaf, use: uses.setdefault(leaf, []).append(use)
  _returned(outs, record, "the model")
  return uses
