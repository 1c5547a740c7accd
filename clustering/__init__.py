"""clustering: embed a corpus, spherical k-means, multi-label top-l assignment.

    mlcd embed   --shards DIR --out EMB --model open_clip:ViT-L-14 --pretrained vitl14.bin
    mlcd cluster --emb EMB --k 1000000 --out CL                  # two-level above 65536 centres
    mlcd assign  --emb EMB --centroids CL/centroids.npy --topk 8 --out LBL

Re-clustering a new corpus is either of:

* the same centres, new images: embed the new corpus with the embedder the centres came from,
  then assign it to the existing centres (``mlcd assign`` refuses an EMB made by another
  embedder than the one recorded in ``CL/meta.json``)::

      mlcd embed  --shards NEW --out EMB_NEW --model open_clip:ViT-L-14 --pretrained vitl14.bin
      mlcd assign --emb EMB_NEW --centroids CL/centroids.npy --topk 8 --out LBL_NEW

* a fresh embed -> cluster -> assign with another embedder, e.g. our own student::

      mlcd embed   --shards NEW --out EMB2 --model mlcd:runs/exp1     # newest complete checkpoint
      mlcd cluster --emb EMB2 --k 100000 --out CL2
      mlcd assign  --emb EMB2 --centroids CL2/centroids.npy --topk 8 --out LBL2

Modules: ``embedders/`` (registry, :func:`clustering.embedders.get_embedder`), ``embed``,
``kmeans`` (``mlcd cluster``), ``assign``, ``search`` (faiss / torch top-L search), ``store``
(reading and writing EMB folders safely, in bounded memory).
"""
