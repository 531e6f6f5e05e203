"""pretrainx: JAX-native pretraining and continual pretraining of language models.

config -> data -> model -> step -> loop -> checkpoint/metrics; see README.md for the layout.
"""

__version__ = "0.1.0"
