import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLOPT_LOAD_PLUGINS", "")   # vlopt's own tests never load installed plugins
os.environ["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"
for _name in ("torchao", "torch.utils._pytree", "bitsandbytes"):
    logging.getLogger(_name).setLevel(logging.ERROR)

import pytest  # noqa: E402


# The small random-weight models: for tests of shapes, numerics and plumbing, where answers need not
# mean anything (the trained `tiny` models are in the quality tests).
@pytest.fixture
def eventgpt():
    from vlopt.models import load_model
    return load_model("eventgpt", preset="tiny-random", device="cpu")


@pytest.fixture
def videollava():
    from vlopt.models import load_model
    return load_model("videollava", preset="tiny-random", device="cpu")


@pytest.fixture(params=["eventgpt", "videollava"])
def tiny_model(request):
    from vlopt.models import load_model
    return load_model(request.param, preset="tiny-random", device="cpu")


@pytest.fixture(scope="session")
def trained_eventgpt() -> dict:
    """The shipped trained EventGPT (`tiny`) as a recipe's `model:` block."""
    from vlopt.models import load_model

    assert load_model("eventgpt", preset="tiny", device="cpu").weights_trained
    return {"name": "eventgpt", "preset": "tiny", "dtype": "float32", "device": "cpu"}
