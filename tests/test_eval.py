"""The evaluation: engines agree (simulated == compiled), exact at compression 0, methods, report, sharding, CLI."""

import argparse
import json
from dataclasses import replace

import pytest
import torch
from test_profiling import save_tiny_model
from tiny_models import tiny_model

from lukv_compile.eval import harness, methods, report
from lukv_compile.eval.harness import Result, evaluate, run_sample
from lukv_compile.eval.tasks import make_samples
from lukv_compile.profile import Profile
from lukv_compile.tools import eval_command as command


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


def tiny_profile(tmp_path, scorer: str) -> None:
    """A shipped-style LU-KV profile for the tiny model: head (0, 0) keeps more than the others."""
    prune = Profile.uniform(2, 2).prune.copy()
    prune[:, 0, 0] = prune[:, 0, 1] / 2
    Profile(prune, scorer=scorer).save(tmp_path / f"tiny-llama-{scorer}.safetensors")


def test_full_cache_loop_equals_eager_generate(model):
    tokenizer = CharTokenizer()
    sample = make_samples("passkey", tokenizer, 300, 1, seed=1)[0]
    prompt = harness.encode(tokenizer, sample, "plain")
    prompt = replace(prompt, max_new_tokens=20)
    ids = torch.cat([prompt.context_ids, torch.tensor([prompt.question_ids])], dim=1)
    with torch.no_grad():  # before compiling: after it the model's own generate() compresses too
        eager = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                               do_sample=False, eos_token_id=2, pad_token_id=0)
    want = eager[0, ids.shape[1]:].tolist()
    got = run_sample(lukv_compiled(model), model, methods.make_cache("full", model, 0.8), prompt, {2})
    assert got.tokens == (want[:-1] if want[-1] == 2 else want)
    assert len(got.step_seconds) == len(got.tokens) - (len(got.tokens) == 20)  # the question is one forward
    # full cache: K/V plus 4 bytes of position per slot and the room to grow (at most 1/16 of a head, or 16 slots)
    assert got.full_bytes <= got.kv_bytes < 1.2 * got.full_bytes


def greedy_reference(model, ids: list[int], tokens: int) -> list[int]:
    """`tokens` greedy tokens after `ids`, each from a full forward over everything so far (no cache)."""
    out = []
    with torch.no_grad():
        for _ in range(tokens):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def test_follow_up_questions_continue_the_conversation_on_the_same_cache(model):
    """Each later question follows the previous answer, cut at max_new_tokens or not: at compression 0 every
    answer equals greedy decoding over the whole conversation."""
    prompt = harness.Prompt(torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(1)),
                            [5, 6, 7], 6, [], ([8, 9, 10, 11], [12, 13]))
    got = run_sample(lukv_compiled(model), model, methods.make_cache("full", model, 0.8), prompt, set())
    so_far = prompt.context_ids[0].tolist() + prompt.question_ids
    for answer, turn in zip([got.tokens, *got.later], [*prompt.followups, []], strict=True):
        assert answer == greedy_reference(model, so_far, 6)
        so_far += answer + turn
    assert len(got.later) == 2
    assert harness.conversation_ids(prompt, got) == so_far[70:]  # what the compiled engine's oracle scores


def test_a_multi_question_sample_is_scored_per_turn(model):
    tokenizer = CharTokenizer()
    results = evaluate(model, tokenizer, ["full"], ["niah_multiturn"], [800], 1, [0.8], engine="compiled",
                       progress=False, prompt_format="plain", inner="aot_eager", haystacks=("chat",))
    (result,) = results
    assert result.task == "niah_multiturn@chat" and len(result.turns) == 4
    assert result.score == sum(result.turns) / 4 and result.answer.count(" | ") == 3


METHODS = ["full", "streaming", "uniform:snapkv", "pyramid:keydiff", "adakv:snapkv", "lukv:keydiff",
           "uniform:expected_attention"]


@pytest.mark.parametrize("protocol", ["agnostic", "aware"])
def test_simulated_engine_gives_the_compiled_engines_answers(model, tmp_path, monkeypatch, protocol):
    """The simulated engine (one prefill, every method as a row of one masked batch) answers exactly as the
    product path (one compiled LUKVCache per run), for every budget kind, scorer and both protocols."""
    monkeypatch.setattr(methods, "PROFILE_DIR", tmp_path)
    tiny_profile(tmp_path, "keydiff")
    args = dict(methods=METHODS, tasks=["passkey"], context_tokens=[300], samples=2, compressions=[0.5, 0.8],
                progress=False, prompt_format="plain", protocols=(protocol,))
    simulated = evaluate(model, CharTokenizer(), engine="simulated", **args)
    compiled = evaluate(model, CharTokenizer(), engine="compiled", compiled=lukv_compiled(model), **args)
    key = lambda r: (r.sample, r.method, r.compression)  # noqa: E731
    assert len(simulated) == len(compiled) == 2 * (1 + 2 * (len(METHODS) - 1))
    assert {key(r): r.answer for r in simulated} == {key(r): r.answer for r in compiled}
    assert len({r.answer for r in simulated}) > 2, "compression should change some answers"
    kept = {(r.method, r.compression): r.kept for r in simulated}
    assert kept["full", 0.0] == 1.0 and 0.45 < kept["uniform:snapkv", 0.5] < 0.6
    assert kept["uniform:snapkv", 0.8] < kept["uniform:snapkv", 0.5]
    assert all(r.kv_ratio is not None and r.kept is None for r in compiled)


@pytest.mark.parametrize("skipped, runs, note", [
    # one top-r over every layer needs every layer's scores first: compress_context's scorings only
    ("global:keydiff", "uniform:keydiff", "global budgets need every layer's scores before any is kept"),
    # a cache ranks with its own profile's ranking: on the compiled engine this would silently be lukv:keydiff
    ("lukv-keydiff:snapkv", "lukv-keydiff:keydiff", "a cache ranks with its profile's own ranking (keydiff)"),
])
def test_simulated_only_methods_are_skipped_on_the_compiled_engine(skipped, runs, note, model, capsys, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(methods, "PROFILE_DIR", tmp_path)
    tiny_profile(tmp_path, "keydiff")
    args = dict(methods=["full", skipped, runs], tasks=["passkey"], context_tokens=[300], samples=1,
                compressions=[0.8], progress=False, prompt_format="plain")
    simulated = evaluate(model, CharTokenizer(), engine="simulated", **args)
    assert [r.method for r in simulated] == ["full", skipped, runs]
    compiled = evaluate(model, CharTokenizer(), engine="compiled", compiled=lukv_compiled(model), **args)
    assert [r.method for r in compiled] == ["full", runs]
    assert f"skipped {skipped}: {note}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="only the simulated engine"):
        methods.make_cache(skipped, model, 0.8)


def test_kvzip_two_by_two_runs_on_the_simulated_engine(model, tmp_path, monkeypatch):
    """{reconstruction, kvzip} x {LU-KV budgets, global top-r}: the global rows keep as many tokens in all as
    uniform budgets would; both need the agnostic protocol."""
    monkeypatch.setattr(methods, "PROFILE_DIR", tmp_path)
    tiny_profile(tmp_path, "reconstruction")
    names = ["lukv:reconstruction", "lukv-reconstruction:kvzip", "global:reconstruction", "global:kvzip",
             "uniform:kvzip"]
    results = evaluate(model, CharTokenizer(), names, ["passkey"], [300], 1, [0.8], progress=False,
                       prompt_format="plain")
    kept = {r.method: r.kept for r in results}
    assert [r.method for r in results] == names
    assert kept["global:kvzip"] == pytest.approx(kept["global:reconstruction"])
    assert kept["global:kvzip"] == pytest.approx(kept["uniform:kvzip"])  # one total, split by the scores
    with pytest.raises(ValueError, match="agnostic only"):
        evaluate(model, CharTokenizer(), ["global:kvzip"], ["passkey"], [300], 1, [0.8], progress=False,
                 prompt_format="plain", protocols=("aware",))


def test_the_compiled_engines_oracle_answers_as_the_simulated_engines(model, tmp_path, monkeypatch):
    """Agnostic, one question: the compiled engine's oracle (the utility of the full cache's question and answer,
    filled before the question) keeps what the simulated engine's oracle keeps, on LU-KV and global budgets."""
    monkeypatch.setattr(methods, "PROFILE_DIR", tmp_path)
    tiny_profile(tmp_path, "keydiff")
    args = dict(methods=["full", "lukv-keydiff:oracle", "global:oracle", "uniform:keydiff"], tasks=["passkey"],
                context_tokens=[300], samples=2, compressions=[0.8], progress=False, prompt_format="plain")
    simulated = evaluate(model, CharTokenizer(), engine="simulated", **args)
    compiled = evaluate(model, CharTokenizer(), engine="compiled", compiled=lukv_compiled(model), **args)
    key = lambda r: (r.sample, r.method)  # noqa: E731
    assert {key(r): r.answer for r in simulated} == {key(r): r.answer for r in compiled}
    with pytest.raises(ValueError, match="compiled engine's oracle .* agnostic only"):
        evaluate(model, CharTokenizer(), engine="compiled", compiled=lukv_compiled(model), protocols=("aware",), **args)


def test_samples_are_sharded_over_ranks(model):
    args = dict(methods=["full", "uniform:snapkv"], tasks=["passkey"], context_tokens=[256], samples=3,
                compressions=[0.8], progress=False, prompt_format="plain")
    ranks = [evaluate(model, CharTokenizer(), rank=r, world=2, **args) for r in (0, 1)]
    assert sorted({r.sample for r in ranks[0]}) == [0, 2] and sorted({r.sample for r in ranks[1]}) == [1]
    alone = evaluate(model, CharTokenizer(), **args)
    merged = command.gather(ranks[0] + ranks[1], 1)
    assert sorted(map(repr, merged)) == sorted(map(repr, alone))


def test_missing_profiles_are_skipped(model, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "PROFILE_DIR", tmp_path)
    results = evaluate(model, CharTokenizer(), ["full", "lukv:snapkv", "lukv-keydiff:oracle"], ["passkey"], [256], 1,
                       [0.8], progress=False, prompt_format="plain")
    out = capsys.readouterr().out
    assert "skipped lukv:snapkv" in out and "tiny-llama-snapkv.safetensors" in out
    assert "skipped lukv-keydiff:oracle" in out
    assert [r.method for r in results] == ["full"]


def test_method_caches_match_their_definitions(model, tmp_path, monkeypatch):
    assert methods.make_cache("full", model, 0.8).settings.compression == 0.0
    assert methods.make_cache("streaming", model, 0.8).profile.scorer == "streaming"
    assert methods.make_cache("adakv:keydiff", model, 0.8).settings.policy == "adakv"
    pyramid = methods.make_cache("pyramid:snapkv", model, 0.8).profile.fractions(0.8)
    assert pyramid[0].mean() < pyramid[1].mean()  # shallow layers keep more
    monkeypatch.setattr(methods, "PROFILE_DIR", tmp_path)
    tiny_profile(tmp_path, "keydiff")
    lukv = methods.make_cache("lukv:keydiff", model, 0.8)
    assert lukv.profile.scorer == "keydiff" and lukv.profile.fractions(0.8)[0, 0] < lukv.profile.fractions(0.8)[0, 1]
    oracle = methods.resolve("lukv-keydiff:oracle", model)
    assert oracle.scorer == "oracle" and oracle.profile.fractions(0.8)[0, 0] == lukv.profile.fractions(0.8)[0, 0]


@pytest.mark.parametrize("text, message", [
    ("full,bogus", "unknown method 'bogus'.*allowed: full, streaming, or budget:scorer"),
    ("uniform:h2o", "unknown method 'uniform:h2o'"),
    ("lukv-h2o:snapkv", "unknown method 'lukv-h2o:snapkv'"),
    ("", "no method given"),
    ("full,full", "listed twice"),
])
def test_bad_method_names(text, message):
    with pytest.raises(ValueError, match=message):
        methods.parse_methods(text)


def test_all_methods_cover_every_budget_and_scorer():
    names = methods.parse_methods("all")
    assert {"full", "streaming", "uniform:snapkv", "pyramid:keydiff", "adakv:expected_attention", "lukv:keydiff",
            "uniform:oracle", "lukv-snapkv:oracle"} <= set(names)


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": ["passkey", "sudoku"]}, "unknown task"),
    ({"context_tokens": [10]}, "context_tokens must be"),
    ({"samples": 0}, "samples must be"),
    ({"compressions": [1.0]}, "compression must be"),
    ({"prompt_format": "xml"}, "unknown prompt format"),
    ({"engine": "vllm"}, "unknown engine 'vllm'"),
    ({"protocols": ("agnostic", "psychic")}, "unknown protocol"),
    ({"haystacks": ("persuasion", "phonebook")}, "unknown haystack"),
    ({"tasks": ["niah_multiturn"]}, "only the compiled engine runs"),
])
def test_bad_evaluation_arguments_raise_before_work(model, kwargs, message):
    args = {"methods": ["full"], "tasks": ["passkey"], "context_tokens": [256], "samples": 1,
            "compressions": [0.8], **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluate(model, CharTokenizer(), **args, progress=False, inner="aot_eager")
    assert torch._dynamo.utils.counters["lukv"]["graphs_compiled"] == 0


def fake_results():
    def result(method, compression, task, sample, score, engine="simulated"):
        return Result(engine, "agnostic", 1024, task, sample, method, compression, score, f"a{score}",
                      kept=1 - compression)

    rows = []
    for i in range(4):
        rows += [result("full", 0.0, "passkey", i, 1.0), result("full", 0.0, "niah_single", i, float(i < 2)),
                 result("uniform:snapkv", 0.8, "passkey", i, float(i < 2)),
                 result("uniform:snapkv", 0.8, "niah_single", i, 0.0),
                 result("lukv:snapkv", 0.8, "passkey", i, float(i < 3)),
                 result("lukv:snapkv", 0.8, "niah_single", i, float(i < 1)),
                 result("uniform:oracle", 0.8, "passkey", i, 1.0), result("uniform:oracle", 0.8, "niah_single", i, 0.5)]
    return rows


def test_markdown_table_has_intervals_and_the_ceiling():
    lines = report.markdown_table(fake_results()).splitlines()
    assert lines[0] == "### agnostic, context 1024 tokens, simulated engine (samples per task: 4)"
    assert ("| method | compression | passkey | niah_single | mean [95% CI] | % of ceiling | % of full | kept "
            "| KV bytes ratio | decode ms |") in lines
    full = next(line for line in lines if line.startswith("| full |"))
    assert full.startswith("| full | 0 | 1.00 | 0.50 | 0.750 [0.50, 1.00] | - | 100% | 1.000 |")
    lukv = next(line for line in lines if line.startswith("| lukv:snapkv |"))
    assert lukv.startswith("| lukv:snapkv | 0.8 | 0.75 | 0.25 | 0.500 [") and "| 67% | 67% | 0.200 |" in lukv
    budgets = report.budget_table(fake_results())
    assert "| snapkv | 0.8 | 0.250 | - | - | 0.500 | +0.250 | 67% |" in budgets
    with pytest.raises(ValueError, match="no results"):
        report.markdown_table([])


def test_bootstrap_interval_covers_the_mean_and_narrows_with_samples():
    def cell(n):
        return {"t": [Result("simulated", "agnostic", 1, "t", i, "m", 0.8, float(i % 2), "") for i in range(n)]}

    low, high = report.bootstrap_interval(cell(10))
    low2, high2 = report.bootstrap_interval(cell(200))
    assert low < 0.5 < high and low2 < 0.5 < high2 and (high2 - low2) < (high - low) / 3
    one = {"t": [Result("simulated", "agnostic", 1, "t", 0, "m", 0.8, 1.0, "")]}
    assert report.bootstrap_interval(one) == (1.0, 1.0)


def test_cross_check_counts_identical_answers():
    both = fake_results() + [Result("compiled", *(r.protocol, r.context_tokens, r.task, r.sample, r.method,
                                                  r.compression, r.score, r.answer if r.sample else "other"))
                             for r in fake_results() if r.method == "lukv:snapkv"]
    assert "8 (sample, method, compression) runs in common; identical answers 6/8" in report.cross_check(both)


def test_write_results_keeps_text_around_the_generated_block(tmp_path):
    out = tmp_path / "results.md"
    report.write_results(fake_results()[:2], out, {"command": "`lukv eval`"})
    out.write_text("# Mine\n\nintro\n" + out.read_text().split("\n", 1)[1] + "\n## Analysis\nkept\n")
    report.write_results(fake_results(), out, {"command": "`lukv eval --again`"})
    text = out.read_text()
    assert text.startswith("# Mine\n\nintro\n") and text.endswith("## Analysis\nkept\n")
    assert "--again" in text and "| lukv:snapkv | 0.8 |" in text and text.count(report.BEGIN) == 1


def test_plots_are_pngs(tmp_path):
    report.plot_accuracy(fake_results(), tmp_path / "acc.png")
    report.plot_budgets(Profile.pyramid(4, 2), tmp_path / "budgets.png")
    for name in ("acc.png", "budgets.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def eval_parser():
    parser = argparse.ArgumentParser(prog="lukv")
    command.add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_command_end_to_end_on_a_saved_tiny_model(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "tiny")
    out, js = tmp_path / "results.md", tmp_path / "rows.json"
    args = eval_parser().parse_args(["eval", "--model", str(folder), "--tasks", "passkey", "--context", "256",
                                     "--samples", "2", "--methods", "full,uniform:snapkv,uniform:oracle",
                                     "--protocol", "agnostic,aware", "--prompt-format", "plain", "--json", str(js),
                                     "--out", str(out), "--no-progress"])
    assert command.run(args) == 0
    results = json.loads(js.read_text())["results"]
    assert len(results) == 2 * 2 * 3
    assert {(r["method"], r["compression"], r["protocol"]) for r in results} >= {("full", 0.0, "aware"),
                                                                                ("uniform:oracle", 0.8, "agnostic")}
    text = out.read_text()
    assert "--methods full,uniform:snapkv,uniform:oracle --engine simulated --protocol agnostic,aware" in text
    assert "### aware, context 256 tokens" in text and (tmp_path / "results_accuracy.png").is_file()
    assert "no budget heatmap" in capsys.readouterr().out
    # Re-rendering from the saved results gives the same tables.
    again = tmp_path / "again.md"
    args = eval_parser().parse_args(["eval", "--model", str(folder), "--from-json", str(js), "--out", str(again)])
    assert command.run(args) == 0
    assert report.markdown_table([Result(**r) for r in results]) in again.read_text()
    # The same rows in two files count once; --tasks keeps only those tasks' rows.
    twice = tmp_path / "twice.md"
    args = eval_parser().parse_args(["eval", "--model", str(folder), "--from-json", f"{js},{js}", "--out", str(twice),
                                     "--tasks", "passkey"])
    assert command.run(args) == 0
    assert report.markdown_table([Result(**r) for r in results]) in twice.read_text()
    args = eval_parser().parse_args(["eval", "--model", str(folder), "--from-json", str(js), "--out", str(twice),
                                     "--tasks", "niah_single"])
    with pytest.raises(ValueError, match="no results"):
        command.run(args)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "full,nope"], "unknown method"),
    (["--context", "1k"], "--context must be a comma-separated list"),
    (["--compression", "0.8,1.5"], "compression must be"),
    (["--tasks", "sudoku"], "unknown task"),
    (["--protocol", "psychic"], "unknown protocol"),
    (["--profile-dir", "/no/such/dir"], "--profile-dir: /no/such/dir is not a folder"),
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
def test_smollm2_engines_agree_and_the_full_cache_finds_the_key():
    """Real SmolLM2, 2 passkey samples at 1k: the full cache finds the key; both engines give the same answers
    (reconstruction too: the chat template's repeat request, compress_context on the compiled path)."""
    pytest.importorskip("gguf")
    from lukv_compile.models import load_model

    model, tokenizer = load_model("smollm2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more OpenMP threads than free cores spin and run far slower
    args = dict(methods=["full", "lukv:keydiff", "adakv:snapkv", "lukv-snapkv:reconstruction"], tasks=["passkey"],
                context_tokens=[1024], samples=2, compressions=[0.8], progress=False)
    try:
        simulated = evaluate(model, tokenizer, engine="simulated", **args)
        compiled = evaluate(model, tokenizer, engine="compiled", inner="aot_eager", **args)
    finally:
        torch.set_num_threads(threads)
    assert [r.score for r in simulated if r.method == "full"] == [1.0, 1.0]
    assert [r.answer for r in simulated] == [r.answer for r in compiled]
    assert all(r.kv_ratio < 0.3 for r in compiled if r.method != "full")


def test_summary_table_compares_lukv_with_the_ceiling_and_the_best_other_method():
    borrowed = [Result("simulated", "agnostic", 1024, task, i, "lukv-keydiff:snapkv", 0.8, float(i < 3), "a")
                for task in ("passkey", "niah_single") for i in range(4)]  # 0.75 on both: 0.625 with niah 0.5
    borrowed = [r if r.task == "passkey" or r.sample < 2 else replace(r, score=0.0) for r in borrowed]
    table = report.summary_table(fake_results() + borrowed, compressions=(0.8,))
    row = ("| agnostic | 1024 | 0.8 | 0.750 | 0.750 | lukv:snapkv 0.500 | 67% | lukv-keydiff:snapkv 0.625 | 83% "
           "| uniform:snapkv 0.250 | +0.250 |")
    assert row in table


def test_summary_table_survives_a_zero_ceiling():
    zero = [r for r in fake_results() if r.method != "uniform:oracle"]
    zero += [Result("simulated", "agnostic", 1024, "passkey", 0, "uniform:oracle", 0.8, 0.0, "")]
    assert "| 0.000 | lukv:snapkv 0.500 | - |" in report.summary_table(zero, compressions=(0.8,))


def test_share_of_full_pairs_each_document_and_picks_one_compression(tmp_path, capsys, monkeypatch):
    """scripts/share_of_full.py: the ratio of means over runs, its interval around it, one compression at a time."""
    import runpy
    import sys
    from pathlib import Path

    def run_file(name, scores):  # scores: (full, method at 0.8, method at 0.9) per document
        rows = [dict(protocol="agnostic", task="t", sample=i, method=m, compression=c, score=x)
                for i, doc in enumerate(scores)
                for m, c, x in zip(("full", "m", "m"), (0.0, 0.8, 0.9), doc, strict=True)]
        (tmp_path / name).write_text(json.dumps({"results": rows}))
        return str(tmp_path / name)

    a = run_file("a.json", [(1, 1, 0), (1, 0, 0), (0, 0, 1), (1, 1, 1)])
    b = run_file("b.json", [(1, 1, 1), (1, 1, 0)])
    script = str(Path(__file__).parents[1] / "scripts" / "share_of_full.py")
    monkeypatch.setattr(sys, "argv", ["share_of_full.py", "m", a, b, "--compression", "0.8"])
    runpy.run_path(script, run_name="__main__")
    monkeypatch.setattr(sys, "argv", ["share_of_full.py", "m", a])
    with pytest.raises(SystemExit, match=r"m ran at \[0.8, 0.9\]: choose one with --compression"):
        runpy.run_path(script, run_name="__main__")
    said = capsys.readouterr().out
    assert "6 documents, full 0.833, method 0.667: share 80.0% [" in said  # 4 of 5 full-cache points kept
    low, high = (float(x.strip().rstrip("%]")) for x in said.split("[")[1].split(", "))
    assert low <= 80.0 <= high
