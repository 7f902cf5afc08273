"""Long-tailed data sets, CLIP transforms, samplers and loaders.

| module          | what                                                                                  |
| --------------- | ------------------------------------------------------------------------------------- |
| `registry`      | the data-set names, `register_dataset`, `build_data(cfg.data, image_size)`            |
| `datasets`      | `Sample`, `LTDataset`, `ImageListDataset`, `ArrayDataset`, `LTData`                   |
| `transforms`    | CLIP mean / std, `build_transform` (and reduced-scale JPEG decoding), augmentation seeds |
| `loaders`       | samplers, `collate_skip`, `build_loader`, `batch_on_device`, input-pipeline speed     |
| `shards`        | prepared data (``data.prepared``): manifest format, `PreparedDataset`                 |
| `prepare`       | ``sage-fast prepare``: decode, check, resize into tar shards, resumable, in processes  |
| `gpu_decode`    | `GpuBatchTransform`: decode and augment a raw batch on the GPU                        |
| `unreadable`    | unreadable images: the check before training and the limit during it                  |
| `cifar`         | the CIFAR-100 python archive (restricted unpickler) and the CIFAR-100-LT subsampling  |
| `split_files`   | ``relative/path label`` split files (ImageNet-LT, Places-LT, LIFT lists, folder)      |
| `inaturalist`   | iNaturalist 2018's JSON annotations and ``categories.json``                           |
| `class_names`   | class names from a names file, synset / Places365 category files or directories       |
| `images`        | opening image files (regular files only) and converting them to 8-bit RGB (`to_rgb`)  |
| `text_files`    | the data set's text files read as UTF-8, a bad byte named by file, line and offset    |
"""
from .cifar import cifar100_lt_indices, cifar_lt_counts, load_cifar100
from .class_names import read_class_names
from .datasets import ArrayDataset, ImageListDataset, LTData, LTDataset, Sample
from .gpu_decode import GpuBatchTransform
from .images import open_image_file, open_rgb, to_rgb
from .inaturalist import read_inat_categories, read_inat_json
from .loaders import (
    Batch,
    ShardSampler,
    TrainSampler,
    batch_on_device,
    bench_input_pipeline,
    build_loader,
    collate_skip,
    measure_input_pipeline,
)
from .shards import PreparedDataset, read_manifest
from .registry import BuildContext, build_data, dataset_names, register_dataset
from .split_files import read_split_file
from .transforms import CLIP_MEAN, CLIP_STD, ReducedDecode, build_transform, sample_seed, test_resize_size

__all__ = [
    "ArrayDataset",
    "Batch",
    "BuildContext",
    "CLIP_MEAN",
    "CLIP_STD",
    "GpuBatchTransform",
    "ImageListDataset",
    "LTData",
    "LTDataset",
    "PreparedDataset",
    "ReducedDecode",
    "Sample",
    "ShardSampler",
    "TrainSampler",
    "batch_on_device",
    "bench_input_pipeline",
    "build_data",
    "build_loader",
    "build_transform",
    "cifar100_lt_indices",
    "cifar_lt_counts",
    "collate_skip",
    "dataset_names",
    "load_cifar100",
    "measure_input_pipeline",
    "open_image_file",
    "open_rgb",
    "read_class_names",
    "read_inat_categories",
    "read_inat_json",
    "read_manifest",
    "read_split_file",
    "register_dataset",
    "sample_seed",
    "test_resize_size",
    "to_rgb",
]
