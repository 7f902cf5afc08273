"""The training layer: run config, data, trainer, CLI. Uses `sage_fast.model` and `sage_fast.ops`.

| module         | what                                                                                 |
| -------------- | ------------------------------------------------------------------------------------ |
| `config`       | `SageConfig` (data, model, optim, train, eval), Table 8 presets, YAML, overrides     |
| `data`         | data sets (a registry of names), transforms, samplers, loaders, GPU decoding         |
| `loop`         | `Trainer`, `train`, `evaluate_weights`, `bench_input_pipeline`, the lr schedule      |
| `checkpoint`   | atomic writes, checkpoints and RNG states, the safetensors export, `load_weights`    |
| `distributed`  | one process of a torchrun job: device, process group, barrier, seeding               |
| `metrics`      | many / medium / few accuracy, CSV logs, metrics.json, per_class.csv and the plot     |
| `tte`          | test-time ensembling (``eval.tte``: five / ten crops, logits averaged)               |
| `predict`      | `sage-fast predict`: top-k classes of images; `load_trained` (weights -> model)      |
| `attention_maps` | `sage-fast attention`: class-token attention, zero-shot CLIP vs fine-tuned   |
| `sweep`        | `sage-fast sweep`: one run per value of one or two keys; `run_or_reuse`              |
| `cli`          | the `sage-fast` command (`demo`, `train`, `eval`, `predict`, `attention`, `sweep`)   |
| `errors`       | `UserError`, and which exceptions the command prints as one line (exit status 2)      |
| `demo`         | `sage-fast demo`: a tiny generated data set, trained on CPU                          |
"""
