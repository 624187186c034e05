"""The embedded world's procedural dataset: grammar, split, deterministic rendering, noisy data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spo_core.errors import ConfigError
from spo_core.world import dataset as d
from spo_core.world.noisy_data import CLEAN, DataNoise, training_batch


def test_grammar_round_trip_and_counts():
    train, held = d.train_prompts(), d.heldout_prompts()
    assert len(train) == 24 + 216 * 8 and len(held) == 24 * 8
    assert len(set(train)) == len(train) and not set(train) & set(held)
    assert len(d.train_prompts("single")) == 24 and len(d.train_prompts("pair")) == 1728
    for cap in train[::50] + held[::10]:
        assert d.parse_caption(cap).text == cap
    assert d.parse_caption("  A Red   circle ").text == "a red circle"
    p = d.parse_caption("a red circle to the left of a blue square")
    assert p.relation == "to the left of" and [o.shape for o in p.objects] == ["circle", "square"]
    for bad in ("a red dog", "a red circle near a blue square", "a red circle above a red square", ""):
        with pytest.raises(ConfigError):
            d.parse_caption(bad)


def test_heldout_object_pairs_never_appear_together_in_training():
    def pair_key(cap):
        objs = d.parse_caption(cap).objects
        return frozenset(o.text for o in objs)

    train_pairs = {pair_key(c) for c in d.train_prompts("pair")}
    held_pairs = {pair_key(c) for c in d.heldout_prompts()}
    assert len(held_pairs) == 24 and not train_pairs & held_pairs
    # every colour and shape still occurs in training pairs
    words = " ".join(d.train_prompts("pair"))
    assert all(c in words for c in d.COLOUR_NAMES) and all(s in words for s in d.SHAPES)


def test_eval_set_is_fixed_and_nested():
    a = d.heldout_eval_set(16, 2)
    assert a == d.heldout_eval_set(16, 2) and len(a) == 32 and len(set(a)) == 32
    assert all(c in d.heldout_prompts() for c, _ in a)
    assert d.heldout_eval_set(32, 2)[:32] == a  # a larger set extends a smaller one
    with pytest.raises(ConfigError):
        d.heldout_eval_set(0)


def test_render_is_deterministic_and_seed_dependent():
    cap = "a red circle above a blue square"
    a, b, c = d.render(cap, 3), d.render(cap, 3), d.render(cap, 4)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    batch = d.render_batch([cap, "a green cross"], [3, 9])
    assert torch.equal(batch[0], a) and torch.equal(batch[1], d.render("a green cross", 9))


@pytest.mark.parametrize("shape", d.SHAPES)
def test_coverage_area_matches_the_shape_formula(shape):
    # analytic areas: circle pi/4 s^2, square s^2, triangle s^2/2, cross 5/9 s^2
    expected = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}[shape]
    side = torch.tensor([11.3, 14.0])
    cov = d.shape_coverage(torch.full((2,), d.SHAPES.index(shape)), torch.tensor([15.2, 16.0]), torch.tensor([16.7, 15.5]), side)
    area = cov.sum((1, 2))
    torch.testing.assert_close(area, expected * side ** 2, rtol=0.03, atol=0.5)
    # the coverage centroid is the requested centroid (the triangle's is off its box centre)
    ys = torch.arange(32) + 0.5
    cy = (cov.sum(2) * ys).sum(1) / area
    cx = (cov.sum(1) * ys).sum(1) / area
    torch.testing.assert_close(cx, torch.tensor([15.2, 16.0]), atol=0.15, rtol=0)
    torch.testing.assert_close(cy, torch.tensor([16.7, 15.5]), atol=0.15, rtol=0)


def _colour_centroid(img: torch.Tensor, rgb) -> tuple[float, float, int]:
    """Centroid of the pixels within 0.08 of a palette colour (plain numpy, independent of preference.py)."""
    arr = img.permute(1, 2, 0).numpy()
    near = np.abs(arr - np.asarray(rgb)).max(-1) < 0.08
    ys, xs = np.nonzero(near)
    return float(xs.mean()), float(ys.mean()), int(near.sum())


@pytest.mark.parametrize("relation", d.RELATION_NAMES)
def test_rendered_pairs_satisfy_their_relation(relation):
    for seed in range(12):
        cap = f"a yellow triangle {relation} a purple cross"
        img = d.render(cap, seed)
        x1, y1, n1 = _colour_centroid(img, d.COLOURS["yellow"])
        x2, y2, n2 = _colour_centroid(img, d.COLOURS["purple"])
        assert n1 > 10 and n2 > 10
        axis, sign = d.RELATIONS[relation]
        along = sign * ((x1 - x2) if axis == 0 else (y1 - y2))
        across = abs((y1 - y2) if axis == 0 else (x1 - x2))
        assert along > 8 and across <= along / 2 + 1.5, (cap, seed, along, across)
        # background is a flat neutral grey in the corners the objects leave free
        corner = img[:, 0, 0]
        assert float(corner.max() - corner.min()) < 1e-6


def test_training_batch_is_deterministic_and_noisy_where_asked():
    x1, shown1, true1 = training_batch(48, seed=5)
    x2, shown2, true2 = training_batch(48, seed=5)
    assert torch.equal(x1, x2) and shown1 == shown2 and true1 == true2
    assert set(true1) <= set(d.train_prompts())
    wrong = sum(s != t for s, t in zip(shown1, true1))
    assert 2 <= wrong <= 20  # 20% misleading captions
    for s, t in zip(shown1, true1):
        if s != t:  # a misleading caption still parses and keeps the number of objects
            assert len(d.parse_caption(s).objects) == len(d.parse_caption(t).objects)
    xc, shown_c, true_c = training_batch(48, seed=5, noise=CLEAN)
    assert shown_c == true_c
    def flat_corners(x):  # the one-pixel margin is always background
        corners = torch.stack([x[:, :, 0, 0], x[:, :, 0, -1], x[:, :, -1, 0], x[:, :, -1, -1]], -1)
        return (corners.amax(-1) - corners.amin(-1)).amax(-1) < 1e-6

    assert flat_corners(xc).all()
    assert 2 <= int((~flat_corners(x1)).sum()) <= 20  # ~20% noisy or shaded backgrounds
    with pytest.raises(ConfigError):
        DataNoise(caption_error=1.5)


def test_training_batch_respects_a_prompt_list():
    prompts = ["a red circle", "a blue square above a green cross"]
    _, shown, true = training_batch(16, seed=1, noise=CLEAN, prompts=prompts)
    assert set(true) <= set(prompts) and shown == true
