"""pretrainx: JAX-native pretraining and continual pretraining of language models.

config -> data -> model -> step -> loop -> checkpoint/metrics; see README.md for the layout.
"""

import time as _time

STARTED_AT = _time.time()  # the process's start, as goodput accounting counts it

from pretrainx import platforms as _platforms  # pylint: disable=wrong-import-position

__version__ = "0.1.0"

_platforms.choose_platforms()  # before JAX starts: no libtpu on hosts without TPU chips
