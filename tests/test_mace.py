"""MACE: its closed forms against the reference's written out in float64, its token pairing, the attention maps its
loss reads (UNet cross-attention, SD3/Flux joint attention), and short runs on tiny, tiny SD3 and tiny Flux."""

import pytest
import torch

from erase import ConceptSpec, erase_concepts
from erase.lora.mace import MACEConfig, fusion_update, importance_weight, matched_positions, refinement_update
from pipelines import load_pipeline


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def transformer(request):
    return load_pipeline(request.param)


def _reference_closed_form(weight, all_contexts, all_valuess, lamb, preserve_scale, cache):
    """``cfr_utils.closed_form_refinement`` for one layer: per item, contexts (tokens, d) and values (tokens, out)
    stacked on a third axis, summed by ``bmm``, the cache added at ``preserve_scale``, then mat1 @ inverse(mat2)."""
    mat1 = lamb * weight
    mat2 = lamb * torch.eye(weight.shape[1], dtype=torch.float64)
    total1, total2 = torch.zeros_like(weight), torch.zeros_like(mat2)
    for contexts, values in zip(all_contexts, all_valuess, strict=True):
        c = torch.stack(contexts, dim=2)  # (tokens, d, prompts)
        v = torch.stack(values, dim=2)  # (tokens, out, prompts)
        total1 += torch.bmm(v, c.permute(0, 2, 1)).sum(dim=0)
        total2 += torch.bmm(c, c.permute(0, 2, 1)).sum(dim=0)
    total1 += preserve_scale * cache["mat1"] + mat1
    total2 += preserve_scale * cache["mat2"] + mat2
    return total1 @ torch.inverse(total2)


def _problem(seed=0, d=12, out=7, concepts=3, prompts=2, tokens=9, kept=40):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    weight, refined = draw(out, d), draw(out, d)
    loras = [0.3 * draw(out, 1) @ draw(1, d) for _ in range(concepts)]  # rank-1 LoRA changes
    contexts = [[draw(tokens, d) for _ in range(prompts)] for _ in range(concepts)]
    preserved = draw(kept, d)
    return weight, refined, loras, contexts, preserved


@pytest.mark.parametrize("lamb", [0.0, 0.5])
def test_fusion_is_the_reference_closed_form(lamb):
    """``fuse_lora_close_form.py``: each concept's prompts' tokens keep the values its LoRA-fused projection gives,
    the preserved tokens (the cache, built from the base weights) the base's."""
    weight, refined, loras, contexts, preserved = _problem()
    cache = {"mat1": weight @ preserved.T @ preserved, "mat2": preserved.T @ preserved}  # cache_coco.py's sums
    valuess = [[c @ (refined + lora).T for c in prompts] for prompts, lora in zip(contexts, loras, strict=True)]
    scale = 1e-4 * 2e5  # fuse_preserve_scale * preserve_weight
    expected = _reference_closed_form(refined, contexts, valuess, lamb, scale, cache)
    grams = [sum(c.T @ c for c in prompts) for prompts in contexts]
    ours = fusion_update(weight, refined, loras, grams, preserved.T @ preserved, scale, lamb)
    assert (ours - expected).norm() / expected.norm() < 1e-10
    # each concept's own LoRA is what the fused weights follow on its tokens: dropping one moves the result
    other = fusion_update(weight, refined, [loras[0] * 0, *loras[1:]], grams, preserved.T @ preserved, scale, lamb)
    assert (other - ours).norm() > 1e-3 * ours.norm()


def test_refinement_is_the_reference_closed_form():
    """Stage 1: contexts of the concept prompt sent to the guide prompt's values under the base weights, the cache
    applied at train_preserve_scale twice (once building it, once in the solve), as the reference does."""
    weight, _, _, contexts, preserved = _problem(seed=1)
    guides = [[c + 0.1 for c in prompts] for prompts in contexts]
    valuess = [[g @ weight.T for g in prompts] for prompts in guides]
    cache = {"mat1": weight @ preserved.T @ preserved, "mat2": preserved.T @ preserved}
    scale = 1e-4
    cache = {k: scale * (2e5 * v) for k, v in cache.items()}  # cfr_lora_training.py's cache_dict
    expected = _reference_closed_form(weight, contexts, valuess, 0.5, scale, cache)
    c = torch.cat([x for prompts in contexts for x in prompts])
    g = torch.cat([x for prompts in guides for x in prompts])
    ours = refinement_update(weight, weight, g @ weight.T, c, preserved.T @ preserved, scale**2 * 2e5, 0.5)
    assert (ours - expected).norm() / expected.norm() < 1e-10


def test_token_pairing_follows_the_reference():
    """``find_matching_indices`` plus the extension to 77: common prefix and suffix, then every later position,
    the two lists the same length."""
    old, new = [49406, 320, 1125, 2, 3, 49407], [49406, 320, 1125, 7, 49407]  # "a photo of <x y>" -> "a photo of <z>"
    old_pos, new_pos = matched_positions(old, new, 77)
    assert old_pos[:4] == [0, 1, 2, 5] and new_pos[:4] == [0, 1, 2, 4]
    assert len(old_pos) == len(new_pos) and old_pos[-1] == 76 and new_pos[-1] == 75
    assert old_pos[4:] == list(range(6, 77)) and new_pos[4:] == list(range(5, 76))
    short_old, short_new = matched_positions([49406, 5, 49407], [49406, 49407], 77)  # "{}" -> the empty guide
    assert short_old[:2] == [0, 2] and short_new[:2] == [0, 1] and short_old[-1] == 76
    assert len(short_old) == len(short_new) == 76


def test_importance_weight_is_the_reference_bump():
    f = importance_weight(torch.tensor([0, 100, 300, 500, 999]))
    assert f.argmax() == 2 and f[2] > 0.98 and f[0] < 1e-4 and f[4] < 1e-8


def test_attention_probabilities_are_those_the_unet_uses(tiny):
    """Recombining the recorded probabilities with the values gives each cross-attention's own output."""
    layers = [layer for layer in tiny.cross_attention_layers(("*attn2.to_v",))]
    attention = ["unet." + layer.name.rpartition(".")[0] for layer in layers]
    encoding = tiny.encode_prompts(["van gogh"])
    latents = tiny.initial_latents(0)
    with tiny.capture([f"{a}.to_v" for a in attention] + attention) as outputs:
        with tiny.attention_probabilities(attention) as probabilities:
            tiny.noise_prediction(latents, 500, encoding)
    for name in attention:
        module = tiny.module(name)
        (probs,) = probabilities[name]
        assert probs.shape[1] == module.heads and probs.shape[-1] == 77
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        v = outputs[f"{name}.to_v"][0]
        v = v.reshape(v.shape[0], v.shape[1], module.heads, -1).transpose(1, 2)
        mixed = (probs @ v).transpose(1, 2).reshape(v.shape[0], probs.shape[2], -1)
        torch.testing.assert_close(module.to_out[0](mixed), outputs[name][0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_mace_on_tiny_lowers_the_attention_to_the_concept(tiny):
    """A short run (tiny, 20 steps): the erased model attends less to the concept's tokens than the base (at 6 steps
    of 1e-2 it does not yet)."""
    config = MACEConfig(steps=20, lr=3e-2, pool_images=1, pool_steps=4, templates=("{}", "a painting of {}"))
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",), guides=("art",), preserve=("a cat",)), "mace", config)
    assert set(artifact.deltas) == {n for n in artifact.deltas if n.endswith(("attn2.to_k", "attn2.to_v"))}
    assert artifact.info["layers_matched"] == len(artifact.deltas) and len(artifact.info["lora_final_losses"]) == 1

    before, after = _concept_attention(tiny, config.templates, artifact.deltas)
    assert after < before


def _concept_attention(wrapper, templates, deltas) -> tuple[float, float]:
    """The attention of the image tokens to "van gogh"'s text rows (in every stream) in ``templates``, summed over the
    text-attention layers at t = 300: the base model's, and with ``deltas`` applied."""
    attention = wrapper.text_attention_names()
    prompts = [t.format("van gogh") for t in templates]
    encoding = wrapper.encode_prompts(prompts)
    streams = range(len(wrapper.token_streams()))
    positions = [[r for s in streams for r in wrapper.phrase_positions(p, "van gogh", s)] for p in prompts]
    assert len(positions[0]) == 2 * len(streams)
    latents = torch.cat([wrapper.initial_latents(s) for s in range(len(prompts))])

    def concept_attention() -> float:
        with torch.no_grad(), wrapper.attention_probabilities(attention) as found:
            wrapper.noise_prediction(latents, 300, encoding)
        return sum(float(p[i][..., positions[i]].norm()) for a in attention for p in found[a] for i in range(len(p)))

    before = concept_attention()
    with wrapper.weight_deltas(deltas):
        return before, concept_attention()


def test_joint_attention_probabilities_are_those_the_transformer_uses(transformer, tiny):
    """SD3/Flux: with the image tokens' values zeroed, each joint (and Flux single-stream) attention's image rows are
    the recorded image-to-text probabilities times the text values: the rows and columns of the joint softmax the
    processor takes (Flux's rotary embedding included). The UNet's text attention is its cross-attention."""
    assert tiny.text_attention_names() == sorted(
        {"unet." + layer.name.rpartition(".")[0] for layer in tiny.cross_attention_layers()}
    )
    attention = transformer.text_attention_names()
    assert any(".single_transformer_blocks." in n for n in attention) == (transformer.architecture == "flux")
    encoding = transformer.encode_prompts(["van gogh"])
    text = encoding.embeddings.shape[1]
    values, outputs, handles = {}, {}, []

    def keep(store, name, rows=slice(None)):  # noqa: ANN001, ANN202
        return lambda _module, args, *output: store.__setitem__(name, (output[0] if output else args[0])[:, rows])

    for name in attention:
        module = transformer.module(name)
        joint = module.add_v_proj is not None if hasattr(module, "add_v_proj") else False
        image = slice(None) if joint else slice(text, None)  # single-stream: text rows first, then image rows
        handles.append(module.to_v.register_forward_hook(lambda _m, _a, out, image=image: out.index_fill(
            1, torch.arange(out.shape[1])[image], 0.0)))  # fmt: skip
        if joint:
            handles.append(module.add_v_proj.register_forward_hook(keep(values, name)))
            handles.append(module.to_out[0].register_forward_pre_hook(keep(outputs, name)))
        else:
            handles.append(module.to_v.register_forward_hook(keep(values, name, slice(0, text))))
            handles.append(module.register_forward_hook(keep(outputs, name, slice(text, None))))
    try:
        with torch.no_grad(), transformer.attention_probabilities(attention) as probabilities:
            transformer.noise_prediction(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 500,
                                         encoding)  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    for name in attention:
        (probs,) = probabilities[name]
        heads = transformer.module(name).heads
        assert probs.shape[1:] == (heads, outputs[name].shape[1], text)
        assert float(probs.sum(-1).max()) < 1.0  # the image keys take the rest of each row
        v = values[name].unflatten(-1, (heads, -1)).transpose(1, 2).float()
        torch.testing.assert_close((probs @ v).transpose(1, 2).flatten(2), outputs[name].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_mace_on_sd3_and_flux_lowers_the_attention_to_the_concept(transformer):
    """A short run: all three stages on the text-side input projections (token rows and pooled vector), and the
    erased transformer's image tokens attend less to the concept's text rows, in every stream, than the base's."""
    config = MACEConfig(steps=20, lr=3e-2, pool_images=1, pool_steps=4, templates=("{}", "a painting of {}"))
    spec = ConceptSpec(("van gogh",), guides=("art",), preserve=("a cat",))
    artifact = erase_concepts(transformer, spec, "mace", config)
    assert set(artifact.deltas) == {f"transformer.{layer.name}" for layer in transformer.cross_attention_layers()}
    before, after = _concept_attention(transformer, config.templates, artifact.deltas)
    assert after < before
