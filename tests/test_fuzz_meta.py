"""Issue 15, class 9 (fuzz): every JSON file a stage reads, fed values of the wrong type.

For each file, each key (and each key of the objects nested in it) gets in turn: a value of
another JSON type (a list for an object, a string for a number, ...), null, a huge integer
(10**400), a number that overflows a float (1e999, read as inf), and a nested null inside a
list or object, or is left out.  The stage must then finish (status 0) or stop with status 2 and one line
naming the file; never a traceback.  tests/test_hostile.py covers the type swaps of the
embeddings, centres, labels (as `mlcd assign` rereads them) and shard-progress files; this
file adds null / huge / missing values there and the files it leaves out: the export sidecar
(`mlcd convert`), a Hugging Face config.json (`mlcd convert --from-hf`), a checkpoint's
meta.json, and the labels meta.json and sizes.json as `mlcd train` reads them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlcd_train.cli import run_stage
from mlcd_train.utils.errors import MLCDError

HUGE_INT = "1" + "0" * 400  # 10**400: Python reads it as an int, no C type holds it
INF = "1e999"  # read as float('inf')
_OTHER = {dict: "[]", list: "{}", str: "7", int: '"7"', float: '"x"', bool: '"yes"', type(None): "[]"}


def _kind(v):
    return type(v) if not isinstance(v, bool) else bool


MARK = "@@value@@"


def _paths(obj, depth: int = 2, prefix: tuple = ()):
    """Key paths into ``obj``: every key, and the keys of the objects under them."""
    if isinstance(obj, dict) and depth > 0:
        for key, value in obj.items():
            yield prefix + (key,), value
            yield from _paths(value, depth - 1, prefix + (key,))


def _replaced(obj, path: tuple, text: str) -> str:
    import copy

    new = copy.deepcopy(obj)
    node = new
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = MARK
    return json.dumps(new).replace(json.dumps(MARK), text)


def mutations(obj):
    """(what, JSON text) pairs: obj with one value replaced (see the module docstring)."""
    yield "top: list", json.dumps([obj])
    yield "top: null", "null"
    yield "top: huge", HUGE_INT
    for path, value in list(_paths(obj)):
        nested = ("[null]" if not isinstance(value, dict) else
                  json.dumps({k: None for k in value}) if value else '{"x": null}')
        for label, text in (("other type", _OTHER[_kind(value)]), ("null", "null"), ("huge int", HUGE_INT),
                            ("inf", INF), ("nested null", nested)):
            yield f"{'.'.join(map(str, path))}: {label}", _replaced(obj, path, text)
        yield f"{'.'.join(map(str, path))}: missing", _removed(obj, path)


def _removed(obj, path: tuple) -> str:
    import copy

    new = copy.deepcopy(obj)
    node = new
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return json.dumps(new)


def fuzz(path: Path, run, capsys, *, min_cases: int = 10, names: tuple = ()) -> int:
    """Every mutation of ``path``: ``run()`` returns 0, or 2 with one error line naming the
    file (or one of ``names``: a sidecar's .pt, whose config no longer fits it); an exception
    fails the test.  The file is restored after."""
    names = (path.name,) + tuple(names)
    original = path.read_text()
    capsys.readouterr()
    base_rc = run()  # the unmutated file: a stage that stops later for its own reason (a missing model)
    base = capsys.readouterr().err.strip()  # stops there too when it accepts a mutation
    tried = 0
    try:
        for what, text in mutations(json.loads(original)):
            path.write_text(text)
            capsys.readouterr()
            rc = run()
            err = capsys.readouterr().err
            lines = [ln for ln in err.splitlines() if "error:" in ln]
            accepted = rc == base_rc and err.strip() == base
            assert rc == 0 or accepted or (rc == 2 and len(lines) == 1 and any(n in lines[0] for n in names)), \
                (what, rc, err[-2000:])
            tried += 1
    finally:
        path.write_text(original)
    assert tried >= min_cases
    return tried


def test_mutations_cover_nested_keys():
    cases = dict(mutations({"a": 1, "cfg": {"b": "x"}}))
    assert json.loads(cases["cfg.b: null"]) == {"a": 1, "cfg": {"b": None}}
    assert json.loads(cases["a: huge int"]) == {"a": 10 ** 400, "cfg": {"b": "x"}}
    assert json.loads(cases["a: inf"])["a"] == float("inf")
    assert json.loads(cases["cfg: other type"]) == {"a": 1, "cfg": []}
    assert json.loads(cases["cfg: nested null"]) == {"a": 1, "cfg": {"b": None}}
    assert json.loads(cases["cfg.b: missing"]) == {"a": 1, "cfg": {}}
    assert json.loads(cases["a: missing"]) == {"cfg": {"b": "x"}}


@pytest.mark.slow  # ~50 conversions
def test_export_sidecar_fuzz(tmp_path, capsys):
    from mlcd_train.export import load_model, save_native
    from mlcd_train.models import create_model, model_config_to_dict

    for pos in ("rope2d", "abs"):
        torch.manual_seed(0)
        m = create_model("ViT-Tiny-4-28", pos_embed=pos, width=32, layers=1, heads=2, output_dim=8)
        pt = tmp_path / f"{pos}.pt"
        save_native(m.state_dict(), model_config_to_dict(m), pt)

        def convert(pt=pt, pos=pos):
            return run_stage("convert", ["--checkpoint_path", str(pt), "--pytorch_dump_folder_path",
                                         str(tmp_path / f"hf_{pos}"), "--overwrite", "--no_verify"])

        def load(pt=pt):  # the teacher / probe side of the same file
            try:
                load_model(pt)
            except MLCDError as exc:
                print(f"mlcd embed: error: {exc}", file=__import__("sys").stderr)
                return 2
            return 0

        assert fuzz(pt.with_suffix(".json"), convert, capsys, names=(pt.name,)) > 40
        fuzz(pt.with_suffix(".json"), load, capsys, names=(pt.name,))


@pytest.mark.slow  # ~50 conversions
def test_hf_config_fuzz(tmp_path, capsys):
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)
    for name, model in (("mlcd", transformers.MLCDVisionModel(transformers.MLCDVisionConfig(**common))),
                        ("clip", transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common)))):
        d = tmp_path / name
        model.save_pretrained(d)
        cfg = json.loads((d / "config.json").read_text())
        # keep the file to what the conversion reads (transformers 5 adds a dozen defaults)
        keep = {k: cfg[k] for k in ("model_type", "architectures", "hidden_size", "intermediate_size",
                                    "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
                                    "hidden_act", "layer_norm_eps") if k in cfg}
        (d / "config.json").write_text(json.dumps(keep))
        out = tmp_path / f"{name}.pt"
        fuzz(d / "config.json", lambda d=d, out=out: run_stage("convert", ["--from-hf", str(d), "--out", str(out),
                                                                           "--overwrite", "--no_verify"]), capsys)


def test_sizes_and_embedding_meta_fuzz_with_nulls_and_huge_numbers(tmp_path, capsys):
    from tests.fixtures import make_random_shards
    from tests.test_hostile import _emb

    sh = make_random_shards(tmp_path, n=8, size=8, num_classes=2, shard_size=4)
    fuzz(sh / "sizes.json", lambda: run_stage("embed", ["--shards", str(sh), "--out", str(tmp_path / "e"),
                                                        "--model", "pca:/nonexistent.npz"]), capsys)
    emb = _emb(tmp_path / "emb")
    n = iter(range(10 ** 6))
    fuzz(emb / "meta.json", lambda: run_stage("cluster", ["--emb", str(emb), "--k", "4", "--out",
                                                          str(tmp_path / f"c{next(n)}"), "--threads", "1",
                                                          "--niter", "1"]), capsys)


def test_checkpoint_meta_fuzz(tmp_path, capsys):
    from mlcd_train.trainer import checkpoint as ck

    step = tmp_path / "ck" / "step_00000001"
    step.mkdir(parents=True)
    ck.write_meta(step, {"step": 1, "world_size": 1, "parallel": "ddp", "model_config": {"name": "x", "width": 8}})

    def read_meta():
        try:
            ck.read_meta(step)
        except MLCDError as exc:
            print(f"mlcd train: error: {exc}", file=__import__("sys").stderr)
            return 2
        return 0

    fuzz(step / "meta.json", read_meta, capsys)


@pytest.mark.slow
def test_labels_meta_and_sizes_fuzz_through_train(tmp_path, capsys):
    """`mlcd train` reads LABELS/meta.json (k, topk, centroids_sha) and SHARDS/sizes.json: a
    mutated file is refused with one line naming it, or the run stops where the unmutated one
    does (its last shard's label files are missing, so no training step is ever paid for)."""
    from tests.fixtures import make_random_shards
    from tests.test_train import TINY, make_labels

    sh = make_random_shards(tmp_path, n=8, size=8, num_classes=2, shard_size=4)
    lbl = make_labels(sh, tmp_path / "labels", k=4, topk=2)
    meta = json.loads((lbl / "meta.json").read_text())
    meta["centroids_sha"] = "ab" * 32
    (lbl / "meta.json").write_text(json.dumps(meta))
    last = sorted(lbl.glob("*.labels.npy"))[-1]
    last.unlink()
    n = iter(range(10 ** 6))

    def train():
        return run_stage("train", [f"output_dir={tmp_path / f'o{next(n)}'}", f"data.shards={sh}",
                                   f"data.labels={lbl}", *TINY, "loss.l=2", "train.global_batch_size=4",
                                   "data.num_workers=0"])

    capsys.readouterr()
    assert train() == 2 and last.name in capsys.readouterr().err  # the base: stops at the missing file
    assert fuzz(lbl / "meta.json", train, capsys) > 20
    assert fuzz(sh / "sizes.json", train, capsys) > 10
