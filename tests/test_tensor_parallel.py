"""Two CPU processes with the gloo backend: the sharded decoder gives the single-process logits."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, size, port, model, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", VLOPT_LOAD_PLUGINS="")
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:

        from vlopt.decode import teacher_forced_logits
        from vlopt.models import get_workload, load_model
        from vlopt.plugins import get_registry

        vlm = load_model(model, preset="tiny-random", dtype="float32", device="cpu")
        wl = get_workload(vlm.default_workload)
        inp = vlm.run_stages(None, wl, "What is here?")
        tokens = vlm.stage4(inp, new_tokens=8).tokens
        single = teacher_forced_logits(vlm, inp, tokens)
        # fastv's hooks stay inert outside its engine, so the plain comparison below is unaffected;
        # sharded, each rank sees half the heads and the ranking all-reduces their attention.
        get_registry().apply(vlm, {"type": "prune_visual", "method": "fastv", "keep": 0.3})
        single_fastv = vlm.decoding.score(inp, tokens)
        outcome = get_registry().apply(vlm, {"type": "tensor_parallel", "size": size})
        sharded = teacher_forced_logits(vlm, inp, tokens)
        sharded_fastv = vlm.decoding.score(inp, tokens)
        q = vlm.text_model.layers[0].self_attn.q_proj.weight
        torch.save({"single": single, "sharded": sharded,
                    "single_fastv": single_fastv, "sharded_fastv": sharded_fastv, "q_rows": q.shape[0],
                    "tokens": tokens, "tp_tokens": vlm.stage4(inp, new_tokens=8).tokens,
                    "info": outcome.info}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model", ["eventgpt", "videollava"])
def test_two_gloo_ranks_match_the_single_process_logits(tmp_path, model):
    mp.spawn(_worker, args=(2, _free_port(), model, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert r0["q_rows"] == r1["q_rows"] == 64 // 2           # each rank holds half the heads
    for r in (r0, r1):
        torch.testing.assert_close(r["sharded"], r["single"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["sharded_fastv"], r["single_fastv"], rtol=1e-5, atol=1e-5)
    assert (r0["single_fastv"] - r0["single"]).abs().max() > 1e-3          # fastv did prune
    torch.testing.assert_close(r0["sharded"], r1["sharded"], rtol=0, atol=0)   # ranks agree exactly
    assert r0["info"] == {"rank": 0, "world_size": 2} and r1["info"]["rank"] == 1


def _fast_decode_worker(rank, size, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", VLOPT_LOAD_PLUGINS="")
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        from vlopt.decode import teacher_forced_logits
        from vlopt.models import get_workload, load_model
        from vlopt.plugins import get_registry

        vlm = load_model("videollava", preset="tiny-random", dtype="float32", device="cpu")
        inp = vlm.run_stages(None, get_workload("videollava"), "What is here?")
        tokens = vlm.stage4(inp, new_tokens=8).tokens
        single = teacher_forced_logits(vlm, inp, tokens)
        get_registry().apply(vlm, {"type": "tensor_parallel", "size": size})
        get_registry().apply(vlm, {"type": "fast_decode"})      # compiled; the all-reduce is in the graph
        result = vlm.stage4(inp, new_tokens=8)
        torch.save({"single": single, "engine": vlm.decoding.score(inp, tokens), "tokens": tokens,
                    "engine_tokens": result.tokens, "heads": vlm.decoding.engine.decoder.n_heads,
                    "fused": vlm.decoding.engine.fused is not None, "compile_s": result.info["compile_s"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fast_decode_on_two_gloo_ranks_matches_the_single_process(tmp_path):
    mp.spawn(_fast_decode_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for i in range(2):
        r = torch.load(tmp_path / f"rank{i}.pt", weights_only=True)
        assert r["heads"] == 4 // 2 and r["fused"] and r["compile_s"] > 0   # its own shard, fused, compiled
        torch.testing.assert_close(r["engine"], r["single"], rtol=1e-5, atol=1e-5)
        # greedy tokens agree up to a position where the single-process top two are near-tied
        first = next((j for j, (a, b) in enumerate(zip(r["engine_tokens"], r["tokens"])) if a != b), None)
        if first is not None:
            assert float(r["single"][first].topk(2).values.diff().abs()) < 1e-4


def test_without_torchrun_it_is_a_clear_error(eventgpt):
    from vlopt.errors import VloptError
    from vlopt.plugins import get_registry
    with pytest.raises(VloptError, match="torchrun --nproc-per-node 2"):
        get_registry().apply(eventgpt, {"type": "tensor_parallel"})


def test_torchrun_apply_writes_once_from_rank_0_with_full_weights(tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    recipe = tmp_path / "tp.yaml"
    recipe.write_text("model: {name: eventgpt, preset: tiny-random, dtype: float32, device: cpu}\n"
                      "benchmark: {samples: 1, warmup: 0, new_tokens: 4}\n"
                      "passes:\n  - {type: tensor_parallel, size: 2}\noutput: out\n")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "vlopt.cli",
                           "-q", "apply", str(recipe)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "VLOPT_LOAD_PLUGINS": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("# vlopt report") == 1                    # rank 0 alone reports
    report = json.loads((tmp_path / "out" / "vlopt_report.json").read_text())
    row = report["passes"][0]
    assert row["status"] == "applied" and row["fidelity"]["first_divergence"] is None
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:   # unsharded weights saved
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [64, 64]
    # `vlopt bench` on that output under torchrun: the pass is replayed (sharded again), rank 0 reports
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "vlopt.cli",
                           "-q", "bench", "--model", str(tmp_path / "out"), "--samples", "1", "--warmup", "0",
                           "--new-tokens", "4", "--json", str(tmp_path / "bench.json")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "VLOPT_LOAD_PLUGINS": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("stage-4 s") == 1
    assert json.loads((tmp_path / "bench.json").read_text())["stage4"]["new_tokens"] == 4
    # and without torchrun it is the tensor_parallel pass's own clear error
    proc = subprocess.run([sys.executable, "-m", "vlopt.cli", "bench", "--model", str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "torchrun --nproc-per-node 2" in proc.stderr
