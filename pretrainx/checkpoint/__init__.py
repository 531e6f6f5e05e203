"""A run's checkpoints: `persistent` (Orbax saves to the run directory, local or gs://, by a
step/time policy; validated restore; params exports), `local` (each host's fast tier, copied to a
peer) and `tiers` (both behind the one checkpointer the training loop uses). The persistent
tier's names are this package's, as before the split."""

from pretrainx.checkpoint.persistent import (COMMIT_MARKER, CheckpointError, Checkpointer,
                                             CheckpointWriteError, check_directory,
                                             check_finite_arrays, describe_error, load_params,
                                             restore_subtree, save_params, shape_mismatches)

__all__ = ["COMMIT_MARKER", "CheckpointError", "CheckpointWriteError", "Checkpointer",
           "check_directory", "check_finite_arrays", "describe_error", "load_params",
           "restore_subtree", "save_params", "shape_mismatches"]
