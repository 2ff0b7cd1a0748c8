"""`dgemma bench` on the CPU with the tiny random shape: the result files carry every required field."""

import json

from dgemma.cli.main import main

REQUIRED = {"gpu", "torch", "precision", "shape", "batch", "prompt_len", "steps", "ms_per_step", "floor_ms_per_step",
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
