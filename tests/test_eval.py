"""The evaluation harness: exact at compression 0, memory shrinks with compression, methods, report, CLI."""

import argparse
import json
import math

import pytest
import torch
from test_profiling import save_tiny_model
from tiny_models import tiny_model

from lukv_compile.eval import command, harness, methods, report
from lukv_compile.eval.harness import Prompt, Row, evaluate, run_sample
from lukv_compile.eval.tasks import make_samples
from lukv_compile.profile import Profile


class CharTokenizer:
    """One token per character (ASCII; anything else becomes '?'), so a tiny 128-word model can read tasks."""

    eos_token_id = 2

    def encode(self, text, add_special_tokens=False):
        return [ord(c) if ord(c) < 128 else ord("?") for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def model():
    m = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16, vocab=128, seed=3)
    m.config.name_or_path = "test/Tiny-Llama:random"
    return m


def lukv_compiled(model):
    return torch.compile(model, backend="lukv", options={"inner": "aot_eager"})


def test_full_cache_loop_equals_eager_generate(model):
    tokenizer = CharTokenizer()
    sample = make_samples("passkey", tokenizer, 300, 1, seed=1)[0]
    prompt = harness.encode(tokenizer, sample, "plain")
    prompt = Prompt(prompt.context_ids, prompt.question_ids, 20)
    got = run_sample(lukv_compiled(model), model, methods.make_cache("full", model, 0.8), prompt, {2})

    ids = torch.cat([prompt.context_ids, torch.tensor([prompt.question_ids])], dim=1)
    with torch.no_grad():
        eager = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                               do_sample=False, eos_token_id=2, pad_token_id=0)
    want = eager[0, ids.shape[1]:].tolist()
    assert got.tokens == (want[:-1] if want[-1] == 2 else want)
    assert len(got.step_seconds) == len(got.tokens) - (len(got.tokens) == 20)  # the question is one forward
    # full cache: K/V plus 4 bytes of position per slot and the room to grow (at most 1/16 of a head, or 16 slots)
    assert got.full_bytes <= got.kv_bytes < 1.2 * got.full_bytes


def test_kv_bytes_shrink_with_compression_and_missing_profiles_are_skipped(model, capsys):
    rows = evaluate(model, CharTokenizer(), ["full", "snapkv", "streaming", "lukv_keydiff"], ["passkey"], [256], 2,
                    [0.5, 0.8], progress=False, prompt_format="plain", inner="aot_eager")
    assert "skipped lukv_keydiff" in capsys.readouterr().out
    by_run = {(r.method, r.compression): r for r in rows}
    assert sorted(by_run) == [("full", 0.0), ("snapkv", 0.5), ("snapkv", 0.8), ("streaming", 0.5),
                              ("streaming", 0.8)]
    full, half, most = by_run["full", 0.0], by_run["snapkv", 0.5], by_run["snapkv", 0.8]
    assert full.kv_bytes > half.kv_bytes > most.kv_bytes
    assert 1.0 <= full.kv_ratio < 1.2 and 0.5 < half.kv_ratio < 0.7 and most.kv_ratio < half.kv_ratio
    assert by_run["streaming", 0.8].kv_bytes == most.kv_bytes  # same uniform budgets, other scorer
    assert all(r.n == 2 and 0.0 <= r.score <= 1.0 for r in rows)
    assert all(r.decode_ms > 0 or math.isnan(r.decode_ms) for r in rows)  # nan: every answer ended in warm-up


def test_lukv_method_reads_the_shipped_profile(model, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "PROFILE_DIR", tmp_path)
    with pytest.raises(methods.ProfileMissingError, match="tiny-llama-snapkv.safetensors"):
        methods.make_cache("lukv_snapkv", model, 0.8)
    prune = Profile.uniform(2, 2).prune.copy()
    prune[:, 0, 0] = prune[:, 0, 1] / 2  # head (0, 0) keeps more than the others
    Profile(prune, scorer="snapkv", window=32).save(tmp_path / "tiny-llama-snapkv.safetensors")
    cache = methods.make_cache("lukv_snapkv", model, 0.8)
    assert cache.profile.prune[79, 0, 0] == pytest.approx(0.4) and cache.settings.policy == "lukv"
    Profile(prune, scorer="keydiff", window=1).save(tmp_path / "tiny-llama-snapkv.safetensors")
    with pytest.raises(ValueError, match="holds a keydiff profile, expected snapkv"):
        methods.make_cache("lukv_snapkv", model, 0.8)


def test_method_caches_match_their_definitions(model):
    assert methods.make_cache("full", model, 0.8).settings.compression == 0.0
    assert methods.make_cache("streaming", model, 0.8).profile.scorer == "streaming"
    assert methods.make_cache("adakv", model, 0.8).settings.policy == "adakv"
    pyramid = methods.make_cache("pyramidkv", model, 0.8).profile.fractions(0.8)
    assert pyramid[0].mean() < pyramid[1].mean()  # shallow layers keep more


@pytest.mark.parametrize("text, message", [
    ("full,bogus", "unknown method.*'bogus'.*allowed: full, streaming"),
    ("", "unknown method.*none given"),
    ("full,full", "listed twice"),
])
def test_bad_method_names(text, message):
    with pytest.raises(ValueError, match=message):
        methods.parse_methods(text)
    with pytest.raises(ValueError, match="unknown method 'h2o'"):
        methods.make_cache("h2o", None, 0.8)


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": ["passkey", "sudoku"]}, "unknown task"),
    ({"context_tokens": [10]}, "context_tokens must be"),
    ({"samples": 0}, "samples must be"),
    ({"compressions": [1.0]}, "compression must be"),
    ({"prompt_format": "xml"}, "unknown prompt format"),
])
def test_bad_evaluation_arguments_raise_before_work(model, kwargs, message):
    args = {"methods": ["full"], "tasks": ["passkey"], "context_tokens": [256], "samples": 1,
            "compressions": [0.8], **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluate(model, CharTokenizer(), **args, progress=False, inner="aot_eager")
    assert torch._dynamo.utils.counters["lukv"]["graphs_compiled"] == 0


def fake_rows():
    return [Row("full", 0.0, "passkey", 1024, 1.0, 2, 1000.0, 1.01, 40.0),
            Row("full", 0.0, "niah_single", 1024, 0.5, 2, 1000.0, 1.01, 42.0),
            Row("snapkv", 0.8, "passkey", 1024, 0.5, 2, 250.0, 0.25, 30.0),
            Row("snapkv", 0.8, "niah_single", 1024, 0.25, 2, 250.0, 0.25, 32.0)]


def test_markdown_table():
    table = report.markdown_table(fake_rows())
    lines = table.splitlines()
    assert lines[0] == "### Context 1024 tokens (samples per task: 2)"
    assert "| method | compression | passkey | niah_single | mean | % of full | KV bytes ratio | decode ms |" in lines
    assert "| full | 0 | 1.00 | 0.50 | 0.750 | 100% | 1.010 | 41.0 |" in lines
    assert "| snapkv | 0.8 | 0.50 | 0.25 | 0.375 | 50% | 0.250 | 31.0 |" in lines
    with pytest.raises(ValueError, match="no result rows"):
        report.markdown_table([])


def test_write_results_keeps_text_around_the_generated_block(tmp_path):
    out = tmp_path / "results.md"
    report.write_results(fake_rows()[:2], out, {"command": "`lukv eval`"})
    out.write_text("# Mine\n\nintro\n" + out.read_text().split("\n", 1)[1] + "\n## Analysis\nkept\n")
    report.write_results(fake_rows(), out, {"command": "`lukv eval --again`"})
    text = out.read_text()
    assert text.startswith("# Mine\n\nintro\n") and text.endswith("## Analysis\nkept\n")
    assert "--again" in text and "| snapkv | 0.8 |" in text and text.count(report.BEGIN) == 1


def test_plots_are_pngs(tmp_path):
    report.plot_accuracy(fake_rows(), tmp_path / "acc.png")  # one ratio: bars
    two_ratios = fake_rows() + [Row("snapkv", 0.5, "passkey", 1024, 1.0, 2, 500.0, 0.5, 35.0)]
    report.plot_accuracy(two_ratios, tmp_path / "lines.png")
    report.plot_budgets(Profile.pyramid(4, 2), tmp_path / "budgets.png")
    for name in ("acc.png", "lines.png", "budgets.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def eval_parser():
    parser = argparse.ArgumentParser(prog="lukv")
    command.add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_command_end_to_end_on_a_saved_tiny_model(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "tiny")
    out, js = tmp_path / "results.md", tmp_path / "rows.json"
    args = eval_parser().parse_args(["eval", "--model", str(folder), "--tasks", "passkey", "--context", "256",
                                     "--samples", "1", "--methods", "full,snapkv", "--inner", "aot_eager",
                                     "--prompt-format", "plain", "--json", str(js), "--out", str(out),
                                     "--no-progress"])
    assert command.run(args) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [(r["method"], r["compression"]) for r in rows] == [("full", 0.0), ("snapkv", 0.8)]
    assert "--methods full,snapkv" in out.read_text() and (tmp_path / "results_accuracy.png").is_file()
    assert "no budget heatmap" in capsys.readouterr().out
    # Re-rendering from the saved rows gives the same table.
    again = tmp_path / "again.md"
    args = eval_parser().parse_args(["eval", "--model", str(folder), "--from-json", str(js), "--out", str(again)])
    assert command.run(args) == 0
    assert report.markdown_table([Row(**r) for r in rows]) in again.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--methods", "full,nope"], "unknown method"),
    (["--context", "1k"], "--context must be a comma-separated list"),
    (["--compression", "0.8,1.5"], "compression must be"),
    (["--tasks", "sudoku"], "unknown task"),
    (["--out", "/no/such/dir/r.md"], "--out: folder /no/such/dir does not exist"),
    (["--from-json", "/no/such.json"], "--from-json needs --out"),
    (["--from-json", "/no/such.json", "--out", "r.md"], "--from-json: /no/such.json is not a JSON file"),
])
def test_command_rejects_bad_arguments_before_loading(argv, message, capsys):
    args = eval_parser().parse_args(["eval", "--model", "/no/such/model", *argv])
    with pytest.raises(ValueError, match=message):
        command.run(args)
    assert command.main(["eval", "--model", "/no/such/model", *argv]) == 2
    assert message.split(".*")[0] in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_passkey_smoke():
    """Real SmolLM2, 2 passkey samples at 1k: the full cache must find the key; LU-KV (or uniform) runs at 0.8."""
    pytest.importorskip("gguf")
    from lukv_compile.models import load_model

    model, tokenizer = load_model("smollm2")
    lukv = "lukv_snapkv" if methods.profile_path(model, "snapkv").is_file() else "snapkv"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more OpenMP threads than free cores spin and run far slower
    try:
        rows = evaluate(model, tokenizer, ["full", lukv], ["passkey"], [1024], 2, [0.8], progress=False,
                        inner="aot_eager")
    finally:
        torch.set_num_threads(threads)
    full, compressed = rows
    assert (full.method, full.score, full.n) == ("full", 1.0, 2)
    assert compressed.method == lukv and compressed.kv_ratio < 0.3 and compressed.kv_bytes < full.kv_bytes / 3
