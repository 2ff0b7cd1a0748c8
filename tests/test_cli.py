"""`dgemma` CLI on CPU with the bundled demo model: outputs, determinism, and clean errors.

Most tests call `dgemma.cli.main.main([...])` in-process, with the model loaded once per module (the loader is
swapped for a cache); one test runs `python -m dgemma.cli` in a subprocess to check the real entry point.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from dgemma.cli.main import main
from dgemma.cli.view import CommittedText, LiveView
from dgemma.engine.generate import StepEvent

FAST = ["--max-new-tokens", "16", "--max-denoising-steps", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def llm_cache():
    from dgemma import LLM

    cache = {}

    def load(model=None, device=None, dtype=None, lora=None):
        if (model, device, dtype, lora) not in cache:
            cache[model, device, dtype, lora] = LLM(model, device=device, dtype=dtype, lora=lora)
        return cache[model, device, dtype, lora]

    return load


@pytest.fixture
def cli(monkeypatch, capsys, llm_cache):
    """Run `dgemma ARGS` in-process → (exit code, stdout, stderr)."""
    monkeypatch.setattr("dgemma.cli.run.LLM", llm_cache)

    def call(*args: str, stdin: str | None = None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return call


def _one_line_error(err: str, prefix: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def test_json_output_and_same_seed_same_output(cli):
    code, out, err = cli("run", "hello", "--json", *FAST)
    assert code == 0
    result = json.loads(out)
    assert {"text", "token_ids", "finish_reason", "stats", "model", "device", "dtype", "params"} <= result.keys()
    assert 0 < len(result["token_ids"]) <= 16 and all(isinstance(t, int) for t in result["token_ids"])
    assert result["stats"]["new_tokens"] == len(result["token_ids"])
    assert result["params"]["max_denoising_steps"] == 4 and result["device"] == "cpu"
    assert "demo model" in result["note"] and "demo model" in err
    assert "new tokens" in err and "tokens/s" in err  # the stats line
    assert json.loads(cli("run", "hello", "--json", *FAST)[1])["token_ids"] == result["token_ids"]


def test_prompt_from_stdin_matches_argument(cli):
    by_arg = json.loads(cli("run", "hello", "--json", *FAST)[1])
    for args in ((), ("-",)):
        code, out, _ = cli("run", *args, "--json", *FAST, stdin="hello\n")  # chat mode drops the final newline
        assert code == 0
        assert json.loads(out)["token_ids"] == by_arg["token_ids"]


def test_no_visual_streams_the_final_text(cli):
    # 100 tokens over canvases of 64: the text arrives in two pieces and must add up to the JSON text.
    args = ["hello", "--max-new-tokens", "100", "--max-denoising-steps", "4", "--seed", "0"]
    expected = json.loads(cli("run", *args, "--json")[1])
    assert expected["stats"]["canvases"] == 2
    code, out, err = cli("run", *args, "--no-visual")
    assert code == 0
    assert out == expected["text"] + "\n"
    assert "2 canvases" in err


def test_raw_mode_differs_from_chat(cli):
    chat = json.loads(cli("run", "hello", "--json", *FAST)[1])
    raw = json.loads(cli("run", "hello", "--raw", "--json", *FAST)[1])
    assert raw["stats"]["prompt_tokens"] < chat["stats"]["prompt_tokens"]


@pytest.mark.parametrize("args, flag", [
    (["--bogus"], "--bogus"),
    (["--max-denoising-steps", "0"], "--max-denoising-steps"),
    (["--t-min", "-1"], "--t-min"),
    (["--max-new-tokens", "many"], "--max-new-tokens"),
    (["--t-min", "0.5", "--t-max", "0.2"], "--t-max"),
    (["--raw", "--thinking"], "--thinking"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int3"], "--dtype"),
])
def test_usage_errors_are_one_line(cli, args, flag):
    code, out, err = cli("run", "hi", *args)
    assert code == 2 and out == ""
    assert flag in _one_line_error(err, "dgemma run: error:")


def test_library_value_error_is_clean(cli):
    code, _, err = cli("run", "hi", "--t-max", "0.3")  # below the checkpoint's t_min (0.4): caught by the library
    assert code == 1
    assert "t_max" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_missing_model_dir(cli):
    code, out, err = cli("run", "hi", "--model", "/nonexistent/dir")
    assert code == 1 and out == ""
    assert "/nonexistent/dir" in _one_line_error(err, "dgemma: error:")


def test_tty_stdin_without_prompt(cli, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    code, _, err = cli("run")
    assert code == 2 and "no prompt" in _one_line_error(err, "dgemma run: error:")


def test_help_version_and_no_command(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "run" in out
    code, out, _ = cli("run", "--help")
    assert code == 0 and "generation_config.json" in out and "--max-denoising-steps" in out
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("dgemma ")
    code, _, err = cli()
    assert code == 2 and "usage:" in err


def test_subprocess_entry_point_matches_in_process(cli):
    in_process = json.loads(cli("run", "hello", "--json", *FAST)[1])
    # Same thread count as this process: CPU float sums (and so sampled tokens) depend on it.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-m", "dgemma.cli.main", "run", "--json", *FAST], input="hello",
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["token_ids"] == in_process["token_ids"]


def test_live_view_on_a_terminal(llm_cache, capsys):
    from rich.console import Console

    from dgemma import SamplingParams

    llm = llm_cache()
    params = SamplingParams(max_new_tokens=16, max_denoising_steps=4, seed=0)
    screen = io.StringIO()
    view = LiveView(llm.tokenizer, params.resolve(llm.defaults), llm.args.canvas_length,
                    Console(file=screen, force_terminal=True, width=80, height=24))
    final = view.run(llm.stream("hello", params, chat=True))
    assert capsys.readouterr().out.strip() != ""  # the final text, printed once the live region is cleared
    assert final.stats.new_tokens == 16
    assert "canvas 1/1" in screen.getvalue()


def test_draft_dims_positions_still_changing(llm_cache):
    llm = llm_cache()
    view = LiveView(llm.tokenizer, llm.defaults, canvas_length=4)
    ids = llm.tokenizer.encode(" one two three four")[:4]
    step = StepEvent(0, 1, torch.tensor([ids]), torch.tensor([[True, False, False, False]]), torch.tensor([False]))
    view._on_step(step)
    changed = [ids[0], ids[1], ids[3], ids[2]]  # positions 2 and 3 change, position 1 stays
    view._on_step(StepEvent(0, 2, torch.tensor([changed]), torch.zeros(1, 4, dtype=torch.bool), torch.tensor([False])))
    _, _, draft, settled, _ = view.frame
    assert settled == [True, True, False, False]
    text = view._draft_text(draft, settled, done=False)
    dim = {span.start for span in text.spans if span.style == "dim"}
    assert len(dim) == 2


def test_committed_text_holds_back_half_characters():
    class Tok:
        def decode(self, ids):
            return "ab\ufffd" if len(ids) == 1 else "abé"

    from dgemma.config import DiffusionParams

    text = CommittedText(Tok(), DiffusionParams(max_new_tokens=8))
    assert text.add([5]) == "ab"
    assert text.add([6]) == "é"
    assert text.finish([5, 6]) == ""
