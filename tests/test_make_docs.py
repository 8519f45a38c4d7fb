"""scripts/make_docs.py: the measured tables are written from JSON, follow it, and the committed ones are current."""

import json
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = runpy.run_path(str(ROOT / "scripts" / "make_docs.py"), run_name="make_docs_script")
MAIN, MATRIX = SCRIPT["main"], SCRIPT["matrix_table"]

MEASURED = {
    "concepts": ["van gogh"], "method": "uce", "guides": ["art"], "preserve": [],
    "groups": {
        "erased: van gogh": {"n": 8, "clip_before": 1.0, "clip_after": 0.125, "judge_before": 1.0,
                             "judge_after": 0.0, "after_reads_as": {"warhol": 7, "van gogh": 1}},
        "kept: objects": {"n": 8, "clip_before": 0.875, "clip_after": 0.75, "judge_before": 1.0, "judge_after": 0.875},
    },
}  # fmt: skip


def _rate(value: float, n: int = 4) -> dict:
    return {"value": value, "low": max(0.0, value - 0.3), "high": min(1.0, value + 0.3), "n": n, "k": round(value * n)}


ATTACKS = {
    "original": {"rows": {}, "preserved": {"clip": _rate(1.0), "judge": _rate(1.0)}},
    "uce": {
        "rows": {
            "original": {
                "row": "original",
                "clip": _rate(1.0),
                "judge": _rate(1.0),
                "kept": {"clip": _rate(1.0), "judge": _rate(0.75)},
            },
            "unattacked": {
                "row": "unattacked",
                "clip": _rate(0.0),
                "judge": _rate(0.0),
                "kept": {"clip": _rate(0.75), "judge": _rate(1.0)},
            },
            "rece_embedding": {
                "row": "rece_embedding",
                "clip": _rate(0.75),
                "judge": _rate(0.5),
                "seconds": 8.0,
                "kept": {"clip": _rate(0.25), "judge": _rate(0.0)},
            },
        },
        "preserved": {"clip": _rate(0.75), "judge": _rate(1.0)},
    },
}


def _doc_root(tmp_path: Path, kind: str, source: str, data: dict) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / source).write_text(json.dumps(data))
    doc = tmp_path / "docs" / "x.md"
    doc.write_text(f"# x\n\nbefore\n\n<!-- table: {kind} {source} -->\nhand-typed\n<!-- end table -->\n\nafter\n")
    return doc


def test_an_erasure_table_is_written_from_its_json_and_follows_it(tmp_path):
    doc = _doc_root(tmp_path, "erasure", "docs/results/m.json", MEASURED)
    assert MAIN(["--check", "--root", str(tmp_path)]) == 1  # the hand-typed block differs from its JSON
    assert MAIN(["--root", str(tmp_path)]) == 0
    text = doc.read_text()
    assert "hand-typed" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("\n\nafter\n")
    assert "| erased: van gogh | 8 | 100.0 -> 12.5% | 100.0 -> 0.0% | warhol 88%, van gogh 12% |" in text
    assert "| kept: objects | 8 | 87.5 -> 75.0% | 100.0 -> 87.5% |  |" in text
    assert MAIN(["--check", "--root", str(tmp_path)]) == 0
    changed = json.loads(json.dumps(MEASURED))
    changed["groups"]["kept: objects"]["clip_after"] = 0.625
    (tmp_path / "docs/results/m.json").write_text(json.dumps(changed))
    assert MAIN(["--check", "--root", str(tmp_path)]) == 1
    assert doc.read_text() == text  # --check changes nothing
    assert MAIN(["--root", str(tmp_path)]) == 0
    assert "| kept: objects | 8 | 87.5 -> 62.5% |" in doc.read_text() and "87.5 -> 75.0%" not in doc.read_text()


def test_an_attack_table_is_written_from_table_json(tmp_path):
    doc = _doc_root(tmp_path, "attacks", "docs/results/t/table.json", ATTACKS)
    assert MAIN(["--root", str(tmp_path)]) == 0
    lines = doc.read_text().splitlines()
    assert "| method | unattacked | rece_embedding | preserved | others kept, least |" in lines
    assert "| original | 100 / 100 [70-100] |  | 100 / 100 [70-100] | 100 / 75 |" in lines
    # the least kept is the erased model's (the original's 100 / 75 is not its)
    assert "| uce | 0 / 0 [0-30] | 75 / 50 [45-100] | 75 / 100 [45-100] | 25 / 0 rece_embedding |" in lines
    assert any(line.startswith("Wall time per attack") and "rece_embedding 8 s" in line for line in lines)
    # a prompt attack writes its own text: what its images keep is not the erasure's doing, and is not the least
    attacks = json.loads(json.dumps(ATTACKS))
    zero = {"clip": _rate(0.0), "judge": _rate(0.0)}
    prompt_row = {"row": "ring_a_bell_prompt", "kind": "prompt", **zero, "kept": zero}
    attacks["uce"]["rows"]["ring_a_bell_prompt"] = prompt_row
    (tmp_path / "docs/results/t/table.json").write_text(json.dumps(attacks))
    assert MAIN(["--root", str(tmp_path)]) == 0
    assert "| 75 / 100 [45-100] | 25 / 0 rece_embedding |" in doc.read_text()


def test_a_suite_table_has_a_row_per_concept_of_one_erasure(tmp_path):
    rows = ATTACKS["uce"]["rows"]
    for concept, rate in (("van gogh", 0.75), ("monet", 0.25)):
        suite = {"concept": concept, "n": 4, "split": "report", "budget": 1.0,
                 "erasure": {"method": "uce", "concepts": ["van gogh", "monet"]},
                 "rows": [rows["original"], rows["unattacked"], {**rows["rece_embedding"], "clip": _rate(rate)}],
                 "threats": {}}  # fmt: skip
        folder = tmp_path / "docs" / "s" / concept.replace(" ", "-")
        folder.mkdir(parents=True)
        (folder / "attacks.json").write_text(json.dumps(suite))
    doc = tmp_path / "docs" / "x.md"
    doc.write_text("<!-- table: suite docs/s/*/attacks.json -->\n<!-- end table -->\n")
    assert MAIN(["--root", str(tmp_path)]) == 0
    lines = doc.read_text().splitlines()
    assert "`scripts/attack.py` on uce erasing van gogh, monet (report seeds, budget x1, 4 probes a row):" in lines
    assert "| concept | unattacked | rece_embedding | preserved | others kept, least |" in lines
    assert "| van gogh | 0 / 0 [0-30] | 75 / 50 [45-100] | - | 25 / 0 rece_embedding |" in lines
    assert "| monet | 0 / 0 [0-30] | 25 / 50 [0-55] | - | 25 / 0 rece_embedding |" in lines


def test_a_block_without_its_json_is_left_as_recorded(tmp_path, capsys):
    doc = _doc_root(tmp_path, "erasure", "docs/results/m.json", MEASURED)
    (tmp_path / "docs/results/m.json").unlink()
    before = doc.read_text()
    assert MAIN(["--root", str(tmp_path)]) == 0 and MAIN(["--check", "--root", str(tmp_path)]) == 0
    assert doc.read_text() == before and "pending" in capsys.readouterr().out


def test_an_unknown_kind_is_one_line_and_exit_2(tmp_path, capsys):
    doc = _doc_root(tmp_path, "erasure", "docs/results/m.json", MEASURED)
    doc.write_text(doc.read_text().replace("table: erasure", "table: nonsense"))
    assert MAIN(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nonsense" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("check", [[], ["--check"]])
def test_a_root_without_documentation_is_one_line_and_exit_2(tmp_path, capsys, check):
    """--check on a folder that is no checkout checked nothing and passed."""
    assert MAIN([*check, "--root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "holds no documentation" in err and len(err.splitlines()) == 1


def test_the_committed_docs_are_up_to_date_with_their_json(capsys):
    assert MAIN(["--check"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "pipelines/saes/README.md: 1 table(s) up to date" in out  # at least one table is generated, not pending
    assert "README.md: 1 table(s) up to date" in out.splitlines()  # the method x architecture matrix
    card = (ROOT / "pipelines/saes/README.md").read_text()
    for sae_json in sorted((ROOT / "pipelines/saes").glob("*/sae.json")):
        fvu = json.loads(sae_json.read_text())["quality"]["fvu"]
        assert f"| {fvu:.3f} (" in card


def test_the_readme_stays_a_guide_of_at_most_12_kb():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 12 * 1024, f"README.md is {len(readme)} bytes: measurements go to docs/ or the model card"


def test_the_matrix_table_names_every_method_and_attack_once_and_says_why_not():
    import erase
    from evals.attacks import available_attacks

    table = MATRIX(())
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = [name.strip(" `") for row in rows for name in row.split(" | ")[0].strip("| ").split(",")]
    assert sorted(named) == sorted(erase.available_methods() + available_attacks())
    for row in rows:
        for cell in row.strip("|").split(" | ")[1:]:
            number = cell.strip().removeprefix("no (").removesuffix(")")
            assert cell.strip().startswith("yes") or f"({number}) " in table, cell  # every "no" has its reason


def test_tables_with_prompt_forms_and_threat_models_show_them(tmp_path):
    forms = {"alone": {"clip_after": 0.0}, "one_other": {"clip_after": 0.25}, "both_others": {"clip_after": 0.5}}
    measured = json.loads(json.dumps(MEASURED))
    measured.update(schema_version=2, split="report", forms=["alone", "one_other", "both_others"])
    measured["groups"]["erased: van gogh"].update(forms=forms, forms_differ=True)
    doc = _doc_root(tmp_path, "erasure", "docs/results/m.json", measured)
    attacks = json.loads(json.dumps(ATTACKS))
    worst = {"clip": {"row": "rece_embedding", **_rate(0.75)}, "judge": {"row": "rece_embedding", **_rate(0.5)}}
    attacks["uce"]["threats"] = {
        "prompt": {"attacks": [], "clip": None, "judge": None, "holds": None},
        "embedding": {"attacks": ["rece_embedding"], **worst, "holds": False},
    }
    (tmp_path / "docs" / "t").mkdir()
    (tmp_path / "docs" / "t" / "table.json").write_text(json.dumps(attacks))
    doc.write_text(doc.read_text() + "\n<!-- table: attacks docs/t/table.json -->\n<!-- end table -->\n")
    assert MAIN(["--root", str(tmp_path)]) == 0
    lines = doc.read_text().splitlines()
    assert any(line.startswith("`m.json`: uce erasing van gogh") and line.endswith("; report seeds") for line in lines)
    erased = "| erased: van gogh | 8 | 100.0 -> 12.5% | 100.0 -> 0.0% | 0 / 25 / 50 ! | warhol 88%, van gogh 12% |"
    assert erased in lines and "| kept: objects | 8 | 87.5 -> 75.0% | 100.0 -> 87.5% | - / - / - |  |" in lines
    head = (
        "| method | unattacked | rece_embedding | preserved | others kept, least | worst: prompt | worst: embedding |"
    )
    assert head in lines
    uce = ("| uce | 0 / 0 [0-30] | 75 / 50 [45-100] | 75 / 100 [45-100] | 25 / 0 rece_embedding | - "
           "| 75 / 50 [45-100] rece_embedding |")  # fmt: skip
    assert uce in lines
