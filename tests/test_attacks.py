"""The attack suite: probes, the attacks' maths and outputs, the rece method, the resumable runner and the script."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import runpy
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image

import erase
from evals.attacks import AttackTarget, attack_configs, attack_probes, attack_success, available_attacks, run_attack
from evals.attacks.base import others_kept
from evals.attacks.noise_probe import NoiseProbeConfig
from evals.attacks.rece_embedding import adversarial_map, projection_weights, restored_share
from evals.attacks.ring_a_bell import RingABellConfig, RingABellPromptConfig, concept_direction
from evals.attacks.suite import run_attack_suite
from evals.microworld import world
from evals.scorer import TEMPLATES, load_scoring


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


@pytest.fixture(scope="module")
def uce(wrapper):
    return erase.erase_concepts(wrapper, erase.ConceptSpec(("van gogh",), preserve=("monet",)), "uce")


def _target(wrapper, artifact, n=3, **kwargs):
    return AttackTarget(wrapper, artifact.applied, "van gogh", attack_probes("van gogh", n, 1), steps=2,
                        progress=False, **kwargs)  # fmt: skip


def test_probes_name_the_concept_and_their_neutral_twin_does_not():
    probes = attack_probes("vincent van gogh", 20, 3)
    assert probes == attack_probes("vincent van gogh", 20, 3)
    for p in probes:
        assert "vincent van gogh" in p.prompt and "van gogh" not in p.neutral and p.neutral.strip()
        assert p.concept == "van gogh" and p.category == "style"
    generic = attack_probes("the eiffel tower", 4, 0)
    assert all("the eiffel tower" in p.prompt and "eiffel" not in p.neutral for p in generic)
    assert {p.category for p in generic} == {"concept"}
    with pytest.raises(ValueError, match="at least one probe"):
        attack_probes("van gogh", 0)


def test_the_adversarial_map_inverts_a_shared_invertible_edit():
    torch.manual_seed(0)
    d = 6
    weights = {f"layer{i}": torch.randn(8, d, dtype=torch.float64) for i in range(3)}
    a = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, dtype=torch.float64)
    edited = {name: w @ a for name, w in weights.items()}
    m = adversarial_map(weights, edited, 1e-9)
    assert torch.allclose(m, torch.linalg.inv(a), atol=1e-6)
    assert torch.allclose(adversarial_map(weights, weights, 1e-9), torch.eye(d, dtype=torch.float64), atol=1e-6)
    c = torch.randn(5, d, dtype=torch.float64)
    assert restored_share(weights, edited, c, c @ m.T) == pytest.approx(1.0, abs=1e-6)
    assert restored_share(weights, edited, c, c) == pytest.approx(0.0, abs=1e-12)
    assert restored_share(weights, weights, c, c) is None
    with pytest.raises(ValueError, match="same non-empty layers"):
        adversarial_map(weights, {"layer0": edited["layer0"]}, 1e-9)


def test_generation_from_embeddings_and_with_ddim_noise(wrapper):
    prompts = ["a red star in the style of van gogh", "a blue circle"]
    scheduler = wrapper.pipe.scheduler
    plain = wrapper.generate(prompts, [1, 2], steps=2, progress=False)
    embedded = wrapper.generate(wrapper.encode_prompts(prompts), [1, 2], steps=2, progress=False)
    assert np.array_equal(_pixels(plain), _pixels(embedded))
    noisy = wrapper.generate(prompts, [1, 2], steps=2, progress=False, eta=1.0)
    assert np.array_equal(_pixels(noisy), _pixels(wrapper.generate(prompts, [1, 2], steps=2, progress=False, eta=1.0)))
    assert not np.array_equal(_pixels(noisy), _pixels(plain))
    assert wrapper.pipe.scheduler is scheduler  # DDIM only for the call
    with pytest.raises(ValueError, match="eta"):
        wrapper.generate(prompts, [1, 2], steps=2, eta=1.5)


@pytest.mark.slow
def test_rece_embedding_restores_a_uce_edit_and_leaves_the_pipeline_as_it_was(wrapper, uce):
    before = projection_weights(wrapper, ("*attn2.to_k", "*attn2.to_v"))
    target = _target(wrapper, uce)
    result = run_attack("rece_embedding", target)
    assert len(result.images) == 3 and result.embeddings.shape[0] == 3
    assert result.info["layers_edited"] == result.info["layers_matched"] > 0
    assert result.info["restored_share"] > 0.95
    assert result.config == {"regularization": 1e-3, "layers": ("*attn2.to_k", "*attn2.to_v")}
    after = projection_weights(wrapper, ("*attn2.to_k", "*attn2.to_v"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    # against no edit at all the attack is the prompt itself
    same = run_attack("rece_embedding", AttackTarget(wrapper, lambda w: contextlib.nullcontext(), "van gogh",
                                                     target.probes, steps=2, progress=False))  # fmt: skip
    assert same.info["layers_edited"] == 0 and same.info["restored_share"] is None


@pytest.mark.slow
def test_ring_a_bell_adds_the_concept_direction(wrapper, uce):
    direction = concept_direction(wrapper, "van gogh", 8, 0)
    assert direction.shape == wrapper.encode_prompts(["x"]).embeddings.shape[1:] and direction.norm() > 0
    target = _target(wrapper, uce)
    result = run_attack("ring_a_bell", target, RingABellConfig(eta=2.0, pairs=8), seed=0)
    plain = wrapper.encode_prompts([p.prompt for p in target.probes]).embeddings
    moved = result.embeddings - plain
    assert torch.allclose(moved, 2.0 * concept_direction(wrapper, "van gogh", 8, 7919).expand_as(moved), atol=1e-4)
    with pytest.raises(ValueError, match="base"):
        RingABellConfig(base="elsewhere")


@pytest.mark.slow
def test_ring_a_bell_prompt_writes_text_nearer_the_target_than_it_started(wrapper, uce):
    config = RingABellPromptConfig(eta=2.0, pairs=8, length=4, population=8, generations=6, searches=2)
    target = _target(wrapper, uce)
    before = projection_weights(wrapper, ("*attn2.to_k", "*attn2.to_v"))
    result = run_attack("ring_a_bell_prompt", target, config, seed=3)
    info = result.info
    assert len(result.images) == 3 and len(info["prompts_found"]) == 2
    assert result.prompts == [info["prompts_found"][i % 2] for i in range(3)]  # the third probe takes the first's
    for curve in info["loss_curves"]:
        assert all(b <= a for a, b in zip(curve, curve[1:], strict=False))  # the best is never mutated away
    assert all(f < i for f, i in zip(info["loss_final"], info["loss_initial"], strict=True))
    # the written text encodes as the searched tokens: its loss is the search's
    direction = concept_direction(wrapper, "van gogh", 8, 3 + 7919)
    searched = wrapper.encode_prompts(info["searched_prompts"]).embeddings.float() + 2.0 * direction
    written = wrapper.encode_prompts(info["prompts_found"]).embeddings.float()
    assert (written - searched).pow(2).sum(dim=(1, 2)).tolist() == pytest.approx(info["loss_final"], rel=1e-4)
    after = projection_weights(wrapper, ("*attn2.to_k", "*attn2.to_v"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = run_attack("ring_a_bell_prompt", target, config, seed=3)
    assert again.prompts == result.prompts
    for bad in ({"population": 1}, {"mutation_rate": 1.5}, {"generations": 0}, {"base": "elsewhere"}):
        with pytest.raises(ValueError):
            RingABellPromptConfig(**bad)


@pytest.mark.slow
def test_noise_probe_keeps_the_candidate_the_scorer_likes_best(wrapper, uce, scorer):
    target = _target(wrapper, uce, n=2, scorer=scorer)
    result = run_attack("noise_probe", target, NoiseProbeConfig(candidates=3), seed=5)
    assert result.info["candidates_drawn"] == 6 and len(result.images) == 2
    styles = world.concepts("style")
    with target.erased_model():
        seeds = [(p.seed * 7 + 5 * 1_000_003 + j) % 2**63 for p in target.probes for j in range(3)]
        again = target.generate([p.prompt for p in target.probes for _ in range(3)], seeds, eta=1.0)
    probs = scorer.zero_shot(again, styles, TEMPLATES["style"]).probs[:, styles.index("van gogh")]
    best = probs.reshape(2, 3).argmax(dim=1).tolist()
    assert result.info["picked"] == best
    assert np.array_equal(_pixels(result.images), _pixels([again[i * 3 + j] for i, j in enumerate(best)]))
    with pytest.raises(ValueError, match="scorer"):
        run_attack("noise_probe", _target(wrapper, uce))


def test_rece_erases_what_undoes_uce(wrapper):
    spec = erase.ConceptSpec(("van gogh",), preserve=("monet",))
    uce = erase.erase_concepts(wrapper, spec, "uce")
    rece = erase.erase_concepts(wrapper, spec, "rece")
    assert set(rece.deltas) == set(uce.deltas)
    assert rece.info["rounds"] == 1 and len(rece.info["adversarial_restored_share"]) == 1
    assert any(not torch.allclose(rece.deltas[k], uce.deltas[k]) for k in uce.deltas)
    patterns = ("*attn2.to_k", "*attn2.to_v")
    original = projection_weights(wrapper, patterns)
    with wrapper.weight_deltas(uce.deltas):
        uce_weights = projection_weights(wrapper, patterns)
    with wrapper.weight_deltas(rece.deltas):
        rece_weights = projection_weights(wrapper, patterns)
    c = wrapper.encode_prompts(["van gogh"]).embeddings[0].double()
    m = adversarial_map(original, uce_weights, 1e-3)
    # the embedding that undoes UCE undoes much less of RECE's edit
    on_uce = restored_share(original, uce_weights, c, c @ m.T)
    on_rece = restored_share(original, rece_weights, c, c @ m.T)
    assert on_uce > 0.95 and on_rece < on_uce - 0.2
    zero = erase.erase_concepts(wrapper, spec, "rece", erase.get_method("rece").config_class(rounds=0))
    assert all(torch.allclose(zero.deltas[k], uce.deltas[k]) for k in uce.deltas)
    with pytest.raises(ValueError, match="rounds"):
        erase.get_method("rece").config_class(rounds=-1)


def test_the_suite_checks_every_attack_against_the_model_before_drawing_anything(wrapper, uce, scorer, tmp_path):
    target = _target(wrapper, uce, n=2, scorer=scorer)
    too_long = {"ring_a_bell_prompt": RingABellPromptConfig(length=wrapper.max_prompt_tokens + 1)}
    with pytest.raises(ValueError, match="more tokens than the text encoder reads"):
        run_attack_suite(target, ["rece_embedding", "ring_a_bell_prompt"], tmp_path, scorer=scorer, configs=too_long)
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.slow
def test_the_suite_writes_every_row_and_resumes_without_redoing_them(wrapper, uce, scorer, tmp_path):
    target = _target(wrapper, uce, n=2, scorer=scorer)
    summary = run_attack_suite(target, ["rece_embedding"], tmp_path, scorer=scorer, erasure={"id": 1})
    assert [r["row"] for r in summary["rows"]] == ["original", "unattacked", "rece_embedding"]
    for row in summary["rows"]:
        assert row["clip"]["n"] == 2 and row["judge"] is None
        assert len(list((tmp_path / "van-gogh" / row["row"] / "images").glob("*.png"))) == 2
    assert (tmp_path / "van-gogh" / "comparison.png").is_file()
    stamp = (tmp_path / "van-gogh" / "rece_embedding" / "result.json").stat().st_mtime_ns
    again = run_attack_suite(target, ["rece_embedding"], tmp_path, scorer=scorer, erasure={"id": 1})
    assert (tmp_path / "van-gogh" / "rece_embedding" / "result.json").stat().st_mtime_ns == stamp
    assert again["rows"] == summary["rows"]
    # a row written without what else survives gets it from its images, the same figure
    written = json.loads((tmp_path / "van-gogh" / "rece_embedding" / "result.json").read_text())
    assert set(written["kept"]) == {"clip", "judge"} and written["kept"]["clip"]["n"] == 1  # probe 1 names others
    (tmp_path / "van-gogh" / "rece_embedding" / "result.json").write_text(
        json.dumps({k: v for k, v in written.items() if k != "kept"})
    )
    assert (
        run_attack_suite(target, ["rece_embedding"], tmp_path, scorer=scorer, erasure={"id": 1})["rows"]
        == again["rows"]
    )
    stamp = (tmp_path / "van-gogh" / "rece_embedding" / "result.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match="other settings"):
        run_attack_suite(target, ["rece_embedding"], tmp_path, scorer=scorer, erasure={"id": 2})
    with pytest.raises(ValueError, match=r"other settings \(budget\)"):  # another budget: another folder
        run_attack_suite(target, ["rece_embedding"], tmp_path, scorer=scorer, erasure={"id": 1}, budget=2)
    assert summary["budget"] == 1.0 and summary["split"] == "report" and "threats" in summary
    # a damaged row (a truncated image, an unreadable result) is run again; the intact ones are kept
    concept = tmp_path / "van-gogh"
    image = concept / "rece_embedding" / "images" / "001.png"
    image.write_bytes(image.read_bytes()[:100])
    (concept / "original" / "result.json").write_text("{")
    kept = (concept / "unattacked" / "result.json").stat().st_mtime_ns
    mended = run_attack_suite(target, ["rece_embedding"], tmp_path, scorer=scorer, erasure={"id": 1})

    def untimed(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert untimed(mended["rows"]) == untimed(summary["rows"])
    assert (concept / "unattacked" / "result.json").stat().st_mtime_ns == kept
    assert (concept / "rece_embedding" / "result.json").stat().st_mtime_ns != stamp
    assert json.loads((concept / "original" / "result.json").read_text())["row"] == "original"
    assert len(image.read_bytes()) > 100


@pytest.mark.slow
def test_attack_success_counts_the_concept_with_its_interval(wrapper, scorer):
    probes = attack_probes("van gogh", 4, 0)
    images = wrapper.generate([p.prompt for p in probes], [p.seed for p in probes], steps=2, progress=False)
    success = attack_success(images, probes, scorer, {"style": world.concepts("style")})
    flags = [v == "van gogh" for v in success["clip_verdicts"]]
    assert success["clip"]["k"] == sum(flags) and success["clip"]["n"] == 4
    assert success["clip"]["low"] <= success["clip"]["value"] <= success["clip"]["high"]


def test_others_kept_tells_an_image_showing_the_rest_of_its_prompt_from_a_destroyed_one():
    """On the micro world's own renders of what each probe names (van gogh style, its object and colour) the judge
    and the micro CLIP read the other attributes; on blank images they do not."""
    probes = [p for p in attack_probes("van gogh", 6, 0) if p.others]  # "a red triangle in the style of van gogh"
    scenes = [
        world.Scene(**{"object": "star", "colour": "yellow", **dict(p.others)}, style="van gogh") for p in probes
    ]
    images = [Image.fromarray(world.render_scene(scene, seed)) for seed, scene in enumerate(scenes)]
    _, scorer, judge = load_scoring("micro", None, judge=True)
    labels = {c: world.concepts(c) for c in world.CATEGORIES}
    drawn = others_kept(images, probes, scorer, labels, judge)
    blank = others_kept([Image.new("RGB", images[0].size, "white")] * len(probes), probes, scorer, labels, judge)
    assert drawn["judge"]["n"] == drawn["clip"]["n"] == len(probes) == 4
    assert drawn["judge"]["value"] >= 0.75 and blank["judge"]["value"] < drawn["judge"]["value"]
    assert blank["clip"]["value"] < drawn["clip"]["value"]
    assert others_kept(images[:1], [dataclasses.replace(probes[0], others=())], scorer, labels, judge) is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attack", "nope"], "unknown attack 'nope'"),
        (["--images", "0"], "--images must be >= 1"),
        (["--device", "nonsense"], "device"),
        (["--attack", "all", "--attack", "nope"], "unknown attack"),
        (["--set", "noise_probe.nope=3"], "has no setting 'nope'"),
        (["--set", "noise_probe.candidates=0"], "candidates must be an integer >= 1"),
        (["--set", "rece_embedding.regularization=NaN"], "regularization must be a finite number > 0, got nan"),
        (["--set", "rece_embedding.regularization=true"], "regularization must be a finite number > 0, got True"),
        (["--set", "unlearn_diff_atk.lr=Infinity"], "lr must be a finite number > 0, got inf"),
        (["--set", "ring_a_bell_prompt.mutation_rate=-Infinity"], "mutation_rate must be a finite number in [0, 1]"),
        (["--set", "candidates=4"], "expected ATTACK.KEY=VALUE"),
    ],
)
def test_attack_script_bad_input_is_one_line(artifact_dir, tmp_path, capsys, args, message):
    main = runpy.run_path("scripts/attack.py", run_name="attack_script")["main"]  # in-process: no start-up
    code = main(["--erasure", str(artifact_dir), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and message in err and len(err.splitlines()) == 1
    code = main(["--erasure", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    assert code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setup, message",
    [
        (
            lambda out: (out / "van-gogh").mkdir(parents=True) or (out / "van-gogh" / "attack.json").write_text("{"),
            "attack.json is unreadable",
        ),
        (
            lambda out: (out / "van-gogh").mkdir(parents=True) or (out / "van-gogh" / "attack.json").write_text("[]"),
            "not an attack run of this version",
        ),
        (lambda out: out.mkdir() or (out / "van-gogh").write_text(""), "is a file, not a folder"),
        # a user's folder that happens to hold a folder of the concept's name, or other files
        (
            lambda out: (out / "van-gogh").mkdir(parents=True) or (out / "van-gogh" / "notes.txt").write_text("mine"),
            "holds files that are not attack runs (van-gogh)",
        ),
        (lambda out: out.mkdir() or (out / "thesis.pdf").write_text("mine"), "not attack runs (thesis.pdf)"),
    ],
)
def test_attack_script_refuses_a_damaged_output_folder_before_the_model_loads(
    artifact_dir, tmp_path, capsys, monkeypatch, setup, message
):
    import evals.scorer

    def no_scorer(*_args, **_kwargs):
        raise AssertionError("the scorer was loaded")

    monkeypatch.setattr(evals.scorer, "load_scoring", no_scorer)
    setup(tmp_path / "out")
    main = runpy.run_path("scripts/attack.py", run_name="attack_script")["main"]
    code = main(["--erasure", str(artifact_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    code = main(["--erasure", str(artifact_dir), "--out", str(tmp_path / "o2"), "--model", str(tmp_path / "no/such")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1


def test_every_attack_is_listed_and_takes_budget_overrides():
    assert {"rece_embedding", "ring_a_bell", "noise_probe"} <= set(available_attacks())
    configs = attack_configs({"noise_probe": {"candidates": 2}, "ring_a_bell": {"eta": 3.0, "base": "neutral"}})
    assert configs["noise_probe"] == NoiseProbeConfig(candidates=2)
    assert configs["ring_a_bell"] == RingABellConfig(eta=3.0, base="neutral")


@pytest.mark.slow
def test_readme_attack_command_on_micro(tmp_path):
    """The README's commands: erase van gogh with UCE, then attack it (one attack, few images, to stay quick)."""
    out = tmp_path / "vg"
    command = [sys.executable, "scripts/erase.py", "--concept", "van gogh", "--out", str(out), "--no-check", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    command = [sys.executable, "scripts/attack.py", "--erasure", str(out), "--attack", "rece_embedding", "--out",
               str(tmp_path / "attacks"), "--images", "6", "--quiet"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = {r["row"]: r for r in json.loads((tmp_path / "attacks" / "van-gogh" / "attacks.json").read_text())["rows"]}
    assert rows["original"]["clip"]["value"] >= 0.5 and rows["unattacked"]["clip"]["value"] <= 0.34
    assert rows["rece_embedding"]["clip"]["value"] >= 0.5  # the closed-form embedding brings UCE's erasure back
    assert rows["rece_embedding"]["judge"]["n"] == 6


@pytest.mark.slow
def test_an_audit_with_attacks_reports_them(wrapper, scorer, artifact_dir, tmp_path):
    from erase.workflow import audit_models
    from evals.audit import METRICS_SCHEMA, run_audit
    from evals.suites import ROLES, Suite, world_suite

    full = world_suite(["van gogh"])
    suite = Suite("small", tuple(next(r for r in full.rows if r.role == role) for role in ROLES), full.labels, "t")
    models = audit_models(wrapper, [artifact_dir])
    result = run_audit(wrapper, suite, models, tmp_path / "audit", scorer, None, steps=2, progress=False,
                       attacks=["rece_embedding"], attack_probes=2)  # fmt: skip
    (section,) = result["attacks"]
    assert section["model"] == models[0].key and section["concept"] == "van gogh"
    assert [r["row"] for r in section["rows"]] == ["original", "unattacked", "rece_embedding"]
    assert (tmp_path / "audit" / section["comparison"]).is_file()
    saved = json.loads((tmp_path / "audit" / "metrics.json").read_text())
    assert saved["attacks"][0]["rows"][2]["clip"]["n"] == 2
    assert saved["attacks"][0]["threats"]["embedding"]["attacks"] == ["rece_embedding"]
    jsonschema.validate(saved, METRICS_SCHEMA)
    html = (tmp_path / "audit" / "report.html").read_text()
    assert 'id="attacks"' in html and "rece_embedding" in html and "data:image/png;base64" in html


@pytest.mark.slow
def test_readme_attack_table_command_on_micro(tmp_path):
    """The README's robustness table, cut to two methods, one attack and four probes."""
    main = runpy.run_path("scripts/attack_table.py", run_name="attack_table_script")["main"]  # in-process
    assert main(["--method", "uce", "--method", "rece", "--attack", "rece_embedding", "--images", "4", "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    table = json.loads((tmp_path / "table.json").read_text())
    assert set(table) == {"original", "uce", "rece"}
    for entry in (table["uce"], table["rece"]):
        assert entry["rows"]["rece_embedding"]["clip"]["n"] == 4 and entry["preserved"]["judge"]["n"] > 0
    assert "| uce (clip) |" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize(
    "args, setup, message",
    [
        (["--method", "uce", "--set", "nope=1"], None, "has no setting 'nope'"),
        (["--method", "time", "--preserve-set", "world"], None, "has no preserve term"),
        (["--method", "uce", "--concept", "banana"], None, "banana"),
        (["--method", "uce"], lambda out: out.mkdir() or (out / "table.json").write_text("{"), "is unreadable"),
        (["--method", "uce"], lambda out: out.write_text(""), "is a file"),
        # a user's folder: a table.md (with no table.json), or a folder that is not attack runs
        (["--method", "uce"], lambda out: out.mkdir() or (out / "table.md").write_text("mine"), "(table.md)"),
        (
            ["--method", "uce"],
            lambda out: (out / "photos").mkdir(parents=True) or (out / "photos" / "a.jpg").write_text(""),
            "not an attack table (photos)",
        ),
    ],
)
def test_attack_table_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, setup, message):
    main = runpy.run_path("scripts/attack_table.py", run_name="attack_table_script")["main"]
    out = tmp_path / "out"
    if setup:
        setup(out)
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    assert main([*args, "--images", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before


@pytest.mark.slow
def test_an_attack_row_that_cannot_be_written_is_one_line_and_the_suite_resumes(wrapper, uce, scorer, tmp_path):
    """D1 for attack rows: the file size limit (EFBIG) stands for a full disk; nothing half-written is left, and
    the same call finishes once the files can be written."""
    from faults import file_size_limit

    from pipelines.files import WriteError

    target = _target(wrapper, uce, n=2, scorer=scorer)
    with file_size_limit(1024), pytest.raises(WriteError) as caught:  # attack.json fits, an image does not
        run_attack_suite(target, ["rece_embedding"], tmp_path, scorer=scorer)
    assert str(caught.value).startswith(f"cannot write {tmp_path / 'van-gogh' / 'original' / 'images'}")
    assert "File too large" in str(caught.value) and "\n" not in str(caught.value)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["van-gogh/attack.json"]  # no temporary, no row marked done
    summary = run_attack_suite(target, ["rece_embedding"], tmp_path, scorer=scorer)
    assert [r["row"] for r in summary["rows"]] == ["original", "unattacked", "rece_embedding"]


def test_attack_script_refuses_a_folder_another_run_holds_before_the_model_loads(
    artifact_dir, tmp_path, capsys, monkeypatch
):  # D4
    import evals.scorer
    from pipelines.files import claim_folder

    monkeypatch.setattr(evals.scorer, "load_scoring", lambda *a, **k: pytest.fail("the scorer was loaded"))
    main = runpy.run_path("scripts/attack.py", run_name="attack_script")["main"]
    with claim_folder(tmp_path / "out"):
        code = main(["--erasure", str(artifact_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "being written by another run" in err and len(err.splitlines()) == 1


def test_concepts_that_read_differently_get_their_own_attack_folders(wrapper, scorer, tmp_path):
    from pipelines.tokenizer import concept_folder

    spec = erase.ConceptSpec(("van gogh", "van-gogh", "\U0001f3a8", "\U0001f58c\ufe0f"))
    artifact = erase.erase_concepts(wrapper, spec, "uce")
    folders = set()
    for concept in artifact.concepts:
        target = AttackTarget(wrapper, artifact.applied, concept, attack_probes(concept, 1, 1), steps=2,
                              progress=False, scorer=scorer)  # fmt: skip
        run_attack_suite(target, ["rece_embedding"], tmp_path, scorer=scorer, erasure={"id": 1})
        settings = json.loads((tmp_path / concept_folder(concept) / "attack.json").read_text())
        assert settings["concept"] == concept
        folders.add(concept_folder(concept))
    assert len(folders) == 4 and {p.name for p in tmp_path.iterdir()} == folders
