import json

import numpy as np
import pytest
import torch

import erase
from erase import ArtifactError, ArtifactExistsError, ArtifactMismatchError, ConceptSpec, erase_concepts
from erase.closed_form.uce import UCEConfig
from pipelines import load_pipeline
from pipelines.tiny import tiny_sd_pipeline
from pipelines.wrapper import PipelineWrapper


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


@pytest.mark.slow
def test_lora_artifact_loads_in_plain_diffusers_and_reproduces_the_edit(tiny, tmp_path):
    # Few token positions -> low rank: the change is stored as a LoRA.
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "uce", UCEConfig(token_positions="last"))
    erase.save_artifact(artifact, tmp_path / "a", tiny)
    meta = json.loads((tmp_path / "a" / "erasure.json").read_text())
    assert meta["weight_format"] == "lora" and max(meta["payloads"]["weights"]["lora_ranks"].values()) <= 2
    with tiny.weight_deltas(artifact.deltas):
        edited = _pixels(tiny.generate(["a van gogh star"], [3], steps=4, progress=False))
    plain = tiny_sd_pipeline(0)  # a fresh, plain diffusers pipeline with the same base weights
    plain.load_lora_weights(str(tmp_path / "a"))
    reloaded = _pixels(PipelineWrapper(plain, "plain").generate(["a van gogh star"], [3], steps=4, progress=False))
    assert np.abs(edited - reloaded).max() <= 1.0


@pytest.mark.slow
def test_full_artifact_exports_a_loadable_pipeline(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    # 75 positions in 32 dims: full rank, stored as full weights plus a pipeline export
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "uce", UCEConfig(token_positions="from_last"))
    erase.save_artifact(artifact, tmp_path / "a", tiny)
    assert json.loads((tmp_path / "a" / "erasure.json").read_text())["weight_format"] == "full"
    exported = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a" / "pipeline"))
    with tiny.weight_deltas(artifact.deltas):
        edited = _pixels(tiny.generate(["a van gogh star"], [3], steps=3, progress=False))
    again = _pixels(PipelineWrapper(exported, "x").generate(["a van gogh star"], [3], steps=3, progress=False))
    assert np.abs(edited - again).max() <= 1.0


def test_mismatched_base_is_refused_with_one_line(tiny, tmp_path):
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "uce")
    erase.save_artifact(artifact, tmp_path / "a", tiny)
    other = load_pipeline("tiny", seed=1)
    with pytest.raises(ArtifactMismatchError) as err:
        erase.load(other, tmp_path / "a")
    assert "\n" not in str(err.value) and "different weights" in str(err.value)
    erase.load(load_pipeline("tiny", seed=0), tmp_path / "a")  # the right base is accepted


def test_existing_folder_is_not_overwritten_without_permission(tiny, tmp_path):
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "uce")
    erase.save_artifact(artifact, tmp_path / "a", tiny)
    before = (tmp_path / "a" / "erasure.json").read_bytes()
    with pytest.raises(ArtifactExistsError):
        erase.save_artifact(artifact, tmp_path / "a", tiny)
    assert (tmp_path / "a" / "erasure.json").read_bytes() == before
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactExistsError):
        erase.save_artifact(artifact, tmp_path / "user", tiny, overwrite=True)
    assert (tmp_path / "user" / "notes.txt").read_text() == "keep me"
    erase.save_artifact(artifact, tmp_path / "a", tiny, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_corrupt_artifacts_fail_clearly(tiny, tmp_path):
    artifact = erase_concepts(tiny, ConceptSpec(("van gogh",)), "uce")
    erase.save_artifact(artifact, tmp_path / "a", tiny)
    with pytest.raises(ArtifactError, match="not an erasure artifact"):
        erase.load_artifact(tmp_path)
    (tmp_path / "a" / "pytorch_lora_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="sha256"):
        erase.load_artifact(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "erasure.json").read_text())
    (tmp_path / "a" / "erasure.json").write_text(json.dumps({**meta, "checksums": {}}))
    with pytest.raises(ArtifactError, match="not covered by the checksums"):
        erase.load_artifact(tmp_path / "a")
    (tmp_path / "a" / "erasure.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        erase.load_artifact(tmp_path / "a")


def test_low_rank_factors_are_exact():
    torch.manual_seed(0)
    delta = torch.randn(40, 3) @ torch.randn(3, 32)
    lora_a, lora_b = erase.low_rank_factors(delta)
    assert lora_a.shape == (3, 32) and lora_b.shape == (40, 3)
    assert torch.allclose(lora_b @ lora_a, delta, atol=1e-5)
