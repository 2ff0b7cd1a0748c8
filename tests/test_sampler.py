"""The sampler's pure functions against hand-computed values and against the upstream definitions."""

import torch

from dgemma.engine import sampler as S


def test_entropy_matches_categorical_bitwise():
    logits = torch.randn(3, 7, 50) * 4
    logits[0, 0, :49] = -1e30  # near-one-hot row with -inf-like logits
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.equal(S.entropy(logits), ref)


def test_accept_mask_hand_computed():
    h = torch.tensor([[0.30, 0.01, 0.50, 0.02, 0.05]])
    # sorted: .01 .02 .05 .30 .50; cumsum - self: 0, .01, .03, .08, .38 → bound .1 accepts the 4 lowest
    assert S.accept_mask(h, 0.1).tolist() == [[True, True, False, True, True]]
    assert S.accept_mask(h, 0.02).tolist() == [[False, True, False, True, False]]
    # the lowest-entropy token is always accepted, whatever its entropy
    assert S.accept_mask(torch.tensor([[5.0, 6.0]]), 0.1).tolist() == [[True, False]]


def test_temperature_schedule():
    assert abs(float(S.temperature(10, 10, 0.4, 0.8, "cpu")) - 0.8) < 1e-6
    assert abs(float(S.temperature(1, 10, 0.4, 0.8, "cpu")) - 0.44) < 1e-6
    assert S.temperature(5, 10, 0.4, 0.8, "cpu").dtype == torch.float32


def test_stop_state_needs_stability_and_confidence():
    sharp = torch.full((2, 4, 10), -50.0)
    sharp[..., 3] = 50.0
    canvas = sharp.argmax(-1)
    stop = S.StopState(stability=1, confidence=0.01)
    assert stop(canvas, sharp).tolist() == [False, False]  # no history yet
    assert stop(canvas, sharp).tolist() == [True, True]  # same argmax, confident
    flat = torch.zeros(2, 4, 10)
    assert stop(canvas, flat).tolist() == [False, False]  # stable but not confident
    assert S.StopState(0, 0.01)(canvas, sharp).tolist() == [True, True]  # stability 0: confidence alone


def test_eos_pad_mask():
    canvas = torch.tensor([[5, 1, 7, 1, 9], [5, 6, 7, 8, 9]])
    has, after = S.eos_pad_mask(canvas, torch.tensor([1, 106]))
    assert has.tolist() == [True, False]
    assert after.tolist() == [[False, False, True, True, True], [False] * 5]
