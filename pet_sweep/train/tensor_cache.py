"""The cached pipeline's type transform (imports fastai: `data.build_data` loads it when needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from fastai.data.transforms import ToTensor
from fastai.vision.augment import Resize
from fastai.vision.core import PILImage
from fasttransform import Transform


class TensorCache(Transform):
    """An image as the model sees it (decoded, resized, uint8 C x H x W), kept for the data set's own files.

    The resize is fastai's own `Resize` as it treats the validation set (centre
    crop), so training images get the same crop every epoch. For square images
    (digits) that is exactly what the per-item `Resize` gives, pixel for pixel; for
    others (Pets' 500x375) the uncached pipeline's training crop slides along the
    long side from epoch to epoch, the cached one stays centred (the batch's random
    resized crop, flips and warps still vary). With augmentation `size` is the
    presized item (Resize 460 for Pets) and the random transforms run per batch.
    The DataLoaders (and so this cache) live as long as the worker process: every
    trial of it reads the same tensors, and `decoded` counts the files it decoded.

    It takes whatever `PILImage.create` takes (a path, a file name, a PIL image,
    bytes), so an exported learner's ``predict`` does too; only the files given as
    `keep` are cached, and a pickled copy (in ``learner.pkl``) keeps none.
    """

    def __init__(self, size: int, keep: Iterable[Path] = ()) -> None:
        super().__init__()
        self.input_types = object  # fastai's test_dl / predict check inputs against this
        self._resize, self._to_tensor = Resize(size), ToTensor()
        self._keep = frozenset(keep)
        self._tensors: dict[Path, Any] = {}
        self.decoded = 0  # files decoded, kept or not

    def encodes(self, item: object) -> Any:
        cached = self._tensors.get(item) if isinstance(item, Path) else None
        if cached is not None:
            return cached
        tensor = self._to_tensor(self._resize(PILImage.create(item), split_idx=1))
        self.decoded += 1
        if isinstance(item, Path) and item in self._keep:
            self._tensors[item] = tensor
        return tensor

    def __len__(self) -> int:
        return len(self._tensors)

    def __getstate__(self) -> dict[str, Any]:
        # a pickled learner carries none of this worker's cache, nor its count of decodes
        return {**self.__dict__, "_keep": frozenset(), "_tensors": {}, "decoded": 0}
