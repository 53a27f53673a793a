"""The runtime layer under everything else: checkpoints, progress lines, atomic file writes.

It imports nothing of ``sait_tf``, so data readers, evaluation, export, serving and the
trainers can all use it without depending on each other.
"""
