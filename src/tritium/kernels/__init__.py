"""Packed ternary weights and the ternary x int8 matmul.

Contract (every backend computes exactly this):

* ``pack(q)``: int8 ``(N, K)`` with values in {-1, 0, 1} -> uint8 buffer, 4 weights per byte.
* ``unpack(packed, n, k)``: the inverse.
* ``ternary_matmul(xq, packed, n, k, sx, sw, bias)``: ``xq`` int8 ``(M, K)``, ``sx`` float32 ``(M,)``,
  ``sw`` float32 ``(N,)`` (or ``(1,)`` for a per-tensor scale), ``bias`` float32 ``(N,)`` or None ->
  float32 ``(M, N)`` with ``y[m, n] = float(acc[m, n]) * (sx[m] * sw[n]) + bias[n]``, where
  ``acc = xq @ q^T`` is accumulated exactly in int32 and each float operation is rounded separately
  (no fused multiply-add), so all backends agree bit for bit.
"""

from .reference import pack, ternary_matmul, unpack

__all__ = ["pack", "unpack", "ternary_matmul"]
