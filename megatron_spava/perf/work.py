"""What one layer costs one rank, as data: the model's shape, the hardware's constants, and
the steps of a layer (attention calls, dense work, collectives, waits). Each algorithm's
cost model (`Algorithm.cost` in the registry) turns a `LayerRequest` into `LayerWork`;
the scaling model and the roofline read only these types, never an algorithm by name."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from ..config import SpavaConfig


# ---------------------------------------------------------------------------------------
# Shapes and hardware
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What the traffic and FLOP counts need of a model. heads/kv_heads/head_dim: the LLM's
    attention; hidden, ffn, layers: its dense part; act_bytes: activation element size
    (bf16: 2); weight_bytes likewise; tokens_per_group: LLM tokens per frame group."""

    layers: int = 28
    hidden: int = 3584
    ffn: int = 18944
    heads: int = 28
    kv_heads: int = 4
    head_dim: int = 128
    act_bytes: int = 2
    weight_bytes: int = 2
    tokens_per_group: int = 256

    @classmethod
    def of(cls, name: str, model: str = "auto") -> "Shape":
        """The LLM shape of the prefill benchmark's --shape `name`: any registered model
        family's bench shape ("3b", "7b", "internvl3-2b", "qwen3-vl-8b", ...; "tiny": the
        tiny config of `model`'s family), from the family's config in the model-family
        registry (`models.registry.bench_config`). tokens_per_group stays 256: every
        family's benchmark prompt has 256 video tokens per frame group."""
        from megatron_spava.models.registry import bench_config
        return cls.of_config(bench_config(name, model))

    @classmethod
    def of_config(cls, cfg) -> "Shape":
        """The LLM shape of a model family's config (num_layers, hidden_size,
        intermediate_size, num_heads, num_kv_heads, head_dim: every family's config has them)."""
        return cls(layers=cfg.num_layers, hidden=cfg.hidden_size, ffn=cfg.intermediate_size,
                   heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (QKV with bias, output projection, SwiGLU MLP, norms)."""
        h, d = self.hidden, self.head_dim
        qkv = h * (self.heads + 2 * self.kv_heads) * d + (self.heads + 2 * self.kv_heads) * d
        return qkv + self.heads * d * h + 3 * h * self.ffn + 2 * h

    @property
    def flop_per_pair(self) -> int:
        """Attention FLOPs per (query row, key) over all query heads: 4 * hq * d."""
        return 4 * self.heads * self.head_dim


@dataclass(frozen=True)
class Hardware:
    """Link and chip constants; `source` says which are measured and which assumed."""

    gpus_per_node: int = 8
    nvlink_alpha_step: float = 12.0e-6   # s per ring step (fitted through the 2 measured points)
    nvlink_busbw: float = 331e9          # B/s (fitted through the 2 measured points)
    net_bw: float = 400e9 / 8 * 0.9      # B/s per GPU: 400 Gb/s at 90% (assumed)
    net_alpha_step: float = 10e-6        # s per ring step that crosses nodes (assumed)
    call_overhead: float = 5e-6          # s per LSE merge kernel call (assumed)
    source: Dict[str, str] = field(default_factory=lambda: {
        "nvlink": "measured 2026-11-21, 4x H200 NV18: NCCL all-gather bus bandwidth 265 GB/s at "
                  "16 MB per rank, 326 GB/s at 256 MB (../shared/ENVIRONMENT.md); t = (W-1) * "
                  "(alpha + m / B) through both points gives alpha 12 us per step, B 331 GB/s",
        "network": "assumed: 400 Gb/s per GPU (the issue's cluster) at 90% efficiency = 45 GB/s, "
                   "10 us per step crossing nodes (findings repeat the stall analysis at 5 and 20 us); "
                   "never measured here (no multi-node machine)",
        "p2p": "assumed: P2P over NVLink at the all-gather bus bandwidth",
        "collectives_across_nodes": "assumed: NCCL rings use one NIC per GPU (rail-aligned), so a "
                                    "ring collective over k ranks per node moves min(NVLink, k x NIC)",
    })


def nvlink_fit(points=((16 * 2 ** 20, 265e9), (256 * 2 ** 20, 326e9)), world: int = 4):
    """(alpha per step, bus bandwidth) through measured all-gather (bytes per rank, busbw)
    points, under t = (W-1) * alpha + (W-1) * m / B (busbw = (W-1) m / t)."""
    (m1, b1), (m2, b2) = points
    t1, t2 = (world - 1) * m1 / b1, (world - 1) * m2 / b2
    bw = (world - 1) * (m2 - m1) / (t2 - t1)
    alpha = (t1 - (world - 1) * m1 / bw) / (world - 1)
    return alpha, bw


@dataclass
class Call:
    """One attention kernel call: rows x keys over `heads` query heads (causal: square, halved)."""

    rows: int
    keys: int
    causal: bool = False
    heads_frac: float = 1.0  # share of the query heads (TP, all-to-all)
    role: str = ""  # Spava's calls: "query", "anchor" (both replicated on every rank), "block", "passing"

    def pairs(self) -> float:
        return self.rows * self.keys / (2 if self.causal else 1) * self.heads_frac


@dataclass
class Comm:
    """One collective of one layer as one rank sees it. kind: all_gather | p2p | all_to_all |
    all_reduce. ranks: the group's global ranks; payload: bytes this rank contributes per
    peer (all_gather: its whole share, delivered to every peer; p2p: the buffer; all_to_all:
    what it sends each peer; all_reduce: the tensor). peer: for p2p, (send_to, recv_from)."""

    kind: str
    ranks: List[int]
    payload: int
    me: int
    peer: Tuple[int, int] = (0, 0)
    name: str = ""

    def bytes_by_link(self, gpus_per_node: int) -> Dict[str, int]:
        """Payload this rank sends and receives, by where the peer is (logical volume:
        what must leave and arrive, whatever route NCCL takes)."""
        node = lambda r: r // gpus_per_node  # noqa: E731
        out = {"nvlink_send": 0, "nvlink_recv": 0, "net_send": 0, "net_recv": 0}
        if self.kind == "p2p":
            to, frm = self.peer
            out["nvlink_send" if node(to) == node(self.me) else "net_send"] += self.payload
            out["nvlink_recv" if node(frm) == node(self.me) else "net_recv"] += self.payload
            return out
        if self.kind == "all_reduce":  # ring all-reduce: 2 (k-1)/k of the tensor each way
            k = len(self.ranks)
            vol = 2 * (k - 1) * self.payload // k if k > 1 else 0
            link = "nvlink" if len({node(r) for r in self.ranks}) == 1 else "net"
            out[f"{link}_send"] += vol
            out[f"{link}_recv"] += vol
            return out
        for r in self.ranks:  # all_gather, all_to_all: one payload to and from every peer
            if r == self.me:
                continue
            link = "nvlink" if node(r) == node(self.me) else "net"
            out[f"{link}_send"] += self.payload
            out[f"{link}_recv"] += self.payload
        return out

    def seconds(self, hw: Hardware) -> float:
        """Time of the collective on the links (the NCCL algorithm each uses)."""
        k = len(self.ranks)
        if k <= 1 or self.payload == 0:
            return 0.0
        per_node: Dict[int, int] = {}
        for r in self.ranks:
            per_node[r // hw.gpus_per_node] = per_node.get(r // hw.gpus_per_node, 0) + 1
        cross = len(per_node) > 1
        if self.kind == "p2p":
            to, frm = self.peer
            crosses = to // hw.gpus_per_node != self.me // hw.gpus_per_node or \
                frm // hw.gpus_per_node != self.me // hw.gpus_per_node
            if crosses or cross:  # a ring step waits for its slowest hop: the one between nodes
                return hw.net_alpha_step + self.payload / hw.net_bw
            return hw.nvlink_alpha_step + self.payload / hw.nvlink_busbw
        if self.kind == "all_to_all":  # direct sends: remote bytes through this GPU's NIC
            b = self.bytes_by_link(hw.gpus_per_node)
            alpha = (k - 1) * (hw.net_alpha_step if cross else hw.nvlink_alpha_step) / 4
            return alpha + max(b["net_send"] / hw.net_bw, b["nvlink_send"] / hw.nvlink_busbw)
        steps = (k - 1) if self.kind == "all_gather" else 2 * (k - 1)
        vol = steps * self.payload / (1 if self.kind == "all_gather" else k)
        if cross:
            bw = min(hw.nvlink_busbw, min(per_node.values()) * hw.net_bw)
            return steps * hw.net_alpha_step + vol / bw
        return steps * hw.nvlink_alpha_step + vol / hw.nvlink_busbw


@dataclass
class Op:
    """A step of one layer on one rank: compute (`calls`, merged elements, dense tokens) or
    a collective launch (`comm`), or a wait for collective number `wait`."""

    calls: List[Call] = field(default_factory=list)
    merged: float = 0.0  # float32 elements read in LSE merges (rows x heads x d x parts)
    dense: float = 0.0   # share of the layer's dense work, in tokens
    gemm_rows: float = 0.0  # rows M of that work's GEMMs (the rank's local tokens): sets their rate
    comm: Optional[Comm] = None
    wait: Optional[int] = None


@dataclass(frozen=True)
class Plan:
    """One request under one algorithm: everything a rank does, per layer."""

    algo: str
    world: int           # GPUs (TP x CP)
    tp: int
    cp: int
    tokens: int          # prompt tokens S
    local_tokens: Tuple[int, ...]  # per CP rank, dense work
    frame_groups: Tuple[int, ...]  # per CP rank, vision work
    layout: object = None


def dense_split(shape: Shape) -> float:
    """Share of a layer's dense FLOPs before attention (QKV projection)."""
    h, d = shape.hidden, shape.head_dim
    qkv = h * (shape.heads + 2 * shape.kv_heads) * d
    return qkv / (qkv + shape.heads * d * h + 3 * h * shape.ffn)


@dataclass(frozen=True)
class LayerRequest:
    """One layer of one prompt, as an algorithm's cost model is asked for it.

    algo: the registry name; context, query: the prompt's lengths (n, l_q); cp, tp: the
    grid; shape: the model; group: the global ranks of CP group 0 (Megatron's order);
    weights: the per-layer weight all-gather this rank issues first (sharded weights), or
    None; config: the SpavaConfig (already through the algorithm's preset); option: an
    algorithm-specific choice from the variant name (Megatron's `--cp-comm-type`), or None.
    """

    algo: str
    context: int
    query: int
    cp: int
    tp: int
    shape: Shape
    group: Tuple[int, ...]
    weights: Optional[Comm] = None
    config: SpavaConfig = field(default_factory=SpavaConfig)
    option: Optional[str] = None

    @property
    def tokens(self) -> int:
        return self.context + self.query

    def weights_of(self, r: int) -> Optional[Comm]:
        """The weight all-gather as CP rank r issues it, or None."""
        return None if self.weights is None else replace(self.weights, me=self.group[r])


@dataclass(frozen=True)
class LayerWork:
    """An algorithm's answer: the layout it planned (or None), the tokens each CP rank holds
    (its dense work), and the ops of one layer per CP rank (one list: a single rank)."""

    layout: object
    local_tokens: Tuple[int, ...]
    ops: List[List[Op]]
