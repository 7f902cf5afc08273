"""The training layer: run config, data, trainer, CLI. Uses `sage_fast.model` and `sage_fast.ops`.

| module         | what                                                                                 |
| -------------- | ------------------------------------------------------------------------------------ |
| `config`       | `SageConfig` (data, model, optim, train), the Table 8 presets, YAML, CLI overrides   |
| `data`         | data sets (a registry of names), transforms, samplers, loaders, GPU decoding         |
| `loop`         | `Trainer`, `train`, `evaluate_weights`, `bench_input_pipeline`, the lr schedule      |
| `checkpoint`   | atomic writes, checkpoints and RNG states, the safetensors export, `load_weights`    |
| `distributed`  | one process of a torchrun job: device, process group, barrier, seeding               |
| `metrics`      | many / medium / few accuracy, CSV logs, metrics.json, per_class.csv and the plot     |
| `cli`          | the `sage-fast` command (`demo`, `train`, `eval`)                                    |
| `errors`       | `UserError`, and which exceptions the command prints as one line (exit status 2)      |
| `demo`         | `sage-fast demo`: a tiny generated data set, trained on CPU                          |
"""
