"""lukv_compile.testing in a user's CI: the pytest plugin in an empty project on a tiny saved model, the broken
variants it must catch (each failure naming its property), and `lukv check`."""

import pytest
from test_profiling import save_tiny_model, tiny_config

from lukv_compile.config import config_fingerprint
from lukv_compile.profile import Profile
from lukv_compile.testing import PROPERTIES
from lukv_compile.tools.cli import main

pytest_plugins = ["pytester"]
QUICK = ["--lukv-inner", "aot_eager", "--lukv-max-examples", "2", "-p", "no:cacheprovider"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def other_model_profile(tmp_path_factory):
    """A profile of the tiny model's shape, made for another model (its config fingerprint differs)."""
    config = tiny_config()
    profile = Profile.uniform(config.num_hidden_layers, config.num_key_value_heads)
    config.vocab_size += 1
    profile.fingerprint = config_fingerprint(config)
    path = tmp_path_factory.mktemp("profile") / "other.safetensors"
    profile.save(path)
    return path


@pytest.mark.slow
def test_the_plugin_collects_and_passes_in_an_empty_project(pytester, tiny_folder):
    """Installing the package is enough: `pytest --lukv-model FOLDER` in a project with no tests, on the default
    compiler (inductor)."""
    result = pytester.runpytest_subprocess("--lukv-model", str(tiny_folder), "--lukv-max-examples", "2", "-v",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(PROPERTIES))
    result.stdout.fnmatch_lines([f"*::{name} PASSED*" for name in PROPERTIES])


def test_without_the_option_the_plugin_adds_nothing(pytester):
    pytester.makepyfile(test_mine="def test_one():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


OFF_BY_ONE = """
import lukv_compile.runtime.storage as storage

_replace = storage.RaggedStore.replace


def _shifted(self, selected, keys, values, positions):
    _replace(self, selected, keys, values, positions + 1)  # positions off by one after eviction


storage.RaggedStore.replace = _shifted
"""

IGNORES_BUDGET = """
import lukv_compile.runtime.layer as layer

_keep_counts = layer.keep_counts
layer.keep_counts = lambda profile, compression, lengths, protected: _keep_counts(profile, compression / 2, lengths,
                                                                                  protected)
"""


@pytest.mark.parametrize("conftest, broken", [(OFF_BY_ONE, "compressed_equals_masked_simulation"),
                                              (IGNORES_BUDGET, "budgets_respected")],
                         ids=["positions_off_by_one", "eviction_ignores_budget"])
def test_the_plugin_catches_a_broken_runtime(pytester, tiny_folder, conftest, broken):
    pytester.makeconftest(conftest)
    result = pytester.runpytest_subprocess("--lukv-model", str(tiny_folder), *QUICK, "-k", broken)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*lukv property {broken} failed:*", "*lengths=*"])  # the minimal inputs


def test_a_moved_touch_point_fails_before_any_model_runs(pytester, tiny_folder):
    """An upgrade that moves a private API lukv relies on: the canary names it, the model properties are skipped."""
    pytester.makeconftest("import transformers.modeling_layers as layers\n\ndel layers.GradientCheckpointingLayer\n")
    result = pytester.runpytest_subprocess("--lukv-model", str(tiny_folder), *QUICK)
    result.assert_outcomes(failed=1, skipped=len(PROPERTIES) - 1)
    result.stdout.fnmatch_lines(["*lukv property touch_points failed:*",
                                 "*transformers.modeling_layers.GradientCheckpointingLayer broke under torch*"])


def test_the_plugin_catches_a_profile_for_another_model(pytester, tiny_folder, other_model_profile):
    result = pytester.runpytest_subprocess("--lukv-model", str(tiny_folder), "--lukv-profile",
                                           str(other_model_profile), *QUICK, "-k", "profile_match")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*lukv property profile_match failed:*", "*fingerprint*"])


def test_lukv_check_summarises_and_sets_the_exit_status(tiny_folder, other_model_profile, capsys):
    main(["check", str(tiny_folder), "--inner", "aot_eager", "--max-examples", "2"])
    out = capsys.readouterr().out
    assert [f"[{i}/{len(PROPERTIES)}] {name}: ok" in out for i, name in enumerate(PROPERTIES, 1)] == \
        [True] * len(PROPERTIES), out
    assert f"{len(PROPERTIES)} of {len(PROPERTIES)} properties hold" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(tiny_folder), "--profile", str(other_model_profile), "--inner", "aot_eager",
              "--max-examples", "1"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "profile_match: FAILED" in out and "failed: profile_match" in out


def test_lukv_check_refuses_an_unknown_model(capsys):
    assert main(["check", "no-such-model"]) == 2
    assert "neither a saved transformers model folder" in capsys.readouterr().err
