"""DPSOM TF reference (tf.compat.v1 graph + TFP): the original ratschlab/dpsom code as executed.

Mirrors ports/dpsom file for file: config, data, model, losses, optim, train, evaluate (data.py needs no
TensorFlow).
"""
