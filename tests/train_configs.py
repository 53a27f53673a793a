"""gin configs of the `python -m sait_tf.train` runs in tests: demo.gin on a small pair."""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One source-only stage of batch 1; the caller sets run_pipeline.source_only_steps.
SOURCE_ONLY_RUN = (
    "run_pipeline.batch_size = 1",
    "run_pipeline.oracle_steps = 0",
    "run_pipeline.max_rounds = 0",
    "run_pipeline.export = False",
)
# The run generates a 4 + 2 + 2 image pair at 32x64 and trains M at batch 2, F at batch 1.
TINY_PAIR_AND_BATCHES = (
    "ensure_synthetic_pair.num_source = 4",
    "ensure_synthetic_pair.num_target_train = 2",
    "ensure_synthetic_pair.num_target_val = 2",
    "ensure_synthetic_pair.size = (32, 64)",
    "run_pipeline.batch_size = 2",
    "run_pipeline.translator_batch_size = 1",
)
# F, D_S, D_T and M's output discriminator at a few channels.
TINY_TRANSLATOR_AND_DISCRIMINATORS = (
    "build_output_discriminator.width = 4",
    "build_translator.dim = 8",
    "build_translator.num_residual_blocks = 1",
    "build_translator.spade_hidden = 8",
    "build_patch_discriminator.dim = 8",
    "build_patch_discriminator.num_layers = 2",
    "build_patch_discriminator.num_scales = 1",
)


def write_demo_config(path: str | os.PathLike, pair: str | os.PathLike, *bindings: str,
                      run_makes_pair: bool = False) -> str:
    """Writes demo.gin with its data roots at the synthetic pair ``pair``, then ``bindings``
    (each a line or a block of lines); returns the path. ``run_makes_pair``: the run
    generates the pair there first, instead of finding it."""
    pair_root = f"'{pair}'" if run_makes_pair else None
    lines = (f"include '{REPO}/gin/demo.gin'", f"SOURCE_ROOT = '{pair}/source'",
             f"TARGET_ROOT = '{pair}/target'", f"run_pipeline.synthetic_pair_root = {pair_root}",
             *bindings)
    with open(path, "w") as f:
        f.write("".join(f"{line.strip()}\n" for line in lines))
    return str(path)
