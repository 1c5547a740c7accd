"""Top-L inner-product search of embeddings against centres: faiss (exact / IVF) and torch.

``--backend torch`` is for GPUs without faiss-gpu: candidates are picked with a bf16 (or
TF32/fp32) matmul, then re-ranked with exact fp32 dot products, so the result equals the
exact search.  That equality is checked, not hoped for: for unit vectors a bf16 score is
within ``CAND_ERR`` of the exact one, so when the exact L-th score of a row beats the best
score a non-candidate could have (the last candidate's low-precision score + ``CAND_ERR``),
no centre outside the candidates can belong to the top L; rows failing that bound (near
ties) are searched again exactly in fp32.

Backends: ``auto`` = faiss on GPU when faiss-gpu is importable and a GPU is asked for, else
torch on CUDA, else faiss on CPU.
"""
from __future__ import annotations

import math

import numpy as np

from mlcd_core.errors import MLCDError

# Worst error of a low-precision dot product of two unit vectors, with u the unit roundoff
# (2^-8 for bf16's 8-bit significand, 2^-11 for fp16 and tf32): inputs rounded (2u + u^2),
# the output rounded to bf16/fp16 (u), fp32 accumulation (d * 2^-24 < 3e-4 for d <= 4096).
# bf16: 0.0078 + 0.0039 + 0.0003 = 0.0120; fp16: 0.0018; tf32 (fp32 output): 0.0013.  The
# values below leave a margin of 1.6x or more, and the candidate matmul runs with cuBLAS's
# reduced-precision reductions off (see search_torch), so the fp32 accumulation holds.
CAND_ERR = {"bfloat16": 0.02, "float16": 0.004, "tf32": 0.004, "float32": 1e-5}


def faiss_has_gpu() -> bool:
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001
        return False


def pick_backend(backend: str, gpu: bool = False) -> str:
    """'faiss' or 'torch' (after resolving 'auto')."""
    import torch

    if backend not in ("auto", "faiss", "torch"):
        raise MLCDError(f"--backend must be auto, faiss or torch, not {backend!r}")
    if backend != "auto":
        return backend
    if faiss_has_gpu() and (gpu or torch.cuda.is_available()):
        return "faiss"
    if torch.cuda.is_available():
        return "torch"
    return "faiss"


class FaissSearcher:
    """Exact IndexFlatIP (faiss GPU when ``gpu``), or IVF over the centres with ``nprobe``."""

    def __init__(self, centroids: np.ndarray, approx: bool = False, nlist: int | None = None,
                 nprobe: int = 16, gpu: bool = False, seed: int = 0):
        import faiss

        k, d = centroids.shape
        c = np.ascontiguousarray(centroids, dtype=np.float32)
        self.approx = approx
        self.nprobe = int(nprobe) if approx else None
        if approx:
            self.nlist = int(nlist or max(1, min(k // 39, int(4 * math.sqrt(k)))))
            quant = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quant, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.cp.min_points_per_centroid = 1
            index.train(c)
            index.add(c)
            index.nprobe = int(nprobe)
            self._quant = quant  # keep alive
        else:
            index = faiss.IndexFlatIP(d)
            index.add(c)
        self.on_gpu = bool(gpu and faiss_has_gpu())
        if self.on_gpu:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        self.index = index

    def set_nprobe(self, nprobe: int) -> None:
        if not self.approx:
            raise MLCDError("nprobe applies to the IVF (--approx) search only")
        self.index.nprobe = int(nprobe)  # IndexIVFFlat and GpuIndexIVFFlat alike
        self.nprobe = int(nprobe)

    def search(self, x: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
        D, I = self.index.search(np.ascontiguousarray(x, dtype=np.float32), L)
        return D, I


class TorchSearcher:
    """Low-precision candidate pick + exact fp32 re-rank (see module docstring)."""

    rerank_bytes = 256 << 20  # gathered candidate centres held at once by the re-rank

    def __init__(self, centroids: np.ndarray, device: str | None = None, cand_dtype: str | None = None,
                 extra: int = 16):
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.on_gpu = self.device.type == "cuda"
        if cand_dtype is None:
            cand_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if cand_dtype not in CAND_ERR:
            raise MLCDError(f"candidate dtype must be one of {sorted(CAND_ERR)}, not {cand_dtype!r}")
        self.cand_dtype = cand_dtype
        self.extra = extra
        if isinstance(centroids, torch.Tensor):
            self.c32 = centroids.to(self.device, torch.float32).contiguous()
        else:
            self.c32 = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(self.device)
        tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cand_dtype, torch.float32)
        self.cc = self.c32.to(tdt)
        self.tdt = tdt
        self.n_fallback = 0

    def _exact(self, x32, L):
        import torch

        return torch.topk(x32 @ self.c32.T, L, dim=1)

    def search_torch(self, x32, L: int):
        """x32: float32 torch [m, d] on self.device -> (scores [m, L] fp32, ids [m, L] int64)."""
        import torch

        k = self.c32.shape[0]
        if self.cand_dtype == "float32":
            s, i = self._exact(x32, L)
            return s, i
        c = min(k, L + self.extra)
        if self.cand_dtype == "tf32":
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                low = x32 @ self.c32.T
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        else:
            # cuBLAS may otherwise reduce split-K partial sums in bf16/fp16, beyond CAND_ERR
            m = torch.backends.cuda.matmul
            prev = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
            m.allow_bf16_reduced_precision_reduction = m.allow_fp16_reduced_precision_reduction = False
            try:
                low = x32.to(self.tdt) @ self.cc.T
            finally:
                m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = prev
        cs, ci = torch.topk(low, c, dim=1)
        del low
        # fp32 scores of the candidates, in row blocks: the gathered centres of a block take
        # rows x c x d x 4 bytes (65536 x 24 x 1024 would be 6.4 GB at once)
        exact = torch.empty(ci.shape, dtype=torch.float32, device=x32.device)
        step = max(1, self.rerank_bytes // (c * x32.shape[1] * 4))
        for s in range(0, x32.shape[0], step):
            exact[s: s + step] = torch.einsum("md,mcd->mc", x32[s: s + step], self.c32[ci[s: s + step]])
        es, order = torch.sort(exact, dim=1, descending=True)
        ids = torch.gather(ci, 1, order)[:, :L]
        es = es[:, :L]
        if c < k:
            bound = cs[:, -1].float() + CAND_ERR[self.cand_dtype]
            unsure = es[:, -1] <= bound
            if bool(unsure.any()):
                rows = torch.nonzero(unsure).squeeze(1)
                self.n_fallback += int(rows.numel())
                fs, fi = self._exact(x32[rows], L)
                es[rows] = fs
                ids[rows] = fi
        return es, ids

    def search(self, x: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            x32 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            s, i = self.search_torch(x32, L)
            return s.cpu().numpy(), i.cpu().numpy()


def make_searcher(centroids: np.ndarray, backend: str = "auto", approx: bool = False, nlist=None,
                  nprobe: int = 16, gpu: bool = False, cand_dtype: str | None = None, seed: int = 0):
    backend = pick_backend(backend, gpu)
    if backend == "torch":
        if approx:
            raise MLCDError("--approx needs the faiss backend (IVF index); drop --backend torch")
        return TorchSearcher(centroids, cand_dtype=cand_dtype)
    return FaissSearcher(centroids, approx=approx, nlist=nlist, nprobe=nprobe, gpu=gpu, seed=seed)
