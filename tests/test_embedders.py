"""The embedder base class (clustering/embedders/__init__.py)."""


def test_a_large_cpu_batch_runs_in_slices_with_the_same_output():
    """On the CPU, __call__ hands the tower at most CPU_CHUNK images at a time (a large batch
    thrashes the cache: half the speed at 1024) and returns the rows in order."""
    import torch

    from clustering.embedders import CPU_CHUNK, Embedder

    class Probe(Embedder):
        dim = 4

        def __init__(self):
            super().__init__(device="cpu")
            self.sizes = []
            self.w = torch.randn(3 * 2 * 2, 4, generator=torch.Generator().manual_seed(0))

        def forward(self, pixels):
            self.sizes.append(len(pixels))
            return pixels.flatten(1) @ self.w

    e = Probe()
    x = torch.randn(2 * CPU_CHUNK + 44, 3, 2, 2)
    out = e(x)
    assert e.sizes == [CPU_CHUNK, CPU_CHUNK, 44]
    torch.testing.assert_close(out, x.flatten(1) @ e.w)
    e.sizes.clear()
    e(x[:CPU_CHUNK])
    assert e.sizes == [CPU_CHUNK]
