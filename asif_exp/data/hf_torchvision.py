"""Datasets through libraries: Hugging Face `datasets` (hub names or local copies) and
`torchvision.datasets` classes, from local files only."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from asif_exp.data.common import AnchorSet, sha_of, to_rgb
from asif_exp.data.registry import anchor_loader, benchmark_loader
from asif_exp.errors import DataError


class HFImages:
    """An image column of a Hugging Face `datasets.Dataset`."""

    def __init__(self, dataset, column: str, description: str):
        if column not in dataset.column_names:
            raise DataError(f"{description}: no column {column!r}; columns: {dataset.column_names}")
        self.dataset, self.column = dataset, column
        self.ids = [f"{i}" for i in range(len(dataset))]
        self.fingerprint = {
            "source": "hf",
            "description": description,
            "hf_fingerprint": getattr(dataset, "_fingerprint", None),
            "ids_sha": sha_of(self.ids),
        }

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Image.Image:
        image = self.dataset[index][self.column]
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                return to_rgb(opened)
        return to_rgb(image)


def load_hf_dataset(path: str | None, config: str | None, split: str, data_root: str, what: str):
    import datasets

    if not path:
        raise DataError(f"{what}: set the HF dataset name or local directory in `path`/`root`")
    local = Path(path.format(data_root=data_root)).expanduser()
    if local.exists():
        if local.is_dir() and (local / "dataset_info.json").exists():
            return datasets.load_from_disk(str(local))
        return datasets.load_dataset(str(local), config, split=split)
    if local.is_absolute() or path.startswith((".", "~", "{data_root}")):
        raise DataError(f"{what}: {local} does not exist")
    try:  # a hub name: needs a network (or a warm HF cache)
        return datasets.load_dataset(path, config, split=split)
    except Exception as error:
        raise DataError(f"{what}: could not load Hugging Face dataset {path!r}: {error}") from error


@anchor_loader("hf")
def hf_anchors(cfg, data_root: str) -> AnchorSet:
    dataset = load_hf_dataset(cfg.path, cfg.hf_config, cfg.split, data_root, f"anchors {cfg.name}")
    if cfg.limit is not None:
        dataset = dataset.select(range(min(cfg.limit, len(dataset))))
    images = HFImages(dataset, cfg.image_column, f"{cfg.path}:{cfg.split}")
    if cfg.caption_column not in dataset.column_names:
        raise DataError(f"anchors {cfg.name}: no column {cfg.caption_column!r}")
    return AnchorSet(cfg.name, images, [str(c) for c in dataset[cfg.caption_column]])


@benchmark_loader("hf")
def hf_benchmark(cfg, data_root: str, class_names):
    what = f"benchmark {cfg.name}"
    dataset = load_hf_dataset(cfg.root, cfg.hf_config, cfg.split, data_root, what)
    images = HFImages(dataset, cfg.image_column, f"{cfg.root}:{cfg.split}")
    labels = [int(y) for y in dataset[cfg.label_column]]
    if class_names is None:
        feature = dataset.features.get(cfg.label_column)
        class_names = list(getattr(feature, "names", None) or [])
    return images, labels, class_names


class _TorchvisionImages:
    def __init__(self, dataset, description: str):
        self.dataset = dataset
        self.ids = [f"{i}" for i in range(len(dataset))]
        self.fingerprint = {
            "source": "torchvision",
            "description": description,
            "ids_sha": sha_of(self.ids),
        }

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Image.Image:
        return to_rgb(self.dataset[index][0])


@benchmark_loader("torchvision")
def torchvision_benchmark(cfg, data_root: str, class_names):
    import inspect

    import torchvision.datasets as tvd

    if not cfg.torchvision_class or not hasattr(tvd, cfg.torchvision_class):
        raise DataError(
            f"benchmark {cfg.name}: unknown torchvision_class {cfg.torchvision_class!r}"
        )
    klass = getattr(tvd, cfg.torchvision_class)
    root = Path((cfg.root or "{data_root}").format(data_root=data_root))
    parameters = inspect.signature(klass).parameters
    kwargs = {"train": cfg.split == "train"} if "train" in parameters else {"split": cfg.split}
    try:
        dataset = klass(str(root), download=False, **kwargs)
    except RuntimeError as error:
        raise DataError(
            f"benchmark {cfg.name}: {cfg.torchvision_class} not found under {root}: {error}"
        ) from None
    targets = getattr(dataset, "targets", None) or getattr(dataset, "_labels", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    names = class_names or list(getattr(dataset, "classes", []))
    return (
        _TorchvisionImages(dataset, f"{cfg.torchvision_class}:{cfg.split}:{root}"),
        [int(t) for t in targets],
        names,
    )
