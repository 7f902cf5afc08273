"""Tuning of the Triton kernels' launch configurations on the GPU at hand (stage "tune" of run_gpu.sh).

    python -m benchmarks.tuning run --results DIR [--budget-s 150] [--table-out PATH]   # on the GPU
    python -m benchmarks.tuning prefilter     # CPU: compile the grid for sm_90, write benchmarks/tuning/grid.json
    python -m benchmarks.tuning grid          # print the problems and their candidate counts

Not a benchmark: it decides which launch configuration each kernel gets on a device and writes the
table `sage_fast/ops/launch.py` reads (`sage_fast/ops/tuned_launch.json`). The modules, in the order a
run uses them:

| module | what |
|---|---|
| `problems` | what is tuned: a kernel at one shape (`Problem`), the GPU run's list, the interpreter's tiny list |
| `candidates` | the heuristic and the grid of configurations tried against it; the sm_90-prefiltered grid file |
| `launches` | each problem's inputs and output buffers, and one launch exactly as the glue launches it |
| `precompile` | a pool of worker processes compiling the candidates ahead of the timing process |
| `measure` | the correctness gate, timing, confirmation rounds, the decision and the time budget of one problem |
| `table` | the table written from the decisions (the committed one with this device's decided keys replaced) |
| `tuner` | a whole run: every problem within the budget, tune.json and the table rewritten after each |
| `compile_sm90` | compiles the kernels for sm_90 on a CPU (ptxas' spill and shared-memory report): a child process |
| `prefilter` | runs `compile_sm90` over the grid and writes `grid.json`, the candidates the GPU run may try |

**Problems** (`problems.gpu_problems`, in this order, the most useful first): the adapter's forward, dx
and weight-gradient kernels at the benchmark's training shape (M = 128 x 197 token rows, d = 768, bf16
GEMM operands and activations, as under bf16 autocast, block epilogue) for r = 32, 256, 4, 8; then the
loss kernel at batch 512, fp32 logits (the model's), FIT on for C = 8142 and 1000, FIT off (the LA
loss alone) for C = 8142, with every gradient (training).

**Candidates** (`candidates.grid`): the heuristic of `sage_fast.ops.launch` first, then a small product of
block sizes and warps (row kernels: block_m x block_d x {4, 8} warps; weight gradients: block_m x block_d x
block_h x {4, 8} warps at the heuristic's two-waves split rule; loss: block_b x block_c x warps with 4
to 32 values per thread), and the heuristic's tile at other pipelining depths (num_stages). They are
tried nearest to the heuristic first (so a sweep cut short has covered its neighbourhood). The
weight-gradient kernel then tries one and four waves of split for its three best tiles. The grid is
pre-filtered on a CPU: `prefilter` compiles every candidate for sm_90 (`compile_sm90` as a child
process) and `grid.json` keeps those that compile without register spills and within sm_90's shared
memory; the GPU run tries only those.

**Each candidate**, in a fixed order: compiled (ahead, in a pool of worker processes calling the JIT's
`warmup`, so that the main process finds the binaries in Triton's cache), run once on outputs poisoned
with NaN and compared with the heuristic's outputs on the same inputs (the correctness gate: relative
error per output <= 1e-2 for bf16 / fp16 tensors, 1e-3 for fp32, integers exact, partial sums reduced
first; a candidate that fails is rejected and never timed), then timed: the median of CUDA-event
times of single launches, each after an L2 flush (`benchmarks.timing.median_time`).

**Decision** (`measure.decide`): the heuristic is timed at the start, middle and end of the sweep; the
three fastest candidates and the heuristic are then timed again in three interleaved rounds. The fastest
candidate wins only if its speedup over the heuristic (median times) is larger than the noise (the
spread, max - min over median, of the heuristic's and of its own repeated measurements) and than
`MIN_MARGIN` (3%). A winner becomes a table entry keyed by (device name, d, r, dtype) or (device name,
C, dtype, FIT); no winner removes the device's entry for that key (the heuristic stays).

**Budget** (`measure.Budget`): the run stops measuring at --budget-s; each problem gets an equal share
of what is left when it starts (time a problem does not use passes to the next), and a sweep stops when
its share is spent, keeping what it measured; its confirmation rounds are kept inside the share.
SIGINT (run_gpu.sh's time limit) ends the run the same way. After every problem the log (tune.json)
and the table are rewritten, so a run cut short keeps every problem it decided.

**Output**: DIR/tune.json (every candidate: configuration, gate, time; the decisions) and the table:
the committed `sage_fast/ops/tuned_launch.json` with this device's decided keys replaced, written to
--table-out (default DIR/tuned_launch.json); run_gpu.sh exports it. It is not installed in the
running checkout: every stage of one run measures the committed table; commit the file and the next
run confirms it (it times the heuristic again, and the entry's configuration among the candidates).

Importing this package imports no kernel: `compile_sm90` must import the kernels itself, outside
Triton's interpreter.
"""
