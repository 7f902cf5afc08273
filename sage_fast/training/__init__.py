"""The training layer: run config, data, the trainer and its side jobs, evaluation and the experiments.
Uses `sage_fast.model` and `sage_fast.ops`; the command line (`sage_fast.cli`) sits above it.

| module             | what                                                                              |
| ------------------ | --------------------------------------------------------------------------------- |
| `config`           | `SageConfig` (data, model, optim, train, eval), Table 8 presets, YAML, overrides, comparing configs |
| `data`             | data sets (a registry of names), transforms, samplers, loaders, shards, GPU decoding |
| `trainer`          | `Trainer` (the loop, the step, evaluation), `train`, the lr schedule               |
| `preflight`        | the checks a run passes before anything is built                                  |
| `distributed`      | one process of a torchrun job: device, precision, process group, seeding, rank     |
| `preemption`       | SIGTERM / SIGUSR1: stop at a step boundary with a checkpoint (`Preempted`)         |
| `run_folder`       | the files of a run folder, its lock and marker, claiming it, `RunFolderError`     |
| `checkpoint`       | checkpoints and RNG states, the safetensors export, reading trained weights      |
| `run_log`          | train_log.csv, eval_log.csv and TensorBoard                                       |
| `evaluation`       | top-1 on a test split, sharded over processes                                     |
| `metrics`          | many / medium / few accuracy, metrics.json, per_class.csv and the plot            |
| `tte`              | test-time ensembling (``eval.tte``: five / ten crops, logits averaged)            |
| `inference`        | trained weights at work: their config, loading, `evaluate_weights`, predicting images |
| `attention_figure` | the figure of class-token attention, zero-shot CLIP vs fine-tuned                 |
| `reuse`            | finished runs reused by sweep and ablate (the same config and data)               |
| `sweep`            | one run per value of one or two keys; sweep.csv and sweep.png                     |
| `ablate`           | the ladder of Tables 5 and 6; ablation.md and ablation.csv                        |
| `demo`             | a tiny generated long-tailed data set, trained on CPU                             |
| `errors`           | `UserError`, and which exceptions are the user's mistakes (one line, exit status 2) |
"""
