"""One reading of a concept: what is tokenised, compared, looked up in the micro world and named on disk."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

import erase
from erase.core.inputs import check_concept_text
from erase.core.layout import default_output_folder
from erase.workflow import check_probes, micro_world_name
from evals.attacks import attack_labels, attack_probes
from evals.probes import world_concept
from evals.suites import world_suite
from pipelines import load_pipeline
from pipelines.tokenizer import concept_folder, concept_text, offline_clip_tokenizer

SCRIPT = Path(__file__).parents[1] / "scripts" / "erase.py"
FULLWIDTH = "\uff56\uff41\uff4e \uff47\uff4f\uff47\uff48"  # "van gogh" in fullwidth letters
TRICKY = ["Van  Gogh", FULLWIDTH, "van-gogh", "\U0001f3a8", "\U0001f58c\ufe0f", "Stra\u00dfe", "a&amp;b", "\u2168",
          "\ufb01ne", "CAF\u00c9", "cafe\u0301", "\u00a0monet\u3000", "\u0130stanbul", "x" * 100]  # fmt: skip


def test_the_reading_is_what_the_tokenizer_makes_of_the_text_and_fullwidth_reads_as_ascii():
    tokenizer = offline_clip_tokenizer()
    plain = tokenizer("van gogh")["input_ids"]
    assert tokenizer(FULLWIDTH)["input_ids"] != plain  # CLIP's BPE alone: byte tokens, another concept to the model
    assert concept_text(FULLWIDTH) == "van gogh" and tokenizer(concept_text(FULLWIDTH))["input_ids"] == plain
    assert concept_text("  Van\tGOGH ") == "van gogh" and concept_text("a&amp;b") == "a&b"


@pytest.mark.parametrize("text", TRICKY)
def test_the_reading_is_idempotent_and_its_folder_is_stable(text):
    reading = concept_text(text)
    assert concept_text(reading) == reading
    assert concept_folder(text) == concept_folder(reading) and "/" not in concept_folder(text)
    assert 0 < len(concept_folder(text)) <= 60


def test_distinct_readings_get_distinct_folders_and_plain_names_keep_their_slug():
    readings = {concept_text(t) for t in TRICKY}
    folders = {concept_folder(t) for t in TRICKY}
    assert len(folders) == len(readings)  # "van gogh" and its fullwidth spelling are one reading, one folder
    assert concept_folder("Van Gogh") == "van-gogh" and concept_folder("monet") == "monet"
    assert concept_folder("van-gogh") != concept_folder("van gogh")
    assert concept_folder("\U0001f3a8") != concept_folder("\U0001f58c\ufe0f")
    assert concept_folder("a" * 59 + "b") != concept_folder("a" * 59 + "c")  # past the length: a hash tells apart
    assert default_output_folder(["van gogh"], "uce") == Path("erased/van-gogh-uce")
    assert default_output_folder(["\U0001f3a8"], "uce") != default_output_folder(["\U0001f58c\ufe0f"], "uce")
    many = [f"concept number {i}" for i in range(12)]
    assert default_output_folder(many, "uce") != default_output_folder([*many[:-1], "another"], "uce")
    assert len(default_output_folder(many, "uce").name) <= 90


def test_a_concept_spec_keeps_the_reading_and_compares_by_it():
    spec = erase.ConceptSpec((FULLWIDTH, "Monet"), guides=("Art",), preserve=("PICASSO", "picasso"))
    assert spec.targets == ("van gogh", "monet") and spec.guides == ("art",) and spec.preserve == ("picasso",)
    with pytest.raises(ValueError, match="all read as 'van gogh'"):
        erase.ConceptSpec((FULLWIDTH, "van gogh"))
    with pytest.raises(ValueError, match="is the concept itself"):
        erase.ConceptSpec((FULLWIDTH,), guides=("VAN GOGH",))
    erase.ConceptSpec(("van gogh", "van-gogh"))  # two readings, two concepts
    with pytest.raises(ValueError, match="reads as empty text"):
        check_concept_text("&nbsp;", "concept to erase")


def test_erasing_the_fullwidth_spelling_is_erasing_the_concept(wrapper):
    fullwidth = erase.erase_concepts(wrapper, erase.ConceptSpec((FULLWIDTH,)), "uce")
    plain = erase.erase_concepts(wrapper, erase.ConceptSpec(("van gogh",)), "uce")
    assert list(fullwidth.concepts) == list(plain.concepts) == ["van gogh"]
    assert fullwidth.deltas.keys() == plain.deltas.keys()
    assert all(torch.equal(fullwidth.deltas[k], plain.deltas[k]) for k in plain.deltas)


@pytest.mark.parametrize(
    "name, world_name",
    [("Van Gogh", "van gogh"), ("VINCENT  VAN GOGH", "vincent van gogh"), ("van-gogh", "van gogh"),
     ("a circle", "circle"), ("\uff43\uff4f\uff42\uff41\uff4c\uff54", "cobalt"), ("Monet style", "monet"),
     ("a dog", None), ("\U0001f3a8", None), ("starry night style", "starry night style")],
)  # fmt: skip
def test_the_world_lookup_reads_names_as_the_tokenizer_does(name, world_name):
    assert world_concept(name) == world_name


@pytest.fixture(scope="module")
def micro():
    return load_pipeline("micro")


def test_the_checks_probes_take_any_concept_before_any_edit(micro):
    targets, preserved, labels = check_probes(micro, ["Van Gogh", "a dog", "a circle"], [], 6, 0)
    judged = {(p.concept, p.category) for p in targets}
    assert judged == {("van gogh", "style"), ("circle", "object"), ("a dog", "concept")}
    assert "a dog" in labels["concept"] and len(labels["concept"]) > 1 and preserved
    assert all(p.concept in labels[p.category] for p in [*targets, *preserved])


def test_the_script_erases_a_capitalised_world_name_and_an_unknown_one_with_its_check(tmp_path, capsys):
    out = tmp_path / "out"
    code = runpy.run_path(str(SCRIPT))["main"](
        ["--concept", "Van Gogh", "--concept", "a dog", "--method", "esd", "--steps", "1", "--set", "pool_images=1",
         "--set", "pool_steps=2", "--check-images", "2", "--check-steps", "2", "--out", str(out), "--quiet"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Erased 'van gogh', 'a dog'" in captured.out and (out / "before_after.png").is_file()


@pytest.mark.parametrize("name, near", [("van gohg", "van gogh"), ("VanGogh", "van gogh"), ("a circl", "circle"),
                                        ("Monnet", "monet"), ("hearts", "heart")])  # fmt: skip
def test_a_near_miss_of_a_world_name_is_refused_with_the_near_names_before_any_edit(micro, name, near):
    with pytest.raises(ValueError, match=f"^concept to erase '{name}' is no micro-world name; near ones: '{near}'"):
        check_probes(micro, [name], [], 6, 0)
    with pytest.raises(ValueError, match=f"^preserved concept '{name}' is no micro-world name"):
        check_probes(micro, ["van gogh"], [name], 6, 0)


def test_the_script_refuses_a_misspelt_world_name_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    code = runpy.run_path(str(SCRIPT))["main"](
        ["--concept", "Van Gohg", "--method", "esd", "--steps", "1000", "--out", str(out), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "near ones: 'van gogh'" in err and "--no-check" in err, err
    assert not out.exists()


def test_a_world_name_in_any_spelling_is_that_name_and_only_world_names_do_where_the_world_is_all():
    assert micro_world_name("VINCENT  Van-Gogh", "concept", outside=None) == "vincent van gogh"
    assert micro_world_name("a dog", "concept", outside="probed generically") is None
    with pytest.raises(ValueError, match="^concept 'a dog' is no micro-world name; the world's concepts: circle, "):
        micro_world_name("a dog", "concept", outside=None)


def test_the_attack_table_reads_its_concept_as_erase_does_and_refuses_a_misspelt_one_at_once(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT.with_name("attack_table.py")))["main"]
    code = main(["--concept", "Van Gohg", "--out", str(tmp_path / "table")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--concept 'Van Gohg' is no micro-world name; near ones: 'van gogh'" in err
    assert not (tmp_path / "table").exists()


def test_the_audit_suite_and_the_attack_probes_read_a_world_name_in_any_spelling_as_the_check_does():
    assert world_suite(["a circle", "Van-Gogh"]).rows == world_suite(["circle", "van gogh"]).rows
    assert attack_probes("van-gogh", 6, 1) == attack_probes("van gogh", 6, 1)
    assert attack_labels("a circle") == attack_labels("circle") and "circle" in attack_labels("a circle")["object"]
    assert {p.category for p in attack_probes("a dog", 3)} == {"concept"}
    assert "a dog" in attack_labels("a dog")["concept"]
