"""Loaders: the embedded synthetic set, generic files, HF datasets and the local real data."""

import json

import pytest
from conftest import SHARED_DATA, compose_config, require_shared_data
from omegaconf import OmegaConf
from PIL import Image

from asif_exp.data import balanced_subset, load_anchors, load_benchmark
from asif_exp.data.synthetic import SHAPES, SyntheticShapes
from asif_exp.errors import DataError


def cfg_of(group: str, option: str, **changes):
    node = compose_config([f"{group}={option}"])[group]
    return OmegaConf.merge(node, changes)


def write_images(folder, names, size=16):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (size, size), (i * 40 % 255, 10, 200)).save(folder / name)


def test_synthetic_is_seeded_and_disjoint():
    a = SyntheticShapes(0, 0, 30, 64, "shape")
    b = SyntheticShapes(0, 0, 30, 64, "shape")
    assert a.captions == b.captions and a.load(3).tobytes() == b.load(3).tobytes()
    bench = SyntheticShapes(0, 1_000_000, 30, 64, "shape")
    assert not set(a.ids) & set(bench.ids)
    assert set(bench.labels) <= set(range(len(SHAPES)))
    for caption, item in zip(a.captions, a.samples, strict=True):
        assert item.shape in caption and item.colour in caption


def test_synthetic_anchors_and_benchmark_from_config():
    anchors = load_anchors(cfg_of("anchors", "synthetic_shapes", num_samples=12), "/nonexistent")
    bench = load_benchmark(cfg_of("benchmark", "synthetic_shapes", num_samples=10), "/nonexistent")
    assert len(anchors.captions) == 12 and len(bench.labels) == 10
    prompts, classes = bench.prompts()
    assert len(prompts) == len(bench.class_names) * len(bench.templates)
    assert classes[: len(bench.templates)] == [0] * len(bench.templates)  # class-major


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_pairs_file_loader(tmp_path, suffix):
    write_images(tmp_path / "img", ["a.png", "b.png"])
    rows = [
        {"image": "img/a.png", "caption": "a dog"},
        {"image": "img/b.png", "caption": "a cat"},
        {"image": "img/a.png", "caption": "a brown dog"},
    ]
    path = tmp_path / f"pairs.{suffix}"
    if suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        path.write_text("image,caption\n" + "\n".join(f"{r['image']},{r['caption']}" for r in rows))
    anchors = load_anchors(
        cfg_of("anchors", "pairs_file", path=str(path), loader=suffix), str(tmp_path)
    )
    assert anchors.captions == ["a dog", "a cat", "a brown dog"]
    assert anchors.images.ids == ["img/a.png", "img/b.png", "img/a.png"]
    assert anchors.images.load(1).size == (16, 16)
    limited = load_anchors(
        cfg_of("anchors", "pairs_file", path=str(path), loader=suffix, limit=2), "/"
    )
    assert len(limited.captions) == 2


def test_pairs_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "x.png", "caption": "hi"}\n{not json}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl, line 2"):
        load_anchors(cfg_of("anchors", "pairs_file", path=str(path)), str(tmp_path))
    path.write_text('{"image": "missing.png", "caption": "hi"}\n')
    with pytest.raises(DataError, match="image file not found: .*missing.png"):
        load_anchors(cfg_of("anchors", "pairs_file", path=str(path)), str(tmp_path))
    write_images(tmp_path, ["x.png"])
    path.write_text('{"image": "x.png", "caption": "  "}\n')
    with pytest.raises(DataError, match="caption of pair 0 .*is empty"):
        load_anchors(cfg_of("anchors", "pairs_file", path=str(path)), str(tmp_path))
    path.write_text('{"image": "x.png", "text": "hi"}\n')
    with pytest.raises(DataError, match="no 'caption' field"):
        load_anchors(cfg_of("anchors", "pairs_file", path=str(path)), str(tmp_path))


def test_missing_data_says_what_and_where(tmp_path):
    with pytest.raises(
        DataError, match=f"{tmp_path}/coco_mini/captions.jsonl does not exist.*ASIF_DATA_ROOT"
    ):
        load_anchors(cfg_of("anchors", "coco_mini"), str(tmp_path))
    with pytest.raises(DataError, match="cifar10_test does not exist"):
        load_benchmark(cfg_of("benchmark", "cifar10"), str(tmp_path))


def test_image_folder_loader(tmp_path):
    write_images(tmp_path / "bench" / "sea_lion", ["1.png", "2.png"])
    write_images(tmp_path / "bench" / "cat", ["1.png"])
    bench = load_benchmark(cfg_of("benchmark", "image_folder", root="bench"), str(tmp_path))
    assert bench.class_names == ["cat", "sea lion"]
    assert bench.labels == [0, 1, 1] and bench.images.ids[0] == "cat/1.png"
    with pytest.raises(DataError, match="match no class of cifar10"):
        load_benchmark(
            cfg_of("benchmark", "image_folder", root="bench", class_names="cifar10"), str(tmp_path)
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_benchmark(cfg_of("benchmark", "image_folder", root="empty"), str(tmp_path))


def test_hf_datasets_loader_from_local_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(4)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["red", "dark"]),
        }
    )
    data = datasets.Dataset.from_dict(
        {"image": images, "caption": [f"shade {i}" for i in range(4)], "label": [1, 1, 0, 0]},
        features=features,
    )
    data.save_to_disk(str(tmp_path / "hf"))
    anchors = load_anchors(cfg_of("anchors", "hf", path=str(tmp_path / "hf")), str(tmp_path))
    assert anchors.captions[2] == "shade 2" and anchors.images.load(2).size == (8, 8)
    bench = load_benchmark(cfg_of("benchmark", "hf", root=str(tmp_path / "hf")), str(tmp_path))
    assert bench.class_names == ["red", "dark"] and bench.labels == [1, 1, 0, 0]
    with pytest.raises(DataError, match="no column 'picture'"):
        load_anchors(
            cfg_of("anchors", "hf", path=str(tmp_path / "hf"), image_column="picture"), "/"
        )


def test_empty_class_list_is_an_error(tmp_path):
    write_images(tmp_path / "bench" / "cat", ["1.png"])
    cfg = cfg_of("benchmark", "hf", root=str(tmp_path / "none"))
    with pytest.raises(DataError, match="does not exist"):
        load_benchmark(cfg, str(tmp_path))
    from asif_exp.data import Benchmark

    with pytest.raises(DataError, match="class list is empty"):
        Benchmark(
            "b",
            load_benchmark(cfg_of("benchmark", "image_folder", root="bench"), str(tmp_path)).images,
            [0],
            [],
            ["a {}."],
        )


def test_balanced_subset_is_balanced_and_seeded():
    labels = [i % 4 for i in range(400)]
    subset = balanced_subset(labels, 40, seed=3)
    assert subset == sorted(subset) and len(set(subset)) == 40
    assert [sum(labels[i] == c for i in subset) for c in range(4)] == [10] * 4
    assert subset == balanced_subset(labels, 40, seed=3) != balanced_subset(labels, 40, seed=4)


def test_local_coco_mini_anchors():
    require_shared_data("coco_mini", "captions.jsonl")
    anchors = load_anchors(cfg_of("anchors", "coco_mini"), str(SHARED_DATA))
    assert len(anchors.captions) == 1195 and len(set(anchors.images.ids)) == 239


def test_local_cifar10_benchmark():
    require_shared_data("cifar10_test")
    bench = load_benchmark(cfg_of("benchmark", "cifar10", subset=200), str(SHARED_DATA))
    assert len(bench.labels) == 200 and bench.class_names[0] == "airplane"
    assert all(
        bench.class_names[y] in bench.images.ids[i].replace("_", " ")
        for i, y in enumerate(bench.labels)
    )


def test_local_imagenet_mini_benchmark():
    require_shared_data("imagenet_mini", "labels.csv")
    bench = load_benchmark(cfg_of("benchmark", "imagenet_mini"), str(SHARED_DATA))
    assert (
        len(bench.labels) == 2300 and len(bench.class_names) == 1000 and len(bench.templates) == 7
    )


def test_nested_subsets_have_distinct_fingerprints():
    from asif_exp.data import Subset, SyntheticImages

    source = SyntheticImages(SyntheticShapes(0, 0, 10, 16, "shape"))
    first, second = (
        Subset(Subset(source, [0, 1, 2, 3]), [0, 1]),
        Subset(Subset(source, [5, 6, 7, 8]), [0, 1]),
    )
    assert first.ids == [source.ids[0], source.ids[1]] and second.ids == [
        source.ids[5],
        source.ids[6],
    ]
    assert first.fingerprint != second.fingerprint
    assert Subset(source, [5, 6]).fingerprint == second.fingerprint  # same images, same key


def write_split_pairs(tmp_path):
    write_images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    rows = [
        {"image": "img/a.png", "caption": "a dog", "split": "train"},
        {"image": "img/a.png", "caption": "a dog", "split": "train"},  # an exact repeat
        {"image": "img/b.png", "caption": "a cat", "split": "dev"},
        {"image": "img/c.png", "caption": "a cow", "split": "test"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_splits_select_records_in_file_order(tmp_path):
    path = write_split_pairs(tmp_path)
    cfg = cfg_of("anchors", "pairs_file", path=str(path), splits=["dev", "train"])
    anchors = load_anchors(cfg, str(tmp_path))
    assert anchors.captions == ["a dog", "a dog", "a cat"]  # file order, test left out
    with pytest.raises(DataError, match=r"anchors.splits \['val'\] not found.*'dev', 'test'"):
        load_anchors(OmegaConf.merge(cfg, {"splits": ["val"]}), str(tmp_path))
    with pytest.raises(DataError, match=r"line 1: no 'fold' field"):
        load_anchors(OmegaConf.merge(cfg, {"split_column": "fold"}), str(tmp_path))


@pytest.mark.parametrize("policy", ["keep", "drop", "error"])
def test_repeated_pairs_policy(tmp_path, policy):
    path = write_split_pairs(tmp_path)
    cfg = cfg_of("anchors", "pairs_file", path=str(path), repeated_pairs=policy)
    if policy == "error":
        with pytest.raises(DataError, match=r"1 repeated pairs, the first: pairs 0 and 1 are"):
            load_anchors(cfg, str(tmp_path))
        return
    anchors = load_anchors(cfg, str(tmp_path))
    assert anchors.repeats["count"] == 1 and anchors.repeats["policy"] == policy
    assert anchors.repeats["examples"][0] == {
        "first": 0, "repeat": 1, "image": "img/a.png", "caption": "a dog"
    }  # fmt: skip
    expected = (
        ["a dog", "a dog", "a cat", "a cow"] if policy == "keep" else ["a dog", "a cat", "a cow"]
    )
    assert anchors.captions == expected
    expected_ids = ["img/a.png", "img/a.png", "img/b.png", "img/c.png"]
    assert anchors.images.ids == (expected_ids if policy == "keep" else expected_ids[1:])
    with pytest.raises(DataError, match=r"anchors.repeated_pairs='sometimes': expected one of"):
        load_anchors(OmegaConf.merge(cfg, {"repeated_pairs": "sometimes"}), str(tmp_path))


def test_image_files_fingerprint_is_content_not_location(tmp_path):
    from asif_exp.data import ImageFiles

    write_images(tmp_path / "one", ["a.png", "b.png"])
    (tmp_path / "one").rename(tmp_path / "two")
    moved = ImageFiles(tmp_path / "two", ["a.png", "b.png"])
    write_images(tmp_path / "one", ["a.png", "b.png"])
    original = ImageFiles(tmp_path / "one", ["a.png", "b.png"])
    assert moved.fingerprint == original.fingerprint
    (tmp_path / "one" / "b.png").write_bytes((tmp_path / "one" / "a.png").read_bytes())
    assert ImageFiles(tmp_path / "one", ["a.png", "b.png"]).fingerprint != moved.fingerprint


def test_flickr8k_anchors_are_train_and_dev_in_file_order():
    require_shared_data("flickr8k", "captions.jsonl")
    anchors = load_anchors(compose_config(["anchors=flickr8k"]).anchors, str(SHARED_DATA))
    assert len(anchors.captions) == 30_000 and len(set(anchors.images.ids)) == 6_000
    assert anchors.repeats["policy"] == "keep" and anchors.repeats["count"] > 0
    rows = [json.loads(line) for line in (SHARED_DATA / "flickr8k" / "captions.jsonl").open()]
    expected = [r["caption"] for r in rows if r["split"] in ("train", "dev")]
    assert anchors.captions == expected


# ----------------------------------------------------------------------------- bad input (#13)


def test_image_folder_ignores_hidden_folders_and_files(tmp_path):
    write_images(tmp_path / "bench" / "cat", ["1.png", "._1.png"])  # macOS resource fork
    write_images(tmp_path / "bench" / "dog", ["1.png"])
    write_images(tmp_path / "bench" / ".ipynb_checkpoints", ["1-checkpoint.png"])
    bench = load_benchmark(cfg_of("benchmark", "image_folder", root="bench"), str(tmp_path))
    assert bench.class_names == ["cat", "dog"]
    assert bench.images.ids == ["cat/1.png", "dog/1.png"]


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    write_images(tmp_path / "bench" / "cat", ["1.png"])
    (tmp_path / "bench" / "dog").mkdir()
    (tmp_path / "bench" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*bench/dog holds no images"):
        load_benchmark(cfg_of("benchmark", "image_folder", root="bench"), str(tmp_path))


def load_pairs(tmp_path, name: str, content: bytes):
    write_images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / name).write_bytes(content)
    loader = name.rpartition(".")[2]
    return load_anchors(
        cfg_of("anchors", "pairs_file", path=str(tmp_path / name), loader=loader), str(tmp_path)
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # an unbalanced quote: the csv module reads on to the next quote, swallowing rows
        (
            b'image,caption\na.png,"a dog\nb.png,a cat\nc.png,a cow\n',
            r"pairs.csv, line 2: the record runs on to line 4 \(an unbalanced quote",
        ),
        # a caption with a line break inside quotes
        (
            b'image,caption\na.png,a dog\nb.png,"a cat\non a mat"\nc.png,a cow\n',
            r"pairs.csv, line 3: the record runs on to line 4",
        ),
        (b"image,caption\na.png,a dog\nb.png,a cat,extra\n", r"line 3: 3 fields, the header has 2"),
    ],
)
def test_csv_records_that_span_lines_or_misalign_name_the_line(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        load_pairs(tmp_path, "pairs.csv", content)


def test_csv_blank_lines_and_quoted_commas_are_fine(tmp_path):
    content = b'image,caption\na.png,"a dog, brown"\n\nb.png,a cat\n'
    assert load_pairs(tmp_path, "pairs.csv", content).captions == ["a dog, brown", "a cat"]


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.jsonl"])
def test_a_utf8_byte_order_mark_is_read(tmp_path, name):
    body = (
        "image,caption\na.png,a dog\n"
        if name.endswith("csv")
        else '{"image": "a.png", "caption": "a dog"}\n'
    )
    anchors = load_pairs(tmp_path, name, "\ufeff".encode() + body.encode())
    assert anchors.captions == ["a dog"] and anchors.images.ids == ["a.png"]


@pytest.mark.parametrize(
    ("line", "found"), [(b'["a.png", "a dog"]', "list"), (b'"a.png"', "str"), (b"7", "int")]
)
def test_a_json_line_that_is_not_an_object_names_the_line(tmp_path, line, found):
    content = b'{"image": "a.png", "caption": "a dog"}\n\n' + line + b"\n"
    with pytest.raises(
        DataError, match=rf"pairs.jsonl, line 3: expected a JSON object, found {found}"
    ):
        load_pairs(tmp_path, "pairs.jsonl", content)


def test_every_malformed_record_is_named_by_file_and_line(tmp_path):
    cases = [
        (b'{"image": "a.png", "caption": "x"}\n{"image": "b.png"}\n', "line 2: no 'caption'"),
        (
            b'{"image": "a.png", "caption": "x"}\n\n{"image": "z.png", "caption": "y"}\n',
            "line 3: image file not found",
        ),
        (b'{"image": "a.png", "caption": ""}\n', "line 1: caption of pair 0"),
    ]
    for content, message in cases:
        with pytest.raises(DataError, match=rf"pairs.jsonl, {message}"):
            load_pairs(tmp_path, "pairs.jsonl", content)
    with pytest.raises(DataError, match=r"pairs.csv, line 2: no 'caption' field"):
        load_pairs(tmp_path, "pairs.csv", b"image,text\na.png,x\n")


def test_an_unknown_loader_kind_lists_the_known_ones(tmp_path):
    with pytest.raises(DataError, match=r"anchors.loader='tsv': unknown loader; known: csv, hf, "):
        load_anchors(cfg_of("anchors", "pairs_file", loader="tsv"), str(tmp_path))
    with pytest.raises(DataError, match=r"benchmark.loader='folder': .*image_folder, labels_csv"):
        load_benchmark(cfg_of("benchmark", "image_folder", loader="folder"), str(tmp_path))
