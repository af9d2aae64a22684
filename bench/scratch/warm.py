import time, torch
def t(label, fn):
    torch.cuda.synchronize(); t0=time.perf_counter(); fn(); torch.cuda.synchronize(); print(f"{label:40s} {time.perf_counter()-t0:.3f}", flush=True)
t("init", lambda: torch.zeros(1, device="cuda"))
a = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
t("bf16 mm first", lambda: a @ a.T)
t("bf16 mm second", lambda: a @ a.T)
t("bf16 mm fp32 out", lambda: torch.mm(a.T, a, out_dtype=torch.float32))
H = torch.randn(4, 512, 512, device="cuda"); H = H @ H.transpose(1,2) + 512*torch.eye(512, device="cuda")
t("cholesky_ex first", lambda: torch.linalg.cholesky_ex(H))
t("cholesky_ex second", lambda: torch.linalg.cholesky_ex(H))
L = torch.linalg.cholesky(H)
t("solve_triangular first", lambda: torch.linalg.solve_triangular(L, torch.eye(512, device="cuda").expand_as(L), upper=False))
t("bmm fp32 first", lambda: torch.bmm(H, H))
q = torch.randn(2, 16, 2048, 128, device="cuda", dtype=torch.bfloat16)
from torch.nn.attention import SDPBackend, sdpa_kernel
with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
    t("sdpa flash first", lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    t("sdpa flash second", lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
x = torch.randn(64, 512, device="cuda")
g = torch.cuda.CUDAGraph()
def cap():
    with torch.cuda.graph(g): y = x * 2 + 1
t("graph capture first", cap)
t("pinned 800MB alloc", lambda: torch.empty(800 << 20, dtype=torch.uint8, pin_memory=True))
t("pinned 196x4MB alloc", lambda: [torch.empty(4 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(196)])
t("topk/argsort/bincount", lambda: (torch.randn(1000, 64, device="cuda").topk(8), torch.argsort(torch.randint(0, 64, (8000,), device="cuda"), stable=True), torch.bincount(torch.randint(0,64,(100,),device="cuda")).tolist()))
