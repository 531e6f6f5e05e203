"""pretrainx: JAX-native pretraining and continual pretraining of language models.

config -> data -> model -> step -> loop -> checkpoint/metrics; see README.md for the layout.
"""

from pretrainx import platforms as _platforms

__version__ = "0.1.0"

_platforms.choose_platforms()  # before JAX starts: no libtpu on hosts without TPU chips
