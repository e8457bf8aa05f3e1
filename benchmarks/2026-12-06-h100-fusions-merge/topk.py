"""Issue 23: torch.topk against sort-based and two-stage top-k on the selection's shapes
(rows = KV heads x blocks, keys per row, k = the passing length), GPU time per call."""
import torch
torch.manual_seed(0)
def t(fn, reps=50):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e6))
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    a.record()
    for _ in range(reps): fn()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / reps
for rows, L, k in ((4, 16384, 1024), (8, 16384, 1024), (8, 32768, 2048), (8, 65536, 4096), (16, 16384, 1024)):
    s = torch.randn(rows, L, device="cuda")
    ref = set(map(tuple, torch.topk(s, k).indices.sort(-1).values.tolist()))
    def two_stage(c=8):
        part = s.view(rows, c, L // c)
        v, i = torch.topk(part, min(k, L // c), dim=-1)
        i = i + (torch.arange(c, device=s.device) * (L // c))[None, :, None]
        v2, j = torch.topk(v.flatten(1), k, dim=-1)
        return i.flatten(1).gather(1, j)
    same = set(map(tuple, two_stage().sort(-1).values.tolist())) == ref
    same_sort = set(map(tuple, torch.sort(s, descending=True).indices[:, :k].sort(-1).values.tolist())) == ref
    print(f"rows {rows:3d} L {L:6d} k {k:5d}: topk {t(lambda: torch.topk(s, k)):.4f} ms  "
          f"sort {t(lambda: torch.sort(s, descending=True)):.4f} ms (same set {same_sort})  "
          f"two-stage/8 {t(two_stage):.4f} ms (same set {same})  "
          f"two-stage/16 {t(lambda: two_stage(16)):.4f} ms", flush=True)
