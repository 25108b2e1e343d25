"""Gradient compression for collectives, with Horovod's interface (``Compression.none``, ``.fp16``, ``.bf16``).

A compressor turns a tensor into what travels over the network, and back. The
casting ones also name their ``wire_dtype``: ``DistributedOptimizer`` needs only
that (it casts whole fused buckets into a wire buffer of that dtype, reduces it
there, and casts back before the update, which stays in the parameters' dtype).
"""

from __future__ import annotations

import torch


class Compressor:
    """Turns a tensor into what travels over the network, and back.

    ``wire_dtype``: the dtype floating-point tensors travel in (None: unchanged). A
    subclass that only casts can set it alone; one that does more (sparsification,
    quantisation with a scale) overrides ``compress``/``decompress``, and works with
    the collectives but not with ``DistributedOptimizer``.
    """

    wire_dtype: torch.dtype | None = None

    @classmethod
    def compress(cls, tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
        if cls.wire_dtype is not None and tensor.is_floating_point() and tensor.dtype != cls.wire_dtype:
            return tensor.to(cls.wire_dtype), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: object) -> torch.Tensor:
        return tensor if ctx is None else tensor.to(ctx)


class NoneCompressor(Compressor):
    """Sends tensors as they are."""


class FP16Compressor(Compressor):
    """Sends floating-point tensors as float16 (half of float32's bytes), restoring the dtype after.

    float16 holds magnitudes up to 65504: gradients beyond that become inf (bf16 keeps float32's range).
    """

    wire_dtype = torch.float16


class BF16Compressor(Compressor):
    """Sends floating-point tensors as bfloat16: float32's range with 8 bits of mantissa."""

    wire_dtype = torch.bfloat16


class Compression:
    """The available compressors, named as in Horovod (``bf16`` is pipedap's addition)."""

    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor


def wire_dtype_for_buckets(compression) -> torch.dtype | None:
    """The dtype ``DistributedOptimizer``'s buckets travel in under ``compression`` (None: as the parameters).

    Raises TypeError for an object that is not a Compressor class, and ValueError for a
    compressor whose ``compress`` does more than cast (fused buckets can only be cast).
    """
    if not (isinstance(compression, type) and issubclass(compression, Compressor)):
        raise TypeError(f"compression must be pipedap.Compression.none, .fp16, .bf16 or a Compressor subclass, "
                        f"not {compression!r}")
    custom = (getattr(compression.compress, "__func__", None) is not Compressor.compress.__func__
              or compression.decompress is not Compressor.decompress)
    if custom:
        raise ValueError(
            f"DistributedOptimizer: compression {compression.__name__} overrides compress()/decompress(); the "
            "optimizer reduces fused buckets and can only cast them. Use Compression.fp16 or .bf16, or a "
            "Compressor subclass that only sets wire_dtype (pipedap.allreduce(..., compression=) takes any compressor)."
        )
    return compression.wire_dtype
