"""Evaluating a jaxpr with hooks where params are consumed."""

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
  propagate,
  scanned_origin,
)
from jaxsparse.tracing.walk import passed_through


class Key(NamedTuple):
  """The key of a value a hook emits (e.g. one layer's input statistics).

  Attributes:
    leaf: the params leaf.
    indexed: the origin's ``indexed`` axes where it was emitted; a value
      emitted inside a scan over one of them is stacked by the scan (one
      entry per layer), others are summed over iterations.
    tag: anything static the hook needs (e.g. ``dot_general`` batch axes).
  """

  leaf: int
  indexed: tuple[int, ...]
  tag: tuple = ()


Collected = dict[Key, Any]


def add_collected(into: Collected, new: Collected) -> None:
  """Adds ``new`` into ``into`` key by key (pytrees summed leaf by leaf)."""
  for key, value in new.items():
    into[key] = (
      value if key not in into else jax.tree.map(jnp.add, into[key], value)
    )


class Hooks:
  """What an :class:`Interpreter` does where parameters are consumed.

  The default evaluates the model unchanged. Subclasses override:

  * :meth:`consume`: a ``dot_general``/``conv`` that consumes a param;
    return its outputs, or ``None`` to evaluate it as written;
  * :meth:`relabel`: a layout op on a param (values that are not arrays,
    such as packed kernels, stay symbolic through it);
  * :meth:`materialize`: an array for a value of the model's dtype.
  """

  def consume(
    self,
    eqn: Any,
    values: list[Any],
    origins: list[Origin | None],
    uses: list[tuple[int, Use]],
    collect: Collected,
  ) -> list[Any] | None:
    del eqn, values, origins, uses, collect
    return None

  def relabel(self, eqn: Any, values: list[Any], out: list[Origin | None]):
    del eqn, values, out
    return None

  def materialize(self, value: Any) -> Any:
    """An array for ``value`` where an op consumes it as written."""
    return value

  def output(self, value: Any, origin: Origin | None) -> Any:
    """An array for ``value`` returned by the model."""
    del origin
    return value

  def rescan(self, value: Any, origin: Origin) -> Any:
    """The value of one scan slice of ``value`` (already sliced)."""
    del origin
    return value

  def scan_input(self, value: Any, origin: Origin) -> Any:
    """``value`` about to be scanned over its leading axis (``origin`` is
    its origin outside the scan)."""
    del origin
    return value


def bind(eqn: Any, values: Sequence[Any]) -> list[Any]:
  """Evaluates one eqn as written."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*values, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


class Interpreter:
  """Evaluates a jaxpr, letting :class:`Hooks` act where params are consumed.

  Values derived from params carry their :class:`Origin`. Calls are
  evaluated inline; ``scan``, ``while`` and ``cond`` are rebuilt with the
  interpreted bodies, so hooks also act inside them, and values the hooks
  emit inside a scan over stacked layers come out stacked, one per layer.
  """

  def __init__(self, leaf_shapes: Sequence[tuple], hooks: Hooks):
    self.leaf_shapes = tuple(leaf_shapes)
    self.hooks = hooks

  def run(
    self,
    jaxpr: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    origins: Sequence[Origin | None],
    collect: Collected,
  ) -> tuple[list[Any], list[Origin | None]]:
    env: dict[Any, Any] = {}
    where: dict[Any, Origin] = {}
    for var, value in zip(jaxpr.constvars, consts):
      env[var] = value
    for var, value, origin in zip(jaxpr.invars, args, origins):
      env[var] = value
      if origin is not None:
        where[var] = origin
    read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
    for eqn in jaxpr.eqns:
      values = [read(v) for v in eqn.invars]
      origins_in = [
        where.get(v) if isinstance(v, core.Var) else None for v in eqn.invars
      ]
      if any(o is not None for o in origins_in):
        outs, out_origins = self.eqn(eqn, values, origins_in, collect)
      else:
        outs, out_origins = bind(eqn, values), [None] * len(eqn.outvars)
      for var, value, origin in zip(eqn.outvars, outs, out_origins):
        if isinstance(var, core.DropVar):
          continue
        env[var] = value
        if origin is not None:
          where[var] = origin
    outs = [read(v) for v in jaxpr.outvars]
    out_origins = [
      where.get(v) if isinstance(v, core.Var) else None for v in jaxpr.outvars
    ]
    return outs, out_origins

  def _materialized(self, values: Sequence[Any]) -> list[Any]:
    return [self.hooks.materialize(v) for v in values]

  def eqn(self, eqn, values, origins, collect):
    inner = call_jaxpr(eqn)
    if inner is not None:
      sub, consts = closed_jaxpr(inner)
      return self.run(sub, consts, values, origins, collect)
    name = eqn.primitive.name
    none = [None] * len(eqn.outvars)
    if name == "scan":
      return self.scan(eqn, values, origins, collect)
    if name == "while":
      return self.while_loop(eqn, values, origins, collect), none
    if name == "cond":
      return self.cond(eqn, values, origins, collect), none
    if any(
      isinstance(v, (core.Jaxpr, core.ClosedJaxpr)) for v in eqn.params.values()
    ):
      return bind(eqn, self._materialized(values)), none
    out_origins, uses = propagate(eqn, origins, self.leaf_shapes)
    if any(use.kind in ("dot", "conv") for _, use in uses):
      outs = self.hooks.consume(eqn, values, origins, uses, collect)
      if outs is not None:
        return outs, none
    if any(o is not None for o in out_origins):
      outs = self.hooks.relabel(eqn, values, out_origins)
      if outs is not None:
        return outs, out_origins
    return bind(eqn, self._materialized(values)), out_origins

  def _abstract_collect(self, fn: Callable[[], Collected]) -> Collected:
    return jax.eval_shape(fn)

  def scan(self, eqn, values, origins, collect):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    body, body_consts = closed_jaxpr(p["jaxpr"])
    consts, carry, xs = (
      values[:nc],
      values[nc : nc + ncarry],
      values[nc + ncarry :],
    )
    carry = self._materialized(carry)
    x_origins = [
      None if o is None else scanned_origin(o, id(eqn))
      for o in origins[nc + ncarry :]
    ]
    xs = [
      self.hooks.materialize(x)
      if o is None
      else self.hooks.scan_input(x, origins[nc + ncarry + i])
      for i, (x, o) in enumerate(zip(xs, x_origins))
    ]
    in_origins = list(origins[:nc]) + [None] * ncarry + x_origins
    made = {(o.leaf, o.indexed) for o in x_origins if o is not None}
    per_layer = lambda key: any(
      key.leaf == leaf and key.indexed[: len(ix)] == ix for leaf, ix in made
    )

    through: list[Origin | None] = []

    def step(carry, x):
      x = [
        v if o is None else self.hooks.rescan(v, o)
        for v, o in zip(x, x_origins)
      ]
      found: Collected = {}
      outs, out_origins = self.run(
        body, body_consts, [*consts, *carry, *x], in_origins, found
      )
      through[:] = passed_through(
        out_origins[ncarry:], x_origins, origins[nc + ncarry :]
      )
      ys = [
        y if t is not None else self.hooks.materialize(y)
        for y, t in zip(outs[ncarry:], through)
      ]
      stacked = {k: v for k, v in found.items() if per_layer(k)}
      summed = {k: v for k, v in found.items() if not per_layer(k)}
      return self._materialized(outs[:ncarry]), ys, stacked, summed

    first = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs
    )
    summed_shapes = jax.eval_shape(lambda c, x: step(c, x)[3], carry, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), summed_shapes)

    def scan_body(state, x):
      carry, total = state
      new_carry, ys, stacked, summed = step(carry, x)
      total = {k: jax.tree.map(jnp.add, total[k], v) for k, v in summed.items()}
      return (new_carry, total), (ys, stacked)

    (carry_out, total), (ys, stacked) = jax.lax.scan(
      scan_body,
      (carry, zeros),
      xs,
      length=p["length"],
      reverse=p["reverse"],
      unroll=p["unroll"],
    )
    add_collected(collect, stacked)
    add_collected(collect, total)
    return [*carry_out, *ys], [None] * ncarry + list(through)

  def while_loop(self, eqn, values, origins, collect):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond, cond_consts = closed_jaxpr(p["cond_jaxpr"])
    body, body_consts = closed_jaxpr(p["body_jaxpr"])
    cconsts, bconsts = values[:cn], values[cn : cn + bn]
    carry = self._materialized(values[cn + bn :])
    corigins = list(origins[:cn]) + [None] * len(carry)
    borigins = list(origins[cn : cn + bn]) + [None] * len(carry)

    def body_step(carry):
      found: Collected = {}
      outs, _ = self.run(body, body_consts, [*bconsts, *carry], borigins, found)
      return self._materialized(outs), found

    shapes = jax.eval_shape(lambda c: body_step(c)[1], carry)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def cond_fn(state):
      (out,), _ = self.run(
        cond, cond_consts, [*cconsts, *state[0]], corigins, {}
      )
      return out

    def body_fn(state):
      carry, total = state
      new, found = body_step(carry)
      return new, {
        k: jax.tree.map(jnp.add, total[k], v) for k, v in found.items()
      }

    carry, total = jax.lax.while_loop(cond_fn, body_fn, (carry, zeros))
    add_collected(collect, total)
    return list(carry)

  def cond(self, eqn, values, origins, collect):
    index = self.hooks.materialize(values[0])
    operands, operand_origins = values[1:], origins[1:]

    def branch_fn(branch):
      sub, consts = closed_jaxpr(branch)

      def run():
        found: Collected = {}
        outs, _ = self.run(sub, consts, operands, operand_origins, found)
        return self._materialized(outs), found

      return run

    branches = [branch_fn(b) for b in eqn.params["branches"]]
    shapes: dict[Key, Any] = {}
    for fn in branches:
      shapes.update(jax.eval_shape(lambda fn=fn: fn()[1]))

    def filled(fn):
      def run():
        outs, found = fn()
        full = {
          k: found[k]
          if k in found
          else jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
          for k, shape in shapes.items()
        }
        return outs, full

      return run

    outs, found = jax.lax.switch(index, [filled(fn) for fn in branches])
    add_collected(collect, found)
    return list(outs)
