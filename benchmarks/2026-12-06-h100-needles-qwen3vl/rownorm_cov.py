"""Scratch (not in the package): coverage and accuracy of per-row normalised scores on the
needle models, through tools/selection_coverage.py with two extra scores registered on
every rank:
  rownorm      log of the sum over the question rows j and the GQA group's heads g of
               softmax over the block's keys t of (scale q[j,g] . k[t]) (SnapKV-like)
  rownorm-max  rownorm shared by the KV heads as lse-max shares lse (each head's log share,
               maximised over the heads)
Usage: PYTHONPATH=$PWD:<this folder> python rownorm_cov.py <selection_coverage args>."""
import sys
import torch


def rownorm(k_block, probes, scale):
    l, b, hk, d = k_block.shape
    m, _, hq, _ = probes.shape
    g = hq // hk
    q = probes.float().reshape(m, b, hk, g, d).permute(1, 2, 0, 3, 4).reshape(b, hk, m * g, d)
    k = k_block.float().permute(1, 2, 0, 3)  # [b, hk, l, d]
    logits = scale * q @ k.transpose(-1, -2)  # [b, hk, mg, l]
    return torch.logsumexp(torch.log_softmax(logits, -1), dim=2)  # [b, hk, l]


def rownorm_max(k_block, probes, scale):
    s = rownorm(k_block, probes, scale)
    s = (s - torch.logsumexp(s, dim=-1, keepdim=True)).amax(dim=1, keepdim=True)
    return s.expand(-1, k_block.shape[2], -1)


def register():
    from megatron_spava.algos.spava import selection
    selection.register_scorer("rownorm", rownorm, replace=True)
    selection.register_scorer("rownorm-max", rownorm_max, replace=True)


def run_rank(args):
    register()
    from megatron_spava.tasks import selection_coverage
    return selection_coverage.run_rank(args)


if __name__ == "__main__":
    register()
    from megatron_spava.tasks import selection_coverage
    import rownorm_cov
    selection_coverage.run_rank = rownorm_cov.run_rank  # ranks import this module's run_rank
    sys.exit(selection_coverage.main(sys.argv[1:]))
