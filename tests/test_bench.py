"""`dgemma bench` on the CPU with the tiny random shape: the result files carry every required field."""

import json

import pytest

from dgemma.cli.main import main

REQUIRED = {"gpu", "torch", "precision", "shape", "batch", "prompt_len", "steps", "ms_per_step", "floor_ms_per_step",
            "roofline_ms_per_step", "matmul_tflops",
            "ms_per_commit", "ttft_ms", "tok_s_excl_prefill", "tok_s_incl_prefill", "peak_mem_gb", "command",
            "commit", "path"}


def test_bench_writes_json_and_markdown(tmp_path):
    rc = main(["bench", "--random-weights", "--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--steps", "2",
               "--prompt-len", "16", "--batch", "1", "2", "--reference", "--reps", "1", "--out", str(tmp_path)])
    assert rc == 0
    [json_file] = tmp_path.glob("bench-*.json")
    rows = json.loads(json_file.read_text())
    assert len(rows) == 4 and {r["path"] for r in rows} == {"fast", "reference"}
    for r in rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["ms_per_step"] > 0 and r["floor_ms_per_step"] > 0 and r["tok_s_excl_prefill"] > 0
        assert r["roofline_ms_per_step"] > 0 and r["matmul_tflops"] > 0
        assert r["command"].startswith("dgemma bench ")
        if r["path"] == "fast":  # the commit pass folded into the canvas's first step, as generate runs it
            assert r["ms_first_step"] > 0 and r["ms_per_commit"] == r["ms_first_step"] - r["ms_per_step"]
            per_canvas = (r["steps"] - 1) * r["ms_per_step"] + r["ms_first_step"]
        else:
            assert r["ms_first_step"] is None and r["ms_per_commit"] == r["ms_commit_pass"]
            per_canvas = r["steps"] * r["ms_per_step"] + r["ms_commit_pass"]
        assert abs(r["tok_s_excl_prefill"] - r["batch"] * 256 / (per_canvas / 1e3)) <= 1e-6 * r["tok_s_excl_prefill"]
    md = next(tmp_path.glob("bench-*.md")).read_text()
    assert "| ms_per_step |" in md and md.count("| fast |") == 2
    assert "batch 2 gives" in md and "× the floor" in md  # the ratios the targets are stated in


def test_summary_states_the_target_ratios():
    """bench's ratio lines from the rows alone: step/floor, transformers, batch-B tokens/s against batch 1 and the long
    prompt's step against the short one's, pairing rows of the same GPU, precision and steps only."""
    from dgemma.benchmark import summary

    row = dict(gpu="G", precision="bfloat16", path="fast", steps=16, floor_ms_per_step=10.0)
    rows = [row | dict(batch=1, prompt_len=512, ms_per_step=15.0, tok_s_excl_prefill=1000.0,
                       transformers_ms_per_step=30.0),
            row | dict(batch=8, prompt_len=512, ms_per_step=40.0, tok_s_excl_prefill=3000.0),
            row | dict(batch=1, prompt_len=32768, ms_per_step=18.0, tok_s_excl_prefill=800.0),
            row | dict(batch=8, prompt_len=512, ms_per_step=40.0, tok_s_excl_prefill=3000.0, steps=48),
            row | dict(batch=1, prompt_len=512, ms_per_step=1.0, path="reference")]
    lines = summary(rows)
    assert "bfloat16 batch 1, prompt 512, 16 steps: 1.50× the floor, 2.00× faster than transformers" in lines
    assert "bfloat16 prompt 512, 16 steps: batch 8 gives 3.00× batch 1's tokens/s" in lines
    assert "bfloat16 batch 1, 16 steps: the prompt-32768 step is 1.20× the prompt-512 step" in lines
    assert not any("48 steps: batch 8 gives" in line for line in lines)  # no batch 1 at 48 steps to compare with
    assert len(lines) == 4 + 2


def test_bench_sweeps_precisions(tmp_path):
    rc = main(["bench", "--random-weights", "--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "bf16",
               "--steps", "2", "--prompt-len", "16", "--reps", "1", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert [r["precision"] for r in rows] == ["float32", "bfloat16"]
    assert rows[1]["floor_ms_per_step"] < rows[0]["floor_ms_per_step"]  # half the bytes per step


def test_bench_rejects_unknown_precision(capsys):
    rc = main(["bench", "--random-weights", "--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "int3"])
    assert rc != 0
    assert "unknown dtype 'int3'" in capsys.readouterr().err


def test_bench_rejects_bad_values(capsys):
    try:
        rc = main(["bench", "--random-weights", "--shape", "huge"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_bench_says_when_the_weights_do_not_fit(capsys, monkeypatch):
    """The real shape on a machine without room for it: a one-line error with the sizes and what to do, exit 1,
    before any weight is allocated."""
    from dgemma import benchmark as bm

    monkeypatch.setattr(bm, "free_memory", lambda device: 8 * 10**9)
    rc = main(["bench", "--random-weights", "--shape", "26b-a4b", "--device", "cpu", "--out", "unused"])
    err = capsys.readouterr().err
    assert rc == 1 and "random 26b-a4b weights need 53.5 GB in bfloat16 on cpu, which has 8.0 GB free" in err, err
    assert "--shape tiny" in err


def test_fastpath_check_script_runs_and_agrees_on_cpu():
    """scripts/gpu_fastpath_check.py (the real-shape bf16 check on a GPU) on the tiny shape in fp32: the static
    path's passes, self-conditioning and the folded commit agree with the reference ops."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_fastpath_check.py"
    spec = importlib.util.spec_from_file_location("gpu_fastpath_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--shape", "tiny", "--prompt-len", "40", "--batch", "2", "--device", "cpu"])
    for key in ("step1", "step2_selfcond", "folded_first_step"):
        assert out[key]["cosine"] > 0.99999 and out[key]["top1_agreement"] == 1.0, (key, out[key])
    assert out["cache_kv_min_layer_cosine"] > 0.99999
    for key, stats in out["per_layer"].items():
        value = stats if key.endswith("cosine") else stats["min_cosine"]
        assert value > 0.99999, (key, stats)


def test_step_work_counts_every_weight_once_and_scales_with_the_work():
    """The roofline's parts (benchmark.step_work): the weight parts read every matrix once (step_bytes less the 1-D
    norm weights and scalars), their FLOPs double with the batch, attention sees the window on sliding layers."""
    import torch

    from dgemma import benchmark as bm

    model = bm.random_model("tiny", "cpu", torch.float32)
    args, C = model.args, model.args.canvas_length
    one, two = bm.step_work(model, 1, 16), bm.step_work(model, 2, 16)
    vectors = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() < 2)
    weights = [p for p in one if not p[0].endswith("attention")]
    assert sum(b for _, b, _ in weights) == bm.step_bytes(model) - vectors
    for (name, _, f1), (_, _, f2) in zip(one, two):
        assert f2 == 2 * f1, name
    long = dict((n, (b, f)) for n, b, f in bm.step_work(model, 1, 10 * args.sliding_window))
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        keys = (args.sliding_window if attn.sliding else 10 * args.sliding_window) + C
        assert long[f"layers.{i}.attention"][1] == 4 * C * attn.n_heads * attn.head_dim * keys
    # each part at the better of its limits: all bandwidth with infinite FLOP/s, all compute with infinite bandwidth
    assert bm.roofline_ms(one, 1e9, float("inf")) == pytest.approx(sum(b for _, b, _ in one) / 1e9 * 1e3)
    assert bm.roofline_ms(one, float("inf"), 1e12) == pytest.approx(sum(f for _, _, f in one) / 1e12 * 1e3)
