"""Perception pre-training: an unlabelled autoencoder on public images that trains only the
image path (vision tower + projector) of any supported family, and learns."""

import pytest
import torch

from mor_secure.alignment.perception import (
    IMAGE_PATH,
    build_base_model,
    input_embeddings,
    pooled_image_features,
    pretrain_perception,
)
from mor_secure.config import ModelSpec, load_config
from mor_secure.errors import ConfigError
from mor_secure.data import make_samples, vocabulary
from mor_secure.models.factory import build_vlm


@pytest.mark.parametrize("family", ["llava", "idefics3", "paligemma"])
def test_perception_trains_only_the_image_path_and_lowers_the_loss(family):
    vlm = build_vlm(family, vocabulary(), seed=0)
    images = [s["image"] for s in make_samples("shapes", "colour", 32, seed=3, pool="public")]
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    losses = pretrain_perception(vlm, images, steps=40, lr=1e-3, batch_size=16, resolution=8, seed=0,
                                 progress=False)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # it learns to rebuild the images
    changed = {n for n, p in vlm.model.named_parameters() if not torch.equal(p, before[n])}
    image_path = {n for n in before if any(part in n for part in IMAGE_PATH)}
    assert changed and changed <= image_path  # the language model is untouched
    assert not vlm.model.training


def test_pooled_features_differ_between_images_and_zero_steps_is_a_no_op():
    vlm = build_vlm("llava", vocabulary(), seed=0)
    samples = make_samples("shapes", "colour", 4, seed=3, pool="public")
    images = [s["image"] for s in samples]
    with torch.no_grad():
        feats = pooled_image_features(vlm, vlm.encode(images, [""] * 4))
    assert feats.shape == (4, vlm.hidden_size)
    assert not torch.allclose(feats[0], feats[1])
    state = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    assert pretrain_perception(vlm, images, steps=0, lr=1e-3, batch_size=4, resolution=8, seed=0) == []
    assert all(torch.equal(p, state[n]) for n, p in vlm.model.named_parameters())


@pytest.mark.parametrize("family", ["llava", "idefics3", "paligemma"])
def test_input_embeddings_are_what_the_language_model_receives(family):
    vlm = build_vlm(family, vocabulary(), seed=0)
    images = [s["image"] for s in make_samples("shapes", "count", 3, seed=4, pool="public")]
    batch = vlm.encode(images, ["how many shapes are there ?"] * 3)
    with torch.no_grad():
        full = vlm.model.model(**batch, output_hidden_states=True).hidden_states[0]
        assert torch.allclose(input_embeddings(vlm, batch), full)


def test_base_model_with_perception_is_deterministic_and_differs_from_the_random_one():
    spec = ModelSpec(family="paligemma", perception={"steps": 5, "images": 16, "batch_size": 8})
    kwargs = dict(track="shapes", image_size=32, data_seed=0, model_seed=7, progress=False)
    a, losses = build_base_model(spec, **kwargs)
    b, _ = build_base_model(spec, **kwargs)
    plain, none = build_base_model(ModelSpec(family="paligemma"), **kwargs)
    assert len(losses) == 5 and none == []
    sa, sb, sp = a.model.state_dict(), b.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # server, clients and a resumed run rebuild the same model
    assert any(not torch.equal(sa[k], sp[k]) for k in sa if any(part in k for part in IMAGE_PATH))


def test_perception_with_a_checkpoint_is_refused_by_name(tmp_path):
    text = (tmp_path / "c.yaml")
    text.write_text("clients:\n  - name: a\n    families: [colour]\n"
                    "policy:\n  model: {checkpoint: /models/real, perception: {steps: 10}}\n")
    with pytest.raises(ConfigError, match="perception.steps"):
        load_config(text)
