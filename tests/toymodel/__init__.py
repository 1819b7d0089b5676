"""A toy second model that touches no engine file: the claim of docs/interface.md, tested.

A tanh MLP autoencoder 6 -> 5 -> 3 -> 5 -> 6 without BatchNorm, plus a clustering loss that is a
batch SUM (sum_i ||z_i - c_i||^2, each sample's fixed centre row ``c`` given in the batch) next to a
reconstruction loss that is a batch MEAN. Reference: pure numpy with a hand-written backward
(reference.py, standing in for a TF reference); port: a plain ``nn.Module`` driven by the
table-driven torch adapter (port.py, table.csv); spec: spec.py (``TOY``, passed to the engine
directly, not registered under harness/models).
"""
