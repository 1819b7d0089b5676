"""DEKM TF reference (tf.keras = Keras 2 from tf_keras, eager + GradientTape): the original
spdj2271/DEKM (HEAD e58f506) as executed.

Mirrors ports/dekm file for file (docs/dekm-interface.md): config (a re-export of the shared
``ports/dekm/config.py``), data, model, losses, optim, train, evaluate. data.py and evaluate.py need
no TensorFlow (except the native shuffles, imported lazily).
"""
