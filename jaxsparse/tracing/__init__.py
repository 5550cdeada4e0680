"""Following parameters through a model's traced computation (its jaxpr).

A model is a function ``apply_fn(params, *inputs)``. Tracing it with
:func:`jax.make_jaxpr` gives every operation it performs, whatever library
wrote it (linen, nnx, Hugging Face Flax, hand-written ``jnp``). This module
follows each parameter leaf from the jaxpr's inputs to the operations that
consume it, through the operations that only relabel its axes:

* layout ops: ``convert_element_type``, ``transpose``, ``reshape`` (merging
  or splitting whole axes), ``squeeze``/``broadcast_in_dim`` of size-1
  axes, sharding annotations, scaling by a scalar;
* calls: ``jit``, ``remat``, ``custom_jvp``/``custom_vjp`` calls (followed
  inside), ``scan`` (a parameter scanned over as ``xs`` loses its leading
  axis: that axis indexes *stacked layers*), ``while`` and ``cond``.

A value derived that way carries an :class:`Origin`: which leaf, and which
leaf axes each of its axes spans. Where the value is consumed, a
:class:`Use` is recorded:

* ``dot``: an operand of ``dot_general``: its contracting axes are the
  kernel's *contraction axes*, its batch axes index separate matrices
  (stacked, like the scanned axes);
* ``conv``: the kernel of ``conv_general_dilated`` (contraction: the input
  feature and spatial axes);
* ``lookup``: the table of a ``gather`` (an embedding);
* ``elementwise``: combined with activations (a bias, a norm scale, a
  position table);
* ``other``: anything else (named by its primitive).

:func:`param_uses` walks a jaxpr and returns the uses of every leaf;
:class:`Interpreter` evaluates a jaxpr while calling a hook at every
``dot_general``/``conv`` that consumes a parameter, which is how calibration
statistics are captured and packed kernels replace dense matmuls without any
knowledge of module classes.
"""

from jaxsparse.tracing.interpreter import Collected as Collected
from jaxsparse.tracing.interpreter import Hooks as Hooks
from jaxsparse.tracing.interpreter import Interpreter as Interpreter
from jaxsparse.tracing.interpreter import Key as Key
from jaxsparse.tracing.interpreter import add_collected as add_collected
from jaxsparse.tracing.interpreter import bind as bind
from jaxsparse.tracing.operands import Unsupported as Unsupported
from jaxsparse.tracing.operands import dot_output as dot_output
from jaxsparse.tracing.operands import dot_rows as dot_rows
from jaxsparse.tracing.operands import leaf_view as leaf_view
from jaxsparse.tracing.operands import split_to_leaf_axes as split_to_leaf_axes
from jaxsparse.tracing.operands import var_order as var_order
from jaxsparse.tracing.origins import Origin as Origin
from jaxsparse.tracing.origins import Use as Use
from jaxsparse.tracing.origins import call_jaxpr as call_jaxpr
from jaxsparse.tracing.origins import conv_kernel_dims as conv_kernel_dims
from jaxsparse.tracing.origins import dot_operands as dot_operands
from jaxsparse.tracing.origins import origin_of_leaf as origin_of_leaf
from jaxsparse.tracing.origins import propagate as propagate
from jaxsparse.tracing.origins import scanned_origin as scanned_origin
from jaxsparse.tracing.walk import Traced as Traced
from jaxsparse.tracing.walk import param_uses as param_uses
from jaxsparse.tracing.walk import passed_through as passed_through
from jaxsparse.tracing.walk import trace as trace
from jaxsparse.tracing.walk import walk as walk
