"""Stacked erasures on the tiny pipeline: a weight edit (uce) and then a runtime payload (saeuron) made with it in
force, saved as a stack folder, loaded, removed bit for bit; members checked against the state before them."""

import argparse
import json
import runpy
from pathlib import Path

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
    saeuron = erase.get_method("saeuron").config_class(
        sae_stores=(str(store),),
        percentile=90.0,
        multiplier=-5.0,
        other_prompts=4,
        steps=4,
        guidance=7.5,
        templates=("{}",),
    )
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


# ---------------------------------------------------------------------------------------------------- the scripts
ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    return runpy.run_path(str(ROOT / "scripts" / name), run_name="script")["main"]


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("attack_table.py", ["--method", "uce++saeuron"], "has an empty member"),
        ("attack_table.py", ["--method", "uce+saeuron", "--set", "nope=1"], "no member of uce+saeuron has"),
        (
            "attack_table.py",
            ["--method", "uce", "--method", "rece+saeuron", "--set", "esd.lr=1"],
            "'esd' is no member of rece, saeuron, uce",
        ),
        ("attack_table.py", ["--method", "uce+saeuron", "--set", "saeuron.steps=0"], "saeuron: steps must be"),
        ("measure_erasure.py", ["--concept", "van gogh", "--method", "uce+uce"], "names 'uce' twice"),
        ("erase.py", ["--concept", "van gogh", "--method", "uce+nope", "--no-check"], "unknown erasure method 'nope'"),
    ],
)
def test_a_bad_stack_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, capsys, script, args, message):
    out = ["--json", str(tmp_path / "out.json")] if script == "measure_erasure.py" else ["--out", str(tmp_path / "o")]
    assert _script(script)([*args, *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_erase_script_saves_a_stack_with_each_members_settings_and_it_loads(wrapper, stack, tmp_path, capsys):
    from erase.cli import main

    store = json.loads((stack[1] / "2-saeuron" / "erasure.json").read_text())["config"]["sae_stores"]
    sets = ["--set", f"saeuron.sae_stores={json.dumps(store)}", "--set", "saeuron.steps=4", "--set",
            "saeuron.other_prompts=4", "--set", "templates=[\"{}\"]", "--set", "uce.lamb=0.25"]  # fmt: skip
    code = main(["--model", "tiny", "--concept", "van gogh", "--method", "uce+saeuron", *sets, "--no-check",
                 "--out", str(tmp_path / "vg")])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "a stack of uce then saeuron" in printed
    meta = json.loads((tmp_path / "vg" / "stack.json").read_text())
    assert meta["method"] == "uce+saeuron" and meta["config"]["uce"]["lamb"] == 0.25
    assert meta["config"]["saeuron"]["steps"] == 4 and "lamb" not in meta["config"]["saeuron"]
    assert meta["config"]["uce"]["templates"] == meta["config"]["saeuron"]["templates"] == ["{}"]  # a plain --set
    assert meta["guides"] == ["art"]  # saeuron reads no guide
    before = _state(wrapper)
    with erase.load(wrapper, tmp_path / "vg") as handle:
        assert [m.method for m in handle.stack.members] == ["uce", "saeuron"]
    assert all(torch.equal(v, wrapper.pipe.unet.state_dict()[k]) for k, v in before.items())


def test_the_audit_reads_a_stack_folder(wrapper, stack):
    from erase.workflow import audit_models

    (model,) = audit_models(wrapper, [stack[1]])
    assert model.metadata["method"] == "uce+saeuron" and model.metadata["weight_format"] == "stack"
    assert set(model.metadata["config"]) == {"uce", "saeuron"}


@pytest.mark.slow
def test_the_attack_script_attacks_a_stack_folder(stack, clip_dir, tmp_path, capsys):
    code = _script("attack.py")(["--erasure", str(stack[1]), "--model", "tiny", "--attack", "rece_embedding",
                                 "--scorer", str(clip_dir), "--no-judge", "--images", "2", "--quiet",
                                 "--out", str(tmp_path / "attacks")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads(next((tmp_path / "attacks").rglob("attack.json")).read_text())
    assert summary["erasure"]["method"] == "uce+saeuron" and set(summary["erasure"]["config"]) == {"uce", "saeuron"}


def test_attack_table_rows_name_the_stack_and_the_settings_that_reach_it():
    row_suffix = runpy.run_path(str(ROOT / "scripts" / "attack_table.py"), run_name="script")["row_suffix"]
    args = argparse.Namespace(label="", preserve_set=[], split="report",
                              set=["saeuron.steps=20", "lamb=1", "saeuron.gate=0.3"])  # fmt: skip
    assert (
        "uce+saeuron" + row_suffix(args, ["uce", "saeuron"], 1)
        == "uce+saeuron saeuron.steps=20 lamb=1 saeuron.gate=0.3"
    )
    assert "uce" + row_suffix(args, ["uce"], 4) == "uce lamb=1 x4 budget"  # another row's member settings left out


@pytest.mark.slow
def test_attack_table_measures_a_stack_under_a_row_named_for_it_and_its_settings(tmp_path):
    """The coordinator's command, cut to one attack, one probe and a short saeuron on the micro model."""
    sets = ["saeuron.steps=4", "saeuron.percentile=99", "saeuron.multiplier=-20", "saeuron.gate=0.3",
            "saeuron.other_prompts=2", "saeuron.templates=[\"{}\"]"]  # fmt: skip
    args = ["--method", "uce+saeuron", *(a for s in sets for a in ("--set", s))]
    assert _script("attack_table.py")([*args, "--attack", "rece_embedding", "--images", "1",
                                        "--out", str(tmp_path)]) == 0  # fmt: skip
    table = json.loads((tmp_path / "table.json").read_text())
    stack_row = "uce+saeuron " + " ".join(sets)
    assert set(table) == {"original", stack_row}
    assert table[stack_row]["rows"]["rece_embedding"]["clip"]["n"] == 1
    assert f"| {stack_row} (clip) |" in (tmp_path / "table.md").read_text()
