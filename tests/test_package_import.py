"""What importing sait_tf does to TensorFlow before any model is built."""

import os
import platform
import subprocess
import sys

import pytest

PROBE = ("import os, sait_tf\n"
         "from tensorflow.python.util import _pywrap_util_port\n"
         "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), _pywrap_util_port.IsMklEnabled())\n")

x86_64 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                            reason="oneDNN is turned on by sait_tf on x86-64 only")


def _import_sait_tf(onednn_setting: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if onednn_setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn_setting
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                            text=True, timeout=300, check=True)
    return result.stdout.split()


@x86_64
def test_importing_sait_tf_turns_on_tensorflows_onednn_kernels_unless_the_user_chose():
    # TensorFlow alone leaves them off on CPUs without AVX-512 VNNI/BF16, AVX-VNNI or AMX.
    assert _import_sait_tf(None) == ["1", "True"]
    assert _import_sait_tf("0") == ["0", "False"]


@x86_64
def test_tensorflow_imported_first_with_onednn_off_gets_a_warning():
    probe = ("import warnings\nwarnings.simplefilter('always')\nimport tensorflow\n"
             "from tensorflow.python.util import _pywrap_util_port\n"
             "import sait_tf\nprint(_pywrap_util_port.IsMklEnabled())\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                            text=True, timeout=300, check=True)
    onednn_on = result.stdout.split()[-1] == "True"
    # On CPUs where TensorFlow turns oneDNN on by itself there is nothing to say.
    assert ("import sait_tf first or set TF_ENABLE_ONEDNN_OPTS=1" in result.stderr) != onednn_on
