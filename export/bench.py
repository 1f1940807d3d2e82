"""The bench stage: latency, size, memory and accuracy of exported models beside their float baselines.

Every run measures, together, the float32 ONNX graph (the reference every ratio is taken against),
PyTorch eager float32 (what the user had before exporting) and each model asked for. Each target
runs in its own worker process (`rotaq.export.bench_worker`), pinned to the same cores; repeats are
interleaved round by round across targets, so a slow spell on the machine touches every model
alike. Medians are reported with their spread. Perplexity, KL divergence and top-1 agreement are
measured on the ONNX graphs themselves, against the float32 graph, on the held-out split.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rotaq.pipeline.progress import progress_bar

from rotaq.eval.tables import markdown_table, write_table
from rotaq.export.bench_worker import EAGER, GENAI, ONNX, TargetSpec, serve
from rotaq.export.genai_folder import GENAI_CONFIG, genai_available
from rotaq.export.layout import ExportLayout, read_layout
from rotaq.export.runtime import CPU, CUDA
from rotaq.pipeline.atomic import atomic_write, write_json_atomic
from rotaq.pipeline.data import DataSpec
from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.pipeline.options import setting

BENCH_FILE = "bench.json"  # rotaq.pipeline.run.stage_registry.BENCH_FILE: a JSON list of rows
META_FILE = "bench_meta.json"
REFERENCE_FOLDER = "reference-fp32"
PEERS = ("genai",)
COLUMNS = ["model", "scheme", "runtime", "kernels", "prefill_ms_128", "prefill_ms_512", "decode_tokens_per_s",
           "file_mb", "peak_rss_mb", "perplexity", "kl_divergence", "top1_agreement", "prefill_speedup_128",
           "prefill_speedup_512", "decode_speedup", "decode_vs_peer", "prefill_vs_peer_512", "size_ratio"]
# The builder graph at the same weight precision, for the "× peer" columns.
PEER_FOR_WEIGHT_BITS = {4: "genai int4", 8: "genai int8", 32: "genai fp32"}


@dataclass(frozen=True)
class BenchOptions:
    models: tuple[str, ...]
    out: Path
    reference: str | None = None  # a float32 export; found among `models` or exported from their float parent
    prompt_lengths: tuple[int, ...] = setting((128, 512), "prompt lengths whose prefill time is measured", minimum=1)
    cached_tokens: int = setting(256, "KV cache length before decoding", minimum=1)
    decode_tokens: int = setting(64, "tokens generated to measure decode speed", minimum=1)
    threads: int | None = setting(None, "ONNX Runtime intra-op threads (null: all cores)", minimum=1)
    repeats: int = setting(5, "interleaved timing rounds per model (medians are reported)", minimum=1)
    warmup: int = setting(1, "untimed rounds first", minimum=0)
    # a prefill sample is the best of this many calls (see bench_worker.serve)
    prefill_calls: int = setting(3, "calls per prefill sample (the best one counts)", minimum=1)
    eager: bool = setting(True, "also time PyTorch eager float32")
    cuda: bool = setting(True, "also time on CUDA when onnxruntime-gpu and a GPU are present")
    evaluation: DataSpec = DataSpec(seq_len=512, max_tokens=16 * 512)
    perplexity: bool = setting(True, "measure the graphs' perplexity on held-out text")
    genai: bool = setting(True, "also time each export through onnxruntime-genai's Generator, the loop the peer "
                          "is timed with (when onnxruntime-genai is installed)")
    profile: bool = setting(False, "profile one decode step of the first 4-bit export and of the builder's int4 "
                            "graph with ONNX Runtime's profiler: profile.md with the time per operator type")
    peers: tuple[str, ...] = setting((), "also build and time onnxruntime-genai's int4/int8/fp32 builder graphs of the "
                                     "source model in the same bench: genai (needs the 'peer' extra)",
                                     choices=lambda: PEERS, flag="--peer", old_names=("peer",))
    progress: bool = True
    extra_fields: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            raise RotaqError("bench needs at least one exported model folder")
        if min(self.repeats, self.prefill_calls, self.decode_tokens, self.cached_tokens) < 1 or self.warmup < 0:
            raise RotaqError("bench: repeats, prefill_calls, decode_tokens and cached_tokens must be at least 1, "
                             "warmup at least 0")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise RotaqError(f"bench: prompt lengths {self.prompt_lengths} must be positive")
        unknown = set(self.peers) - set(PEERS)
        if unknown:
            raise RotaqError(f"unknown peer(s) {', '.join(sorted(unknown))}; available: {', '.join(PEERS)}")


@dataclass
class Target:
    """One timed row: a model on a runtime, its worker, and the samples it collected."""

    label: str
    spec: TargetSpec
    layout: ExportLayout | None
    description: dict[str, Any] = field(default_factory=dict)  # scheme, kernels, file_mb
    samples: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def runtime(self) -> str:
        if self.spec.kind in (EAGER, GENAI):
            return self.spec.kind
        return "onnxruntime-cuda" if self.spec.provider == CUDA else "onnxruntime-cpu"

    @classmethod
    def for_export(cls, layout: ExportLayout, threads: int) -> Target:
        return cls(_label(layout), TargetSpec(ONNX, str(layout.folder), threads), layout,
                   {"scheme": scheme_label(layout), "kernels": kernel_summary(layout),
                    "file_mb": graph_size_mb(layout), **graph_identity(layout)})

    def on_cuda(self) -> Target:
        """The same export timed on CUDA; its description (and graph hash) is the CPU target's."""
        return Target(self.label, TargetSpec(ONNX, self.spec.path, self.spec.threads, CUDA), self.layout,
                      dict(self.description))

    def logits_fn(self) -> Any:
        """The graph's logits callable for scoring, or None where it is not scored (PyTorch, CUDA)."""
        if self.spec.provider != CPU or self.spec.kind == EAGER:
            return None
        if self.spec.kind == GENAI:
            if self.layout is not None:  # a rotaq export: the same graph is scored on its ONNX Runtime row
                return None
            from rotaq.export.peer_genai import GenaiTimed

            return GenaiTimed(self.spec.path, self.spec.threads).logits
        from rotaq.export.runtime import OnnxDecoder

        return OnnxDecoder(Path(self.spec.path), threads=self.spec.threads).logits


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_quantized(layout: ExportLayout) -> bool:
    return bool((layout.manifest.get("source_manifest") or {}).get("quantization"))


def scheme_label(layout: ExportLayout) -> str:
    """The quantization scheme the export carries, or fp32; '+rot' when the model was rotated."""
    source = layout.manifest.get("source_manifest") or {}
    scheme = (source.get("quantization") or {}).get("scheme", {}).get("name", "fp32")
    weights = (source.get("quantization") or {}).get("weights")
    return scheme + (f" {weights}" if weights else "") + (" +rot" if source.get("rotation") else "")


def kernel_summary(layout: ExportLayout) -> str:
    """How the exported linears run, e.g. 'matmul_nbits acc4 ×210, matmul_nbits acc0 ×1'."""
    kinds = Counter()
    for linear in layout.manifest.get("linears", {}).values():
        level = f" acc{linear['accuracy_level']}" if "accuracy_level" in linear else ""
        kinds[f"{linear['kind']}{level}"] += 1
    return ", ".join(f"{kind} ×{count}" for kind, count in kinds.most_common()) or "float MatMul"


def graph_size_mb(layout: ExportLayout) -> float:
    """Bytes on disk of the graph and its external weights, in MiB."""
    return sum(path.stat().st_size for path in layout.graph_files()) / 2**20


def graph_identity(layout: ExportLayout) -> dict[str, str]:
    """What the CI gate matches baseline rows by: the SHA-256 of the graph files as they are now, and the
    model's shape. Each file's hash must also be the one export.json recorded: a corrupted or edited graph
    is refused before it is timed (the hashes are computed here anyway)."""
    import hashlib

    from rotaq.pipeline.artifacts import sha256_file

    digest = hashlib.sha256()
    recorded = layout.manifest.get("files", {})
    for path in layout.graph_files():
        file_digest = sha256_file(path)
        name = str(path.relative_to(layout.folder))
        if name in recorded and recorded[name] != file_digest:
            raise ArtifactError(f"{path} does not match the SHA-256 in {layout.folder / 'export.json'}: the graph "
                                "was modified or corrupted; export it again")
        digest.update(f"{path.name}:{file_digest}\n".encode())
    return {"graph_sha256": digest.hexdigest(),
            "shape": (f"{layout.num_layers} layers, {layout.num_kv_heads} kv heads x {layout.head_dim}, "
                      f"vocab {layout.vocab_size}")}


def float_parent(layout: ExportLayout) -> str:
    """The float model an export came from: the model itself, or the quantize stage's input."""
    source = layout.manifest.get("model_source") or {}
    if is_quantized(layout):
        source = source.get("origin") or {}
    reference = source.get("path") or source.get("id")
    if not reference:
        raise ArtifactError(f"{layout.folder}: export.json does not say which float model it came from")
    return str(reference)


def resolve_reference(options: BenchOptions, layouts: list[ExportLayout]) -> ExportLayout:
    """The float32 export every ratio is taken against: given, found among the models, or exported
    (once, into OUT/reference-fp32) from the float parent of the first model."""
    if options.reference is not None:
        layout = read_layout(Path(options.reference))
        if is_quantized(layout):
            raise RotaqError(f"--reference {options.reference} is quantized; give a float32 export")
        return layout
    for layout in layouts:
        if not is_quantized(layout):
            return layout
    parent = float_parent(layouts[0])
    folder = Path(options.out) / REFERENCE_FOLDER
    if folder.is_dir():
        cached = read_layout(folder)
        if float_parent(cached) == parent:
            return cached
    from rotaq.export.stage import ExportOptions, run_export

    print(f"no float32 export among the models: exporting {parent} to {folder} as the reference")
    return read_layout(run_export(ExportOptions(model=parent, out=folder)))


def build_targets(options: BenchOptions, threads: int) -> tuple[list[Target], dict[str, Any]]:
    layouts = [read_layout(Path(model)) for model in options.models]
    reference = resolve_reference(options, layouts)
    ordered = [reference, *(layout for layout in layouts if layout.folder.resolve() != reference.folder.resolve())]
    notes: dict[str, Any] = {}
    targets = [Target.for_export(layout, threads) for layout in ordered]
    if options.eager:
        targets.insert(1, Target(_label(reference), TargetSpec(EAGER, float_parent(reference), threads), None,
                                 {"scheme": "fp32", "kernels": "PyTorch eager (transformers)"}))
    if options.genai and genai_available():
        # Each export also through onnxruntime-genai's Generator, the loop the peer is timed with.
        targets += [Target(t.label, TargetSpec(GENAI, t.spec.path, threads), t.layout, dict(t.description))
                    for t in list(targets) if t.spec.kind == ONNX and (t.layout.folder / GENAI_CONFIG).is_file()]
    if "genai" in options.peers:
        targets += genai_targets(reference, Path(options.out), threads)
    import onnxruntime as ort

    if options.cuda and CUDA in ort.get_available_providers():
        targets += [t.on_cuda() for t in targets if t.spec.kind == ONNX]
    else:
        notes["cuda"] = ("skipped: disabled" if not options.cuda else
                         "skipped: this onnxruntime has no CUDAExecutionProvider (install the onnxruntime-gpu extra)")
    return targets, notes


def genai_targets(reference: ExportLayout, out: Path, threads: int) -> list[Target]:
    """onnxruntime-genai builder graphs (int4, int8 and fp32, CPU defaults) of the original float model."""
    from rotaq.export.peer_genai import PRECISIONS, build_peer, graph_files_mb, original_float_model

    model = original_float_model(reference.manifest.get("model_source") or {})
    targets = []
    for precision in PRECISIONS:
        folder = build_peer(model, precision, out / f"peer-genai-{precision}", out)
        targets.append(Target(folder.name, TargetSpec(GENAI, str(folder), threads), None,
                              {"scheme": f"genai {precision}", "file_mb": graph_files_mb(folder),
                               "kernels": ("GroupQueryAttention, float32 MatMul" if precision == "fp32" else
                                           "GroupQueryAttention, MatMulNBits block 32 acc4 (builder defaults)")}))
    return targets


def _label(layout: ExportLayout) -> str:
    return layout.folder.name


class Workers:
    """One spawned worker process per target, started before timing and stopped afterwards."""

    def __init__(self, targets: list[Target]) -> None:
        context = multiprocessing.get_context("spawn")
        self.targets = targets
        self.pipes, self.processes = [], []
        for target in targets:
            parent, child = context.Pipe()
            process = context.Process(target=serve, args=(child, target.spec), daemon=True)
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)
            target.info.update(self._receive(len(self.pipes) - 1))

    def ask(self, index: int, *request: Any) -> Any:
        self.pipes[index].send(request)
        return self._receive(index)

    def _receive(self, index: int) -> Any:
        target = self.targets[index]
        if not self.pipes[index].poll(3600):
            raise RotaqError(f"bench worker for {target.label} ({target.runtime}) stopped answering")
        try:
            status, payload = self.pipes[index].recv()
        except EOFError as exc:
            raise RotaqError(f"bench worker for {target.label} ({target.runtime}) died; "
                             f"exit code {self.processes[index].exitcode}") from exc
        if status == "error":
            raise RotaqError(f"bench of {target.label} ({target.runtime}) failed: {payload}")
        return payload

    def close(self) -> None:
        for pipe, process in zip(self.pipes, self.processes, strict=True):
            if process.is_alive():
                pipe.send(("stop",))
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def time_rounds(workers: Workers, options: BenchOptions, warmup: int, rounds: int, first_round: int = 0) -> None:
    """`warmup` untimed rounds, then `rounds` timed ones. A round runs each measure on every target back
    to back, in an order that rotates from round to round (continuing from `first_round`), so the
    samples a ratio pairs are timed seconds apart, not a whole round apart.

    A prefill sample is the best of `prefill_calls` calls, taken in turns across the targets (A B A B …):
    interference only ever adds time, and a prefill is one call, so being timed more than once, in the
    same window as the reference, is its defence against a busy spell. Decode records the run's total
    and its median step ("decode_step"), which a step the machine interrupted does not move."""
    targets = workers.targets
    measures = [*(f"prefill_{length}" for length in options.prompt_lengths), "decode"]
    with progress_bar(total=(warmup + rounds) * len(targets) * len(measures), desc="bench",
                      disable=not options.progress) as bar:
        for round_index in range(first_round, first_round + warmup + rounds):
            shift = round_index % len(targets)
            order = list(range(len(targets)))[shift:] + list(range(len(targets)))[:shift]
            measured: list[dict[str, float]] = [{} for _ in targets]
            for length in options.prompt_lengths:
                key = f"prefill_{length}"
                for _ in range(options.prefill_calls):
                    for index in order:
                        seconds = workers.ask(index, "prefill", length)
                        measured[index][key] = min(seconds, measured[index].get(key, math.inf))
                bar.update(len(targets))
            for index in order:
                bar.set_postfix_str(f"{targets[index].label} {targets[index].runtime}")
                total, step = workers.ask(index, "decode", options.cached_tokens, options.decode_tokens)
                measured[index].update(decode=total, decode_step=step)
                bar.update()
            if round_index >= first_round + warmup:
                for target, values in zip(targets, measured, strict=True):
                    for key, seconds in values.items():
                        target.samples.setdefault(key, []).append(seconds)


def spread_pct(samples: list[float]) -> float:
    """(max − min) / median over the repeats, in percent."""
    median = statistics.median(samples)
    return 100.0 * (max(samples) - min(samples)) / median if median > 0 else 0.0


def timing_fields(target: Target, options: BenchOptions) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for length in options.prompt_lengths:
        samples = target.samples[f"prefill_{length}"]
        row[f"prefill_ms_{length}"] = 1000 * statistics.median(samples)
        row[f"prefill_ms_{length}_spread_pct"] = spread_pct(samples)
    decode = target.samples["decode"]
    row["decode_tokens_per_s"] = options.decode_tokens / statistics.median(decode)
    row["decode_spread_pct"] = spread_pct(decode)
    return row


def accuracy_fields(target: Target, reference: Target, reference_fn: Any, windows: Any,
                    progress: bool) -> dict[str, Any]:
    """Perplexity on the graph itself, and KL / top-1 against the float32 graph's logits callable
    `reference_fn` (one session, shared by every target) on the same windows."""
    from rotaq.eval.metrics import evaluate_logits_fn

    if target is reference:  # scored by the session already open for every other target's KL
        logits_fn, reference_fn = reference_fn, None
    else:
        logits_fn = target.logits_fn()
    if logits_fn is None:
        return {}
    result = evaluate_logits_fn(logits_fn, windows, reference_fn, progress=progress,
                                desc=f"perplexity {target.label}").to_dict()
    fields = {"perplexity": result["perplexity"], "eval_tokens": result.get("tokens")}
    if reference_fn is not None:
        fields.update(kl_divergence=result.get("kl_divergence"), top1_agreement=result.get("top1_agreement"))
    else:
        fields.update(kl_divergence=0.0, top1_agreement=1.0)
    return fields


def evaluation_windows(options: BenchOptions, reference: Target) -> Any:
    from transformers import AutoTokenizer

    from rotaq.pipeline.data import load_split_windows

    tokenizer = AutoTokenizer.from_pretrained(str(reference.layout.folder))
    return load_split_windows(options.evaluation, tokenizer, "evaluation")


def round_speedups(reference: list[float], samples: list[float]) -> list[float]:
    """Reference time / target time, round by round. Each round times both back to back, so a slow spell
    of the machine scales both and cancels in the ratio (the ratio of medians would not)."""
    return [ref / own for ref, own in zip(reference, samples, strict=True)]


def reference_for(target: Target, targets: list[Target]) -> Target | None:
    """The float32 ONNX target a target's ratios are taken against: on the same provider for ONNX
    targets, the CPU one for PyTorch and peer rows."""
    provider = target.spec.provider if target.spec.kind == ONNX else CPU
    return next((t for t in targets if t.spec.kind == ONNX and t.layout is not None
                 and t.label == targets[0].label and t.spec.provider == provider), None)


def sample_key(model: str, runtime: str) -> str:
    """How a row's raw samples are keyed in the run's metadata and in a gate baseline."""
    return f"{model} ({runtime})"


def add_ratios(rows: list[dict[str, Any]], targets: list[Target]) -> None:
    """Speed-ups and size against the float32 ONNX graph (> 1 is faster; size < 1 is smaller): the
    median of the per-round paired ratios, and the best-of-N ratio of minimums."""
    for row, target in zip(rows, targets, strict=True):
        base = reference_for(target, targets)
        if base is None:
            continue
        for key, samples in target.samples.items():
            if key == "decode_step":  # a gate statistic (see time_rounds), not a reported ratio
                continue
            name = "decode_speedup" if key == "decode" else key.replace("prefill_", "prefill_speedup_")
            row[name] = statistics.median(round_speedups(base.samples[key], samples))
            row[f"{name}_best"] = min(base.samples[key]) / min(samples)
        base_mb = base.description.get("file_mb")
        if row.get("file_mb") and base_mb:
            row["size_ratio"] = row["file_mb"] / base_mb


def copy_graph_accuracy(rows: list[dict[str, Any]]) -> None:
    """A rotaq export's genai row runs the graph its ONNX Runtime row scored: the same numbers."""
    scored = {row.get("graph_sha256"): row for row in rows if row.get("perplexity") is not None and row.get("graph_sha256")}
    for row in rows:
        source = scored.get(row.get("graph_sha256"))
        if row.get("perplexity") is None and source is not None:
            row.update({key: source[key] for key in ("perplexity", "eval_tokens", "kl_divergence", "top1_agreement")
                        if key in source})


def weight_bits_of(scheme: str) -> int | None:
    """4 for w4a*, 8 for w8a*, 32 for fp32 (`scheme_label`'s first word); None for the peer's own rows."""
    scheme = scheme.split(" ")[0]
    if scheme == "fp32":
        return 32
    if scheme.startswith("w") and scheme[1:2].isdigit():
        return int(scheme[1])
    return None


def add_peer_ratios(rows: list[dict[str, Any]], targets: list[Target]) -> None:
    """"Decode × peer": a row's speed over the builder graph at the same weight precision (W4* against
    int4, W8A8 against int8, fp32 against fp32), the median of per-round paired ratios like every ratio
    here; prefill 512 the same. > 1 is faster than the peer."""
    peers = {t.description.get("scheme"): t for t in targets if t.layout is None and t.spec.kind == GENAI}
    for row, target in zip(rows, targets, strict=True):
        peer = peers.get(PEER_FOR_WEIGHT_BITS.get(weight_bits_of(str(row.get("scheme", ""))) or 0))
        if peer is None or target.layout is None:
            continue
        row["decode_vs_peer"] = statistics.median(round_speedups(peer.samples["decode"], target.samples["decode"]))
        if "prefill_512" in target.samples:
            row["prefill_vs_peer_512"] = statistics.median(round_speedups(peer.samples["prefill_512"],
                                                                          target.samples["prefill_512"]))


def machine_info(threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        cpu += f" (avx2: {'avx2' in flags}, avx512_vnni: {'avx512_vnni' in flags}, avx_vnni: {'avx_vnni' in flags})"
    return {"cpu": cpu, "threads": threads, "onnxruntime": ort.__version__, "rotaq": rotaq_version(),
            "python": platform.python_version()}


def rotaq_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("rotaq")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def run_bench(options: BenchOptions) -> list[dict[str, Any]]:
    """Time, size and score every target; writes bench.{json,md,csv} and bench_meta.json to `out`."""
    return run_bench_with_meta(options)[0]


MoreRounds = Callable[[list[dict[str, Any]], dict[str, Any]], int]
"""Asked after the timed rounds with the rows and metadata so far: how many more rounds to time (0: done).
The CI gate uses it to keep timing while its verdict is inconclusive."""


def run_bench_with_meta(options: BenchOptions, more_rounds: MoreRounds | None = None
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`run_bench`, also returning the run's metadata (machine, settings, raw samples)."""
    threads = options.threads or default_threads()
    targets, notes = build_targets(options, threads)
    reference = targets[0]
    machine = machine_info(threads)
    workers = Workers(targets)
    try:
        time_rounds(workers, options, options.warmup, options.repeats)
        timed = options.repeats
        while more_rounds is not None:
            extra = more_rounds(*timing_rows(targets, options, machine, notes))
            if extra <= 0:
                break
            time_rounds(workers, options, 0, extra, first_round=options.warmup + timed)
            timed += extra
        for index, target in enumerate(targets):
            target.info["peak_rss_mb"] = workers.ask(index, "rss")
    finally:
        workers.close()
    rows, meta = timing_rows(targets, options, machine, notes)
    windows = evaluation_windows(options, reference) if options.perplexity else None
    reference_fn = reference.logits_fn() if windows is not None else None
    if windows is not None:
        for row, target in zip(rows, targets, strict=True):
            row.update(accuracy_fields(target, reference, reference_fn, windows, options.progress))
        copy_graph_accuracy(rows)
    if any("qdq" in str(row.get("kernels")) for row in rows):
        notes["qdq"] = ("rows with qdq kernels (W4A4, per-token W4A8) run per-token activation fake-quant ops and a "
                        "float-activation MatMulNBits: exact numerics, but ONNX Runtime has no W4A4 CPU kernel, so "
                        "their speed needs one; their size and accuracy are what a W4A4 kernel would deliver")
    if options.profile:
        notes["profile"] = profile_graphs(targets, options, threads)
    write_bench_files(rows, meta, Path(options.out))
    return rows, meta


def profile_graphs(targets: list[Target], options: BenchOptions, threads: int) -> str:
    """`--profile`: one decode step of the first 4-bit export and of the builder's int4 graph, per
    operator type (`rotaq.export.bench_profile`); returns where the table was written, or why not."""
    from rotaq.export.bench_profile import profile_decode_step, write_profile

    own = next((t for t in targets if t.spec.kind == ONNX and t.layout is not None
                and weight_bits_of(str(t.description.get("scheme", ""))) == 4), None)
    peer = next((t for t in targets if t.layout is None and t.description.get("scheme") == "genai int4"), None)
    chosen = [t for t in (own, peer) if t is not None]
    if not chosen:
        return "skipped: no 4-bit export and no genai int4 peer among the models"
    steps = 20
    profiles = {t.label: profile_decode_step(Path(t.spec.path), threads, options.cached_tokens, steps) for t in chosen}
    path = write_profile(profiles, Path(options.out), {"cached_tokens": options.cached_tokens, "steps": steps,
                                                         "threads": threads})
    return f"decode-step profile per operator type in {path.name}"


def timing_rows(targets: list[Target], options: BenchOptions, machine: dict[str, Any], notes: dict[str, Any]
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows and metadata of what has been timed so far (no accuracy yet), on `machine_info`'s machine."""
    rows = []
    for target in targets:
        rows.append({"model": target.label, "runtime": target.runtime, **target.description,
                     **timing_fields(target, options),
                     "peak_rss_mb": target.info.get("peak_rss_mb"),
                     # The worker's peak before it loaded the model (interpreter and imports).
                     "baseline_rss_mb": target.info["baseline_rss_mb"],
                     "threads": machine["threads"], **options.extra_fields})
    add_ratios(rows, targets)
    add_peer_ratios(rows, targets)
    speedups = {}
    for target in targets:
        base = reference_for(target, targets)
        if base is not None and base is not target:
            speedups[sample_key(target.label, target.runtime)] = {
                key: round_speedups(base.samples[key], samples) for key, samples in target.samples.items()}
    meta = {"machine": machine, "notes": notes, "repeats": len(targets[0].samples["decode"]),
            "warmup": options.warmup, "prompt_lengths": list(options.prompt_lengths),
            "prefill_calls": options.prefill_calls,
            "cached_tokens": options.cached_tokens, "decode_tokens": options.decode_tokens,
            "reference": str(targets[0].layout.folder), "reference_label": targets[0].label,
            "samples_seconds": {sample_key(t.label, t.runtime): t.samples for t in targets},
            "round_speedups": speedups}
    return rows, meta


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    present = {key for row in rows for key in row}
    extra = [key for row in rows for key in row if key not in COLUMNS and key not in ("threads",)]
    return [c for c in COLUMNS if c in present] + list(dict.fromkeys(extra))


MACHINE_ONLY_COLUMNS = ("baseline_rss_mb", "graph_sha256", "shape")


def readable_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns a person reads: no best-of-N ratios, hashes or worker baselines (JSON and CSV keep them)."""
    return [c for c in table_columns(rows) if not c.endswith("_best") and c not in MACHINE_ONLY_COLUMNS]


def write_bench_files(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, out / Path(BENCH_FILE).stem, table_columns(rows))
    write_json_atomic(out / META_FILE, meta)
    notes = "".join(f"- {key}: {value}\n" for key, value in meta["notes"].items())
    machine = meta["machine"]
    atomic_write(out / Path(BENCH_FILE).with_suffix(".md"), markdown_table(rows, readable_columns(rows)) + (
        f"\nMedians of {meta['repeats']} interleaved repeats after {meta['warmup']} warm-up round(s); "
        f"prefill: best of {meta['prefill_calls']} calls per repeat; "
        f"decode: {meta['decode_tokens']} tokens after {meta['cached_tokens']} cached; "
        f"{machine['threads']} threads on {machine['cpu']}; onnxruntime {machine['onnxruntime']}. "
        f"Ratios are against the float32 ONNX row.\n" + notes))
