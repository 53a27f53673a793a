"""sait_tf.cli: the HEIGHT,WIDTH flag parser shared by the evaluate and translate commands."""

import pytest
from absl import app

from sait_tf.cli import parse_size


def test_parse_size_reads_height_then_width():
    assert parse_size(["512", "1024"], "resize") == (512, 1024)
    assert parse_size(None, "resize") is None and parse_size([], "resize") is None


@pytest.mark.parametrize("values, message", [
    (["512", "wide"], "--input_size must be HEIGHT,WIDTH, got"),
    (["512"], "--input_size must be HEIGHT,WIDTH of positive ints"),
    (["0", "1024"], "--input_size must be HEIGHT,WIDTH of positive ints"),
])
def test_parse_size_names_the_flag_in_its_error(values, message):
    with pytest.raises(app.UsageError, match=message):
        parse_size(values, "input_size")
