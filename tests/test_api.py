"""The public API on the bundled model (CPU)."""

import pytest
import torch

from dgemma import LLM, SamplingParams
from dgemma.api import UnknownParameterError
from dgemma.engine.generate import CanvasEvent, FinishedEvent, StepEvent


@pytest.fixture(scope="module")
def llm():
    return LLM()


def test_defaults_come_from_generation_config(llm):
    assert llm.device.type in ("cpu", "cuda")
    assert llm.dtype == (torch.float32 if llm.device.type == "cpu" else torch.bfloat16)
    d = llm.defaults
    assert (d.max_denoising_steps, d.entropy_bound, d.t_min, d.t_max) == (48, 0.1, 0.4, 0.8)
    assert d.eos_token_ids == (1, 50, 106)
    assert llm.is_default_model


def test_unknown_parameter_lists_valid_names_and_aliases():
    with pytest.raises(UnknownParameterError, match=r"'num_denoising_steps' \(did you mean max_denoising_steps") as e:
        SamplingParams(num_denoising_steps=8)
    assert "valid names: max_new_tokens, max_denoising_steps" in str(e.value)
    assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)
    with pytest.raises(UnknownParameterError, match=r"temperature.*t_min and t_max"):
        SamplingParams(temperature=0.7)
    with pytest.raises(UnknownParameterError, match=r"denoising_temperature.*t_min and t_max"):
        SamplingParams(denoising_temperature=0.7)


@pytest.mark.parametrize("bad", [dict(max_denoising_steps=0), dict(t_min=-1.0), dict(t_min=0.9, t_max=0.5),
                                 dict(entropy_bound=0), dict(max_new_tokens=0), dict(confidence_threshold=-1.0)])
def test_bad_values(llm, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        llm.generate([[2, 5, 6]], SamplingParams(**bad))


def test_dtype_and_device_parsing():
    from dgemma.api import resolve_device, resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("bf16", cpu) == resolve_dtype("bfloat16", cpu) == resolve_dtype(torch.bfloat16, cpu)
    assert resolve_dtype("fp16", cpu) == torch.float16 and resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        resolve_dtype("int3", cpu)
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("mps")


def test_generate_shapes_and_limits(llm):
    p = SamplingParams(max_new_tokens=70, max_denoising_steps=4, seed=3)
    outs = llm.generate(["Hello there", "A much longer prompt about the sky and the sea"], p)
    assert len(outs) == 2
    for o in outs:
        assert 1 <= len(o.token_ids) <= 70
        assert o.finish_reason in ("stop", "length")
        assert 0 not in o.token_ids or o.token_ids.index(0) >= 0  # pads never follow EOS in the output
        assert o.stats["canvases"] >= 1 and o.stats["tokens_per_forward"] > 0
        assert isinstance(o.text, str)
    again = llm.generate(["Hello there", "A much longer prompt about the sky and the sea"], p)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]


def test_chat_and_token_prompts_agree(llm):
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 2 and ids.count(2) == 1  # one BOS
    p = SamplingParams(max_new_tokens=8, max_denoising_steps=3, seed=1)
    assert llm.generate(["Hi"], p, chat=True)[0].token_ids == llm.generate([ids], p)[0].token_ids


def test_stream_events(llm):
    events = list(llm.stream("Hi", SamplingParams(max_new_tokens=100, max_denoising_steps=3, seed=0)))
    steps = [e for e in events if isinstance(e, StepEvent)]
    canvases = [e for e in events if isinstance(e, CanvasEvent)]
    assert isinstance(events[-1], FinishedEvent)
    assert 1 <= len(canvases) <= 2 and len(steps) >= len(canvases)
    assert steps[0].draft.shape == (1, llm.args.canvas_length)
    out = events[-1].outputs[0]
    committed = torch.cat([c.tokens for c in canvases], dim=1)[0].tolist()
    assert committed[: len(out.token_ids)] == out.token_ids


def test_bf16_on_cpu_runs():
    b = LLM(dtype="bf16", device="cpu")
    assert b.model.embed_tokens.weight.dtype == torch.bfloat16
    out = b.generate(["Hi"], SamplingParams(max_new_tokens=8, max_denoising_steps=2, seed=0))[0]
    assert 1 <= len(out.token_ids) <= 8


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[2, 10**6]])
    with pytest.raises(ValueError, match="image input is not supported yet"):
        llm.generate(["hi"], images=["cat.png"])
    with pytest.raises(ValueError, match="image input is not supported yet"):
        llm.generate([[{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]], chat=True)
    with pytest.raises(TypeError, match="a prompt must be"):
        llm.generate([3.5])
