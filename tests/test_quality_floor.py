"""Trained things have a quality floor: an SAE that explains less than the mean, or saw fewer tokens than it has
features, is not saved unless forced and is refused by the methods that would read it (at erase time and in an
artifact); an edit larger than the weights is said so."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest

import erase
from erase.sae.sae import SAE_METADATA, SAETrainConfig, build_sae, resolve_sae, sae_quality_problems
from erase.workflow import edit_size_warnings, run_erase

ROOT = Path(__file__).parents[1]
HOOK = "text_encoder.encoder.layers.1"
MICRO_HOOK = "text_encoder.encoder.layers.2"


@pytest.mark.parametrize(
    "quality, latents, problem",
    [
        ({"fvu": 0.05, "training_tokens": 5000}, 512, None),
        ({"fvu": 1.0, "training_tokens": 5000}, 512, "explains less than the mean"),
        ({"fvu": math.nan, "training_tokens": 5000}, 512, "explains less than the mean"),
        ({"fvu": True, "training_tokens": 5000}, 512, "explains less than the mean"),
        ({"fvu": 0.05, "training_tokens": 100}, 512, "fewer than its 512 features"),
        (None, 512, "records no quality"),
    ],
)
def test_the_floor_reads_an_sae_json(quality, latents, problem):
    meta = {"latents": latents} | ({"quality": quality} if quality is not None else {})
    problems = sae_quality_problems(meta)
    assert (problems == []) if problem is None else any(problem in p for p in problems)


def test_the_shipped_saes_are_above_the_floor():
    shipped = sorted((ROOT / "pipelines" / "saes").glob(f"*/{SAE_METADATA}"))
    assert shipped and all(sae_quality_problems(json.loads(p.read_text())) == [] for p in shipped)


def test_too_few_tokens_is_refused_before_training_and_forced_it_is_recorded_and_not_used(wrapper, tmp_path):
    config = SAETrainConfig(expansion=16, k=8, batch_size=64, epochs=1)
    with pytest.raises(ValueError, match="145 training tokens .* fewer than the SAE's 512 features"):
        build_sae(wrapper, HOOK, ["red cat", "blue dog"], tmp_path / "few", config)
    assert not (tmp_path / "few" / SAE_METADATA).exists() and not (tmp_path / "few" / ".work" / "checkpoint").exists()
    _, meta = build_sae(wrapper, HOOK, ["red cat", "blue dog"], tmp_path / "few", config, force=True)
    saved = json.loads((tmp_path / "few" / SAE_METADATA).read_text())
    assert (
        saved["quality"]["training_tokens"] == 145
        and saved["quality"]["below_floor"] == meta["quality"]["below_floor"]
    )
    with pytest.raises(ValueError, match="below the quality floor, no result to use: .*fewer than its 512 features"):
        resolve_sae(wrapper, HOOK, tmp_path / "few")


def test_an_sae_that_explains_less_than_the_mean_is_not_saved(wrapper, tmp_path):
    # trained on one prompt over and over, it reconstructs other prompts' tokens worse than their mean does
    prompts = ["red cat"] * 38 + ["a" * 70, "b" * 70]
    config = SAETrainConfig(expansion=2, k=1, batch_size=64, epochs=1, lr=1e-6)
    with pytest.raises(ValueError, match=r"below the quality floor and was not saved: .*fraction of variance"):
        build_sae(wrapper, HOOK, prompts, tmp_path / "poor", config)
    assert not (tmp_path / "poor" / SAE_METADATA).exists()
    build_sae(wrapper, HOOK, prompts, tmp_path / "poor", config, force=True)  # resumes: the training is not redone
    assert json.loads((tmp_path / "poor" / SAE_METADATA).read_text())["quality"]["fvu"] >= 1


def test_train_sae_script_refuses_a_two_line_prompt_file_and_itd_refuses_a_forced_one(tmp_path, capsys):
    """D11: the report's two-line prompt file is refused by train_sae.py (exit 2, nothing written); forced, the SAE is
    refused by itd in one line, exit 2, before any artifact is written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xef\xbb\xbfa red\x00 star\r\n" + b"a blue circle " * 40 + b"\r\n")
    train = runpy.run_path(str(ROOT / "scripts" / "train_sae.py"), run_name="train_sae")["main"]
    store = tmp_path / "saes"
    args = ["--hook", MICRO_HOOK, "--prompts", str(prompts), "--out", str(store), "--quiet"]
    assert train(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "fewer than the SAE's" in err and len(err.splitlines()) == 1
    assert not list(store.glob(f"*/{SAE_METADATA}"))
    assert train([*args, "--force", "--set", "epochs=1"]) == 0
    assert "warning: below the quality floor, saved (--force)" in capsys.readouterr().out
    erase_main = runpy.run_path(str(ROOT / "scripts" / "erase.py"))["main"]
    itd = ["--concept", "van gogh", "--method", "itd", "--no-check", "--out", str(tmp_path / "itd"),
           "--set", f'sae_stores=["{store}"]', "--set", "top_features=4", "--set", "gate=false"]  # fmt: skip
    assert erase_main(itd) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "below the quality floor" in err and str(store) in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "itd").exists()


def test_an_edit_larger_than_the_weights_is_a_warning_in_the_summary(wrapper, tmp_path):
    overrides = {"token_positions": "from_first", "erase_scale": 50.0, "lamb": 0.01}
    summary = run_erase(wrapper, ["van gogh", "monet", "picasso"], out=tmp_path / "big", check=False,
                        config_overrides=overrides)  # fmt: skip
    assert summary.relative_change_max > 1 and len(summary.warnings) == 1
    assert "larger than the weights" in summary.warnings[0] and f"of {summary.layers} layers" in summary.warnings[0]
    assert run_erase(wrapper, ["van gogh"], out=tmp_path / "small", check=False).warnings == []
    assert edit_size_warnings({"a": 0.5, "b": math.nan}) and edit_size_warnings({"a": 1.0}) == []
    assert erase.ConceptSpec  # the public API is untouched by the warning
