"""Trainers: custom tf.function GradientTape loops over tf.data, wired by gin."""
