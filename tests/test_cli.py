"""The `lukv` command line on a tiny random model saved to a folder."""

import json

import numpy as np
import pytest
import torch
from test_profiling import save_tiny_model

from lukv_compile.profile import NUM_RATIOS, Profile
from lukv_compile.tools.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


PROFILE_ARGS = ["--questions", "2", "--k-max", "3", "--context-tokens", "90", "--no-progress"]


def test_profile_with_no_out_is_found_by_a_cache_given_no_profile(tiny_folder, tmp_path, monkeypatch):
    """What the no-profile warning promises: `lukv profile MODEL` writes the default ranking's profile into the user's
    folder, and a cache built without a profile then uses it."""
    from transformers import AutoConfig

    from lukv_compile import LUKVCache
    from lukv_compile.profiles import DEFAULT_RANKINGS, PROFILE_DIR_ENV

    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path / "mine"))
    assert main(["profile", str(tiny_folder), *PROFILE_ARGS]) == 0
    (written,) = (tmp_path / "mine").iterdir()
    assert written.name == f"{tiny_folder.name.lower()}-{DEFAULT_RANKINGS[0]}.safetensors"
    cache = LUKVCache(AutoConfig.from_pretrained(tiny_folder), compression=0.8)
    assert np.array_equal(cache.profile.prune, Profile.load(written).prune)
    assert cache.profile.scorer == DEFAULT_RANKINGS[0]


def test_profile_inspect_solve_roundtrip(tiny_folder, tmp_path, capsys):
    out = tmp_path / "tiny-snapkv.safetensors"
    assert main(["profile", str(tiny_folder), "--scorer", "snapkv", "--out", str(out), "--save-curves",
                 *PROFILE_ARGS]) == 0
    profile = Profile.load(out)
    assert profile.prune.shape == (NUM_RATIOS, 2, 2) and profile.window == 32
    assert json.loads(profile.calibration)["context_tokens"] == 90

    png = tmp_path / "keep.png"
    assert main(["inspect", str(out), "--compression", "0.5", "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    keep = 1 - profile.fractions(0.5)
    assert f"{keep.mean():6.3f}" in printed and "scorer snapkv" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Re-solving the saved curves reproduces the profile; a different scope changes it.
    again = tmp_path / "again.safetensors"
    assert main(["solve", str(out.with_suffix(".curves.npz")), "--out", str(again)]) == 0
    np.testing.assert_array_equal(Profile.load(again).prune, profile.prune)
    layer = tmp_path / "layer.safetensors"
    assert main(["solve", str(out.with_suffix(".curves.npz")), "--out", str(layer), "--scope", "layer"]) == 0
    layered = Profile.load(layer)
    assert layered.scope == "layer"
    np.testing.assert_allclose(layered.prune[49].mean(axis=1), layered.prune[49].mean(), atol=1 / (2 * 90))


def test_profile_several_scorers_writes_one_file_each(tiny_folder, tmp_path):
    pattern = str(tmp_path / "p-{scorer}.safetensors")
    assert main(["profile", str(tiny_folder), "--scorer", "keydiff,expected_attention", "--out", pattern,
                 *PROFILE_ARGS]) == 0
    for scorer in ("keydiff", "expected_attention"):
        profile = Profile.load(tmp_path / f"p-{scorer}.safetensors")
        assert (profile.scorer, profile.window) == (scorer, 1)


def test_profile_shards_balance_and_solve_keeps_them(tiny_folder, tmp_path):
    out = tmp_path / "tp.safetensors"
    assert main(["profile", str(tiny_folder), "--out", str(out), "--shards", "2", "--save-curves", *PROFILE_ARGS]) == 0
    profile = Profile.load(out)
    assert json.loads(profile.calibration)["shards"] == 2
    again = tmp_path / "again.safetensors"
    assert main(["solve", str(out.with_suffix(".curves.npz")), "--out", str(again)]) == 0
    np.testing.assert_array_equal(Profile.load(again).prune, profile.prune)
    assert main(["profile", str(tiny_folder), "--out", str(out), "--shards", "3", *PROFILE_ARGS]) == 2


def test_profile_calibrates_on_given_files(tiny_folder, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("The lighthouse keeper wrote the tide tables by hand every night. " * 3)
    questions = tmp_path / "asked.json"
    questions.write_text(json.dumps(["Who wrote the tide tables?", {"question": "When?", "answer": "nightly"}]))
    out = tmp_path / "own.safetensors"
    assert main(["profile", str(tiny_folder), "--out", str(out), "--calibration-text", str(text),
                 "--calibration-questions", str(questions), "--k-max", "3", "--no-progress"]) == 0
    record = json.loads(Profile.load(out).calibration)
    assert (record["text"], record["questions"]) == ("custom context", 2)
    assert (record["text_file"], record["questions_file"]) == ("notes.txt", "asked.json")
    assert record["context_tokens"] == len(text.read_text())  # the char tokenizer: one token per character


@pytest.mark.parametrize("content, message", [
    (None, "no such calibration questions file"),
    ("directory", "cannot read"),
    ("[1, 2", "is not JSON"),
    ("[]", "holds no questions"),
    ('["fine", {"answer": "no question"}]', "items [1] are not non-empty questions"),
])
def test_bad_calibration_questions_fail_before_work(content, message, tmp_path, capsys):
    path = tmp_path / "q.json"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    assert main(["profile", "smollm2", "--out", "x.safetensors", "--calibration-questions", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_custom_calibration_text_needs_its_questions(tmp_path, capsys):
    text, questions = tmp_path / "t.txt", tmp_path / "q.json"
    text.write_text("some text")
    questions.write_text('["one?", "two?"]')
    assert main(["profile", "smollm2", "--out", "x.safetensors", "--calibration-text", str(text)]) == 2
    assert "needs --calibration-questions" in capsys.readouterr().err
    assert main(["profile", "smollm2", "--out", "x.safetensors", "--calibration-questions", str(questions),
                 "--questions", "3"]) == 2
    assert "only 2 calibration questions" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["profile", "no-such-model", "--out", "x.safetensors"], "neither a known name"),
    (["profile", "smollm2", "--scorer", "h2o", "--out", "x.safetensors"], "unknown scorer 'h2o'"),
    (["profile", "smollm2", "--scorer", "snapkv,keydiff", "--out", "x.safetensors"], "must contain {scorer}"),
    (["profile", "smollm2", "--scorer", "snapkv,snapkv", "--out", "{scorer}.st"], "twice"),
    (["profile", "smollm2", "--out", "/no/such/dir/x.safetensors"], "does not exist"),
    (["profile", "smollm2", "--questions", "31", "--out", "x.safetensors"], "only 30 calibration questions"),
    (["profile", "smollm2", "--shards", "3", "--scope", "layer", "--out", "x.safetensors"], "needs scope 'global'"),
    (["profile", "smollm2", "--scorer", "reconstruction", "--reconstruction-pool", "4", "--out", "x.safetensors"],
     "odd integer >= 1"),
    (["inspect", "/no/such/profile.safetensors"], "no such profile file"),
    (["solve", "/no/such/curves.npz", "--out", "x.safetensors"], "no such curves file"),
])
def test_bad_arguments_fail_before_work(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["profile", "smollm2", "--out", "x.safetensors", "--k-max", "0"],
    ["profile", "smollm2", "--out", "x.safetensors", "--scope", "heads"],
    ["profile", "smollm2", "--out", "x.safetensors", "--scorer", "reconstruction", "--reconstruction-pool", "0"],
    ["inspect", "x.safetensors", "--compression", "1.5"],
    ["frobnicate"],
])
def test_argparse_rejects_bad_values(args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2


def test_solve_rejects_a_file_that_is_not_curves(tmp_path, capsys):
    bogus = tmp_path / "bogus.npz"
    np.savez(bogus, other=np.zeros(3))
    assert main(["solve", str(bogus), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a curves file" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_as_the_readme_runs_it():
    """`lukv demo` (the README's first command) in a fresh process: it finds the passkey and compresses."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    lukv = Path(sys.executable).with_name("lukv")
    out = subprocess.run([str(lukv), "demo"], capture_output=True, text=True, timeout=600, check=True).stdout
    found = re.search(r"^answer: .*\(found the passkey (\d+)\)$", out, re.M)
    assert found, out
    ratio = float(re.search(r"^KV cache: .* \((\d+\.\d+)x\)$", out, re.M).group(1))
    assert ratio < 0.3, out
    from lukv_compile.profiles import DEFAULT_RANKINGS

    assert f"compression 0.8, {DEFAULT_RANKINGS[0]} ranking on global budgets" in out  # the model's own profile, found


@pytest.mark.parametrize("method, selection", [("reconstruction", "budgets"), ("kvzip", "global"),
                                               ("kvzip_pooled", "global"), ("prompt", "budgets"), (None, "global")])
def test_compress_writes_a_cache_a_service_loads(method, selection, tiny_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lukv_compile import LUKVCache
    from lukv_compile.tools.compress_command import document_ids

    text = "the quick brown fox jumps over the lazy dog. " * 4
    (tmp_path / "doc.txt").write_text(text)
    out = tmp_path / "doc.lukv"
    chosen = ["--method", method, "--selection", selection] if method else []  # None: the defaults
    assert main(["compress", str(tmp_path / "doc.txt"), "--model", str(tiny_folder), "--out", str(out), *chosen,
                 "--compression", "0.5"]) == 0
    said = capsys.readouterr().out
    method = method or "kvzip"
    assert f"compressed by {method}" in said and f"wrote {out}" in said
    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    cache = LUKVCache.load(out, model)
    assert torch.equal(cache.token_ids, document_ids(AutoTokenizer.from_pretrained(tiny_folder), text))
    assert cache.settings.compression == 0.5 and cache.profile.scorer == ("snapkv" if method == "prompt" else
                                                                           "reconstruction")
    assert ("global selection" if selection == "global" else "uniform budgets") in said
    held = sum(layer.store.held.sum() for layer in cache.layers)
    assert held < 0.6 * len(cache.layers) * cache.num_kv_heads * cache.get_seq_length()


@pytest.mark.parametrize("args, message", [
    (["compress", "/no/such/doc.txt", "--model", "smollm2", "--out", "x.lukv"], "no such file"),
    (["compress", "{empty}", "--model", "smollm2", "--out", "x.lukv"], "is empty"),
    (["compress", "{empty}", "--model", "smollm2", "--out", "/no/such/dir/x.lukv"], "does not exist"),
    (["compress", "{doc}", "--model", "smollm2", "--out", "x.lukv", "--method", "prompt", "--selection", "global"],
     "selection 'global' needs a reconstruction scoring (reconstruction, kvzip, kvzip_pooled)"),
])
def test_compress_bad_arguments_fail_before_work(args, message, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "doc.txt").write_text("a document")
    args = [a.replace("{empty}", str(tmp_path / "empty.txt")).replace("{doc}", str(tmp_path / "doc.txt")) for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err
