"""The scaling model (megatron_spava.perf: layer, rates, simulate, fit): its byte counts against the tensors the algorithms actually
exchange (counted inside real gloo runs of spava_attn_func and ring_attn_func), against
hand counts for the algorithms not implemented here (Megatron a2a, all-gather), its
attention work against the keys SPAVA.md's dense mask lets each row see, the overlap
simulation on a hand case, and the fit's out-of-sample error on the 4-GPU runs."""

import json
from dataclasses import replace
import os

import pytest
import torch
import torch.distributed as dist

from megatron_spava import SpavaConfig, SpavaLayout, spava_attn_func
from megatron_spava.algos import RingLayout, ring_attn_func
from megatron_spava.algos.megatron import a2a_feasible, a2a_ops, allgather_ops
from megatron_spava.algos.ring import ring_ops
from megatron_spava.algos.spava.cost import spava_ops
from megatron_spava.testing import run_ranks
from megatron_spava.testing.reference import random_qkv, spava_mask

from megatron_spava.perf.fit import fit, load_measurements
from megatron_spava.perf.layer import layer_ops
from megatron_spava.perf.rates import RateCurve, Rates, call_seconds, measured_curves
from megatron_spava.perf.simulate import predict, simulate_layer
from megatron_spava.perf.inputs import prompt_lengths
from megatron_spava.perf.work import Call, Comm, Hardware, Op, Shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SHAPE = Shape(layers=1, hidden=32, ffn=64, heads=4, kv_heads=2, head_dim=8, act_bytes=4)
CFG = SpavaConfig(budget_align=1, anchor_len=16, passing_len=7, pool_kernel=1)
N, LQ, W = 200, 5, 3


def _counted(algo):
    """Run one layer of `algo` on this rank and return the bytes of every collective it
    issued: ("all_gather", bytes this rank put in, bytes it got out) or ("p2p", sent)."""
    import megatron_spava.distributed as D
    rank, world = dist.get_rank(), dist.get_world_size()
    seen = []
    gather, batch = D._all_gather_single, dist.batch_isend_irecv

    def counting_gather(out, inp, group=None, async_op=False):
        seen.append(("all_gather", inp.numel() * inp.element_size(), out.numel() * out.element_size()))
        return gather(out, inp, group=group, async_op=async_op)

    def counting_batch(ops):
        for op in ops:
            if op.op is dist.isend:
                seen.append(("p2p", op.tensor.numel() * op.tensor.element_size()))
        return batch(ops)

    D._all_gather_single, dist.batch_isend_irecv = counting_gather, counting_batch
    try:
        if algo == "spava":
            layout = SpavaLayout.plan(context_len=N, query_len=LQ, cp_size=world, config=CFG)
            fn = spava_attn_func
        else:
            layout = RingLayout.plan(context_len=N, query_len=LQ, cp_size=world)
            fn = ring_attn_func
        q, k, v = random_qkv(N + LQ, 1, SHAPE.heads, SHAPE.kv_heads, SHAPE.head_dim, seed=0)
        idx = layout.local_indices(rank)
        fn(q[idx], k[idx], v[idx], layout=layout, cp_group=dist.group.WORLD)
    finally:
        D._all_gather_single, dist.batch_isend_irecv = gather, batch
    return seen


@pytest.mark.parametrize("algo", ["spava", "ring"])
def test_bytes_equal_the_tensors_actually_exchanged(algo):
    counted = run_ranks(_counted, W, algo, timeout=60)
    group = list(range(W))
    for r in range(W):
        if algo == "spava":
            layout = SpavaLayout.plan(context_len=N, query_len=LQ, cp_size=W, config=CFG)
            ops = spava_ops(layout, r, SHAPE, 1, group, None)
        else:
            layout = RingLayout.plan(context_len=N, query_len=LQ, cp_size=W)
            ops = ring_ops(layout, r, SHAPE, 1, group, None)
        comms = [o.comm for o in ops if o.comm is not None]
        model = [(c.kind, c.payload) for c in comms]
        real = [(kind, sent) for kind, sent, *_ in counted[r]]
        assert model == real, (r, model, real)
        # What lands on this rank: (W-1) payloads per all-gather, one buffer per P2P step.
        for c, rec in zip(comms, counted[r]):
            b = c.bytes_by_link(gpus_per_node=8)
            received = rec[2] - rec[1] if rec[0] == "all_gather" else rec[1]
            assert b["nvlink_recv"] == received and b["net_recv"] == 0
    if algo == "spava":  # 2 passing blocks of 7 tokens x 2 KV heads x (k|v: 16) floats, then the query
        assert counted[0][0][1] == 7 * 2 * 16 * 4 and counted[0][2][1] == LQ * 4 * 9 * 4
    else:  # W-1 steps of two chunk slots x 2 KV heads x 16 floats
        assert [c[1] for c in counted[0]] == [2 * layout.chunk_len * 2 * 16 * 4] * (W - 1)


def test_bytes_by_link_by_hand():
    ag = Comm("all_gather", list(range(16)), 1000, me=3)
    assert ag.bytes_by_link(8) == dict(nvlink_send=7000, nvlink_recv=7000, net_send=8000, net_recv=8000)
    p2p = Comm("p2p", list(range(16)), 500, me=7, peer=(8, 6))  # the ring's node boundary
    assert p2p.bytes_by_link(8) == dict(nvlink_send=0, nvlink_recv=500, net_send=500, net_recv=0)
    a2a = Comm("all_to_all", [0, 4, 8, 12], 10, me=4)
    assert a2a.bytes_by_link(8) == dict(nvlink_send=10, nvlink_recv=10, net_send=20, net_recv=20)
    ar = Comm("all_reduce", [0, 1], 800, me=0)  # ring all-reduce over 2: half each way, twice
    assert ar.bytes_by_link(8) == dict(nvlink_send=800, nvlink_recv=800, net_send=0, net_recv=0)


def test_megatron_a2a_and_allgather_bytes_by_hand():
    shape = Shape(layers=1, hidden=32, ffn=64, heads=8, kv_heads=4, head_dim=16, act_bytes=2)
    S, world = 64, 4
    ops = a2a_ops(S, world, 1, shape, 1, list(range(world)), None)
    comms = [o.comm for o in ops if o.comm is not None]
    # 16 local tokens; each peer gets its quarter of the heads for them: 2 q + 1 k + 1 v heads
    # of 16 values, 2 bytes; afterwards 2 q heads of output go back.
    assert [c.payload for c in comms] == [16 * (2 + 1 + 1) * 16 * 2, 16 * 2 * 16 * 2]
    assert comms[0].bytes_by_link(8)["nvlink_send"] == 3 * 16 * 4 * 16 * 2
    layout = RingLayout.plan(context_len=60, query_len=4, cp_size=world)  # 8 chunks of 8 tokens
    ops = allgather_ops(layout, 0, shape, 1, list(range(world)), None)
    (ag,) = [o.comm for o in ops if o.comm is not None]
    assert ag.payload == 16 * 4 * 32 * 2  # two chunks' K|V, 4 KV heads, 2 x 16 values
    assert ag.bytes_by_link(8)["nvlink_recv"] == 3 * ag.payload
    assert not a2a_feasible(Shape(), 8) and a2a_feasible(Shape(), 4)  # 7B: 28 / 4 heads


def test_attention_work_equals_the_contract_mask():
    """Keys each row sees (SPAVA.md's dense mask, written independently) against the model's
    attention calls: per block, and the query rows summed over ranks. Causal squares are
    counted as s^2 / 2 by the model, s (s + 1) / 2 by the mask: within s / 2 per square."""
    layout = SpavaLayout.plan(context_len=N, query_len=LQ, cp_size=W, config=CFG)
    q, k, _ = random_qkv(N + LQ, 1, SHAPE.heads, SHAPE.kv_heads, SHAPE.head_dim, seed=0)
    mask = spava_mask(layout, q, k)[0, 0]  # one head: pairs per head
    query_model = 0.0
    for r in range(W):
        ops = spava_ops(layout, r, SHAPE, 1, list(range(W)), None)
        calls = [c for o in ops for c in o.calls]
        seg = layout.segments(r)
        for v, lo, hi in seg.blocks:
            g_lo, g_hi = layout.block_range(v)
            seen = int(mask[g_lo:g_hi].sum())
            own = [c for c in calls if c.rows == hi - lo and c.causal and c.keys == hi - lo]
            prefix = [c for c in calls if c.rows == hi - lo and not c.causal]
            model = sum(c.pairs() for c in own[:1] + prefix[:1])
            assert abs(model - seen) <= (hi - lo) / 2, (r, v, model, seen)
            used = {id(c) for c in own[:1] + prefix[:1]}
            calls = [c for c in calls if id(c) not in used]
        query_model += sum(c.pairs() for c in calls if c.rows == LQ)
        anchor = [c for c in calls if c.rows == layout.anchor_len]
        assert len(anchor) == 1 and anchor[0].pairs() == layout.anchor_len ** 2 / 2  # replicated
    query_seen = int(mask[N:].sum())
    assert abs(query_model - query_seen) <= LQ / 2


def test_ring_work_sums_to_causal_attention():
    layout = RingLayout.plan(context_len=N, query_len=LQ, cp_size=W)
    total = sum(c.pairs() for r in range(W)
                for o in ring_ops(layout, r, SHAPE, 1, list(range(W)), None) for c in o.calls)
    S = N + LQ
    assert abs(total - S * (S + 1) / 2) <= S / 2 * 1 + 2 * W * layout.chunk_len / 2


def test_simulation_exposes_only_what_compute_does_not_cover():
    hw = Hardware(nvlink_alpha_step=0.0, nvlink_busbw=1e9, call_overhead=0.0)
    rates = Rates(dense_per_token=1e-3, dense_const=0.0)
    shape = Shape(layers=1)
    for work, comm in ((5.0, 2.0), (1.0, 3.0)):
        c = Comm("all_gather", [0, 1], int(comm * 1e9), 0)  # comm seconds on 2 ranks
        ops = [[Op(comm=replace(c, me=r)), Op(dense=work * 1e3), Op(wait=0)] for r in range(2)]
        end, *_ = simulate_layer(ops, shape, rates, hw, [0.0, 0.0], 0.0)
        assert end == pytest.approx([max(work, comm)] * 2)
    # A collective starts when the last rank launches it.
    c = Comm("all_gather", [0, 1], int(1e9), 0)
    ops = [[Op(dense=r * 2e3), Op(comm=replace(c, me=r)), Op(wait=0)] for r in range(2)]
    end, *_ = simulate_layer(ops, shape, rates, hw, [0.0, 0.0], 0.0)
    assert end == pytest.approx([3.0, 3.0])


def test_local_tokens_are_the_layouts():
    plan, _ = layer_ops("spava", 131072, 8, 1, Shape())
    _, context, query = prompt_lengths(131072)
    layout = SpavaLayout.plan(context_len=context, query_len=query, cp_size=8)
    assert plan.local_tokens == tuple(layout.local_len(r) for r in range(8))
    tp_plan, _ = layer_ops("spava", 131072, 16, 2, Shape())
    assert tp_plan.cp == 8 and tp_plan.local_tokens == plan.local_tokens


def test_fit_on_two_gpus_predicts_four_gpu_ttft():
    """Out of sample: fitted on 1- and 2-GPU runs only (the kernel curves are single-kernel
    measurements, not fitted), every measured 4-GPU TTFT, 32K to 1M and every variant, is
    within 10%."""
    shape, hw = Shape.of("7b"), Hardware()
    meas = load_measurements()
    rates, report = fit(meas, shape, hw, max_gpus=2)
    assert report["fitted_on"] == ["benchmarks/2026-11-21-h200x2/demo_128k.json",
                                   "benchmarks/2026-11-21-h200x4-v2/prefill_7b_4gpu_merged.json (full, 1 GPU)"]
    sources = {src for c in (rates.curves.causal, rates.curves.full, rates.curves.gemm) for src in c.sources}
    assert not any("4gpu" in src or "h200x4" in src for src in sources), sources
    rows = meas["four_gpu_prefill"]
    assert len(rows) == 36 and {r["n"] for r in rows} >= {32768, 65536, 131072, 262144}
    for m in rows:
        fp = m["algo"] != "spava-no-frame-parallel"
        algo = "spava" if not fp else m["algo"]
        p = predict(algo, m["n"], 4, shape=shape, rates=rates, hw=hw, frame_parallel=fp)
        assert abs(p["ttft"] / m["ttft"] - 1) < 0.10, (m["n"], m["algo"], m["ttft"], p["ttft"])


def _bench(path):
    with open(os.path.join(ROOT, "benchmarks", path)) as f:
        return json.load(f)


def test_kernel_curves_pass_through_the_measured_kernel_times():
    """Each measured single-kernel time (read here from the benchmark JSON, FLOPs counted
    here), as a Call through call_seconds at factor 1, comes back as measured; the GEMM
    curve's slowdown is the measured rate ratio."""
    shape = Shape.of("7b")
    rates, hw = Rates(attention=1.0, model_attn=1.0), Hardware()
    checked = 0
    for path in ["2026-12-01-h200/bench_attention_%d.json" % s for s in (2048, 4096, 8192, 16384)] + [
            "2026-11-21-h200x2/bench_attention.json"]:
        d = _bench(path)
        for r in d["results"]:
            if r["kernel"] != "cudnn":
                continue
            call = Call(r["sq"], r["sk"], r["causal"])
            assert call_seconds(call, shape, rates, hw) == pytest.approx(r["median_ms"] / 1e3, rel=1e-9), (path, r)
            checked += 1
    layers = _bench("2026-12-01-h200/bench_layers.json")["floor"]
    for S, f in layers.items():
        call = Call(int(S), int(S), True)
        assert call_seconds(call, shape, rates, hw) == pytest.approx(f["attention_ms"]["sdpa_cudnn"] / 1e3, rel=1e-9)
        checked += 1
    assert checked == 12
    gemm = rates.curves.gemm
    assert gemm.slowdown(131072) == pytest.approx(layers["32768"]["gemm_tflops"] / layers["131072"]["gemm_tflops"])
    assert gemm.slowdown(8192) == 1.0 and gemm.slowdown(10 ** 7) == gemm.slowdown(131072)  # held outside
    # A measured causal 4096 call is 1.62x slower per FLOP than a 16384 one, as measured.
    small, big = Call(4096, 4096, True), Call(16384, 16384, True)
    per_pair = [call_seconds(c, shape, rates, hw) / c.pairs() for c in (small, big)]
    ratio = per_pair[0] / per_pair[1]
    assert ratio == pytest.approx(652.33 / 464.65, rel=1e-3)


def test_rate_curve_interpolates_monotonically():
    """Between two measured points log(rate) is linear in log(size): it stays between them
    and moves the way the data does (rising to the 16K peak, falling after), never
    overshooting; a call's time never falls as its work grows; the ends are held (the
    smallest call's time below, the last rate above). Bad points are refused."""
    c = RateCurve("hand", ((1.0, 100.0), (4.0, 300.0), (16.0, 200.0)))
    assert c.rate(2.0) == pytest.approx(100.0 * 3 ** 0.5)  # geometric midpoint of 100 and 300
    assert c.rate(8.0) == pytest.approx(300.0 * (2 / 3) ** 0.5)
    assert c.rate(0.5) == 100.0 and c.rate(64.0) == 200.0
    assert c.seconds(0.25) == c.seconds(1.0) == pytest.approx(0.01)  # floor: the smallest call's time
    assert RateCurve("r", c.points, floor=False).seconds(0.25) == pytest.approx(0.0025)
    curves = measured_curves()
    for curve in (curves.causal, curves.full, curves.gemm):
        pts = curve.points
        assert len(pts) >= 2
        for (s0, r0), (s1, r1) in zip(pts, pts[1:]):
            grid = [s0 * (s1 / s0) ** (i / 50) for i in range(51)]
            rates = [curve.rate(x) for x in grid]
            assert rates[0] == pytest.approx(r0) and rates[-1] == pytest.approx(r1)
            steps = [b - a for a, b in zip(rates, rates[1:])]
            assert all(st >= -1e-6 for st in steps) if r1 >= r0 else all(st <= 1e-6 for st in steps)
        if curve is not curves.gemm:
            work = [pts[0][0] * 10 ** (k / 20) for k in range(-40, 20 * 6)]
            times = [curve.seconds(w) for w in work]
            assert all(b >= a * (1 - 1e-12) for a, b in zip(times, times[1:])), curve.name
    causal = dict(curves.causal.points)
    peak = max(causal, key=causal.get)
    assert peak == 4 * 28 * 16384 ** 2 * 128 / 2  # the data rise to 16K tokens and fall after
    with pytest.raises(ValueError, match="increasing size"):
        RateCurve("bad", ((2.0, 1.0), (1.0, 2.0)))
    with pytest.raises(ValueError, match="positive rate"):
        RateCurve("bad", ((1.0, 0.0),))


@pytest.mark.slow
def test_two_gpu_prefill_runs_refine_each_algorithm(tmp_path):
    """The 2-GPU prefill runs the fit lacks today: a bench_prefill JSON of world 2 whose spava
    attention is 1.2x the model's gives spava a 1.2 attention factor, and only spava."""
    import json
    shape, hw = Shape.of("7b"), Hardware()
    base, _ = fit(load_measurements(), shape, hw)
    p = predict("spava", 131072, 2, shape=shape, rates=base, hw=hw)
    llm = p["llm"] + 0.2 * p["attention"]
    run = dict(ttft_median_s=p["vision"] + llm, vision_median_s=p["vision"], llm_median_s=llm,
               attention_share_of_llm=1.2 * p["attention"] / llm, tokens=p["tokens"],
               local_tokens=p["local_tokens"])
    path = tmp_path / "prefill_7b_2gpu.json"
    path.write_text(json.dumps(dict(shape="7b", world=2, runs={"131072": {"spava": run}})))
    meas = load_measurements([str(path)])
    assert len(meas["two_gpu_prefill"]) == 1
    rates, report = fit(meas, shape, hw, max_gpus=2)
    assert rates.algo_attn == {"spava": pytest.approx(1.2, rel=1e-6)}
    assert str(path) + " (2 GPUs)" in report["fitted_on"]
    four = predict("spava", 262144, 4, shape=shape, rates=rates, hw=hw)["attention"]
    assert four == pytest.approx(1.2 * predict("spava", 262144, 4, shape=shape, rates=base, hw=hw)["attention"],
                                 rel=1e-3)
    assert predict("ring", 131072, 4, shape=shape, rates=rates, hw=hw) == \
        predict("ring", 131072, 4, shape=shape, rates=base, hw=hw)


#: The released LLM shapes, from the public config.json of each checkpoint (text_config):
#: (num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
#: head_dim). Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct, OpenGVLab/InternVL3-2B
#: (its Qwen2.5-1.5B LLM), Qwen/Qwen3-VL-8B-Instruct. A new family's bench shape adds its line.
PUBLISHED = {"3b": (36, 2048, 11008, 16, 2, 128), "7b": (28, 3584, 18944, 28, 4, 128),
             "internvl3-2b": (28, 1536, 8960, 12, 2, 128), "qwen3-vl-8b": (36, 4096, 12288, 32, 8, 128)}


def test_shape_of_every_benchmark_shape_is_the_released_config():
    """Shape.of knows every --shape the prefill benchmark accepts (each registered family's
    bench shapes, from the model-family registry), with the released checkpoints' numbers;
    "tiny" is the tiny config.json of the family --model names."""
    from megatron_spava.models import registry
    from megatron_spava.perf import bench_prefill as bp
    shapes = registry.bench_shapes()
    assert set(bp.SHAPES) == set(shapes) and set(shapes) - {"tiny"} == set(PUBLISHED), sorted(shapes)
    for name, want in PUBLISHED.items():
        s = Shape.of(name)
        assert (s.layers, s.hidden, s.ffn, s.heads, s.kv_heads, s.head_dim) == want, name
    assert Shape.of("7b") == Shape()  # the dataclass's defaults are the 7B shape
    for family in registry.names():
        text = registry.get_family(family).tiny().tiny_hf_config()["text_config"]
        s = Shape.of("tiny", family)
        heads = text["num_attention_heads"]
        assert (s.layers, s.hidden, s.ffn, s.heads, s.kv_heads, s.head_dim) == (
            text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"], heads,
            text["num_key_value_heads"], text.get("head_dim") or text["hidden_size"] // heads), family
    with pytest.raises(ValueError, match="unknown benchmark shape '13b'"):
        Shape.of("13b")
    with pytest.raises(ValueError, match="internvl3 shape, not qwen2_5_vl"):
        Shape.of("internvl3-2b", "qwen2_5_vl")
