"""Shared checks for lowering Pallas kernels without the hardware."""

import contextlib
from unittest import mock

import jax
from jax._src.pallas.triton import lowering as triton_lowering

# One kernel call in the lowered StableHLO text, per target platform.
KERNEL_CALL = {
  "tpu": r"custom_call @tpu_custom_call\(",
  "cuda": r"custom_call @__gpu\$xla\.gpu\.triton\(",
}


@contextlib.contextmanager
def verified_triton_modules():
  """Runs MLIR's verifier on every Triton module lowered in the block and
  yields the list of their kernel names. ``lower`` alone does not verify
  them: a mistyped op (e.g. an ``scf.for`` with an ``i1`` bound) passes
  lowering and only fails, or miscomputes, in XLA's Triton compile on a
  GPU."""
  verified = []
  real = triton_lowering.lower_jaxpr_to_triton_module

  def checked(jaxpr, *args, **kwargs):
    result = real(jaxpr, *args, **kwargs)
    result.module.operation.verify()  # raises MLIRError if invalid
    verified.append(jaxpr.debug_info.func_name)
    return result

  jax.clear_caches()  # a cached lowering would skip the check
  with mock.patch.object(
    triton_lowering, "lower_jaxpr_to_triton_module", checked
  ):
    yield verified
