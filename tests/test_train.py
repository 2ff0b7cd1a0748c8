"""Training: the §9 objective (hand-computed and against transformers 5.23.0), corruption statistics, data formats,
LoRA merge, exact resume, and the train / merge-lora / --lora round trip. CPU, tiny models, seconds."""

import json
import math
import shutil

import pytest
import torch

from dgemma import LLM, SamplingParams
from dgemma.cli.main import main
from dgemma.config import ModelArgs
from dgemma.engine.cache import KVCache
from dgemma.loader import DEFAULT_MODEL_DIR, save_model
from dgemma.models.diffusion_gemma import DiffusionGemma
from dgemma.tokenizer import Tokenizer
from dgemma.train import lora
from dgemma.train import objective as O
from dgemma.train.data import DataError, collate, load_jsonl, to_example
from dgemma.train.trainer import TrainConfig, Trainer, init_weights, lr_at, train

TINY = dict(vocab_size=2048, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
            top_k_experts=2, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            num_global_key_value_heads=1, global_head_dim=32, sliding_window=12, max_position_embeddings=4096,
            eos_token_id=[1, 106], canvas_length=16)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random checkpoint with the bundled tokenizer's 2048-id vocabulary."""
    out = tmp_path_factory.mktemp("tiny_base")
    model = DiffusionGemma(ModelArgs(**TINY))
    init_weights(model, seed=3)
    save_model(model, out, dtype=torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, out / name)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"text": f"The number {i} comes after {i - 1}."} for i in range(12)]
    rows += [{"messages": [{"role": "user", "content": f"Count to {i}."},
                           {"role": "assistant", "content": " ".join(map(str, range(1, i + 1)))}]} for i in range(6)]
    rows += [{"prompt": "Say hi:", "completion": " hi there"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# --- the objective ----------------------------------------------------------------------------------------------
def test_losses_equal_hand_computed_values():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])  # [1, 3, V=3]
    targets = torch.tensor([[0, 2, 2]])
    mask = torch.tensor([[True, True, False]])
    lse = [math.log(math.exp(2) + 2), math.log(math.e + 2), math.log(math.exp(3) + 2)]
    expected = ((lse[0] - 2.0) + (lse[1] - 0.0)) / 2  # flat mean over the two masked positions
    assert O.masked_ce(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)
    # AR: position i predicts ids[i+1]; targets 2 and 2, both supervised
    ids, sup = torch.tensor([[5, 2, 2]]), torch.tensor([[False, True, True]])
    assert O.ar_ce(logits, ids, sup).item() == pytest.approx(((lse[0] - 0.0) + (lse[1] - 0.0)) / 2, rel=1e-6)


def test_corruption_statistics():
    g = torch.Generator().manual_seed(0)
    B, C, V = 400, 256, 50
    ids = torch.randint(0, V, (B, C), generator=g)
    sup = torch.rand(B, C, generator=g) < 0.8
    t = O.sample_t(B, g)
    assert t.min() >= O.T_MIN and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.05
    t = torch.full((B,), 0.3)
    noisy, corrupted = O.corrupt(ids, sup, t, torch.randint(0, V, (B, C), generator=g), torch.rand(B, C, generator=g))
    assert not corrupted[~sup].any() and torch.equal(noisy[~sup], ids[~sup])  # unsupervised tokens stay clean
    rate = corrupted.sum() / sup.sum()
    assert abs(rate.item() - 0.3) < 0.01
    counts = torch.bincount(noisy[corrupted], minlength=V).float()  # replacements are uniform over the vocab
    assert (counts / counts.mean() - 1).abs().max() < 0.25
    # blocks: only blocks holding a supervised token, uniformly
    sup = torch.zeros(2000, 4 * 8, dtype=torch.bool)
    sup[:, 8:24] = True  # blocks 1 and 2
    blocks = O.choose_blocks(sup, 8, g)
    assert set(blocks.tolist()) == {1, 2} and abs((blocks == 1).float().mean().item() - 0.5) < 0.05


def _hf_loss(hf, ids, sup, d, C):
    """The same loss through transformers' training forward (input_ids + decoder_input_ids + self_conditioning_mask),
    one row at a time (each row has its own block)."""
    from transformers.cache_utils import DynamicCache

    targets, dsup = O.block_view(ids, d.block, C), O.block_view(sup, d.block, C)
    noisy, _ = O.corrupt(targets, dsup, d.t, d.noise, d.flip)
    dec = []
    for b in range(ids.shape[0]):
        s = int(d.block[b]) * C
        kw = dict(decoder_input_ids=noisy[b:b + 1], decoder_position_ids=torch.arange(s, s + C)[None])
        with torch.no_grad():
            cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
            first = hf(input_ids=ids[b:b + 1, :s], past_key_values=cache, **kw).logits
        cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
        dec.append(hf(input_ids=ids[b:b + 1, :s], past_key_values=cache, self_conditioning_logits=first,
                      self_conditioning_mask=d.sc[b:b + 1], **kw).logits)
    diff = O.masked_ce(torch.cat(dec), targets, dsup)
    out = hf(input_ids=ids, decoder_input_ids=noisy)
    enc = torch.tanh(hf.lm_head(out.encoder_last_hidden_state) / 30.0) * 30.0
    return diff + O.ar_ce(enc, ids, sup)


def test_loss_and_gradients_match_transformers(tiny_ckpt):
    from transformers import DiffusionGemmaForBlockDiffusion

    path = tiny_ckpt("a")  # sliding window 8 < canvas 16 < prefix: the decoder sees a windowed prefix
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    model = LLM(path, device="cpu", dtype="float32").model.requires_grad_(True)
    C, V = model.args.canvas_length, model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (2, 3 * C), generator=g)
    sup = torch.ones_like(ids, dtype=torch.bool)
    sup[:, 0] = False
    d = O.Draws(block=torch.tensor([2, 1]), t=torch.tensor([0.4, 0.9]), noise=torch.randint(0, V, (2, C), generator=g),
                flip=torch.rand(2, C, generator=g), sc=torch.tensor([True, False]))
    ours = O.loss_from_draws(model, ids, sup, d)
    ref = _hf_loss(hf, ids, sup, d, C)
    assert ours.loss.item() == pytest.approx(ref.item(), abs=1e-4)
    ours.loss.backward()
    ref.backward()
    hf_params = hf.state_dict(keep_vars=True)  # tied weights appear under both names
    for name in ("layers.0.self_attn.q_proj.weight", "layers.1.self_attn.k_proj.weight", "layers.2.mlp.up_proj.weight",
                 "layers.0.experts.gate_up_proj", "embed_tokens.weight", "self_conditioning.up_proj.weight"):
        ref_grad = hf_params[f"model.decoder.{name}"].grad
        assert ref_grad is not None and ref_grad.abs().sum() > 0, name
        ours_grad = model.get_parameter(name).grad
        assert torch.allclose(ours_grad, ref_grad, atol=1e-5, rtol=1e-3), name


def test_grad_checkpoint_gives_the_same_gradients(tiny_base):
    grads = []
    for ckpt in (False, True):
        model = LLM(tiny_base, device="cpu", dtype="float32").model.requires_grad_(True)
        C, V = model.args.canvas_length, model.args.vocab_size
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(110, V, (3, 2 * C), generator=g)
        sup = torch.ones_like(ids, dtype=torch.bool)
        O.loss_from_draws(model, ids, sup, O.draw(sup, C, V, g), grad_checkpoint=ckpt).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_chunked_encode_equals_one_pass(tiny_base):
    model = LLM(tiny_base, device="cpu", dtype="float32").model
    C = model.args.canvas_length
    ids = torch.randint(110, 2048, (2, 3 * C), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(3 * C).expand(2, -1)
    with torch.no_grad():
        one = model.encode(ids, pos, KVCache(model.args, 2, 3 * C, "cpu", torch.float32))
        cache = KVCache(model.args, 2, 3 * C, "cpu", torch.float32)
        parts = []
        for j in range(3):
            parts.append(model.encode(ids[:, j * C:(j + 1) * C], pos[:, j * C:(j + 1) * C], cache))
            cache.advance(C)
    assert torch.allclose(torch.cat(parts, 1), one, atol=1e-5)


# --- data -------------------------------------------------------------------------------------------------------
def test_data_formats_supervise_the_right_tokens():
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    text = to_example({"text": "hello world"}, tok)
    assert text.ids[0] == 2 and text.ids[-1] == 1 and text.supervised == [False] + [True] * (len(text.ids) - 1)
    pc = to_example({"prompt": "Q:", "completion": " A"}, tok)
    n_prompt = 1 + len(tok.encode("Q:"))
    assert pc.supervised == [False] * n_prompt + [True] * (len(pc.ids) - n_prompt) and pc.ids[-1] == 1
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"}]
    chat = to_example({"messages": msgs}, tok)
    supervised = tok.decode([i for i, s in zip(chat.ids, chat.supervised) if s], skip_special_tokens=False)
    assert supervised == "yo<turn|>sure<turn|>"
    prompt = tok.encode_chat(msgs[:3])  # the last answer follows the prompt exactly as inference renders it
    assert chat.ids[:len(prompt)] == prompt and not any(chat.supervised[len(prompt) - 3:len(prompt)])
    ids, sup, dsup, valid = collate([text, pc], canvas=16)
    assert ids.shape[1] % 16 == 0 and (sup.int().argmax(1) % 16 == 0).all()  # completions start a canvas
    left = 16 - n_prompt
    assert not valid[1, :left].any() and valid[1, left:left + len(pc.ids)].all() and not sup[1, :left + n_prompt].any()
    assert dsup[1, left + len(pc.ids):32].all() and not sup[1, left + len(pc.ids):].any()


def test_data_errors_name_the_line(tmp_path):
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a 'text'"):
        load_jsonl(bad, tok)
    bad.write_text('{"text": "ok"}\n\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        load_jsonl(bad, tok)
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*no assistant turn"):
        load_jsonl(bad, tok)


def test_lr_schedule():
    cfg = TrainConfig(data="-", out="-", steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


# --- LoRA -------------------------------------------------------------------------------------------------------
def _logits(model, ids):
    C = model.args.canvas_length
    cache = KVCache(model.args, ids.shape[0], ids.shape[1] + C, "cpu", torch.float32)
    with torch.no_grad():
        enc = model.lm_head(model.encode(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1), cache))
        cache.advance(ids.shape[1])
        dec = model.denoise(ids[:, :C], torch.arange(ids.shape[1], ids.shape[1] + C)[None], cache)
    return enc, dec


def test_lora_merged_equals_unmerged(tiny_base, tmp_path):
    model = LLM(tiny_base, device="cpu", dtype="float32").model
    ids = torch.randint(110, 2048, (2, 40), generator=torch.Generator().manual_seed(2))
    base = _logits(model, ids)
    names = lora.apply(model, rank=4, alpha=8, targets=[*lora.DEFAULT_TARGETS, "experts"], seed=1)
    assert "layers.0.experts.gate_up_proj" in names and not any("router" in n for n in names)
    assert all(torch.equal(a, b) for a, b in zip(_logits(model, ids), base))  # B = 0: starts at the base model
    with torch.no_grad():
        for p in lora.adapters(model).values():
            p.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    unmerged = _logits(model, ids)
    assert not torch.allclose(unmerged[1], base[1])
    lora.save_adapter(model, tmp_path / "adapter")
    lora.merge(model)
    merged = _logits(model, ids)
    for a, b in zip(merged, unmerged):
        assert torch.allclose(a, b, atol=1e-5)
    fresh = LLM(tiny_base, device="cpu", dtype="float32", lora=tmp_path / "adapter").model
    for a, b in zip(_logits(fresh, ids), unmerged):
        assert torch.allclose(a, b, atol=1e-5)


# --- the loop -----------------------------------------------------------------------------------------------------
def _cfg(tmp_path, data, base, **kw):
    return TrainConfig(data=str(data), out=str(tmp_path), mode="full", model=str(base), batch_size=3, steps=4,
                       lr=3e-3, warmup=2, max_len=40, progress=False, save_dtype="float32", **kw)


def test_resume_continues_identically(tmp_path, data_file, tiny_base):
    straight = train(_cfg(tmp_path / "a", data_file, tiny_base))
    _ = train(_cfg(tmp_path / "b", data_file, tiny_base, save_every=2))
    resumed = Trainer(_cfg(tmp_path / "c", data_file, tiny_base))
    resumed.load_checkpoint(tmp_path / "b" / "checkpoints" / "step-000002")
    log_a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    for step in (2, 3):
        rec = resumed.train_step()
        assert rec["loss"] == log_a[step]["loss"], step
    for (n, p), (_, q) in zip(straight.params, resumed.params):
        assert torch.equal(p, q), n
    assert (tmp_path / "a" / "model.safetensors").is_file() and (tmp_path / "a" / "tokenizer.json").is_file()


def test_full_finetune_freezes_the_router_and_logs(tmp_path, data_file, tiny_base):
    t = train(_cfg(tmp_path, data_file, tiny_base))
    names = [n for n, _ in t.params]
    assert names and not any(".router." in n for n in names)
    recs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in recs)


def test_cli_lora_train_merge_and_run(tmp_path, data_file, tiny_base, capsys):
    out = tmp_path / "adapter"
    rc = main(["train", str(data_file), "--mode", "lora", "--model", str(tiny_base), "--out", str(out), "--steps", "3",
               "--batch-size", "2", "--lr", "1e-2", "--lora-rank", "4", "--max-len", "40", "--no-progress"])
    assert rc == 0 and (out / "adapter_model.safetensors").is_file() and (out / "log.jsonl").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank"] == 4 and cfg["base_model"] == str(tiny_base)
    merged = tmp_path / "merged"
    assert main(["merge-lora", str(out), "--out", str(merged), "--dtype", "float32"]) == 0
    params = SamplingParams(max_new_tokens=20, max_denoising_steps=4, seed=0)
    a = LLM(merged, device="cpu", dtype="float32").generate(["Count to 3."], params, chat=True)[0]
    b = LLM(tiny_base, device="cpu", dtype="float32", lora=out).generate(["Count to 3."], params, chat=True)[0]
    c = LLM(tiny_base, device="cpu", dtype="float32").generate(["Count to 3."], params, chat=True)[0]
    assert a.token_ids == b.token_ids
    assert len(c.token_ids) > 0
    capsys.readouterr()


@pytest.mark.gpu
def test_gpu_training_smoke(tmp_path, data_file, tiny_base):
    """bf16 autocast + activation checkpointing on CUDA: finite losses, tokens/s logged, a loadable model."""
    t = train(_cfg(tmp_path, data_file, tiny_base, device="cuda", grad_checkpoint=True))
    recs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in recs) and t.step == 4
    print("gpu smoke:", [round(r["loss"], 3) for r in recs], f"{recs[-1]['tokens_per_s']:.0f} tok/s")
    LLM(tmp_path, device="cuda").generate(["hi"], SamplingParams(max_new_tokens=8, max_denoising_steps=2, seed=0))


def test_bf16_autocast_forward_runs_and_stays_close(tiny_base):
    """The CUDA path trains under bf16 autocast; CPU autocast exercises the same mixed-dtype cache writes."""
    model = LLM(tiny_base, device="cpu", dtype="float32").model.requires_grad_(True)
    C, V = model.args.canvas_length, model.args.vocab_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(110, V, (2, 2 * C), generator=g)
    sup, valid = torch.ones_like(ids, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool)
    valid[0, :3], sup[0, :4] = False, False
    d = O.draw(sup, C, V, g)
    ref = O.loss_from_draws(model, ids, sup, d, valid=valid).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = O.loss_from_draws(model, ids, sup, d, valid=valid).loss
    out.backward()
    assert torch.isfinite(out) and abs(out.item() - ref.item()) < 0.05 * ref.item()
