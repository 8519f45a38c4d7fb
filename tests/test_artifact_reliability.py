"""Artifacts under bad input and faults: tampered files, foreign folders, killed saves, permissions, double loads.

Each test names the row of shared/reports/reliability-2026-11-30.md it covers.
"""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import erase
from erase import ArtifactError, ArtifactExistsError, ArtifactMismatchError, ConceptSpec, erase_concepts
from erase.closed_form.uce import UCEConfig
from erase.core.layout import LORA_FILE, METADATA_FILE, TEMPORARY_MARK
from pipelines import load_pipeline
from pipelines.files import file_sha256
from pipelines.tiny import tiny_sd_pipeline
from pipelines.wrapper import PipelineWrapper


@pytest.fixture
def saved(tiny, tmp_path):
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "uce")
    return artifact, erase.save_artifact(artifact, tmp_path / "a", tiny)


def _edit_meta(folder, **changes):
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta.update(changes)
    (folder / METADATA_FILE).write_text(json.dumps(meta))


def _retamper_weights(folder, change, adapter=None):
    """Rewrite the LoRA file with ``change(tensors)`` (and its adapter metadata with ``adapter(metadata)``, else
    without one) and record its new sha256, so the tampering reaches the loader."""
    tensors = load_file(str(folder / LORA_FILE))
    header = None
    if adapter is not None:
        with safe_open(str(folder / LORA_FILE), "pt") as f:
            metadata = f.metadata()
        header = {
            **metadata,
            "lora_adapter_metadata": json.dumps(adapter(json.loads(metadata["lora_adapter_metadata"]))),
        }
    save_file(change(tensors), str(folder / LORA_FILE), metadata=header)
    _edit_meta(folder, checksums={LORA_FILE: file_sha256(folder / LORA_FILE)})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"schema_version": "1"}, "schema_version must be a positive integer"),  # A05b
        ({"schema_version": None}, "schema_version must be a positive integer"),  # A05b (API)
        ({"layers": None}, "layers must be a list"),  # A05c
        ({"layers": []}, "lists no layers"),  # A13b
        ({"concepts": [1]}, "concepts must be a list of strings"),
        ({"payloads": {"pickle": {}}}, "unknown payload kind 'pickle'"),
        ({"seconds": "abc"}, "seconds must be a finite number"),  # a ValueError without the file's name
        ({"weight_norms": {"base": {"unet.x": float("nan")}}}, "must map module names to finite numbers"),
        ({"low_precision_fingerprints": {"float16": 5}}, "must map dtype names"),  # silently ignored
        ({"info": [1]}, "info must be a dict"),
        ({"method": "nope"}, "method 'nope' is no erasure method this erase knows"),  # loaded, then named nothing
        ({"method": ""}, "method '' is no erasure method"),
    ],
)
def test_malformed_metadata_is_an_artifact_error(saved, changes, message):
    _, folder = saved
    _edit_meta(folder, **changes)
    with pytest.raises(ArtifactError, match=message) as err:
        erase.load_artifact(folder)
    assert "\n" not in str(err.value)


def test_metadata_that_is_not_an_object(saved):  # A05c: erasure.json is `5`
    _, folder = saved
    (folder / METADATA_FILE).write_text("5")
    with pytest.raises(ArtifactError, match="not a JSON object"):
        erase.load_artifact(folder)


def test_lora_factors_that_do_not_multiply(saved):  # A02b
    _, folder = saved
    name = next(k for k in load_file(str(folder / LORA_FILE)) if k.endswith("lora_A.weight"))
    _retamper_weights(folder, lambda t: {**t, name: torch.zeros(t[name].shape[0] + 1, t[name].shape[1])})
    with pytest.raises(ArtifactError, match="do not multiply"):
        erase.load_artifact(folder)


def test_non_finite_weights_are_refused(saved):  # A13
    _, folder = saved
    _retamper_weights(folder, lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()})
    with pytest.raises(ArtifactError, match="NaN"):
        erase.load_artifact(folder)


def test_changed_weights_fail_the_checksum(saved):
    _, folder = saved
    tensors = load_file(str(folder / LORA_FILE))
    save_file({k: v * 2 for k, v in tensors.items()}, str(folder / LORA_FILE))
    with pytest.raises(ArtifactError, match="sha256"):
        erase.load_artifact(folder)


def test_a_fifo_for_weights_fails_at_once(saved):  # A11c: open() on a FIFO blocks forever
    _, folder = saved
    (folder / LORA_FILE).unlink()
    os.mkfifo(folder / LORA_FILE)
    with pytest.raises(ArtifactError, match="not a regular file"):
        erase.load_artifact(folder)


def test_apply_is_all_or_nothing(tiny, tmp_path):  # API1
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "uce")
    first = sorted(artifact.deltas)[0]
    bad = dict(artifact.deltas)
    bad[sorted(bad)[-1]] = torch.zeros(3, 3)
    before = {name: tiny.module(name).weight.detach().clone() for name in artifact.deltas}
    with pytest.raises(ValueError, match="shape"):
        tiny.apply_weight_deltas(bad)
    assert all(torch.equal(tiny.module(n).weight, w) for n, w in before.items()), first


def test_overwrite_never_deletes_the_users_files(saved, tiny):  # E20b
    artifact, folder = saved
    (folder / "my_notes").mkdir()
    (folder / "my_notes" / "thesis.txt").write_text("important")
    with pytest.raises(ArtifactExistsError, match="my_notes"):
        erase.save_artifact(artifact, folder, tiny, overwrite=True)
    assert (folder / "my_notes" / "thesis.txt").read_text() == "important"


def test_overwrite_swaps_in_the_new_artifact_and_leaves_nothing_behind(saved, tiny):  # K3
    _, folder = saved
    monet = erase_concepts(tiny, ConceptSpec(("monet",)), "uce")
    erase.save_artifact(monet, folder, tiny, overwrite=True)
    assert erase.load_artifact(folder).concepts == ["monet"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_a_killed_saves_temporary_folder_is_removed_by_the_next_save(saved, tiny):  # K2
    artifact, folder = saved
    dead = folder.with_name(f".{folder.name}{TEMPORARY_MARK}999999999-deadbeef")  # no such process
    alive = folder.with_name(f".{folder.name}{TEMPORARY_MARK}{os.getpid()}-cafecafe")  # a save still running
    unrelated = folder.with_name(".a.something-else")
    for path in (dead, alive, unrelated):
        path.mkdir()
    erase.save_artifact(artifact, folder, tiny, overwrite=True)
    assert not dead.exists() and alive.exists() and unrelated.exists()


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_artifacts_follow_the_umask(tiny, tmp_path, umask, dir_mode, file_mode):  # P1
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "uce", UCEConfig(token_positions="from_last"))
    old = os.umask(umask)
    try:
        folder = erase.save_artifact(artifact, tmp_path / "a", tiny, extra_files={"before_after.png": b"png"})
    finally:
        os.umask(old)
    for path in [folder, *folder.rglob("*")]:
        expected = dir_mode if path.is_dir() else file_mode
        assert path.stat().st_mode & 0o777 == expected, path


def test_symlinked_out_writes_into_its_target(tiny, tmp_path):  # E36
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "uce")
    erase.save_artifact(artifact, tmp_path / "link", tiny)
    assert (tmp_path / "link").is_symlink() and (target / METADATA_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "link"]


@pytest.mark.parametrize("check", ["output_folder", "writable_folder", "result_file"])
def test_an_output_that_is_a_link_to_nothing_is_refused_and_its_target_never_made(tmp_path, check):
    """``--out`` naming a dangling symbolic link passed the checks, and the write created the link's target folder
    wherever it pointed (``/nonexistent/...``)."""
    from erase.core.layout import check_result_file, check_writable_folder

    target = tmp_path / "nowhere" / "deeper"
    (tmp_path / "link").symlink_to(target)
    run = {"output_folder": erase.check_output_folder, "writable_folder": check_writable_folder,
           "result_file": lambda path: check_result_file(path, "--json", ("groups",))}[check]  # fmt: skip
    with pytest.raises(ArtifactError, match="symbolic link to nothing") as err:
        run(tmp_path / "link")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "link").is_symlink()


@pytest.mark.parametrize("where", ["file_parent", "cwd", "file"])
def test_unusable_output_folders_are_refused_before_work(tmp_path, monkeypatch, where):  # E23b, E24
    (tmp_path / "afile.txt").write_text("x")
    out = {"file_parent": tmp_path / "afile.txt" / "sub", "cwd": ".", "file": tmp_path / "afile.txt"}[where]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError) as err:
        erase.check_output_folder(out)
    assert "\n" not in str(err.value)
    assert (tmp_path / "afile.txt").read_text() == "x"


def test_no_op_and_non_finite_edits_are_refused(tiny, tmp_path):  # E28, A13 on the saving side
    with pytest.raises(ValueError, match="is the concept itself"):
        ConceptSpec(("van gogh",), guides=("Van Gogh",))
    spec = ConceptSpec(("van gogh",))
    object.__setattr__(spec, "guides", ("van gogh",))  # a guide that reads like the target, past the spec's check
    with pytest.raises(ValueError, match="changes nothing"):
        erase_concepts(tiny, spec, "uce")
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "uce")
    name = artifact.layers[0]
    artifact.deltas[name] = torch.full_like(artifact.deltas[name], float("nan"))
    artifact.payload("weights").factors = None
    with pytest.raises(ArtifactError, match="NaN"):
        erase.save_artifact(artifact, tmp_path / "nan", tiny)
    assert not (tmp_path / "nan").exists()


@pytest.mark.parametrize("concept", ["\u200b", "\x00", "van\x00gogh", " \u2060 "])
def test_invisible_or_control_concepts_are_refused(concept):  # E05
    with pytest.raises(ValueError, match="control character|no visible characters|empty"):
        ConceptSpec((concept,))


def test_a_case_variant_cannot_be_both_erased_and_preserved():  # E11d
    with pytest.raises(ValueError, match="both erased and preserved"):
        ConceptSpec(("van gogh",), preserve=("monet", "Van Gogh"))


@pytest.mark.slow
def test_erase_load_applies_to_a_plain_pipeline_once(saved, tiny):
    artifact, folder = saved
    with tiny.weight_deltas(artifact.deltas):
        edited = np.asarray(tiny.generate(["a van gogh star"], [3], steps=4, progress=False)[0], dtype=np.float32)
    plain = tiny_sd_pipeline(0)  # a plain diffusers pipeline object with the same base weights
    handle = erase.load(plain, folder)
    assert handle.artifact.concepts == ["van gogh"]
    again = np.asarray(PipelineWrapper(plain, "x").generate(["a van gogh star"], [3], steps=4, progress=False)[0])
    assert np.abs(edited - again.astype(np.float32)).max() <= 1.0
    with pytest.raises(ArtifactMismatchError, match="already applied"):
        erase.load(plain, folder)
    with pytest.raises(ArtifactMismatchError, match="different weights"):
        erase.load(tiny_sd_pipeline(1), folder)
    with pytest.raises(TypeError, match="StableDiffusionPipeline"):
        erase.load(object(), folder)


def test_erase_load_accepts_a_half_precision_copy_of_the_base(saved):
    artifact, folder = saved
    half = load_pipeline("tiny", dtype=torch.float16)
    erase.load(half.pipe, folder)
    name = artifact.layers[0]
    expected = tiny_sd_pipeline(0).unet.get_submodule(name.removeprefix("unet.")).weight + artifact.deltas[name]
    assert torch.allclose(half.module(name).weight.float(), expected, atol=2e-3)
    with pytest.raises(ArtifactMismatchError, match="already applied"):
        erase.load(half.pipe, folder)
    # the float16 fingerprint recorded at save time tells another model of the same shapes apart exactly (the norms
    # of two random initialisations agree to 1e-3, so the norm fallback of older artifacts could not)
    assert set(erase.load_artifact(folder).low_precision_fingerprints) == {"float16", "bfloat16"}
    with pytest.raises(ArtifactMismatchError, match="different weights"):
        erase.load(load_pipeline("tiny", seed=1, dtype=torch.float16).pipe, folder)


def test_erase_load_applies_to_a_plain_sdxl_pipeline(tiny_sdxl, tmp_path):
    from pipelines.tiny import tiny_sdxl_pipeline

    artifact = erase_concepts(tiny_sdxl, ConceptSpec(("van gogh",)), "uce")
    folder = erase.save_artifact(artifact, tmp_path / "xl", tiny_sdxl)
    plain = tiny_sdxl_pipeline(0)
    erase.load(plain, folder)
    for name, delta in artifact.deltas.items():
        expected = tiny_sdxl.module(name).weight + delta
        assert torch.allclose(plain.unet.get_submodule(name.removeprefix("unet.")).weight, expected, atol=1e-6)
    with pytest.raises(ArtifactMismatchError, match="already applied"):
        erase.load(plain, folder)


# ---------------------------------------------------------------------------------------------------- D12
def _scaled(factor, rslora=False):
    """Adapter metadata with every alpha times ``factor`` (and rsLoRA's alpha / sqrt(r) scaling if asked)."""

    def change(metadata):
        out = dict(metadata)
        for key, value in metadata.items():
            if key.endswith(".lora_alpha"):
                out[key] = value * factor
            elif key.endswith(".alpha_pattern"):
                out[key] = {k: v * factor for k, v in value.items()}
            elif key.endswith(".r") and rslora:
                out[key.removesuffix(".r") + ".use_rslora"] = True
        return out

    return change


@pytest.mark.parametrize("factor, rslora", [(2.0, False), (0.5, False)])
def test_erase_load_applies_a_lora_as_load_lora_weights_does(saved, factor, rslora):
    """D12: the adapter's alpha and rank (and rsLoRA) scale the change for ``erase.load`` exactly as for diffusers'
    ``load_lora_weights`` (fused, to compare the weights)."""
    artifact, folder = saved
    _retamper_weights(folder, lambda t: t, adapter=_scaled(factor, rslora))
    ours = tiny_sd_pipeline(0)
    erase.load(ours, folder)
    theirs = tiny_sd_pipeline(0)
    theirs.load_lora_weights(str(folder))
    theirs.fuse_lora()
    for name, delta in artifact.deltas.items():
        path = name.removeprefix("unet.")
        found = ours.unet.get_submodule(path).weight
        assert torch.allclose(found, theirs.unet.get_submodule(path).weight, atol=1e-6), name
        base = tiny_sd_pipeline(0).unet.get_submodule(path).weight
        assert not torch.allclose(found, base + delta, atol=1e-6), name  # the scale is in force, not ignored


@pytest.mark.parametrize(
    "change, adapter, message",
    [
        (lambda t: {k: v.to(torch.int32) for k, v in t.items()}, None, "int32 values, not floats"),  # D12
        (lambda t: {**t, "unet.extra.lora_A.weight": torch.ones(1, 4)}, None, "no LoRA factor"),  # D12
        (lambda t: {**t, "unet.x.alpha": torch.tensor(2.0)}, None, "no LoRA factor"),  # further: kohya's alphas
        (lambda t: t, lambda m: {k: ({p: 2 for p in v} if k.endswith("rank_pattern") else v) for k, v in m.items()},
         "the metadata says 2"),  # further: a rank the factors do not have
        (lambda t: t, lambda m: {**m, "unet.use_dora": True}, "DoRA"),  # further: diffusers would apply DoRA
        (lambda t: t, lambda m: {**m, "unet.lora_bias": True}, "lora_bias is True"),  # diffusers cannot fuse it
        (lambda t: t, lambda m: {**m, "unet.modules_to_save": ["conv_in"]}, "modules_to_save"),  # diffusers fails
    ],
)  # fmt: skip
def test_a_lora_erase_cannot_apply_as_diffusers_would_is_refused(saved, change, adapter, message):
    _, folder = saved
    _retamper_weights(folder, change, adapter=adapter)
    with pytest.raises(ArtifactError, match=message) as err:
        erase.load_artifact(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: {k: v for k, v in m.items() if k != "checksums"}, "lacks checksums"),  # D12
        (lambda m: {**m, "checksums": {}}, "not covered by the checksums"),  # D12: an emptied checksum
        (lambda m: {**m, "checksums": {**m["checksums"], "intervention.json": "0" * 64}}, "no payload"),  # further
    ],
)
def test_erasure_json_without_its_checksums_is_refused(saved, change, message):
    _, folder = saved
    meta = json.loads((folder / METADATA_FILE).read_text())
    (folder / METADATA_FILE).write_text(json.dumps(change(meta)))
    with pytest.raises(ArtifactError, match=message):
        erase.load(tiny_sd_pipeline(0), folder)
