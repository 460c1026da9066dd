"""Pure numpy decoders (and, where tests or conversions need them, packers) per format family.

Every decoder takes the arrays exactly as stored in the safetensors file (as returned by
:class:`quantscope.backend.safetensors_file.SafetensorsFile.read`) plus the format's parameters and
returns ``float32`` weights in the logical orientation ``[out_features, in_features]`` (leading
dims kept for stacked experts). The values are what the format's reference library computes, in
the dtype it computes in, converted to float32 — see :func:`common.round_to`.
"""
