"""lm-evaluation-harness's RULER documents as evaluation samples (`lukv eval --tasks-file`).

tests/data/lmeval_ruler_1k_head.jsonl: the first document of each task in docs/eval_runs/lmeval_ruler_1k.jsonl,
written by scripts/lmeval_ruler_samples.py (lm-eval 0.4.13's generators, SmolLM2's tokenizer).
"""

import json
from pathlib import Path

import pytest
from test_eval import eval_parser, lukv_compiled
from test_profiling import chat_tokenizer, save_tiny_model, tiny_tokenizer
from tiny_models import tiny_model

from lukv_compile.eval.harness import encode, evaluate
from lukv_compile.eval.outside import REQUIRED_KEYS, load_ruler_docs
from lukv_compile.eval.tasks import make_samples
from lukv_compile.tools import eval_command as command

HEAD = Path(__file__).parent / "data" / "lmeval_ruler_1k_head.jsonl"
TASKS = ["niah_single_1", "niah_multikey_2", "ruler_vt", "ruler_cwe", "ruler_fwe"]


def docs() -> list[dict]:
    return [json.loads(line) for line in HEAD.read_text().splitlines()]


def test_each_document_becomes_a_sample_cut_before_its_question():
    sets = load_ruler_docs(HEAD, 1)
    assert [s.label for s in sets] == sorted(f"lmeval_{t}" for t in TASKS)
    assert {s.context_tokens for s in sets} == {1024}
    by_task = {s.label: s.samples[0] for s in sets}
    for doc in docs():
        sample = by_task[f"lmeval_{doc['task']}"]
        assert f"{sample.context}\n{sample.question}" == doc["input"].rstrip()  # nothing lost at the cut
        assert "\n" not in sample.question and sample.question.endswith(("?", "above."))
        assert sample.answers == doc["outputs"] and sample.max_new_tokens == doc["max_gen_toks"]
        assert sample.answer_prefix == doc["gen_prefix"] and sample.starts_answer
    vt = by_task["lmeval_ruler_vt"]
    assert vt.question.startswith("Question: Find all variables") and "VAR" in vt.context


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
def test_the_prompt_starts_the_answer_as_lm_eval_does(prompt_format):
    """lm-eval ends the prompt with gen_prefix; our own tasks end with the question (chat) or "Answer:" (plain)."""
    tokenizer = chat_tokenizer()
    sample = load_ruler_docs(HEAD, 1)[0].samples[0]
    def ends_with_prefix(s) -> bool:  # in tokens (the char tokenizer: one per character)
        prefix = tokenizer.encode(s.answer_prefix, add_special_tokens=False)
        return encode(tokenizer, s, prompt_format).question_ids[-len(prefix):] == prefix

    assert ends_with_prefix(sample)
    ours = make_samples("passkey", tokenizer, 256, 1)[0]
    assert ours.answer_prefix and not ends_with_prefix(ours)


def write(tmp_path, lines: list) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_the_compiled_engine_answers_lm_eval_documents_as_the_simulated_one():
    """The product path (a LUKVCache on the compiled model) gives the simulated engine's answers on lm-eval's
    documents, answer start included; the compressed rows differ from the full cache's, so the equality has teeth."""
    model, tokenizer = tiny_model(), tiny_tokenizer()
    sets = load_ruler_docs(HEAD, 1)[:3]
    args = dict(methods=["full", "uniform:snapkv", "uniform:keydiff"], tasks=[], context_tokens=[1024], samples=1,
                compressions=[0.8], progress=False, prompt_format="plain", sample_sets=sets)
    simulated = evaluate(model, tokenizer, engine="simulated", **args)
    compiled = evaluate(model, tokenizer, engine="compiled", compiled=lukv_compiled(model), **args)
    answers = {(r.task, r.method): r.answer for r in simulated}
    assert len(simulated) == len(compiled) == 3 * 3
    assert answers == {(r.task, r.method): r.answer for r in compiled}
    assert any(answers[s.label, "full"] != answers[s.label, m] for s in sets for m in ("uniform:snapkv",
                                                                                      "uniform:keydiff"))


def test_bad_files_raise_before_work_naming_the_line(tmp_path):
    good = docs()[0]
    with pytest.raises(ValueError, match="does not exist"):
        load_ruler_docs(tmp_path / "none.jsonl", 1)
    with pytest.raises(ValueError, match="holds no documents"):
        load_ruler_docs(write(tmp_path, [""]), 1)
    with pytest.raises(ValueError, match="line 2: not a JSON object"):
        load_ruler_docs(write(tmp_path, [good, "{oops"]), 1)
    with pytest.raises(ValueError, match="line 1: missing key.s. outputs"):
        load_ruler_docs(write(tmp_path, [{k: v for k, v in good.items() if k != "outputs"}]), 1)
    with pytest.raises(ValueError, match=r"outputs must be a non-empty list .*got \[\]"):
        load_ruler_docs(write(tmp_path, [good | {"outputs": []}]), 1)
    with pytest.raises(ValueError, match="the question on the last line"):
        load_ruler_docs(write(tmp_path, [good | {"input": "no question here"}]), 1)
    with pytest.raises(ValueError, match="max_gen_toks must be an int >= 1, got 0"):
        load_ruler_docs(write(tmp_path, [good | {"max_gen_toks": 0}]), 1)
    with pytest.raises(ValueError, match="fewer than 3 samples for lmeval_niah_single_1 at 1024: 2"):
        load_ruler_docs(write(tmp_path, [good, good]), 3)
    assert set(REQUIRED_KEYS) <= set(good)


def test_evaluate_refuses_short_sample_sets_and_tasks_beside_them():
    sets = load_ruler_docs(HEAD, 1)
    with pytest.raises(ValueError, match="every sample set needs 2 samples; lmeval_niah_multikey_2: 1"):
        evaluate(None, None, ["full"], [], [1024], 2, [0.8], sample_sets=sets)
    with pytest.raises(ValueError, match=r"give tasks or sample_sets, not both \(got tasks \['passkey'\]\)"):
        evaluate(None, None, ["full"], ["passkey"], [1024], 1, [0.8], sample_sets=sets)


def test_lukv_eval_runs_a_tasks_file_and_reports_its_tasks(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    js, out = tmp_path / "rows.json", tmp_path / "results.md"
    args = eval_parser().parse_args(["eval", "--model", str(folder), "--tasks-file", str(HEAD), "--samples", "1",
                                     "--methods", "full,uniform:snapkv", "--compression", "0.5",
                                     "--prompt-format", "plain", "--json", str(js), "--no-progress"])
    assert command.run(args) == 0
    saved = json.loads(js.read_text())
    assert sorted(r["task"] for r in saved["results"]) == sorted(f"lmeval_{t}" for t in TASKS for _ in range(2))
    assert f"--tasks-file {HEAD} --samples 1" in saved["meta"]["command"] and "--seed" not in saved["meta"]["command"]
    assert f"from {HEAD}" in saved["meta"]["samples"]
    args = eval_parser().parse_args(["eval", "--model", str(folder), "--from-json", str(js), "--out", str(out)])
    assert command.run(args) == 0  # no --tasks: every row is kept, ours or not
    assert "lmeval_ruler_vt" in out.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "passkey"], "--tasks-file gives the samples and their lengths: drop --tasks"),
    (["--context", "512", "--seed", "3"], "drop --context, --seed"),
    (["--samples", "2"], "fewer than 2 samples for lmeval_niah_single_1 at 1024: 1"),
])
def test_a_tasks_file_refuses_what_it_replaces_before_loading(argv, message):
    args = eval_parser().parse_args(["eval", "--model", "/no/such/model", "--tasks-file", str(HEAD), *argv])
    with pytest.raises(ValueError, match=message):
        command.run(args)
