"""Model building blocks whose implementation depends on how weights are stored.

`Linear` and `Embedding` take a weight format object (`weight_formats`) at construction; the
format creates, loads, quantizes, counts and multiplies the layer's tensors, so a new format
is one file there plus, for speed, one kernel.
"""
