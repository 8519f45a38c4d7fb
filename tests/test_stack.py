"""Stacked erasures on the tiny pipeline: a weight edit (uce) and then a runtime payload (saeuron) made with it in
force, saved as a stack folder, loaded, removed bit for bit; members checked against the state before them."""

import json

import numpy as np
import pytest
import torch

import erase
from erase import ArtifactError, ArtifactMismatchError, ConceptSpec
from erase.sae.sae import SAETrainConfig, build_sae
from erase.stack import erase_stack, load_stack, member_overrides, parse_method_stack, save_stack
from erase.workflow import stack_settings

UNET_HOOK = "unet.up_blocks.0.attentions.1"
PROMPTS = ["a painting by van gogh", "a red house", "a blue car at night", "a tree by the river", "a cat",
           "starry night by van gogh", "a dog in the city", "a boat under the moon"]  # fmt: skip


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


def _state(wrapper):
    return {k: v.detach().clone() for k, v in wrapper.pipe.unet.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- names, settings
def test_a_stack_is_methods_joined_by_plus_and_bad_names_are_one_line():
    assert parse_method_stack("uce+saeuron") == ["uce", "saeuron"]
    assert parse_method_stack(" uce ") == ["uce"]
    for text, message in (("uce++saeuron", "empty member"), ("uce+uce", "names 'uce' twice"), ("", "empty"),
                          ("uce+nope", "unknown erasure method 'nope'")):  # fmt: skip
        with pytest.raises(ValueError, match=message) as caught:
            parse_method_stack(text)
        assert "\n" not in str(caught.value)


def test_settings_go_to_the_member_named_or_to_every_member_that_has_the_field():
    split = member_overrides(["uce", "saeuron"], {"saeuron.steps": 20, "seed": 3, "lamb": 0.5})
    assert split["saeuron"] == {"steps": 20, "seed": 3} and split["uce"] == {"lamb": 0.5}
    assert member_overrides(["uce"], {"uce.lamb": 0.5}) == {"uce": {"lamb": 0.5}}
    with pytest.raises(ValueError, match="no member of uce\\+saeuron has a setting 'nope'"):
        member_overrides(["uce", "saeuron"], {"nope": 1})
    with pytest.raises(ValueError, match="'esd' is no member of uce\\+saeuron"):
        member_overrides(["uce", "saeuron"], {"esd.lr": 1})
    assert member_overrides(["uce"], {"esd.lr": 1}, known_members=["esd"]) == {"uce": {}}  # another row's setting


def test_stack_settings_give_each_member_what_it_reads(wrapper):
    members = stack_settings(wrapper, ["van gogh"], ["uce", "saeuron"], preserve=["monet"],
                             member_overrides={"saeuron": {"steps": 4}, "uce": {}})  # fmt: skip
    (uce, uce_spec, _), (sae, sae_spec, sae_config) = members
    assert (uce, sae) == ("uce", "saeuron") and sae_config.steps == 4
    assert uce_spec.guides == ("art",) and sae_spec.guides == ("",)  # saeuron takes no guide
    assert uce_spec.preserve == sae_spec.preserve == ("monet",)
    with pytest.raises(ValueError, match="has no setting 'nope'"):
        stack_settings(wrapper, ["van gogh"], ["uce", "saeuron"], member_overrides={"uce": {"nope": 1}})


# ---------------------------------------------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def stack(wrapper, tmp_path_factory):
    """uce, then saeuron made on the uce-edited model, in memory and saved."""
    store = tmp_path_factory.mktemp("saes")
    build_sae(wrapper, UNET_HOOK, PROMPTS, store / "unet",
              SAETrainConfig(expansion=4, k=8, batch_size=512, epochs=3, dead_tokens=5000), steps=4)  # fmt: skip
    saeuron = erase.get_method("saeuron").config_class(sae_stores=(str(store),), percentile=90.0, multiplier=-5.0,
                                                       other_prompts=4, steps=4, guidance=7.5, templates=("{}",))  # fmt: skip
    uce = erase.get_method("uce").config_class()
    made = erase_stack(wrapper, [("uce", ConceptSpec(("van gogh",), ("art",)), uce),
                                 ("saeuron", ConceptSpec(("van gogh",)), saeuron)])  # fmt: skip
    folder = save_stack(made, tmp_path_factory.mktemp("stack") / "vg-uce+saeuron", wrapper)
    return made, folder


def _generate(wrapper):
    return _pixels(wrapper.generate(PROMPTS[:2], [0, 1], steps=4, progress=False))


def test_a_saved_stack_loads_as_the_in_memory_one_and_remove_restores_bit_for_bit(wrapper, stack):
    made, folder = stack
    before, original = _state(wrapper), _generate(wrapper)
    with made.applied(wrapper):
        in_memory = _generate(wrapper)
    with made.members[0].applied(wrapper):
        uce_alone = _generate(wrapper)
    handle = erase.load(wrapper, folder)
    assert handle.active and handle.stack.method == "uce+saeuron"
    loaded = _generate(wrapper)
    with pytest.raises(ArtifactMismatchError, match="already applied"):
        erase.load(wrapper, folder)  # a second time would double the uce edit
    handle.remove()
    assert not handle.active
    after = _state(wrapper)
    assert all(torch.equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(loaded, in_memory)
    np.testing.assert_array_equal(_generate(wrapper), original)  # the hooks are gone too
    assert not np.array_equal(in_memory, uce_alone)  # the runtime member acts on top of the weight edit
    meta = json.loads((folder / "stack.json").read_text())
    assert [m["folder"] for m in meta["members"]] == ["1-uce", "2-saeuron"]


def test_each_member_is_made_on_the_state_its_predecessors_leave(wrapper, stack):
    made, folder = stack
    uce, saeuron = made.members
    base = wrapper.fingerprint(saeuron.fingerprint_modules)
    with uce.applied(wrapper):
        edited = wrapper.fingerprint(saeuron.fingerprint_modules)
    assert saeuron.base_fingerprint == edited != base
    handle = erase.load(wrapper, folder / "1-uce")  # the first member is an ordinary artifact on the base
    handle.remove()
    with pytest.raises(ArtifactMismatchError) as caught:
        erase.load(wrapper, folder / "2-saeuron")
    message = str(caught.value)
    assert "member 2 of the stack 'uce+saeuron'" in message and "\n" not in message


_ESCAPING = {"folder": "../x", "method": "uce", "erasure_sha256": "0"}  # a member folder outside the stack


def _copy(folder, tmp_path):
    import shutil

    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "2-saeuron" / "intervention.safetensors").write_bytes(b"x"), "does not match the sha256"),
        (lambda f: (f / "1-uce" / "erasure.json").write_text("{}"), "does not match the sha256 in"),
        (lambda f: __import__("shutil").rmtree(f / "2-saeuron"), "is missing or no artifact"),
        (lambda f: (f / "stack.json").write_text("{"), "is corrupt"),
        (
            lambda f: (f / "stack.json").write_text(json.dumps({"stack_version": 1, "members": [_ESCAPING]})),
            "must be the folder 1-uce",
        ),
    ],
)
def test_a_damaged_stack_is_one_line(wrapper, stack, tmp_path, damage, message):
    folder = _copy(stack[1], tmp_path)
    damage(folder)
    before = _state(wrapper)
    with pytest.raises(ArtifactError, match=message) as caught:
        erase.load(wrapper, folder)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(v, wrapper.pipe.unet.state_dict()[k]) for k, v in before.items())


def test_a_stack_folder_is_replaced_only_with_overwrite(wrapper, stack, tmp_path):
    made, folder = stack
    target = _copy(folder, tmp_path)
    with pytest.raises(erase.ArtifactExistsError, match="already holds another erasure artifact"):
        save_stack(made, target, wrapper)
    save_stack(made, target, wrapper, overwrite=True)
    assert len(load_stack(target).members) == 2
    (target / "notes.txt").write_text("mine")
    with pytest.raises(erase.ArtifactExistsError, match="notes.txt"):
        save_stack(made, target, wrapper, overwrite=True)
