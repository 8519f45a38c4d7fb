import os

# Nothing in the tests may touch the network: the hub is off for every library that asks it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def tiny():
    from pipelines import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture
def tiny_sdxl():
    from pipelines import load_pipeline

    return load_pipeline("tiny-sdxl")
