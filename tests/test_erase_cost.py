"""What ``erase_concepts`` computes besides the method's solve: prompt prefixes, fingerprints and norms, each once."""

import dataclasses

import pytest
import torch

from erase import ArtifactMismatchError, ConceptSpec, erase_concepts
from erase.core import registry
from erase.core.artifact import check_artifact_base

PROMPTS = ["van gogh", "a painting of a cat by claude monet", "", "a red star"]


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_prompt_prefixes_are_the_full_encodings_first_positions(model):
    """A causal encoder's first n outputs from the first n tokens alone: the full encoding's, up to float32 rounding
    (attention reduces over n keys instead of 77, so sums group differently), and exactly it at full length."""
    from pipelines import load_pipeline

    wrapper = load_pipeline(model)
    full = wrapper.encode_prompts(PROMPTS)
    for length in (1, 3, 9):
        prefix = wrapper.encode_prompt_prefixes(PROMPTS, length)
        assert prefix.embeddings.shape == (len(PROMPTS), length, full.embeddings.shape[2])
        torch.testing.assert_close(prefix.embeddings, full.embeddings[:, :length], rtol=1e-5, atol=1e-5)
        assert torch.equal(prefix.input_ids, full.input_ids) and torch.equal(prefix.lengths, full.lengths)
    # the model's own positions: a wrong prefix (shifted by one) is far off
    assert not torch.allclose(wrapper.encode_prompt_prefixes(PROMPTS, 4).embeddings[:, 1:], full.embeddings[:, :3])
    assert torch.equal(wrapper.encode_prompt_prefixes(PROMPTS, 77).embeddings, full.embeddings)
    with pytest.raises(ValueError, match="prefix length"):
        wrapper.encode_prompt_prefixes(PROMPTS, 0)


def test_fingerprints_in_one_pass_are_the_single_fingerprints(tiny):
    names = [f"unet.{layer.name}" for layer in tiny.cross_attention_layers()][:3]
    precisions = (torch.float32, torch.float16, torch.bfloat16)
    together = tiny.fingerprints(names, precisions)
    assert together == {p: tiny.fingerprint(names, p) for p in precisions}
    assert len(set(together.values())) == 3


def test_artifact_records_are_those_of_the_pipeline_and_computed_once_per_base(tiny, monkeypatch):
    """Norms and low-precision fingerprints equal what measuring the pipeline gives (edited: with the edit applied),
    reused while the base fingerprint is the same, measured again when the weights differ."""
    registry.forget_base_records()
    spec = ConceptSpec(("van gogh",), preserve=("claude monet",))
    first = erase_concepts(tiny, spec, "uce")
    modules = first.fingerprint_modules
    assert first.low_precision_fingerprints == {
        "float16": tiny.fingerprint(modules, torch.float16),
        "bfloat16": tiny.fingerprint(modules, torch.bfloat16),
    }
    assert first.weight_norms["base"] == tiny.weight_norms(modules)
    with tiny.weight_deltas(first.deltas):
        applied = tiny.weight_norms(modules)
        with pytest.raises(ArtifactMismatchError, match="already applied"):
            check_artifact_base(tiny, first)
    assert first.weight_norms["edited"] == applied
    assert all(first.info["relative_change"][m] > 0 for m in modules)
    assert set(first.info["seconds_by_step"]) == {"method", "fingerprints", "norms"}

    calls = []
    monkeypatch.setattr(tiny, "fingerprints", lambda *a: calls.append(a) or {})
    again = erase_concepts(tiny, spec, "uce")  # the same base: its record is reused
    assert not calls and again.low_precision_fingerprints == first.low_precision_fingerprints
    monkeypatch.undo()

    tiny.apply_weight_deltas({modules[0]: torch.ones_like(tiny.module(modules[0]).weight)})
    other = erase_concepts(tiny, spec, "uce")
    assert other.base_fingerprint != first.base_fingerprint
    assert other.low_precision_fingerprints["float16"] == tiny.fingerprint(modules, torch.float16)
    assert other.weight_norms["base"][modules[0]] != first.weight_norms["base"][modules[0]]


def test_a_non_finite_edit_is_refused_naming_the_module(tiny, monkeypatch):
    uce = registry.get_method("uce")

    def broken(wrapper, concepts, config):
        edit = uce.run(wrapper, concepts, config)
        name = sorted(edit.deltas)[1]
        edit.deltas[name] = edit.deltas[name].clone()
        edit.deltas[name][0, 0] = float("nan")
        return edit

    monkeypatch.setattr(registry, "get_method", lambda name: dataclasses.replace(uce, run=broken))
    with pytest.raises(ValueError, match="is not finite"):
        erase_concepts(tiny, ["van gogh"], "uce")
