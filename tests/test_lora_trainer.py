"""The wrapper's LoRA adapters and the shared LoRA trainer, on the tiny random pipeline (seconds each)."""

import json
import os
import shutil

import pytest
import torch
from faults import file_size_limit
from safetensors.torch import load_file, save_file

from erase.lora.trainer import (
    LoraTrainConfig,
    TrainingPool,
    _latest_checkpoint,
    _load_checkpoint,
    _read_pool,
    _save_checkpoint,
    _save_pool,
    train_lora,
)
from pipelines import LORA_TARGETS
from pipelines.files import DamagedCheckpointError, FolderInUseError, WriteError, claim_folder

FAST = dict(steps=6, lr=1e-2, pool_images=2, pool_steps=4)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _inputs(wrapper, batch=2):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=gen)
    return x, torch.full((batch,), 500), wrapper.encode_prompts(["van gogh"] * batch)


def test_lora_modules_match_patterns_and_refuse_none(tiny):
    names = tiny.lora_modules(LORA_TARGETS["xattn"])
    assert len(names) == 16 and all(".attn2." in n for n in names)
    assert all(n.endswith(("to_k", "to_v")) for n in tiny.lora_modules(LORA_TARGETS["kv"]))
    rest = tiny.lora_modules(LORA_TARGETS["noxattn"])
    assert rest and not any(".attn2." in n for n in rest)
    with pytest.raises(ValueError, match="no UNet Linear module matches"):
        tiny.lora_modules(["*no_such_module"])


@pytest.mark.slow
def test_adapters_change_only_targets_frozen_equals_original_and_are_removed(tiny):
    before = _state(tiny.unet)
    grads = {n: p.requires_grad for n, p in tiny.unet.named_parameters()}
    x, t, enc = _inputs(tiny)
    original = tiny.noise_prediction(x, t, enc).detach()
    kv = tiny.lora_modules(LORA_TARGETS["kv"])
    with tiny.lora_adapters(LORA_TARGETS["kv"], 2, 2.0, generator=torch.Generator().manual_seed(0)) as lora:
        assert torch.equal(tiny.noise_prediction(x, t, enc), original)  # B = 0: starts equal to the base
        with torch.no_grad():
            for p in lora.parameters():
                p.add_(0.05)
        adapted = tiny.noise_prediction(x, t, enc).detach()
        assert not torch.allclose(adapted, original)
        with lora.disabled():
            assert torch.equal(tiny.noise_prediction(x, t, enc), original)
        factors = lora.factors()
        assert lora.names == kv and set(factors) == {f"unet.{n}" for n in kv}
        trainable = {n for n, p in tiny.unet.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_" in n for n in trainable)
    after = _state(tiny.unet)
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in tiny.unet.named_parameters()} == grads
    assert not hasattr(tiny.unet, "peft_config")
    assert torch.equal(tiny.noise_prediction(x, t, enc), original)
    # The adapters' change, applied as plain weight deltas, is the adapted model.
    deltas = {k: b @ a for k, (a, b) in factors.items()}
    with tiny.weight_deltas(deltas):
        torch.testing.assert_close(tiny.noise_prediction(x, t, enc), adapted, atol=1e-5, rtol=0)


def test_adapters_are_removed_on_error(tiny):
    before = _state(tiny.unet)
    with pytest.raises(RuntimeError, match="boom"):
        with tiny.lora_adapters(LORA_TARGETS["xattn"], 2, 2.0, generator=torch.Generator().manual_seed(0)):
            raise RuntimeError("boom")
    after = _state(tiny.unet)
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_sample_trajectories_records_every_unet_input(tiny):
    latents, timesteps = tiny.sample_trajectories(["van gogh", "monet", "a cat"], [0, 1, 2], steps=4, batch_size=2)
    assert latents.shape == (3, 4, 4, 16, 16) and timesteps.shape == (4,)
    assert torch.equal(latents[0, 0], tiny.initial_latents(0)[0])  # DDIM: the first input is the seed's noise
    again, _ = tiny.sample_trajectories(["monet"], [1], steps=4)
    torch.testing.assert_close(again[0], latents[1], atol=1e-4, rtol=0)  # batching: summation order only


def _mse_to_frozen_plus_shift(batch, predict):
    """A toy loss: move the concept's prediction 0.1 away from the frozen one."""
    enc = ENCODINGS["enc"].select(batch.prompts)
    target = predict.frozen(batch.latents, batch.timesteps, enc) + 0.1
    return torch.nn.functional.mse_loss(predict.trained(batch.latents, batch.timesteps, enc), target)


ENCODINGS = {}


def test_a_rank_no_adapted_layer_can_hold_is_refused_before_the_pool(tiny, monkeypatch):
    """A LoRA's change has at most the rank of its layer's smaller side: a larger rank (10^5 would exhaust memory)
    is one line before any trajectory is sampled; the widest layer's own width is accepted."""
    import erase.lora.trainer as trainer

    widest = max(min(m.in_features, m.out_features) for n, m in tiny.unet.named_modules()
                 if n in set(tiny.lora_modules(LORA_TARGETS["xattn"])))  # fmt: skip
    monkeypatch.setattr(trainer, "_pool", lambda *a, **k: pytest.fail("the pool was sampled"))
    with pytest.raises(
        ValueError, match=rf"LoRA rank 100000 exceeds every adapted layer's width .+ allows {widest}\)"
    ):
        _train(tiny, rank=100000)
    with pytest.raises(pytest.fail.Exception, match="the pool was sampled"):
        _train(tiny, rank=widest)


def _train(wrapper, **settings):
    ENCODINGS["enc"] = wrapper.encode_prompts(["van gogh", "monet"])
    config = LoraTrainConfig(**{**FAST, **settings})
    return train_lora(
        wrapper,
        pool_prompts=["van gogh", "monet"],
        loss_fn=_mse_to_frozen_plus_shift,
        config=config,
        layers=LORA_TARGETS["xattn"],
        run_key={"test": "toy", "seed": config.seed},  # as a method's: more steps continue a run
        progress=False,
    )


@pytest.mark.slow
def test_training_is_deterministic_leaves_base_identical_and_records_info(tiny):
    before = _state(tiny.unet)
    first = _train(tiny, seed=3)
    assert all(torch.equal(before[k], v) for k, v in _state(tiny.unet).items())
    second = _train(tiny, seed=3)
    other = _train(tiny, seed=4)
    for name, (a, b) in first.factors.items():
        assert torch.equal(a, second.factors[name][0]) and torch.equal(b, second.factors[name][1])
    assert any(not torch.equal(b, other.factors[k][1]) for k, (_, b) in first.factors.items())
    info = first.info
    assert info["steps"] == 6 and len(info["loss_per_100_steps"]) == 1 and info["final_loss"] >= 0
    assert info["peak_memory_mb"] > 0 and info["wall_seconds"] > 0 and info["lora_modules"] == 16
    assert info["final_loss"] < info["loss_per_100_steps"][0] * 2  # it trains (the toy loss falls from 0.01)


@pytest.mark.slow
def test_killed_run_resumed_equals_uninterrupted(tiny, tmp_path):
    whole = _train(tiny, steps=8)
    folder = tmp_path / "ckpt"
    # "Killed" after step 4: the same run with steps=8 but stopped at the first checkpoint is simulated by a run
    # whose loss raises at step 5, after the checkpoint of step 4 was written.
    calls = {"n": 0}

    def dying(batch, predict):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return _mse_to_frozen_plus_shift(batch, predict)

    ENCODINGS["enc"] = tiny.encode_prompts(["van gogh", "monet"])
    config = LoraTrainConfig(**{**FAST, "steps": 8, "checkpoint_dir": str(folder), "checkpoint_every": 4})
    key = {"test": "toy", "steps": 8, "seed": 0}
    run = dict(pool_prompts=["van gogh", "monet"], config=config, layers=LORA_TARGETS["xattn"], run_key=key)
    with pytest.raises(KeyboardInterrupt):
        train_lora(tiny, loss_fn=dying, progress=False, **run)
    assert [p.name for p in folder.glob("step-*")] == ["step-00000004"]
    state = json.loads((folder / "step-00000004" / "state.json").read_text())
    assert state["step"] == 4 and len(state["losses"]) == 4
    resumed = train_lora(tiny, loss_fn=_mse_to_frozen_plus_shift, progress=False, **run)
    assert resumed.info["resumed_from_step"] == 4
    for name, (a, b) in whole.factors.items():
        assert (resumed.factors[name][0] - a).abs().max() <= 1e-6, name
        assert (resumed.factors[name][1] - b).abs().max() <= 1e-6, name
    assert abs(resumed.info["final_loss"] - whole.info["final_loss"]) <= 1e-6
    # Another run's settings are refused in that folder.
    other = dict(run, run_key={**key, "seed": 1})
    with pytest.raises(ValueError, match="another run"):
        train_lora(tiny, loss_fn=_mse_to_frozen_plus_shift, progress=False, **other)


@pytest.mark.slow
def test_checkpoints_hold_no_pickles(tiny, tmp_path):
    _train(tiny, checkpoint_dir=str(tmp_path / "c"), checkpoint_every=3)
    files = sorted(p.name for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert files == ["lora.safetensors", "optimizer.safetensors", "pool.safetensors", "run.json", "state.json"]


def _same_factors(a, b):
    return all(torch.equal(x, b.factors[name][0]) and torch.equal(y, b.factors[name][1])
               for name, (x, y) in a.factors.items())  # fmt: skip


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one_and_resumes(tiny, tmp_path):  # D1
    """The file size limit (EFBIG, real as root too) stands for a full disk: one line naming the checkpoint, no
    temporary left, the last good checkpoint intact; once the files can be written, the same call resumes."""
    whole = _train(tiny, steps=6)
    folder = tmp_path / "ck"
    _train(tiny, steps=4, checkpoint_dir=str(folder), checkpoint_every=2)
    before = _files(folder)
    with file_size_limit(30_000), pytest.raises(WriteError) as caught:  # the optimizer's file is larger
        _train(tiny, steps=6, checkpoint_dir=str(folder), checkpoint_every=2)
    assert str(caught.value).startswith(f"cannot write {folder / 'step-00000006'}: File too large")
    assert "\n" not in str(caught.value) and _files(folder) == before
    resumed = _train(tiny, steps=6, checkpoint_dir=str(folder), checkpoint_every=2)
    assert resumed.info["resumed_from_step"] == 4 and _same_factors(resumed, whole)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, file",
    [
        (_truncate, "step-00000004/lora.safetensors"),
        (_truncate, "step-00000004/optimizer.safetensors"),
        (lambda p: p.write_text('{"step": 4, "losses"'), "step-00000004/state.json"),
        (lambda p: p.write_text("[4]"), "step-00000004/state.json"),
        (lambda p: p.write_text('{"step": 4}'), "step-00000004/state.json"),  # fields missing
        (_truncate, "pool.safetensors"),
        (lambda p: p.write_bytes(b"\xff\xfe"), "run.json"),
    ],
)
def test_a_damaged_checkpoint_is_named_and_restart_starts_afresh(tiny, tmp_path, damage, file):  # D1
    folder = tmp_path / "ck"
    fresh = _train(tiny, steps=4)
    _train(tiny, steps=4, checkpoint_dir=str(folder), checkpoint_every=2)
    damage(folder / file)
    with pytest.raises(DamagedCheckpointError) as caught:
        _train(tiny, steps=4, checkpoint_dir=str(folder), checkpoint_every=2)
    message = str(caught.value)
    assert f"the checkpoint file {folder / file} is damaged" in message and "--restart" in message
    assert "\n" not in message
    again = _train(tiny, steps=4, checkpoint_dir=str(folder), checkpoint_every=2, restart=True)
    assert again.info["resumed_from_step"] == 0 and _same_factors(again, fresh)
    assert sorted(p.name for p in folder.iterdir()) == ["pool.safetensors", "run.json", "step-00000004"]


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_state(path, **changes):
    state = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "lr":
            state["param_groups"][0]["lr"] = value
        else:
            state[key] = value
    path.write_text(json.dumps(state))


def _add_one(path):
    tensors = load_file(str(path))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, str(path))


def _step_as_file(path):
    shutil.rmtree(path.parent)
    path.parent.write_text("")


@pytest.mark.parametrize(
    "damage, file",
    [
        (_flip_last_byte, "step-00000002/lora.safetensors"),  # valid files whose numbers changed
        (_flip_last_byte, "step-00000002/optimizer.safetensors"),
        (_flip_last_byte, "pool.safetensors"),
        (_add_one, "step-00000002/lora.safetensors"),  # rewritten whole, by another writer
        (_add_one, "pool.safetensors"),
        (lambda p: _edit_state(p, losses=[0.5]), "step-00000002/state.json"),  # one loss for two steps
        (lambda p: _edit_state(p, losses=[float("nan"), 0.5]), "step-00000002/state.json"),
        (lambda p: _edit_state(p, seconds=-1), "step-00000002/state.json"),
        (lambda p: _edit_state(p, lr="fast"), "step-00000002/state.json"),  # not this run's optimizer
        (_step_as_file, "step-00000002/state.json"),
    ],
)
def test_a_changed_checkpoint_file_is_named_before_training(tmp_path, damage, file):  # D1
    """Damage that leaves a readable file (a flipped bit, an edit) is found as a truncation is: the checkpoint's
    files carry the digest of their contents, its state is checked against its step and optimizer."""
    folder = tmp_path / "ck"
    folder.mkdir()

    def run_state(seed):
        torch.manual_seed(seed)
        adapters = torch.nn.Linear(4, 3)
        return adapters, torch.optim.Adam(adapters.parameters(), lr=1e-3), torch.Generator().manual_seed(seed)

    adapters, optimizer, generator = run_state(0)
    adapters(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    meta = {"step": 2, "losses": [0.5, 0.25], "seconds": 1.5, "processes": 1}
    _save_checkpoint(folder, 2, adapters, optimizer, [generator.get_state()], meta)
    pool = TrainingPool(torch.randn(4, 3, 4, 2, 2), torch.tensor([900.0, 500.0, 100.0]), torch.tensor([0, 0, 1, 1]))
    _save_pool(folder / "pool.safetensors", pool)

    def load():
        fresh, fresh_optimizer, fresh_generator = run_state(1)
        _read_pool(folder / "pool.safetensors", prompts=2, images=2)
        return fresh, _load_checkpoint(_latest_checkpoint(folder), fresh, fresh_optimizer, fresh_generator)

    restored, state = load()  # intact: read back exactly
    assert state["losses"] == [0.5, 0.25] and torch.equal(restored.weight, adapters.weight)
    damage(folder / file)
    with pytest.raises(DamagedCheckpointError) as caught:
        load()
    message = str(caught.value)
    assert message.startswith(f"the checkpoint file {folder / file} is damaged (") and "--restart" in message
    assert "\n" not in message


def test_a_checkpoint_dir_another_run_holds_is_refused_before_training(tiny, tmp_path):  # D4
    folder = tmp_path / "ck"
    with claim_folder(folder, option="checkpoint_dir"), pytest.raises(FolderInUseError) as caught:
        _train(tiny, steps=2, checkpoint_dir=str(folder))
    assert "\n" not in str(caught.value) and str(caught.value).endswith("choose another checkpoint_dir")
    assert os.listdir(tmp_path) == []  # nothing written, and the claim released


def test_restart_deletes_only_the_runs_own_files(tiny, tmp_path):
    folder = tmp_path / "ck"
    _train(tiny, steps=2, checkpoint_dir=str(folder), checkpoint_every=2)
    (folder / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match="holds no checkpoints of ours"):
        _train(tiny, steps=2, checkpoint_dir=str(folder), restart=True)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "the user's"
    with pytest.raises(ValueError, match="needs a checkpoint_dir"):
        LoraTrainConfig(restart=True)


def test_a_checkpoint_dir_that_cannot_be_made_is_one_line_before_training(tiny, tmp_path):
    (tmp_path / "afile").write_text("x")
    for where in (tmp_path / "afile" / "ck", tmp_path / ("c" * 256)):
        with pytest.raises(WriteError) as caught:
            _train(tiny, steps=2, checkpoint_dir=str(where))
        assert "\n" not in str(caught.value) and str(caught.value).startswith("cannot write")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"rank": 0}, "rank"),
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"alpha": -1.0}, "alpha"),
        ({"seed": -1}, "seed"),
        ({"layers": ()}, "layers"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"pool_images": 0}, "pool_images"),
    ],
)
def test_train_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        LoraTrainConfig(**bad)


@pytest.mark.slow
def test_more_steps_in_the_same_folder_continue_a_finished_run(tiny, tmp_path):
    """Steps are not part of a run's identity: 4 steps, then the same call with 8, equal 8 steps at once."""
    from erase import ConceptSpec, erase_concepts
    from erase.lora.esd import ESDConfig

    spec = ConceptSpec(("van gogh",))
    settings = dict(lr=1e-2, pool_images=2, pool_steps=4, checkpoint_every=100)
    whole = erase_concepts(tiny, spec, "esd", ESDConfig(steps=8, **settings))
    folder = str(tmp_path / "ckpt")
    erase_concepts(tiny, spec, "esd", ESDConfig(steps=4, checkpoint_dir=folder, **settings))
    longer = erase_concepts(tiny, spec, "esd", ESDConfig(steps=8, checkpoint_dir=folder, **settings))
    assert longer.info["resumed_from_step"] == 4
    for name, delta in whole.deltas.items():
        assert (longer.deltas[name] - delta).abs().max() <= 1e-6, name
    with pytest.raises(ValueError, match="beyond steps=6"):
        erase_concepts(tiny, spec, "esd", ESDConfig(steps=6, checkpoint_dir=folder, **settings))


_TWO_PROCESS_TRAINING = """
import json, sys
import torch
from safetensors.torch import save_file
from accelerate import PartialState
from erase import ConceptSpec, erase_concepts
from erase.lora.esd import ESDConfig
from pipelines import load_pipeline

torch.set_num_threads(1)
out, checkpoints = sys.argv[1:3]
rank = PartialState(cpu=True).process_index
config = ESDConfig(steps=6, lr=1e-2, pool_images=2, pool_steps=4, checkpoint_dir=checkpoints, checkpoint_every=3)
edit = erase_concepts(load_pipeline("tiny"), ConceptSpec(("van gogh",)), "esd", config)
save_file({k: v.contiguous() for k, v in edit.deltas.items()}, f"{out}/deltas-{rank}.safetensors")
json.dump(edit.info, open(f"{out}/info-{rank}.json", "w"))
"""


@pytest.mark.slow
def test_two_processes_sync_gradients_and_end_with_the_same_adapters(tiny, tmp_path):
    import os
    import subprocess

    from launch import two_process_launcher
    from safetensors import safe_open
    from safetensors.torch import load_file

    from erase import ConceptSpec, erase_concepts
    from erase.lora.esd import ESDConfig

    launcher = two_process_launcher()
    if launcher is None:
        pytest.skip("accelerate launcher not installed")
    script = tmp_path / "train.py"
    script.write_text(_TWO_PROCESS_TRAINING)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, str(script), str(tmp_path), str(tmp_path / "ckpt")], capture_output=True,
                            text=True, timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"deltas-{r}.safetensors")) for r in (0, 1)]
    infos = [json.loads((tmp_path / f"info-{r}.json").read_text()) for r in (0, 1)]
    assert set(ranks[0]) == set(ranks[1]) and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert infos[0]["processes"] == 2 and infos[0]["examples_per_step"] == 2
    assert infos[0]["loss_per_100_steps"] == infos[1]["loss_per_100_steps"]  # the loss is averaged too
    # Each process drew its own batches: the synced run is not a one-process run of the same seed.
    alone = erase_concepts(tiny, ConceptSpec(("van gogh",)), "esd", ESDConfig(steps=6, lr=1e-2, pool_images=2,
                                                                              pool_steps=4))  # fmt: skip
    assert any(not torch.allclose(alone.deltas[k], ranks[0][k], atol=1e-6) for k in ranks[0])
    with safe_open(str(tmp_path / "ckpt" / "step-00000006" / "optimizer.safetensors"), "pt") as f:
        assert {"generator", "generator.1"} <= set(f.keys())
