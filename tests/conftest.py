import os

# Nothing in the tests may touch the network: the hub is off for every library that asks it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The README's command runs two pytest-xdist workers (``-n 2``) on a 2-core machine: one torch thread each, in the
# scripts they start too (the variables are inherited). Alone, pytest runs torch on two threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)

# The time ``pytest -m "not slow"`` takes, read off a run of more than that subset, so that ``.ci/run`` runs the
# suite once and prints both times: collection plus the setup, call and teardown of every test not marked slow. A
# module-scoped fixture built during a slow test counts as slow here, though the subset alone would build it too.
_SESSION = {"start": 0.0, "collected": 0.0}
_SECONDS = {"fast": 0.0, "slow": 0.0}
_TESTS = {"fast": set(), "slow": set()}


def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSION["start"] = time.perf_counter()


def pytest_collection_finish(session: pytest.Session) -> None:
    _SESSION["collected"] = time.perf_counter()


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: pytest without it must not reject this file
def pytest_xdist_node_collection_finished(node, ids) -> None:  # noqa: ANN001 - xdist's WorkerController
    """Under xdist the workers collect; the first to finish marks the end of collection (worker start-up included)."""
    _SESSION["collected"] = _SESSION["collected"] or time.perf_counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    kind = "slow" if "slow" in report.keywords else "fast"
    _SECONDS[kind] += report.duration
    _TESTS[kind].add(report.nodeid)


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's TerminalReporter
    if not _TESTS["fast"] and not _TESTS["slow"]:
        return
    collection = _SESSION["collected"] - _SESSION["start"]
    fast = collection + _SECONDS["fast"]
    terminalreporter.write_line(
        f"fast subset (-m 'not slow'): {fast:.0f} s for {len(_TESTS['fast'])} tests ({collection:.0f} s of it "
        f"collection); slow tests: {_SECONDS['slow']:.0f} s for {len(_TESTS['slow'])}"
    )


@pytest.fixture
def tiny():
    from pipelines import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture
def tiny_sdxl():
    from pipelines import load_pipeline

    return load_pipeline("tiny-sdxl")


# The audit tests' shared models: a tiny random CLIP as the scorer, the tiny pipeline and one UCE artifact on it,
# built once per test module.
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_clip import save_clip_folder, tiny_clip_config
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(image_size=32, patch_size=8)).eval()
    return save_clip_folder(model, tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(clip_dir: Path):
    from evals.scorer import ClipScorer

    return ClipScorer.from_pretrained(str(clip_dir), progress=False)


@pytest.fixture(scope="module")
def wrapper():
    from pipelines import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def artifact_dir(wrapper, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import erase

    artifact = erase.erase_concepts(wrapper, erase.ConceptSpec(("van gogh",), preserve=("monet",)), "uce")
    folder = tmp_path_factory.mktemp("art") / "vg"
    erase.save_artifact(artifact, folder, wrapper, export_pipeline=False)
    return folder
