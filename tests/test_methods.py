"""Checks every registered erasure method gets, table-driven over the registry."""

import numpy as np
import pytest
import torch

import erase
from erase import ConceptSpec, erase_concepts


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


@pytest.fixture(params=erase.available_methods())
def method(request):
    return request.param


def test_registry_lists_methods_and_refuses_duplicates():
    assert {"uce", "time"} <= set(erase.available_methods())
    spec = erase.get_method("uce")
    with pytest.raises(ValueError, match="already registered"):
        erase.register_method("uce", spec.config_class, "closed_form")(spec.run)
    with pytest.raises(ValueError, match="unknown erasure method"):
        erase.get_method("nope")


def test_method_changes_target_and_leaves_other_modules_bit_identical(tiny, method):
    before = {k: v.clone() for k, v in tiny.pipe.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in tiny.pipe.text_encoder.state_dict().items()}
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",), preserve=("monet",)), method)
    # Methods return the change; the pipeline is untouched until it is applied.
    assert all(torch.equal(v, tiny.pipe.unet.state_dict()[k]) for k, v in before.items())
    edited = {name.removeprefix("unet.") + ".weight" for name in artifact.deltas}
    assert all(name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for name in edited)
    base = _pixels(tiny.generate(["a painting by van gogh"], [0], steps=3, progress=False))
    erase.apply_artifact(tiny, artifact)
    after_state = tiny.pipe.unet.state_dict()
    for key, value in before.items():
        if key in edited:
            assert not torch.equal(value, after_state[key]), key
        else:
            assert torch.equal(value, after_state[key]), key
    assert all(torch.equal(v, tiny.pipe.text_encoder.state_dict()[k]) for k, v in text_before.items())
    erased = _pixels(tiny.generate(["a painting by van gogh"], [0], steps=3, progress=False))
    assert np.abs(base - erased).max() > 1


def test_save_load_round_trip(tiny, method, tmp_path):
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh", "monet")), method)
    erase.save_artifact(artifact, tmp_path / "a", tiny)
    loaded = erase.load_artifact(tmp_path / "a")
    assert loaded.method == method and loaded.concepts == ["van gogh", "monet"]
    assert loaded.base_fingerprint == artifact.base_fingerprint
    for name, delta in artifact.deltas.items():
        assert torch.allclose(loaded.deltas[name], delta, atol=1e-4), name


def test_method_config_validation_names_the_bad_value(method):
    config_class = erase.get_method(method).config_class
    with pytest.raises(ValueError, match="-1"):
        config_class(lamb=-1.0)
    with pytest.raises(ValueError, match="layers"):
        config_class(layers=())
