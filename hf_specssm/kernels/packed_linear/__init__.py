"""oneDNN-prepacked `nn.Linear` layers for CPU inference (see README.md).

    >>> handle = pack_linears(model)          # measures, then packs where it is faster
    >>> model.generate(ids, assistant_model=drafter)
    >>> handle.remove()                       # back to stock nn.Linear (or: `with pack_linears(model): …`)

Packing speeds up plain decoding as much as verification (more for several rows), so benchmarks that pack
the target compare against the packed target alone as well as the stock one.
"""

from hf_specssm.kernels.packed_linear.packing import (
    LAYOUT_ROWS,
    PackedLinears,
    PackingMeasurement,
    choose_layout,
    measure_packing,
    pack_linears,
    packed_linear_available,
)

__all__ = [
    "LAYOUT_ROWS",
    "PackedLinears",
    "PackingMeasurement",
    "choose_layout",
    "measure_packing",
    "pack_linears",
    "packed_linear_available",
]
