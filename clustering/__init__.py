"""clustering: embed a corpus, spherical k-means, multi-label top-l assignment."""
