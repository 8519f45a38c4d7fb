"""The SAE family on tiny models: the TopK SAE and its training, hook points and activation collection, the runtime
intervention artifact (save, load, attach, remove, audit), itd's gate and saeuron's error-preserving edit."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from faults import file_size_limit
from safetensors.torch import save_file

import erase
from erase import ConceptSpec, erase_concepts
from erase.sae.sae import (
    SAETrainConfig,
    TopKSAE,
    build_sae,
    find_sae,
    fraction_of_variance_unexplained,
    load_sae,
    save_sae,
    train_sae,
)
from pipelines.files import DamagedCheckpointError, WriteError

TEXT_HOOK = "text_encoder.encoder.layers.1"
UNET_HOOK = "unet.up_blocks.0.attentions.1"
WORDS = "red blue green cat dog house tree car city night sun moon river boat bird star".split()


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) for _ in range(n)]


@pytest.fixture(scope="module")
def sae_store(wrapper, tmp_path_factory):
    """SAEs for the tiny pipeline's default itd and saeuron hook points, trained in seconds."""
    store = tmp_path_factory.mktemp("saes")
    config = SAETrainConfig(expansion=4, k=8, batch_size=512, epochs=3, dead_tokens=5000)
    prompts = _prompts(48)
    build_sae(wrapper, TEXT_HOOK, prompts, store / "text", config)
    build_sae(wrapper, UNET_HOOK, prompts[:16], store / "unet", config, steps=4)
    return store


def _itd(wrapper, store, concepts=("van gogh",), **settings):
    config = erase.get_method("itd").config_class(sae_stores=(str(store),), top_features=8, **settings)
    return erase_concepts(wrapper, ConceptSpec(concepts), "itd", config)


def _saeuron(wrapper, store, **settings):
    defaults = dict(sae_stores=(str(store),), percentile=95.0, multiplier=-5.0, images_per_prompt=1,
                    other_prompts=6, steps=4, guidance=7.5)  # fmt: skip
    config = erase.get_method("saeuron").config_class(**{**defaults, **settings})
    return erase_concepts(wrapper, ConceptSpec(("van gogh",)), "saeuron", config)


# ---------------------------------------------------------------------------------------------------- the SAE
def test_topk_codes_have_k_features_and_decoder_rows_have_unit_norm():
    sae = TopKSAE(16, 64, 5)
    z = sae.encode(torch.randn(10, 16))
    assert ((z > 0).sum(-1) <= 5).all() and (z >= 0).all()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert sae(torch.randn(3, 7, 16)).shape == (3, 7, 16)
    with pytest.raises(ValueError, match="k must be"):
        TopKSAE(16, 8, 9)


def _sparse_data(n=6000, d=24, atoms=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=gen), dim=1)
    codes = torch.zeros(n, atoms)
    idx = torch.randint(0, atoms, (n, 3), generator=gen)
    codes.scatter_(1, idx, torch.rand(n, 3, generator=gen) + 0.5)
    return codes @ dictionary + 0.3


@pytest.mark.slow
def test_training_explains_sparse_data_and_decoder_rows_stay_unit_norm():
    x = _sparse_data()
    sae, stats = train_sae(x[:5000], SAETrainConfig(expansion=4, k=4, batch_size=128, epochs=10, lr=3e-3))
    with torch.no_grad():
        fvu = float(fraction_of_variance_unexplained(x[5000:], sae(x[5000:])))
    assert fvu < 0.25, fvu  # an untrained SAE explains nothing (FVU about 1)
    assert stats["fvu_by_epoch"][-1] < stats["fvu_by_epoch"][0]
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.latents), atol=1e-5)


@pytest.mark.slow
def test_an_interrupted_training_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    import erase.sae.sae as sae_module

    x = _sparse_data(n=2000)
    config = SAETrainConfig(expansion=2, k=4, batch_size=256, epochs=3, lr=3e-3)
    whole, _ = train_sae(x, config)
    real = sae_module._checkpoint

    def checkpoint_then_die(folder, run_key, epoch, *args):
        real(folder, run_key, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(sae_module, "_checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_sae(x, config, checkpoint_dir=tmp_path / "ck")
    monkeypatch.setattr(sae_module, "_checkpoint", real)
    resumed, stats = train_sae(x, config, checkpoint_dir=tmp_path / "ck")
    assert len(stats["fvu_by_epoch"]) == 3
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    with pytest.raises(ValueError, match="another SAE run"):
        train_sae(x, SAETrainConfig(expansion=2, k=3, batch_size=256, epochs=3), checkpoint_dir=tmp_path / "ck")


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_state(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    state = json.loads(meta["state"])
    save_file(tensors, str(path), metadata={**meta, "state": json.dumps({**state, "epoch": 1})})


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),  # truncated
        lambda p: save_file({"x": torch.zeros(1)}, str(p)),  # no state in its header
        lambda p: save_file({"x": torch.zeros(1)}, str(p), metadata={"state": '{"run": 1, "epoch": "2"}'}),
        _flip_last_byte,  # a valid file whose numbers changed
        _rewrite_state,  # the same tensors, the state edited
    ],
)
def test_a_damaged_sae_checkpoint_is_named_and_restart_starts_afresh(tmp_path, damage):  # D1
    x = _sparse_data(n=600)
    config = SAETrainConfig(expansion=2, k=4, batch_size=256, epochs=2, lr=3e-3)
    fresh, _ = train_sae(x, config)
    folder = tmp_path / "ck"
    train_sae(x, config, checkpoint_dir=folder)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.safetensors"]  # tensors and state: one file
    damage(folder / "checkpoint.safetensors")
    with pytest.raises(DamagedCheckpointError) as caught:
        train_sae(x, config, checkpoint_dir=folder)
    message = str(caught.value)
    assert f"the checkpoint file {folder / 'checkpoint.safetensors'} is damaged" in message
    assert "--restart" in message and "\n" not in message
    again, stats = train_sae(x, config, checkpoint_dir=folder, restart=True)
    assert len(stats["fvu_by_epoch"]) == 2
    pairs = zip(fresh.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_an_sae_checkpoint_that_cannot_be_written_keeps_the_last_one(tmp_path, monkeypatch):  # D1
    import erase.sae.sae as sae_module

    x = _sparse_data(n=600)
    config = SAETrainConfig(expansion=2, k=4, batch_size=256, epochs=3, lr=3e-3)
    whole, _ = train_sae(x, config)
    folder, real = tmp_path / "ck", sae_module._checkpoint

    def checkpoint_then_die(folder, run_key, epoch, *args):  # killed after the first epoch's checkpoint
        real(folder, run_key, epoch, *args)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(sae_module, "_checkpoint", checkpoint_then_die)
        train_sae(x, config, checkpoint_dir=folder)
    before = (folder / "checkpoint.safetensors").read_bytes()
    with file_size_limit(len(before) // 2), pytest.raises(WriteError) as caught:
        train_sae(x, config, checkpoint_dir=folder)
    assert str(caught.value).startswith(f"cannot write {folder / 'checkpoint.safetensors'}: File too large")
    assert [p.name for p in folder.iterdir()] == ["checkpoint.safetensors"]
    assert (folder / "checkpoint.safetensors").read_bytes() == before
    resumed, _ = train_sae(x, config, checkpoint_dir=folder)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_train_sae_script_write_faults_are_one_line(tmp_path, capsys):  # D1, D4, D10
    import runpy

    from pipelines.files import claim_folder

    main = runpy.run_path("scripts/train_sae.py", run_name="train_sae_script")["main"]
    (tmp_path / "prompts.txt").write_text("\n".join(_prompts(16)) + "\n")
    args = ["--model", "tiny", "--hook", TEXT_HOOK, "--prompts", str(tmp_path / "prompts.txt"), "--quiet"]
    out = tmp_path / "saes"
    with file_size_limit(2048):  # the activation cache is larger: the disk "fills" at the first write
        assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {out}/") and "File too large" in err
    assert len(err.strip().splitlines()) == 1
    assert not [p for p in out.rglob("*") if p.is_file()]  # no temporary left
    (folder,) = out.iterdir()  # the SAE's folder, made before the failed write
    with claim_folder(folder):  # another run trains this SAE
        assert main([*args, "--out", str(out)]) == 2
    assert "being written by another run" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / ("s" * 256) / "saes")]) == 2  # before the model loads
    assert "longer than this file system allows" in capsys.readouterr().err


def test_a_damaged_activation_cache_is_named_collected_again_and_replaced(wrapper, tmp_path, caplog):  # D1
    from erase.sae.sae import collect_activations

    prompts = _prompts(4)
    fresh = collect_activations(wrapper, TEXT_HOOK, prompts, cache_dir=tmp_path)
    (cache,) = tmp_path.iterdir()
    _flip_last_byte(cache)
    with caplog.at_level("WARNING", logger="erase.sae.sae"):
        again = collect_activations(wrapper, TEXT_HOOK, prompts, cache_dir=tmp_path)
    assert torch.equal(again, fresh)
    assert f"{cache} does not match the digest in its header" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]  # replaced, no temporary left
    caplog.clear()
    with caplog.at_level("WARNING", logger="erase.sae.sae"):
        assert torch.equal(collect_activations(wrapper, TEXT_HOOK, prompts, cache_dir=tmp_path), fresh)
    assert caplog.text == ""


def test_sae_folder_round_trip_and_damage_is_one_line(tmp_path):
    sae = TopKSAE(8, 16, 2)
    save_sae(sae, tmp_path / "s", {"hook_point": "x"}, ["a cat", "a dog"])
    loaded, meta = load_sae(tmp_path / "s")
    assert meta["hook_point"] == "x"
    for a, b in zip(sae.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    (tmp_path / "s" / "sae.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="sha256|cannot read"):
        load_sae(tmp_path / "s")
    with pytest.raises(ValueError, match="not an SAE folder"):
        load_sae(tmp_path / "nothing")
    with pytest.raises(ValueError, match="must be an integer"):
        SAETrainConfig(k=0)
    # metadata that is not an object, NaN weights, metadata without the sha256 or with sizes that are booleans
    save_sae(sae, tmp_path / "t", {"hook_point": "x"}, [])
    meta_path = tmp_path / "t" / "sae.json"
    meta_path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_sae(tmp_path / "t")
    with torch.no_grad():
        sae.b_dec[0] = float("nan")
    save_sae(sae, tmp_path / "t", {"hook_point": "x"}, [])
    with pytest.raises(ValueError, match="b_dec holds NaN"):
        load_sae(tmp_path / "t")
    meta = json.loads(meta_path.read_text())
    for change, message in (({"sha256": None}, "records no sha256"), ({"k": True}, "lacks the SAE's sizes")):
        meta_path.write_text(json.dumps({**meta, **change}))
        with pytest.raises(ValueError, match=message):
            load_sae(tmp_path / "t")


# ---------------------------------------------------------------------------------------------------- the wrapper
def test_hook_points_are_named_validated_and_sized(wrapper):
    points = wrapper.hook_points()
    assert TEXT_HOOK in points and UNET_HOOK in points
    assert all(p.startswith(("text_encoder.", "unet.")) for p in points)
    with pytest.raises(ValueError, match="not a hook point"):
        wrapper.hook_point("unet.up_blocks.0.attentions.1.transformer_blocks.0")
    assert wrapper.hook_width(TEXT_HOOK) == wrapper.pipe.text_encoder.config.hidden_size
    assert wrapper.text_activations(TEXT_HOOK, ["a cat"]).shape[-1] == wrapper.hook_width(TEXT_HOOK)


def test_unet_activations_keep_the_conditional_half(wrapper):
    """At the first step both runs feed the UNet the same latents and text: the guided run's conditional half is
    the unguided run's activation."""
    guided, t1 = wrapper.unet_activations(UNET_HOOK, ["a red cat", "a dog"], [0, 1], steps=3, guidance=7.5)
    plain, t2 = wrapper.unet_activations(UNET_HOOK, ["a red cat", "a dog"], [0, 1], steps=3, guidance=1.0)
    assert guided.shape[:2] == (2, 3) and guided.shape[-1] == wrapper.hook_width(UNET_HOOK)
    assert torch.equal(t1, t2)
    assert torch.allclose(guided[:, 0], plain[:, 0], atol=1e-4)


def test_an_identity_output_edit_changes_nothing_and_is_removed(wrapper):
    base = _pixels(wrapper.generate(["a cat"], [0], steps=3, progress=False))
    seen = []
    with wrapper.add_output_edit(UNET_HOOK, lambda x, t: seen.append(t) or x) as handle:
        assert handle.active
        same = _pixels(wrapper.generate(["a cat"], [0], steps=3, progress=False))
    assert not handle.active
    assert np.array_equal(base, same)
    assert len(seen) == 3 and all(t is not None for t in seen)  # one UNet call a step, with its timestep
    seen.clear()
    wrapper.generate(["a cat"], [0], steps=3, progress=False)
    assert not seen


def test_find_sae_matches_by_hook_and_weights(wrapper, sae_store):
    from pipelines import load_pipeline

    assert find_sae(wrapper, TEXT_HOOK, [sae_store]).name == "text"
    assert find_sae(wrapper, "text_encoder.encoder.layers.0", [sae_store]) is None
    other = load_pipeline("tiny", seed=1)  # other weights: the SAE does not fit them
    assert find_sae(other, TEXT_HOOK, [sae_store]) is None
    with pytest.raises(ValueError, match="is not a folder"):  # a mistyped store fell through to the shipped SAEs
        find_sae(wrapper, TEXT_HOOK, [sae_store / "nope"])


# ---------------------------------------------------------------------------------------------------- itd
def test_itd_gate_leaves_other_prompts_bit_identical_and_edits_the_concept(wrapper, sae_store):
    """Per prompt: where the gate does not fire the text encoder's output is bit-identical, where it fires it is
    edited; the concept's own prompts fire (the threshold is calibrated on them)."""
    from erase.sae.itd import _gate_error

    artifact = _itd(wrapper, sae_store)
    assert artifact.deltas == {} and artifact.layers == [TEXT_HOOK]
    assert artifact.info["features"] >= 1 and artifact.info["gate_threshold"] > 0
    prompts = ["painting by van gogh", "art by van gogh", *[p for p in _prompts(64, seed=5) if "van" not in p]]
    mse = _gate_error(artifact.payload("intervention"), wrapper.text_activations(TEXT_HOOK, prompts))[0]
    fired = mse >= artifact.payload("intervention").settings["threshold"]
    assert fired[:2].all() and not fired[2:].all()
    before = wrapper.encode_prompts(prompts).embeddings
    with artifact.applied(wrapper):
        after = wrapper.encode_prompts(prompts).embeddings
        concept = _pixels(wrapper.generate(prompts[:1], [0], steps=3, progress=False))
    for i, fire in enumerate(fired.tolist()):
        assert torch.equal(before[i], after[i]) != fire, prompts[i]
    original = _pixels(wrapper.generate(prompts[:1], [0], steps=3, progress=False))
    assert np.abs(concept - original).max() > 1


def test_itd_without_its_gate_edits_every_prompt(wrapper, sae_store):
    artifact = _itd(wrapper, sae_store, gate=False)
    assert artifact.payload("intervention").settings["threshold"] == 0.0
    with artifact.applied(wrapper):
        after = wrapper.encode_prompts(["a red cat"]).embeddings
    assert not torch.equal(after, wrapper.encode_prompts(["a red cat"]).embeddings)


def test_no_sae_for_this_model_says_how_to_train_one(wrapper, tmp_path):
    with pytest.raises(ValueError, match="train_sae.py"):
        erase_concepts(wrapper, ConceptSpec(("van gogh",)), "itd",
                       erase.get_method("itd").config_class(sae_stores=(str(tmp_path),)))  # fmt: skip


# ---------------------------------------------------------------------------------------------------- saeuron
@pytest.mark.slow
def test_saeuron_keeps_the_reconstruction_error(wrapper, sae_store):
    """x' = x + W_dec (z' - z): with every factor 1 the edit returns the activations themselves, not 2 x_hat - x
    as the official code's sign slip would."""
    from erase.sae.saeuron import saeuron_edit

    artifact = _saeuron(wrapper, sae_store)
    intervention = artifact.payload("intervention")
    tables = intervention.tables
    assert tables["selected"].shape == (1, 4, intervention.sae.latents) and tables["selected"].any()
    tokens = wrapper.text_activations(TEXT_HOOK, ["x"])[:, :4, :].new_zeros(2, 16, intervention.sae.d_in)
    tokens += torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0))
    intervention.tables = {**tables, "factor": torch.ones_like(tables["factor"])}
    out = saeuron_edit(intervention, tokens, tables["timesteps"][0])
    assert torch.allclose(out, tokens, atol=1e-6)
    intervention.tables = tables
    out = saeuron_edit(intervention, tokens, tables["timesteps"][0])
    assert out is None or out.shape == tokens.shape


@pytest.mark.slow
def test_saeuron_changes_the_concept_and_is_removed_exactly(wrapper, sae_store):
    artifact = _saeuron(wrapper, sae_store)
    base = _pixels(wrapper.generate(["painting by van gogh"], [0], steps=4, progress=False))
    with artifact.applied(wrapper):
        edited = _pixels(wrapper.generate(["painting by van gogh"], [0], steps=4, progress=False))
    assert np.abs(edited - base).max() > 0
    assert np.array_equal(base, _pixels(wrapper.generate(["painting by van gogh"], [0], steps=4, progress=False)))


@pytest.mark.slow
def test_saeuron_gate_edits_an_image_once_it_has_passed_and_leaves_the_rest_bit_identical(wrapper, sae_store):
    """The gate: an image is edited only after the concept's presence passed its gate at ``gate_steps`` calls of
    one generation; then to the end of it; a later timestep starts a new generation. Images below it are returned
    as they came."""
    from erase.sae.saeuron import saeuron_edit

    artifact = _saeuron(wrapper, sae_store, gate=0.5, gate_steps=2)
    intervention = artifact.payload("intervention")
    tables = intervention.tables
    assert tables["gate"].shape == (1, 4) and (tables["gate"] > 0).all()
    t = tables["timesteps"]
    tokens = 4 * torch.randn(3, 16, intervention.sae.d_in, generator=torch.Generator().manual_seed(0))
    tokens[1] = intervention.sae.b_dec.detach()  # the SAE's origin: hardly any feature fires
    ungated = {**tables}
    del ungated["gate"]
    intervention.tables = ungated
    everywhere = saeuron_edit(intervention, tokens, t[1])
    assert everywhere is not None and not torch.equal(everywhere, tokens)
    # rows 0 and 2 pass the gate at every call, row 1 never
    presence = intervention.sae.encode(tokens).mean(1) @ tables["selected"][0].float().T  # (3, timesteps)
    gate = (presence[1] + presence[[0, 2]].amin(0)) / 2
    assert (presence[1] < gate).all() and (presence[[0, 2]] >= gate).all()
    intervention.tables = {**tables, "gate": gate[None]}
    assert saeuron_edit(intervention, tokens, t[0]) is None  # one pass of the two needed
    out = saeuron_edit(intervention, tokens, t[1])
    assert torch.equal(out[1], tokens[1]) and torch.equal(out[[0, 2]], everywhere[[0, 2]])
    intervention.tables = {**tables, "gate": torch.full_like(gate[None], float("inf"))}
    out = saeuron_edit(intervention, tokens, t[2])  # latched: passes no more, still edited
    assert torch.equal(out[1], tokens[1]) and not torch.equal(out[0], tokens[0])
    assert saeuron_edit(intervention, tokens, t[0]) is None  # a later timestep: a new generation, nothing passed
    # classifier-free guidance's [unconditional; conditional] batch: the conditional half decides for both halves
    low, high = sorted((0, 2), key=lambda i: float(presence[i, 1]))
    assert presence[low, 1] < presence[high, 1] and not torch.equal(everywhere[low], tokens[low])
    between = torch.full_like(gate, float("inf"))
    between[1] = (presence[low, 1] + presence[high, 1]) / 2
    intervention.tables = {**tables, "gate": between[None]}
    intervention.settings = {**intervention.settings, "gate_steps": 1}
    out = saeuron_edit(intervention, tokens[[low, high]], t[1], guided=True)
    assert torch.equal(out, everywhere[[low, high]])
    intervention.memory.clear()  # a new generation
    assert saeuron_edit(intervention, tokens[[high, low]], t[1], guided=True) is None


def test_saeuron_gate_sits_above_every_rival_image_but_ignores_rivals_that_end_as_the_concept():
    from erase.sae.saeuron import _gate

    own = torch.tensor([[4.0, 8.0, 10.0], [6.0, 12.0, 10.0]])  # mean (5, 10, 10)
    rivals = torch.tensor([[3.0, 1.0, 1.0], [0.5, 2.5, 2.0]])
    assert torch.equal(_gate(0.3, own, rivals), torch.tensor([3.0, 3.0, 3.0]))  # max(0.3 * mean, rivals' max)
    drawn_as_the_concept = torch.tensor([[9.0, 9.0, 9.0]])  # ends at the concept's strength: an instance of it
    assert torch.equal(_gate(0.3, own, torch.cat([rivals, drawn_as_the_concept])), _gate(0.3, own, rivals))
    assert torch.equal(_gate(0.3, own, drawn_as_the_concept), 0.3 * own.mean(0))


@pytest.mark.slow
def test_saeuron_gate_edits_an_image_for_one_concept_the_most_present_and_first_latched(wrapper, sae_store):
    from erase.sae.saeuron import saeuron_edit

    intervention = _saeuron(wrapper, sae_store, gate=0.5).payload("intervention")
    tables = intervention.tables
    t = tables["timesteps"][0]
    tokens = 4 * torch.randn(1, 16, intervention.sae.d_in, generator=torch.Generator().manual_seed(2))
    mean_codes = intervention.sae.encode(tokens).mean(1)
    fired = (mean_codes[0] > 0).nonzero().flatten()
    assert len(fired) >= 2
    first, second = torch.zeros(2, intervention.sae.latents, dtype=torch.bool)
    first[fired[0]], second[fired[1]] = True, True
    steps = len(tables["timesteps"])
    selected = torch.stack([first.expand(steps, -1), second.expand(steps, -1)])
    factor = torch.where(selected, -3.0, 1.0)
    presence = torch.stack([mean_codes[0, fired[0]], mean_codes[0, fired[1]]])

    def edit(concepts, gate, at=t, new_generation=True):
        if new_generation:
            intervention.memory.clear()
        intervention.tables = {**tables, "selected": selected[concepts], "factor": factor[concepts],
                               "gate": gate[concepts, None].expand(-1, steps),
                               "threshold": torch.zeros_like(tables["threshold"])}  # fmt: skip
        return saeuron_edit(intervention, tokens, at)

    both_pass = presence / torch.tensor([2.0, 1.0])  # both present at their gates, the first one twice over
    out = edit([0, 1], both_pass)
    assert torch.equal(out, edit([0], both_pass)) and not torch.equal(out, edit([1], both_pass))
    only_second = torch.stack([presence[0] * 2, presence[1]])
    assert torch.equal(edit([0, 1], only_second), edit([1], only_second))
    # latched to the first concept it passed: a second concept passing at a later call adds no edit of its own
    only_first = torch.stack([presence[0], presence[1] * 2])
    later = tables["timesteps"][1]
    edit([0, 1], only_first)
    assert torch.equal(edit([0, 1], only_second, at=later, new_generation=False), edit([0], only_first, at=later))
    edit([1], only_first)  # the second concept alone: nothing passes at the first call, so it latches at the next
    assert torch.equal(edit([1], only_second, at=later, new_generation=False), edit([1], only_second, at=later))


@pytest.mark.slow
def test_saeuron_scores_each_concept_against_the_others_erased_with_it(wrapper, sae_store):
    """As the reference scores a style against every other style: erased together, a concept's "other" images
    include the other erased concept's, so its chosen features are not the ones it shares with that concept."""
    config = erase.get_method("saeuron").config_class(
        sae_stores=(str(sae_store),), percentile=90.0, multiplier=-5.0, other_prompts=6, steps=4, guidance=7.5
    )
    alone = erase_concepts(wrapper, ConceptSpec(("van gogh",)), "saeuron", config).payload("intervention").tables
    pair = (
        erase_concepts(wrapper, ConceptSpec(("van gogh", "monet")), "saeuron", config).payload("intervention").tables
    )
    assert not torch.equal(alone["selected"][0], pair["selected"][0])
    shared = (pair["selected"][0] & pair["selected"][1]).sum()
    alone_monet = erase_concepts(wrapper, ConceptSpec(("monet",)), "saeuron", config).payload("intervention").tables
    assert shared <= (alone["selected"][0] & alone_monet["selected"][0]).sum()


@pytest.mark.slow
def test_saeuron_per_concept_tables_read_merged_ones_and_gate_is_checked(wrapper, sae_store):
    from erase.sae.saeuron import check_saeuron, saeuron_edit

    artifact = _saeuron(wrapper, sae_store)
    intervention = artifact.payload("intervention")
    tables = intervention.tables
    tokens = torch.randn(2, 16, intervention.sae.d_in, generator=torch.Generator().manual_seed(1))
    per_concept = saeuron_edit(intervention, tokens, tables["timesteps"][0])
    intervention.tables = {**tables, "selected": tables["selected"][0], "factor": tables["factor"][0]}
    check_saeuron(intervention)  # artifacts written before per-concept tables
    assert torch.equal(saeuron_edit(intervention, tokens, tables["timesteps"][0]), per_concept)
    intervention.tables = {**tables, "gate": torch.ones(2, 4)}
    with pytest.raises(ValueError, match="'gate' table must have shape"):
        check_saeuron(intervention)
    config_class = erase.get_method("saeuron").config_class
    for bad in (0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="gate must be"):
            config_class(gate=bad)
    with pytest.raises(ValueError, match="gate_steps"):
        config_class(gate=0.5, gate_steps=0)


# ---------------------------------------------------------------------------------------------------- the artifact
@pytest.mark.slow
@pytest.mark.parametrize("method", ["itd", "saeuron"])
def test_runtime_artifact_saves_loads_and_attaches_to_a_plain_pipeline(wrapper, sae_store, tmp_path, method):
    artifact = _itd(wrapper, sae_store) if method == "itd" else _saeuron(wrapper, sae_store)
    folder = erase.save_artifact(artifact, tmp_path / method, wrapper)
    meta = json.loads((folder / "erasure.json").read_text())
    assert meta["weight_format"] == "intervention" and meta["layers"] == artifact.layers
    assert {"intervention.json", "intervention.safetensors", "sae.safetensors", "sae.json"} <= {
        p.name for p in folder.iterdir()
    }
    loaded = erase.load_artifact(folder)
    assert loaded.payload("intervention").identity() == artifact.payload("intervention").identity()
    prompt = ["painting by van gogh"]
    base = _pixels(wrapper.generate(prompt, [0], steps=4, progress=False))
    with artifact.applied(wrapper):
        in_memory = _pixels(wrapper.generate(prompt, [0], steps=4, progress=False))
    handle = erase.load(wrapper.pipe, folder)
    with pytest.raises(ValueError, match="already attached"):
        erase.load(wrapper.pipe, folder)
    attached = _pixels(wrapper.generate(prompt, [0], steps=4, progress=False))
    handle.remove()
    assert np.abs(attached - in_memory).max() <= 1.0
    assert np.array_equal(base, _pixels(wrapper.generate(prompt, [0], steps=4, progress=False)))
    with erase.load(wrapper.pipe, folder):  # a context manager too, and attachable again once removed
        pass


def test_damaged_or_foreign_runtime_artifacts_are_refused(wrapper, sae_store, tmp_path):
    from safetensors.torch import load_file, save_file

    from pipelines import load_pipeline

    folder = erase.save_artifact(_itd(wrapper, sae_store), tmp_path / "itd", wrapper)
    with pytest.raises(erase.ArtifactMismatchError, match="different weights"):
        erase.load(load_pipeline("tiny", seed=1).pipe, folder)
    tables = load_file(str(folder / "intervention.safetensors"))
    save_file({"features": tables["features"][:3]}, str(folder / "intervention.safetensors"))
    with pytest.raises(erase.ArtifactError):
        erase.load_artifact(folder)


def test_a_half_precision_copy_of_the_base_takes_the_intervention(wrapper, sae_store):
    """float16 weights cannot match the float32 fingerprint: the hooked component's norm recognises them, and a
    float16 copy of other weights is still refused."""
    from erase.core.artifact import check_artifact_base
    from pipelines import load_pipeline

    artifact = _itd(wrapper, sae_store)
    half = load_pipeline("tiny", dtype=torch.float16)
    assert half.fingerprint([artifact.payload("intervention").component]) != artifact.base_fingerprint
    check_artifact_base(half, artifact)
    with pytest.raises(erase.ArtifactMismatchError, match="different weights"):
        check_artifact_base(load_pipeline("tiny", seed=1, dtype=torch.float16), artifact)


@pytest.mark.slow
def test_an_audit_generates_through_the_intervention(wrapper, sae_store, scorer, tmp_path):
    from erase.workflow import audit_models
    from evals.audit import run_audit
    from evals.suites import ROLES, Suite, world_suite

    folder = erase.save_artifact(_itd(wrapper, sae_store), tmp_path / "itd", wrapper)
    full = world_suite(["van gogh"])
    suite = Suite("small", tuple(next(r for r in full.rows if r.role == role) for role in ROLES), full.labels, "t")
    result = run_audit(wrapper, suite, audit_models(wrapper, [folder]), tmp_path / "audit", scorer, None, steps=2,
                       progress=False)  # fmt: skip
    assert [m["key"] for m in result["models"]][0] == "original" and len(result["models"]) == 2
    assert len(list((tmp_path / "audit" / "images").iterdir())) == 2


def test_train_sae_script_bad_input_is_one_line(tmp_path, capsys):
    import runpy

    main = runpy.run_path("scripts/train_sae.py", run_name="train_sae_script")["main"]  # in-process: no start-up
    for extra, message in [
        (["--hook", "unet.nope"], "not a hook point"),
        (["--hook", TEXT_HOOK, "--prompts", str(tmp_path / "missing.txt")], "no such file"),
        (["--hook", TEXT_HOOK, "--set", "k=0"], "must be an integer"),
        (["--hook", TEXT_HOOK, "--set", "nope=1"], "has no setting 'nope'"),
        (["--model", str(tmp_path / "no" / "model"), "--hook", TEXT_HOOK], "does not exist"),
        (["--hook", TEXT_HOOK, "--out", "README.md/x"], "cannot write"),
        (["--hook", TEXT_HOOK, "--guidance", "-1"], "--guidance must be >= 0"),
        (["--hook", TEXT_HOOK, "--guidance", "nan"], "--guidance must be >= 0"),
        (["--hook", TEXT_HOOK, "--steps", "0"], "--steps must be >= 1"),
        (["--hook", TEXT_HOOK, "--check-images", "-1"], "--check-images must be >= 0"),
    ]:
        assert main(["--model", "tiny", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, (extra, err)


# ---------------------------------------------------------------------------------------------------- micro
def _micro_with_saes():
    from erase.sae.sae import shipped_sae_store
    from pipelines import micro_model_path

    if not (micro_model_path() / "model_index.json").is_file() or not any(shipped_sae_store().glob("*/sae.json")):
        pytest.skip("micro model or its shipped SAEs not built")
    from pipelines import load_pipeline

    return load_pipeline("micro")


@pytest.mark.slow
def test_itd_on_micro_leaves_64_unrelated_prompts_untouched(tmp_path):
    """The shipped SAE, default settings: prompts naming no erased concept pass the gate untouched (their text
    embeddings, hence their images, bit-identical); the few that fire are counted and must stay few."""
    from evals.microworld import world

    micro = _micro_with_saes()
    artifact = erase_concepts(micro, ConceptSpec(("van gogh",)), "itd")
    rng = np.random.default_rng(2026)
    names = [n.casefold() for n in world.all_names("van gogh")]
    captions = [world.caption(world.random_scene(rng), rng) for _ in range(200)]
    unrelated = [c for c in captions if not any(n in c.casefold() for n in names)][:64]
    assert len(unrelated) == 64
    before = micro.encode_prompts(unrelated).embeddings
    with artifact.applied(micro):
        after = micro.encode_prompts(unrelated).embeddings
        concept = micro.encode_prompts(["a red star in the style of van gogh"]).embeddings
    untouched = [torch.equal(a, b) for a, b in zip(before, after, strict=True)]
    print(f"itd gate fired on {64 - sum(untouched)} of 64 prompts naming no erased concept")
    assert sum(untouched) >= 60  # measured: all 64
    assert not torch.equal(concept, micro.encode_prompts(["a red star in the style of van gogh"]).embeddings)
    keep = [p for p, same in zip(unrelated, untouched, strict=True) if same][:4]
    original = _pixels(micro.generate(keep, [0, 1, 2, 3], progress=False))
    with artifact.applied(micro):
        assert np.array_equal(original, _pixels(micro.generate(keep, [0, 1, 2, 3], progress=False)))


@pytest.mark.slow
def test_attach_in_a_fresh_plain_process_matches_the_in_memory_intervention(tmp_path):
    """A process that imports only diffusers, torch and erase draws what the in-memory intervention draws (within
    1e-3), and removing the handle gives back the original images bit for bit."""
    from diffusers import StableDiffusionPipeline

    from pipelines import micro_model_path, wrap_pipeline

    micro = _micro_with_saes()
    folder = erase.save_artifact(erase_concepts(micro, ConceptSpec(("van gogh",)), "itd"), tmp_path / "itd", micro)
    prompts = ["a red star in the style of van gogh", "a blue moon, van gogh painting"]
    code = "\n".join([
        "import sys, numpy, torch, diffusers, erase",
        f"pipe = diffusers.StableDiffusionPipeline.from_pretrained({str(micro_model_path())!r})",
        "pipe.set_progress_bar_config(disable=True)",
        f"prompts = {prompts!r}",
        "def draw():",
        "    gens = [torch.Generator('cpu').manual_seed(i) for i in range(len(prompts))]",
        "    return pipe(prompts, generator=gens, num_inference_steps=10, output_type='np').images",
        "original = draw()",
        f"handle = erase.load(pipe, {str(folder)!r})",
        "erased = draw()",
        "handle.remove()",
        "restored = draw()",
        f"numpy.save({str(tmp_path / 'erased.npy')!r}, erased)",
        "print('restored', bool((restored == original).all()), 'changed', float(abs(erased - original).max()))",
    ])  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "restored True" in done.stdout, done.stdout
    assert float(done.stdout.split("changed")[-1]) > 0.05
    pipe = StableDiffusionPipeline.from_pretrained(str(micro_model_path()))
    pipe.set_progress_bar_config(disable=True)
    artifact = erase.load_artifact(folder)
    with artifact.applied(wrap_pipeline(pipe)):
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
        in_memory = pipe(prompts, generator=gens, num_inference_steps=10, output_type="np").images
    assert np.abs(np.load(tmp_path / "erased.npy") - in_memory).max() <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--method", "itd", "--preserve-set", "world", "--set", "scale=-1"],
        "--method saeuron --set steps=20 --set percentile=99 --set multiplier=-20 --set gate=0.3".split(),
    ],  # the README's commands
)
def test_readme_sae_commands_on_micro(tmp_path, extra):
    _micro_with_saes()
    out = tmp_path / "vg"
    command = [sys.executable, "scripts/erase.py", "--concept", "van gogh", *extra, "--out", str(out),
               "--check-images", "4", "--json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["weight_format"] == "intervention" and summary["load_code"].startswith("handle = erase.load(")
    assert summary["check"]["target_after"] <= summary["check"]["target_before"]
    assert erase.load_artifact(out).payload("intervention") is not None


def test_bench_sae_bad_input_is_one_line(tmp_path, capsys):
    import runpy

    main = runpy.run_path("scripts/bench_sae.py", run_name="bench_sae_script")["main"]  # in-process: no start-up
    for extra, message in [
        (["--images", "0"], "--images must be >= 1"),
        (["--steps", "-1"], "--steps must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--concept", " "], "concept to erase is empty"),
        (["--set", "nope=1"], "has no setting 'nope'"),
        (["--erasure", str(tmp_path)], "not an erasure artifact"),
        (["--model", str(tmp_path / "no" / "model")], "does not exist"),
    ]:
        assert main(["--model", "tiny", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, (extra, err)


@pytest.mark.slow
def test_bench_sae_reports_the_overhead_of_an_attached_intervention_on_micro(capsys):
    """The benchmark's JSON: both medians positive, the overhead their ratio less one, and the attached run changed
    every image whose prompt names the concept and none of the others (itd's gate fires on the concept alone), so the
    time is that of a working intervention."""
    import runpy

    _micro_with_saes()
    main = runpy.run_path("scripts/bench_sae.py", run_name="bench_sae_script")["main"]  # in-process: no start-up
    assert main(["--method", "itd", "--images", "4", "--steps", "4", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["images"], report["steps"], report["repeats"]) == (4, 4, 1) and list(report["methods"]) == ["itd"]
    itd = report["methods"]["itd"]
    assert itd["bare_seconds"] > 0 and itd["attached_seconds"] > 0
    assert itd["overhead"] == pytest.approx(itd["attached_seconds"] / itd["bare_seconds"] - 1, abs=1e-12)
    counts = ("concept_images", "concept_images_changed", "other_images", "other_images_changed")
    assert [itd[key] for key in counts] == [2, 2, 2, 0], itd
    assert itd["hook_point"].startswith(("text_encoder.", "unet."))
