"""Tests for the built-in class names and prompt templates (asif_exp.data.prompts)."""

from __future__ import annotations

from pathlib import Path

import pytest

import asif_exp.data.prompts as prompts
from asif_exp.data.prompts import (
    available_class_names,
    available_templates,
    load_class_names,
    load_templates,
    parse_templates,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_TEST = SHARED_DATA / "cifar10_test"
SYNSET_WORDS = SHARED_DATA / "imagenet_mini" / "synset_words.txt"

CLASS_COUNTS = {
    "cifar10": 10,
    "cifar100": 100,
    "imagenet1k": 1000,
    "oxford_pets": 37,
    "oxford_pets_asif": 37,
}
TEMPLATE_COUNTS = {
    "imagenet7": 7,
    "cifar18": 18,
    "imagenet80": 80,
    "pets3": 3,
    "photo1": 1,
}
PET_CATS = {
    "abyssinian",
    "bengal",
    "birman",
    "bombay",
    "british shorthair",
    "egyptian mau",
    "maine coon",
    "persian",
    "ragdoll",
    "russian blue",
    "siamese",
    "sphynx",
}


def test_available_lists_all_builtins():
    assert set(CLASS_COUNTS) <= set(available_class_names())
    assert set(TEMPLATE_COUNTS) <= set(available_templates())
    assert available_class_names() == sorted(available_class_names())
    assert available_templates() == sorted(available_templates())


@pytest.mark.parametrize(("name", "count"), sorted(CLASS_COUNTS.items()))
def test_class_name_counts(name, count):
    names = load_class_names(name)
    assert len(names) == count
    assert all(n and n == n.strip() for n in names)


@pytest.mark.parametrize(("name", "count"), sorted(TEMPLATE_COUNTS.items()))
def test_template_counts_and_placeholder(name, count):
    templates = load_templates(name)
    assert len(templates) == count
    assert len(set(templates)) == count
    for t in templates:
        assert t.count("{}") == 1, t
        assert "{" not in t.format("x") and "}" not in t.format("x")


def test_cifar100_names_unique_and_spaced():
    names = load_class_names("cifar100")
    assert len(set(names)) == 100
    assert not any("_" in n for n in names)
    assert names[:2] == ["apple", "aquarium fish"]
    assert names[47] == "maple tree"
    assert names[-1] == "worm"
    # torchvision's fine-label order is alphabetical in the underscore spelling
    assert [n.replace(" ", "_") for n in names] == sorted(n.replace(" ", "_") for n in names)


def test_pets_names():
    plain = load_class_names("oxford_pets")
    asif = load_class_names("oxford_pets_asif")
    assert plain == sorted(plain)  # label order = alphabetical by original file name
    assert plain[0] == "abyssinian" and plain[1] == "american bulldog"
    assert plain[-1] == "yorkshire terrier"
    assert all(n == n.lower() for n in plain + asif)
    assert PET_CATS <= set(plain)
    for breed, name in zip(plain, asif, strict=True):
        assert name == f"{breed} {'cat' if breed in PET_CATS else 'dog'}"
    assert asif[0] == "abyssinian cat" and asif[1] == "american bulldog dog"


def test_imagenet7_is_subset_of_imagenet80():
    assert set(load_templates("imagenet7")) <= set(load_templates("imagenet80"))


def test_cifar18_and_photo1():
    cifar = load_templates("cifar18")
    assert cifar[0] == "a photo of a {}." and cifar[-1] == "a photo of the big {}."
    assert load_templates("photo1") == ["a photo of a {}."]
    assert load_templates("pets3") == ["a type of pet {}.", "a {} texture.", "{} , an animal."]


def test_load_returns_fresh_lists():
    a = load_class_names("cifar10")
    a.append("junk")
    assert len(load_class_names("cifar10")) == 10


@pytest.mark.parametrize("loader", [load_class_names, load_templates])
@pytest.mark.parametrize("bad", ["no_such_set", "../classnames/cifar10", ""])
def test_unknown_name_raises(loader, bad):
    with pytest.raises(ValueError) as err:
        loader(bad)
    msg = str(err.value)
    assert repr(bad) in msg
    assert "available" in msg
    expected = "cifar10" if loader is load_class_names else "photo1"
    assert expected in msg


@pytest.mark.parametrize(
    "line",
    ["a photo of a cat.", "a {} photo of a {}.", "a photo of a {0}.", "a {x} of {}.", "{ }"],
)
def test_parse_templates_rejects_bad_line(line):
    text = f"a photo of a {{}}.\n{line}\n"
    with pytest.raises(ValueError, match=r"my_file\.txt, line 2"):
        parse_templates(text, "my_file.txt")


def test_parse_templates_rejects_empty_line_and_accepts_good_text():
    with pytest.raises(ValueError, match="line 2"):
        parse_templates("a {}.\n\nb {}.\n", "f.txt")
    with pytest.raises(ValueError):
        parse_templates("", "f.txt")
    assert parse_templates("  a {}.  \r\nb {}.", "f.txt") == ["a {}.", "b {}."]


def test_malformed_template_file_raises_with_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "templates").mkdir()
    (tmp_path / "classnames").mkdir()
    (tmp_path / "templates" / "broken.txt").write_text("a photo of a {}.\nno placeholder\n")
    (tmp_path / "classnames" / "gappy.txt").write_text("cat\n\ndog\n")
    monkeypatch.setattr(prompts, "_resource_dir", lambda kind: tmp_path / kind)
    assert available_templates() == ["broken"]
    with pytest.raises(ValueError, match=r"templates/broken\.txt, line 2"):
        load_templates("broken")
    with pytest.raises(ValueError, match=r"classnames/gappy\.txt, line 2"):
        load_class_names("gappy")


def test_package_data_location():
    root = Path(prompts.__file__).parent
    for name in CLASS_COUNTS:
        assert (root / "classnames" / f"{name}.txt").is_file()
    for name in TEMPLATE_COUNTS:
        assert (root / "templates" / f"{name}.txt").is_file()


def test_cifar10_matches_shared_folders():
    if not CIFAR10_TEST.is_dir():
        pytest.skip(f"shared CIFAR-10 test split not found at {CIFAR10_TEST}")
    folders = sorted(p.name for p in CIFAR10_TEST.iterdir() if p.is_dir())
    assert load_class_names("cifar10") == folders


def test_imagenet_names_line_up_with_synset_words():
    if not SYNSET_WORDS.is_file():
        pytest.skip(f"shared ImageNet synset_words.txt not found at {SYNSET_WORDS}")
    synsets = SYNSET_WORDS.read_text().splitlines()
    names = load_class_names("imagenet1k")
    assert len(synsets) == len(names) == 1000
    expected = {0: "tench", 1: "goldfish", 207: "golden retriever", 281: "tabby cat"}
    for idx, word in expected.items():
        assert names[idx].lower() == word
        assert word in synsets[idx].lower(), (idx, synsets[idx])
