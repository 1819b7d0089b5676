"""DEKM, TensorFlow reference: the original's Keras auto-encoder as executed, with canonical names.

Reproduces ``model_conv`` of ``DEKM.py`` (conv: MNIST, USPS, COIL20, FRGC) and of ``DEKM_dense.py``
(dense) of github spdj2271/DEKM at HEAD e58f506 (algorithm of d126375); paper: Guo, Lin, Ye, "Deep
Embedded K-Means Clustering", ICDMW 2021 (arXiv 2109.15149). Written from specs/dekm.md §3 and
docs/dekm-interface.md; no code of the original or of a port is copied.

What is reproduced (tf.keras = Keras 2 from tf_keras, eager):

* conv (§3.1): Conv2D 5x5 s2 'same' ReLU x2 and Conv2D 3x3 s2 ``pad3`` ReLU with
  ``kernel_initializer='uniform'`` (= RandomUniform(-0.05, 0.05)), Flatten, Dense(d, name='embed')
  (linear: h), Dense(H/8 * H/8 * filters[2]) ReLU, Reshape, Conv2DTranspose 3x3 s2 ``pad3`` ReLU,
  5x5 s2 'same' ReLU, 5x5 s2 'same' linear (Glorot-uniform), output Concatenate([h, Flatten(recon)]);
* dense (§3.2): Dense filters ReLU x3, Dense(d), Dense reversed filters ReLU x3, Dense(d_in), every
  kernel 'uniform', output Concatenate([h, recon]);
* biases zero; layers created in the original's order, so that ``save_weights('*.h5')`` writes the
  original's layer order and ``load_weights`` (topological) reads the original's files.

Deliberate differences (none changes a number):

* **Explicit layer names**, equal to the auto-generated ones of the original's first model in a
  fresh process (``conv2d``, ``conv2d_1``, ... ``embed`` ...), so h5 files do not depend on what
  else the process built. ``load_weights`` of an h5 file matches layers by order, not by name.
* A second functional ``Model`` over the same layers exposes every named intermediate
  (:meth:`DEKM.forward`); the original's model (``DEKM.keras``) is the one trained and saved.
* ``dtype="float64"`` builds the same layers in double precision (the harness's rounding-free
  twin); float32 is the original.
"""

from __future__ import annotations

import os

import numpy as np

from reference_tf import require_tensorflow
from reference_tf.dekm.config import DEKMConfig

tf = require_tensorflow()

CONV_LAYERS = ("encoder.conv1", "encoder.conv2", "encoder.conv3", "embedding", "decoder.fc1",
               "decoder.deconv1", "decoder.deconv2", "decoder.deconv3")
DENSE_LAYERS = ("encoder.fc1", "encoder.fc2", "encoder.fc3", "embedding", "decoder.fc1", "decoder.fc2",
                "decoder.fc3", "decoder.out")
CONV_FORWARD_KEYS = ("encoder.conv1", "encoder.conv2", "encoder.conv3", "encoder.flatten", "embedding", "decoder.fc1",
                     "decoder.deconv1", "decoder.deconv2", "decoder.deconv3", "reconstruction")
DENSE_FORWARD_KEYS = ("encoder.fc1", "encoder.fc2", "encoder.fc3", "embedding", "decoder.fc1", "decoder.fc2",
                      "decoder.fc3", "reconstruction")

# Keras layer name of each canonical layer: the auto names of the original's first model.
CONV_KERAS_NAMES = dict(zip(CONV_LAYERS, ("conv2d", "conv2d_1", "conv2d_2", "embed", "dense", "conv2d_transpose",
                                          "conv2d_transpose_1", "conv2d_transpose_2")))
DENSE_KERAS_NAMES = dict(zip(DENSE_LAYERS, ("dense", "dense_1", "dense_2", "dense_3", "dense_4", "dense_5", "dense_6",
                                            "dense_7")))


def refuse_deviations(config: DEKMConfig, where: str) -> None:
    """The reference is the original: a switched-on declared deviation is a ValueError naming it."""
    dev = config.deviations()
    if dev:
        raise ValueError(
            f"{where}: the TF reference reproduces the original as executed and has no switch for the port's "
            f"declared deviation(s) {dev} (fields: {', '.join(sorted(dev))})"
        )


class DEKM:
    """The original DEKM auto-encoder (``keras``: its Keras model) with canonical-name access.

    ``keras(x)`` returns the original's output ``[h, flatten(recon)]`` (width d + P).
    """

    def __init__(self, config: DEKMConfig, dtype: str = "float32"):
        refuse_deviations(config, "reference_tf DEKM")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype={dtype!r}; expected 'float32' (the original) or 'float64' (the twin)")
        self.config = config
        self.dtype = dtype
        self.hidden_units = config.hidden_units
        floatx = tf.keras.backend.floatx()
        try:
            tf.keras.backend.set_floatx(dtype)  # layers created now take it as their dtype policy
            if config.convolution:
                self._build_conv()
            else:
                self._build_dense()
        finally:
            tf.keras.backend.set_floatx(floatx)
        self.layer_names = CONV_KERAS_NAMES if config.convolution else DENSE_KERAS_NAMES
        self.layers = {c: self.keras.get_layer(n) for c, n in self.layer_names.items()}
        self.forward_keys = CONV_FORWARD_KEYS if config.convolution else DENSE_FORWARD_KEYS

    # ------------------------------------------------------------------------------------------
    # construction, in the original's layer order
    # ------------------------------------------------------------------------------------------
    def _build_conv(self) -> None:
        cfg = self.config
        L = tf.keras.layers
        f1, f2, f3 = cfg.filters
        fh, fw, fc = cfg.feature_shape
        pad3 = cfg.pad3
        init = "uniform"
        inp = L.Input(shape=cfg.input_shape, name="input_1")
        c1 = L.Conv2D(f1, 5, strides=2, padding="same", activation="relu", kernel_initializer=init, name="conv2d")(inp)
        c2 = L.Conv2D(f2, 5, strides=2, padding="same", activation="relu", kernel_initializer=init, name="conv2d_1")(c1)
        c3 = L.Conv2D(f3, 3, strides=2, padding=pad3, activation="relu", kernel_initializer=init, name="conv2d_2")(c2)
        flat = L.Flatten(name="flatten")(c3)
        h = L.Dense(cfg.hidden_units, name="embed")(flat)
        fc1 = L.Dense(fh * fw * fc, activation="relu", name="dense")(h)
        r = L.Reshape((fh, fw, fc), name="reshape")(fc1)
        d1 = L.Conv2DTranspose(f2, 3, strides=2, padding=pad3, activation="relu", name="conv2d_transpose")(r)
        d2 = L.Conv2DTranspose(f1, 5, strides=2, padding="same", activation="relu", name="conv2d_transpose_1")(d1)
        d3 = L.Conv2DTranspose(cfg.input_shape[2], 5, strides=2, padding="same", name="conv2d_transpose_2")(d2)
        recon = L.Flatten(name="flatten_1")(d3)
        out = L.Concatenate(name="concatenate")([h, recon])
        self.keras = tf.keras.Model(inputs=inp, outputs=out, name="model")
        taps = (c1, c2, c3, flat, h, fc1, d1, d2, d3, recon)
        self._taps = tf.keras.Model(inputs=inp, outputs=list(taps), name="model_taps")

    def _build_dense(self) -> None:
        cfg = self.config
        L = tf.keras.layers
        init = "uniform"
        names = iter(DENSE_KERAS_NAMES.values())
        inp = L.Input(shape=cfg.input_shape, name="input_1")
        x, taps = inp, []
        for width in cfg.filters:
            x = L.Dense(width, activation="relu", kernel_initializer=init, name=next(names))(x)
            taps.append(x)
        h = L.Dense(cfg.hidden_units, kernel_initializer=init, name=next(names))(x)
        taps.append(h)
        x = h
        for width in reversed(cfg.filters):
            x = L.Dense(width, activation="relu", kernel_initializer=init, name=next(names))(x)
            taps.append(x)
        recon = L.Dense(cfg.input_shape[0], kernel_initializer=init, name=next(names))(x)
        taps.append(recon)
        out = L.Concatenate(name="concatenate")([h, recon])
        self.keras = tf.keras.Model(inputs=inp, outputs=out, name="model")
        self._taps = tf.keras.Model(inputs=inp, outputs=taps, name="model_taps")

    # ------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------
    def __call__(self, x, training=None):
        """The original's ``model(x)``: ``[h, recon]`` as a tensor (float64 input is cast by Keras)."""
        return self.keras(x, training=training)

    def forward(self, x, teacher=None) -> dict:
        """Every named intermediate of one forward pass (NHWC), canonical keys in execution order.

        ``teacher`` is the port's (teacher forcing); the reference computes from ``x`` only."""
        if teacher is not None:
            raise ValueError("teacher forcing is the port's; the TF reference is the teacher")
        outs = self._taps(x)
        return {key: np.asarray(t) for key, t in zip(self.forward_keys, outs)}

    def param_count(self) -> int:
        return int(self.keras.count_params())

    # ------------------------------------------------------------------------------------------
    # weights (canonical names, Keras layout)
    # ------------------------------------------------------------------------------------------
    def variables(self) -> dict:
        """``{canonical weight name: tf.Variable}``: ``<layer>.kernel`` then ``<layer>.bias``."""
        out = {}
        for canonical, layer in self.layers.items():
            out[f"{canonical}.kernel"] = layer.kernel
            out[f"{canonical}.bias"] = layer.bias
        return out

    def weight_shapes(self) -> dict:
        return {k: tuple(v.shape.as_list()) for k, v in self.variables().items()}

    def get_weights(self) -> dict:
        return {k: v.numpy() for k, v in self.variables().items()}

    def set_weights(self, weights: dict) -> None:
        """Strict: every missing / unexpected / mis-shaped name is listed in one error and nothing
        is written."""
        from harness.transplant import check_weights

        check_weights(weights, self.weight_shapes(), where="reference_tf DEKM.set_weights")
        for k, var in self.variables().items():
            var.assign(np.asarray(weights[k], dtype=self.dtype))

    def initial_weights(self) -> dict:
        """A fresh draw from the layers' own initialisers (cloned, seed None), canonical names;
        the model is not changed."""
        out = {}
        for canonical, layer in self.layers.items():
            for attr, init in (("kernel", layer.kernel_initializer), ("bias", layer.bias_initializer)):
                var = getattr(layer, attr)
                cfg = dict(init.get_config())
                if "seed" in cfg:
                    cfg["seed"] = None
                fresh = init.__class__.from_config(cfg)
                out[f"{canonical}.{attr}"] = np.asarray(fresh(var.shape, dtype=var.dtype))
        return out

    # ------------------------------------------------------------------------------------------
    # checkpoints: the original's h5 files
    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, path) -> str:
        """``model.save_weights(path)`` (the original's ``weight_base_<ds>.h5``; h5 for a ``.h5``
        path)."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.keras.save_weights(path)
        return path

    def load_checkpoint(self, path) -> None:
        """``model.load_weights(path)``, as the original's clustering phase (layer order)."""
        self.keras.load_weights(os.fspath(path))
