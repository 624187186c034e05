"""The embedded world's ground-truth preference: correct images score high, each kind of
mistake lowers its own component, and the measurements agree with independent references."""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np
import pytest
import torch

from spo_core.errors import ConfigError, InvalidTensorError
from spo_core.world import dataset as d
from spo_core.world.preference import STYLE_KEY, colour_maps, ground_truth, ground_truth_components, rgb_to_hue

FLIP = {"above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of"}


def _captions():
    return d.train_prompts()[::29] + d.heldout_prompts()[::7]


@pytest.fixture(scope="module")
def rendered():
    """Correct renders in the house style (background lightness at STYLE_KEY)."""
    caps = _captions()
    scenes = [dataclasses.replace(d.scene_for(c, s), background=STYLE_KEY) for s, c in enumerate(caps)]
    return d.render_scenes(scenes), caps


def test_correct_renders_score_high(rendered):
    x, caps = rendered
    p = ground_truth_components(x, caps)
    assert p.total.shape == (len(caps),) and float(p.total.min()) > 0.9, float(p.total.min())
    assert float(p.total.mean()) > 0.97
    assert float(p.colour.min()) > 0.95 and float(p.quality.min()) > 0.95
    singles = torch.tensor([not d.parse_caption(c).is_pair for c in caps])
    assert p.relation[singles].isnan().all() and not p.relation[~singles].isnan().any()


def test_style_is_the_background_lightness_whatever_the_caption(rendered):
    x, caps = rendered
    house = ground_truth_components(x, caps)
    assert float(house.style.min()) > 0.99
    # the same scenes on the backgrounds the dataset draws (grey 0.25 .. 0.75): only style changes
    scenes = [d.scene_for(c, s) for s, c in enumerate(caps)]
    drawn = ground_truth_components(d.render_scenes(scenes), caps)
    for name in ("colour", "shape", "quality"):
        torch.testing.assert_close(getattr(drawn, name), getattr(house, name), atol=0.03, rtol=0)
    grey = torch.tensor([s.background for s in scenes])
    far, near = (grey - STYLE_KEY).abs() > 0.3, (grey - STYLE_KEY).abs() < 0.02
    assert far.any() and near.any()
    assert float(drawn.style[far].max()) < 0.01 and float(drawn.style[near].min()) > 0.99
    assert (drawn.style <= house.style + 1e-6).all()
    # a lighter or darker background than the key is worse by the same rule
    light = [dataclasses.replace(sc, background=STYLE_KEY + 0.15) for sc in scenes]
    dark = [dataclasses.replace(sc, background=STYLE_KEY - 0.15) for sc in scenes]
    s_light = ground_truth_components(d.render_scenes(light), caps).style
    s_dark = ground_truth_components(d.render_scenes(dark), caps).style
    assert 0.2 < float(s_light.mean()) < 0.8 and 0.2 < float(s_dark.mean()) < 0.8
    torch.testing.assert_close(s_light, s_dark, atol=0.05, rtol=0)


def _swap(caps, fn):
    return [fn(d.parse_caption(c)).text for c in caps]


def test_wrong_colour_lowers_colour_and_total(rendered):
    x, caps = rendered

    def recolour(p):  # first object's colour -> one that is not in the image
        used = {o.colour for o in p.objects}
        new = next(c for c in d.COLOUR_NAMES if c not in used)
        return d.Caption((d.ObjectSpec(new, p.objects[0].shape),) + p.objects[1:], p.relation)

    right, wrong = ground_truth_components(x, caps), ground_truth_components(x, _swap(caps, recolour))
    assert float(wrong.colour.max()) < 0.55 and float(wrong.total.max()) < 0.6
    assert (right.total - wrong.total).min() > 0.35


def test_wrong_shape_lowers_shape_component(rendered):
    x, caps = rendered

    def reshape(p):
        o = p.objects[0]
        new = d.SHAPES[(d.SHAPES.index(o.shape) + 1) % len(d.SHAPES)]
        return d.Caption((d.ObjectSpec(o.colour, new),) + p.objects[1:], p.relation)

    right, wrong = ground_truth_components(x, caps), ground_truth_components(x, _swap(caps, reshape))
    n_obj = torch.tensor([len(d.parse_caption(c).objects) for c in caps], dtype=torch.float32)
    # the wrongly named object contributes ~0 to the mean over objects
    assert ((right.shape - wrong.shape) > 0.8 / n_obj).all()
    torch.testing.assert_close(wrong.colour, right.colour)
    assert ((right.total - wrong.total) > 0.07).all()  # about half of one of five components


def test_flipped_relation_zeroes_the_relation(rendered):
    x, caps = rendered
    idx = [i for i, c in enumerate(caps) if d.parse_caption(c).is_pair]
    flipped = _swap([caps[i] for i in idx], lambda p: d.Caption(p.objects, FLIP[p.relation]))
    right, wrong = ground_truth_components(x[idx], [caps[i] for i in idx]), ground_truth_components(x[idx], flipped)
    assert float(right.relation.min()) > 0.9 and float(wrong.relation.max()) < 0.05
    assert ((right.total - wrong.total) > 0.19).all()  # one of five components lost
    # a relation on the other axis is not satisfied either
    other = {"above": "to the left of", "below": "to the right of", "to the left of": "above", "to the right of": "below"}
    cross = _swap([caps[i] for i in idx], lambda p: d.Caption(p.objects, other[p.relation]))
    assert float(ground_truth_components(x[idx], cross).relation.mean()) < 0.4


def test_noise_and_clutter_lower_quality(rendered):
    x, caps = rendered
    g = torch.Generator().manual_seed(0)
    clean = ground_truth_components(x, caps)
    q = [float(ground_truth_components((x + s * torch.randn(x.shape, generator=g)).clamp(0, 1), caps).quality.mean())
         for s in (0.02, 0.05, 0.1)]
    assert q[0] > 0.85 and q[0] > q[1] > q[2] and q[2] < 0.05
    # stray blobs in two colours the caption does not name
    cluttered = x.clone()
    for i, cap in enumerate(caps):
        named = {o.colour for o in d.parse_caption(cap).objects}
        stray = [c for c in d.COLOUR_NAMES if c not in named][:2]
        cluttered[i, :, 0:4, 0:4] = torch.tensor(d.COLOURS[stray[0]]).reshape(3, 1, 1)
        cluttered[i, :, 28:32, 28:32] = torch.tensor(d.COLOURS[stray[1]]).reshape(3, 1, 1)
    p = ground_truth_components(cluttered, caps)
    assert float((clean.quality - p.quality).min()) > 0.2


def test_empty_and_random_images_score_low(rendered):
    x, caps = rendered
    assert float(ground_truth(torch.full_like(x, 0.5), caps).max()) == 0.0
    g = torch.Generator().manual_seed(1)
    assert float(ground_truth(torch.rand(x.shape, generator=g), caps).mean()) < 0.2


def test_blur_costs_a_little_and_scores_are_bounded(rendered):
    x, caps = rendered
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    b, c = ground_truth(blurred, caps), ground_truth(x, caps)
    assert (b <= c + 1e-4).all() and float(b.mean()) > 0.85
    assert float(b.min()) >= 0 and float(b.max()) <= 1


def test_batched_equals_single_and_upscaled_images_agree(rendered):
    x, caps = rendered
    full = ground_truth(x, caps)
    one = torch.stack([ground_truth(x[i:i + 1], caps[i]) for i in range(0, len(caps), 5)]).flatten()
    torch.testing.assert_close(one, full[::5], atol=1e-5, rtol=0)
    big = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    torch.testing.assert_close(ground_truth(big, caps), full, atol=1e-4, rtol=0)


def test_hue_matches_colorsys():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 1, (200, 3)).astype(np.float32)
    ours = rgb_to_hue(torch.from_numpy(rgb).reshape(200, 3, 1, 1)).flatten().numpy()
    ref = np.array([colorsys.rgb_to_hsv(*p)[0] * 360 for p in rgb.astype(np.float64)])
    diff = np.abs(ours - ref)
    assert np.minimum(diff, 360 - diff).max() < 1e-2


def test_palette_colours_are_recognised_and_grey_is_not():
    pal = torch.tensor([d.COLOURS[c] for c in d.COLOUR_NAMES]).reshape(6, 3, 1, 1)
    member, mass = colour_maps(pal)
    assert torch.equal(member[:, :, 0, 0].argmax(1), torch.arange(6))
    assert float(member[:, :, 0, 0].max(1).values.min()) > 0.95
    # half coverage over grey reads as half
    half = pal * 0.5 + 0.5 * 0.4
    torch.testing.assert_close(colour_maps(half)[1].flatten(), torch.full((6,), 0.5), atol=0.03, rtol=0)
    greys = torch.linspace(0, 1, 11).reshape(11, 1, 1, 1).expand(11, 3, 1, 1)
    assert float(colour_maps(greys)[1].max()) == 0.0


def test_bad_inputs_raise():
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ConfigError):
        ground_truth(x, ["a red circle"])
    with pytest.raises(InvalidTensorError):
        ground_truth(torch.rand(2, 32, 32), ["a red circle"] * 2)
    with pytest.raises(ConfigError):
        ground_truth(x, ["a red dog"] * 2)
