"""``erase.load``: one entry point for every artifact kind on a plain diffusers ``StableDiffusionPipeline``. The loaded
pipeline draws what the in-memory erased model draws, a second load is refused, and ``remove()`` (or leaving the
``with`` block) restores the pipeline bit for bit."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import erase
from erase import ConceptSpec, erase_concepts
from erase.sae.sae import SAETrainConfig, build_sae
from pipelines import PipelineWrapper, load_pipeline
from pipelines.tiny import tiny_sd_pipeline

TEXT_HOOK = "text_encoder.encoder.layers.1"
WORDS = "red blue green cat dog house tree car city night sun moon river boat bird star".split()
PROMPTS, SEEDS = ["a painting by van gogh", "a red car"], [0, 1]
LORA_FAST = dict(steps=2, lr=1e-2, pool_images=2, pool_steps=4)
STEPS = {"esd": 2, "spm": 8}  # spm's transport scales its adapter down: a visible edit takes a few more steps


@pytest.fixture(scope="module")
def base():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def sae_store(base, tmp_path_factory):
    """An SAE at itd's default hook point of the tiny pipeline, trained in seconds."""
    store = tmp_path_factory.mktemp("saes")
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) for _ in range(48)]
    build_sae(base, TEXT_HOOK, prompts, store / "text", SAETrainConfig(expansion=4, k=8, batch_size=512, epochs=3))
    return store


def _config(method, store):
    config_class = erase.get_method(method).config_class
    if method in STEPS:
        return config_class(**{**LORA_FAST, "steps": STEPS[method]})
    if method == "itd":
        return config_class(sae_stores=(str(store),), top_features=8)
    return None


def _pixels(wrapper):
    images = wrapper.generate(PROMPTS, SEEDS, steps=3, progress=False)
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


def _state(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def _same_state(pipe, state):
    return all(torch.equal(v, state[k]) for k, v in _state(pipe).items()) and set(_state(pipe)) == set(state)


@pytest.mark.parametrize("method", ["uce", "esd", "spm", "itd"])
def test_load_draws_the_erased_model_refuses_a_second_load_and_removes_bit_for_bit(base, sae_store, method, tmp_path):
    artifact = erase_concepts(base, ConceptSpec(("van gogh",)), method, _config(method, sae_store))
    assert method != "spm" or artifact.payload("transport") is not None  # spm's default has facilitated transport
    folder = erase.save_artifact(artifact, tmp_path / method, base)
    with artifact.applied(base):
        in_memory = _pixels(base)
    pipe = tiny_sd_pipeline(0)  # a plain diffusers pipeline with the same base weights
    assert type(pipe) is StableDiffusionPipeline
    plain = PipelineWrapper(pipe, "plain")  # only to generate with the same sampler settings
    original, state = _pixels(plain), _state(pipe)

    handle = erase.load(pipe, folder)
    loaded = _pixels(plain)
    assert np.abs(loaded - in_memory).max() <= 1.0
    assert np.abs(loaded - original).max() > 1.0  # the edit is in force
    with pytest.raises(erase.ArtifactMismatchError, match="already"):
        erase.load(pipe, folder)
    assert np.array_equal(_pixels(plain), loaded)  # the refused load changed nothing
    handle.remove()
    assert not handle.active and _same_state(pipe, state)
    assert np.array_equal(_pixels(plain), original)

    with erase.load(pipe, folder) as again:
        assert again.artifact.method == method and np.array_equal(_pixels(plain), loaded)
    assert _same_state(pipe, state) and np.array_equal(_pixels(plain), original)


def test_a_failed_load_installs_nothing(base, tmp_path):
    """Every payload is checked against the live pipeline before the first is installed: an artifact whose weight
    change fits, but whose second payload does not, leaves the pipeline as it was."""
    artifact = erase_concepts(base, ConceptSpec(("van gogh",)), "spm", erase.get_method("spm").config_class(
        **LORA_FAST, facilitated_transport=True))  # fmt: skip
    transport = artifact.payload("transport")
    transport.embeddings = transport.embeddings[:, :, :-1]  # a text width the pipeline does not have
    pipe = tiny_sd_pipeline(0)
    state = _state(pipe)
    with pytest.raises(erase.ArtifactMismatchError, match="prompt embeddings"):
        erase.load(pipe, artifact)
    assert _same_state(pipe, state)


def test_old_names_are_aliases_of_load(base, tmp_path, artifact_dir):
    pipe = tiny_sd_pipeline(0)
    state = _state(pipe)
    with erase.attach(pipe, artifact_dir) as handle:
        assert isinstance(handle, erase.ArtifactHandle)
    with erase.apply_artifact(pipe, artifact_dir):
        assert not _same_state(pipe, state)
    assert _same_state(pipe, state)


# ---------------------------------------------------------------------------------------------------- checks (D5)
def _itd_folder(base, sae_store, tmp_path):
    artifact = erase_concepts(base, ConceptSpec(("van gogh",)), "itd", _config("itd", sae_store))
    return erase.save_artifact(artifact, tmp_path / "itd", base)


def _rewrite_json(folder, name, change):
    """Change a JSON file of the artifact and record its new sha256, as an artifact made that way would have it."""
    import json

    from pipelines.files import file_sha256

    path = folder / name
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    meta = json.loads((folder / "erasure.json").read_text())
    meta["checksums"][name] = file_sha256(path)
    (folder / "erasure.json").write_text(json.dumps(meta))


def test_intervention_json_is_covered_by_the_checksum(base, sae_store, tmp_path):
    folder = _itd_folder(base, sae_store, tmp_path)
    path = folder / "intervention.json"
    path.write_text(path.read_text().replace('"threshold":', '"threshold": 0.0, "was":', 1))
    pipe = tiny_sd_pipeline(0)
    with pytest.raises(erase.ArtifactError, match="intervention.json does not match the sha256"):
        erase.load(pipe, folder)


def _settings(**changes):
    return lambda d: {**d, "settings": {**d["settings"], **changes}}


@pytest.mark.parametrize(
    "change, message",
    [
        (_settings(threshold=float("nan")), "threshold must be a finite number >= 0, got nan"),  # D5: NaN threshold
        (
            _settings(threshold=float("inf")),
            "threshold must be a finite number >= 0, got inf",
        ),  # D5: infinite threshold
        (_settings(scale=float("nan")), "scale must be a finite number <= 0, got nan"),  # D5: NaN scale
        (_settings(gate_statistic="median"), "gate_statistic must be one of"),  # D5: unknown gate statistic
        (_settings(keep_error="no"), "keep_error must be true or false"),  # further: a string for a switch
        (_settings(threshold=1e30), "gate threshold 1e\\+30 is above the smallest gate error"),  # a silent no-op
        (_settings(calibration_error=-1.0), "calibration_error must be a finite number >= 0"),
        (
            _settings(threshold=-1.0),
            "threshold must be a finite number >= 0, got -1.0",
        ),  # further: a gate that lets every prompt through
    ],
)
def test_an_intervention_that_does_not_fit_is_refused_before_anything_is_installed(
    base, sae_store, tmp_path, change, message
):
    folder = _itd_folder(base, sae_store, tmp_path)
    _rewrite_json(folder, "intervention.json", change)
    pipe = tiny_sd_pipeline(0)
    with pytest.raises(erase.ArtifactError, match=message) as err:
        erase.load(pipe, folder)
    assert "\n" not in str(err.value)


def test_the_hook_points_width_is_checked_against_the_live_model(base, sae_store):
    """An SAE of another width than the hook point's activations (a block of another width, or another model) is
    refused with one line before any hook is installed, not a tensor-size error at the first generation."""
    from erase.sae.sae import TopKSAE

    artifact = erase_concepts(base, ConceptSpec(("van gogh",)), "itd", _config("itd", sae_store))
    intervention = artifact.payload("intervention")
    intervention.sae = TopKSAE(intervention.sae.d_in + 8, intervention.sae.latents, intervention.sae.k)
    pipe = tiny_sd_pipeline(0)
    before = {id(m): len(m._forward_hooks) for m in pipe.text_encoder.modules()}
    with pytest.raises(erase.ArtifactMismatchError, match="wide"):
        erase.load(pipe, artifact)
    assert {id(m): len(m._forward_hooks) for m in pipe.text_encoder.modules()} == before


def test_an_intervention_moved_to_another_layer_of_the_same_width_is_refused(base, sae_store, tmp_path):
    """D5: the hook point moved to another text-encoder layer (same width, same component fingerprint), erasure.json
    made to agree: the SAE was trained at the original layer, so the edit would read activations it does not know."""
    import json

    folder = _itd_folder(base, sae_store, tmp_path)
    other = "text_encoder.encoder.layers.0"
    _rewrite_json(folder, "intervention.json", lambda d: {**d, "hook_point": other})
    meta = json.loads((folder / "erasure.json").read_text())
    meta["layers"], meta["payloads"]["intervention"]["hook_point"] = [other], other
    (folder / "erasure.json").write_text(json.dumps(meta))
    with pytest.raises(erase.ArtifactError, match="not the one its SAE was trained at"):
        erase.load(tiny_sd_pipeline(0), folder)


@pytest.fixture(scope="module")
def itd_saved(base, sae_store, tmp_path_factory):
    """One itd artifact, copied by each test that changes it."""
    return _itd_folder(base, sae_store, tmp_path_factory.mktemp("itd"))


def _tables(change):
    """Change intervention.safetensors (and the tables intervention.json describes, so that they agree)."""

    def rewrite(folder):
        import json

        from safetensors.torch import load_file, save_file

        from pipelines.files import file_sha256

        path = folder / "intervention.safetensors"
        tables = change(load_file(str(path)))
        save_file(tables, str(path))
        meta = json.loads((folder / "erasure.json").read_text())
        meta["checksums"][path.name] = file_sha256(path)
        (folder / "erasure.json").write_text(json.dumps(meta))
        _rewrite_json(folder, "intervention.json", lambda d: {**d, "tables": {k: list(v.shape) for k, v in
                                                                              tables.items()}})  # fmt: skip

    return rewrite


def _in(name, change):
    return lambda folder: _rewrite_json(folder, name, change)


@pytest.mark.parametrize(
    "change, message",
    [
        (_in("intervention.json", lambda d: {**d, "gate": "off"}), "'gate' is no key of an intervention"),
        (_in("intervention.json", _settings(treshold=0.0)), "has no setting 'treshold'"),  # a misspelt setting
        (_in("intervention.json", lambda d: {**d, "tables": {"features": [7]}}), "describes the tables"),
        (_in("sae.json", lambda d: {k: v for k, v in d.items() if k != "hook_point"}), "trained at \\(None\\)"),
        (_in("sae.json", lambda d: {**d, "quality": {**d["quality"], "fvu": 5.0}}), "below the quality floor"),  # D11
        (_in("sae.json", lambda d: {**d, "k": True}), "lacks the SAE's sizes"),  # crashed the first generation
        (_tables(lambda t: {"features": torch.zeros_like(t["features"])}), "deactivates no feature"),  # a no-op
        (_tables(lambda t: {**t, "gate": torch.ones(3)}), "has no table 'gate'"),  # another method's table
    ],
)
def test_an_intervention_claiming_what_it_does_not_do_is_refused(itd_saved, tmp_path, change, message):
    """D5's class: every field of an intervention is one the method reads and checks, its SAE is the one trained at
    its hook point and above the quality floor; files changed and re-signed in erasure.json are still refused."""
    import shutil

    folder = shutil.copytree(itd_saved, tmp_path / "itd")
    change(folder)
    with pytest.raises(erase.ArtifactError, match=message) as err:
        erase.load_artifact(folder)
    assert "\n" not in str(err.value)


def _saeuron(**tables):
    from erase.sae.intervention import SAEIntervention
    from erase.sae.sae import TopKSAE

    selected = torch.zeros(1, 2, 8, dtype=torch.bool)
    selected[0, :, 3] = True
    valid = {"timesteps": torch.tensor([900.0, 100.0]), "selected": selected, "threshold": torch.zeros(2, 8),
             "factor": torch.where(selected, -0.5, 1.0), "gate": torch.ones(1, 2)}  # fmt: skip
    settings = {"percentile": 99.0, "multiplier": -1.0, "gate": 0.3, "gate_steps": 1}
    tables = {k: v for k, v in {**valid, **tables}.items() if v is not None}
    return SAEIntervention("saeuron", "unet.up_blocks.0.attentions.1", TopKSAE(4, 8, 2), settings, tables)


@pytest.mark.parametrize(
    "tables, message",
    [
        ({}, None),
        ({"selected": torch.zeros(1, 2, 8, dtype=torch.bool)}, "selects no feature"),
        ({"factor": torch.full((1, 2, 8), 0.5)}, "must be <= 0 where a feature is selected"),
        ({"threshold": torch.full((2, 8), float("nan"))}, "'threshold' table holds NaN"),
        ({"gate": None}, "'gate' table exactly when"),
        ({"gate": -torch.ones(1, 2)}, "'gate' table must be >= 0"),
        ({"features": torch.ones(8, dtype=torch.bool)}, "has no table 'features'"),
    ],
)
def test_a_saeuron_intervention_that_would_do_nothing_or_something_else_is_refused(tables, message):
    from erase.sae.saeuron import check_saeuron

    intervention = _saeuron(**tables)
    if message is None:
        check_saeuron(intervention)
    else:
        with pytest.raises(ValueError, match=message):
            check_saeuron(intervention)
