"""Token reduction: one module of its own (ToMe merging, attentive pruning, clustering, plans).

``merge``, ``prune``, ``cluster``, ``interpret`` and ``schedule`` are plain tensor functions that
know nothing about timm or transformers; ``plan`` holds the step objects (``Keep``, ``Merge``,
``Prune``, ``PrefixOnly``) a token pass hands to ``compress.patch.vit_tokens``; ``auto`` is the
shared ``auto`` recipe block and its fidelity check; ``pictures`` draws the kept patches for the
report. Every token count is a Python int derived from static shapes or an integer expression on
a (symbolic) shape, never ``int(n * ratio)`` on a dynamic dimension, so the dynamo exporter keeps
the counts right at every input shape.
"""
