"""Token reduction as plain tensor functions (ToMe merging, attentive pruning, schedules).

Nothing here knows about timm or transformers; ``compress.patch.tokens`` wires these functions
into model forwards. Every token count is a Python int derived from static shapes or an integer
expression on a (symbolic) shape, never ``int(n * ratio)`` on a dynamic dimension, so the dynamo
exporter keeps the counts right at every input shape.
"""
