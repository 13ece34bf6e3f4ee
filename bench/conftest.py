"""pytest-benchmark suites for stage 4. CPU (tiny models) by default; `--gpu` runs the `7b` models on
CUDA instead. `--gate-rounds N` sets the timed rounds per side (default 5)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLOPT_LOAD_PLUGINS", "")
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="benchmark the 7b presets on CUDA")
    parser.addoption("--gate-rounds", type=int, default=5, help="timed rounds per side of each gate")


def device_kind() -> str:
    """The key into minimums.yaml and the benchmark storage folder: 'cpu' or the GPU model."""
    import torch
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return next((k for k in ("h100", "h200", "a100") if k in name), name.replace(" ", "_"))


def pytest_benchmark_update_machine_info(config, machine_info):
    # pytest-benchmark's machine id ignores the GPU; record it so stored runs are told apart.
    from vlopt.machine import machine_info as vlopt_machine
    info = vlopt_machine()
    machine_info.update(gpu=info["gpu"], driver=info["driver"], cuda=info["cuda"], torch=info["torch"],
                        transformers=info["transformers"], device_kind=device_kind())


@pytest.fixture(scope="session")
def bench_settings(request):
    gpu = request.config.getoption("--gpu")
    if gpu:
        import torch
        if not torch.cuda.is_available():
            pytest.exit("--gpu needs a CUDA GPU", returncode=2)
    return {"gpu": gpu, "rounds": request.config.getoption("--gate-rounds"), "kind": device_kind()}
