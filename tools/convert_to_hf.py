#!/usr/bin/env python
"""Convert a native MLCD export to a Hugging Face directory (same as ``mlcd convert``).

Takes the flags of the public ``convert_vit_bigG_14_rope2d_to_hf.py``::

    python tools/convert_to_hf.py --checkpoint_path X.pt --pytorch_dump_folder_path DIR --image_size 336

plus ``--num_heads``, ``--act``, ``--overwrite`` and the import direction
(``--from-hf DIR --out X.pt``); see ``mlcd convert --help``.
"""
import sys

from mlcd_train.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("convert", sys.argv[1:]))
