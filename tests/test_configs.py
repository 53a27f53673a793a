"""Every gin/*.gin parses and passes the job's binding checks; the paper configs hold the
settings docs/training.md tabulates (paper Sec. 3.4 and 4, liyunsheng13/BDL where the paper
defers to it)."""

from __future__ import annotations

import glob
import os

import gin
import pytest

from sait_tf.models import size_knobs_of
from sait_tf.models.deeplabv2 import BN_MODES
from sait_tf.train import pipeline, settings
from sait_tf.train.__main__ import parse_gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILES = sorted(glob.glob(os.path.join(REPO, "gin", "*.gin")))
# config -> (segmenter, source dataset, converted checkpoint it loads)
PAPER_CONFIGS = {
    "gta5_deeplabv2": ("deeplabv2", "gta5", "weights/bdl_gta5_deeplabv2.weights.h5"),
    "gta5_fcn8s": ("fcn8s", "gta5", "weights/bdl_gta5_fcn8s.weights.h5"),
    "synthia_deeplabv2": ("deeplabv2", "synthia", "weights/bdl_synthia_deeplabv2.weights.h5"),
    "synthia_fcn8s": ("fcn8s", "synthia", "weights/bdl_synthia_fcn8s.weights.h5"),
}


def _query(binding: str):
    """The bound value of ``binding``, a macro (``%ARCH``) replaced by its value."""
    value = gin.query_parameter(binding)
    if isinstance(value, gin.config.ConfigurableReference) and value.configurable.name == "macro":
        return _query("%" + "/".join(value.scopes))
    return value


@pytest.fixture
def parsed():
    """Parses one config file into a clean gin state; returns ``_query``."""
    def parse(name: str):
        gin.clear_config()
        parse_gin([os.path.join(REPO, "gin", f"{name}.gin")], [])
        return _query
    yield parse
    gin.clear_config()


def _bound(query, binding: str, default=None):
    try:
        return query(binding)
    except ValueError:  # not bound: the function's default applies
        return default


@pytest.mark.parametrize("gin_file", GIN_FILES, ids=os.path.basename)
def test_every_config_parses_and_passes_the_binding_checks(gin_file, parsed):
    query = parsed(os.path.basename(gin_file)[:-4])
    settings.check_bindings(pipeline._job_configurables())
    arch = query("build_segmenter.arch")
    for knob in ("blocks", "width_multiplier", "dropout", "bn_mode"):
        if _bound(query, f"build_segmenter.{knob}") is not None:
            assert knob in size_knobs_of(arch), (gin_file, knob)
    assert _bound(query, "build_segmenter.bn_mode", "frozen") in BN_MODES


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configs_hold_the_settings_table(name, parsed):
    arch, dataset, weights = PAPER_CONFIGS[name]
    query = parsed(name)
    assert query("build_segmenter.arch") == arch
    assert query("source_domain.dataset") == dataset
    assert query("run_pipeline.init_weights") == weights
    assert query("run_pipeline.source_only_steps") == 0
    # Sec. 4: 1024x512 in both domains, M on whole images, F on 512x512 crops, batch 1.
    assert query("source_domain.resize") == query("target_domain.resize") == (512, 1024)
    assert query("source_domain.crop") is None
    assert query("run_pipeline.translator_crop") == (512, 512)
    assert _bound(query, "run_pipeline.batch_size", 1) == 1
    assert _bound(query, "run_pipeline.translator_batch_size", 1) == 1
    # Sec. 3.4: lambda_adv 1e-3 for DeepLabV2, 1e-4 for FCN8s; BDL's schedules.
    if arch == "deeplabv2":
        assert query("train_segmenter.lambda_adv") == 1e-3
        assert query("deeplabv2_optimizer.decay_steps") == 250000
        assert query("discriminator_optimizer.decay_steps") == 250000
        assert query("build_segmenter.bn_mode") == "train"  # BDL.py: model.train()
    else:
        assert query("train_segmenter.lambda_adv") == 1e-4
        assert query("fcn8s_optimizer.step_decay_every") == 50000
        assert query("discriminator_optimizer.step_decay_every") == 50000


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_from_scratch_variants_change_only_the_start(name, parsed):
    paper = parsed(name)
    paper_settings = {binding: _bound(paper, binding) for binding in (
        "source_domain.resize", "train_segmenter.lambda_adv", "build_segmenter.bn_mode",
        "run_pipeline.translator_crop")}
    scratch = parsed(f"{name}_from_scratch")
    assert scratch("run_pipeline.source_only_steps") == 120000
    assert scratch("run_pipeline.init_weights") != PAPER_CONFIGS[name][2]
    assert {binding: _bound(scratch, binding) for binding in paper_settings} == paper_settings
