"""docs/performance.md, rendered from a run's results.json: `markdown(results)` is the whole page.

`make bench` writes bench/results.json and then this page (docs/performance.md); a quick run writes
performance.md beside its results. `python -m bench.report [RESULTS] [-o OUT]` renders again without
measuring (defaults: bench/results.json -> docs/performance.md; `-o -` prints). Every table names the
results.json keys it comes from, and every number in the prose is computed from them, so the page can
never disagree with the run it describes: to change the wording, edit this module, not the page.
"""

from __future__ import annotations

import argparse
import json
import os.path
from pathlib import Path
from typing import Any

from bench import targets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
PAGE = ROOT / "docs" / "performance.md"

Results = dict[str, Any]


def _ms(st: dict[str, Any] | None, digits: int = 0) -> str:
    """A timing as `median (p25-p75)` in milliseconds."""
    if not st:
        return "-"
    return f"{st['median_ms']:,.{digits}f} ({st['p25_ms']:,.{digits}f}-{st['p75_ms']:,.{digits}f})"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _x(value: float | None) -> str:
    """A ratio: `88x`, `1.41x`."""
    if value is None:
        return "-"
    return f"{value:,.0f}x" if value >= 10 else f"{value:.2f}x"


def _source(*keys: str) -> str:
    return "Source: " + ", ".join(f"`{k}`" for k in keys) + "."


def _by_size(d: dict[str, Any]) -> list[tuple[int, Any]]:
    return sorted(((int(k), v) for k, v in d.items()), key=lambda kv: kv[0])


def markdown(r: Results, plot: str | None = "../bench/job-latency.png", source: str = "bench/results.json") -> str:
    """The performance page for one run's results; `plot` is the image's path relative to the page."""
    parts = [_header(r, plot, source)]
    for section in (_jobs, _old_way, _search, _scale, _gpu, _stages, _build, _memory, _encoder, _targets):
        text = section(r)
        if text:
            parts.append(text)
    return "\n\n".join(parts) + "\n"


def _header(r: Results, plot: str | None, source: str) -> str:
    out = [
        "# Performance",
        "",
        f"<!-- Written by bench/report.py from {source}: edit bench/report.py, not this page. -->",
        "",
        f"Every figure on this page comes from `{source}`, written by one `make bench` run "
        "(`python -m bench.run`); each table names the keys it reads. `make bench-quick` is a smoke run "
        "(small sizes, few repeats) that writes to a temporary folder and never touches the committed results; "
        "`python -m bench.report` renders this page again from the JSON without measuring. No test asserts a time.",
        "",
        _the_run(r.get("meta", {})),
    ]
    if plot and "jobs" in r:
        out += ["", f"![Per-job latency against gallery size, and search alone against its floor]({plot})"]
    out += ["", "## What is measured", "", *_what_is_measured(r)]
    failed = [f"**{name}: failed**: {v['error']}" for name, v in r.items() if isinstance(v, dict) and "error" in v]
    if failed:
        out += ["", *failed]
    return "\n".join(out)


def _the_run(meta: dict[str, Any]) -> str:
    m = meta.get("machine", {})
    code = meta.get("uncommitted_code") or []
    changes = f"uncommitted changes in {', '.join(f'`{c}`' for c in code)}" if code else "no uncommitted code"
    sentences = [
        f"**The run** (`meta`): a {meta.get('mode')} run on {meta.get('date')}",
        f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GB RAM",
        f"Python {m.get('python')}, numpy {m.get('numpy')}, faiss {m.get('faiss')}, "
        f"onnxruntime {m.get('onnxruntime')}, dlib {m.get('dlib')}",
        f"code at commit `{meta.get('git_commit')}`, {changes}",
        f"dev faces: {_faces(meta)}",
        f"load average {meta.get('load_average_start')} at the start and {meta.get('load_average_end')} at the end",
        f"the run took {meta.get('elapsed_s')} s",
    ]
    later = [f"{', '.join(f'`{x}`' for x in run['sections'])} "
             f"{'comes' if len(run['sections']) == 1 else 'come'} from a later {run['mode']} run of "
             f"{'that section' if len(run['sections']) == 1 else 'those sections'} alone, on {run['date']} "
             f"(code at `{run['git_commit']}`, detector "
             f"{run['encoder_settings'].get('detector')}, load average {run['load_average_start']} at its start)"
             for run in meta.get("merged", [])]
    return ("; ".join(sentences) + ". " + "".join(f"{_capital(x)}. " for x in later) + "Each figure is the median of "
            "several runs after a warm-up, with the p25-p75 spread in brackets; methods being compared run in "
            "interleaved blocks, each begun with an untimed run, so a change in the machine's other load weighs on "
            "each of them alike and every timed run follows one of its own method.")


def _faces(meta: dict[str, Any]) -> str:
    if meta.get("faces"):
        return f"`{meta['faces']}`"
    return ("`../shared/faces`, the default before `meta.faces` was recorded (the same gallery photos and query "
            "`q04` as `tests/data/faces`, and one more stranger query, `q09`)")


def _what_is_measured(r: Results) -> list[str]:
    syn = r.get("synthetic", {})
    query = r.get("meta", {}).get("query", "a dev query")
    lines = [
        f"- **A job** is what the portal sends: a data-URL selfie (`{query}` of the dev faces) through decode, "
        "detection, encoding, search and the JSON result; through `matcher.query.search_selfie` (the path a worker "
        "takes) and through a real `fsw-worker run` on a private `redis-server`, timed from the Python bullmq "
        "client's `Queue.add` until it sees the job completed.",
    ]
    if syn.get("real_faces_in_each_gallery"):
        lines.append(
            f"- **Galleries of many faces** hold the {syn['real_faces_in_each_gallery']} real dev faces plus synthetic "
            f"descriptors ({syn['faces_per_synthetic_photo']} faces a synthetic photo), written by fsw's own gallery "
            f"writer (`synthetic`): {syn.get('method')}. Real and synthetic agree closely: mean norm "
            f"{syn.get('real_norm_mean')} and {syn.get('synthetic_norm_mean')}, median pairwise distance "
            f"{syn.get('real_pairwise_distance_median')} and {syn.get('synthetic_pairwise_distance_median')}; "
            f"{100 * syn.get('redrawn_share', 0):.0f}% of draws were redrawn. Every size returns exactly the query's "
            "real photos, and the run checks it (`jobs.all_results_real`).")
    old = r.get("old_way", {})
    if old:
        size = (f"scaled each photo to at most {old['max_side']} px (long side)" if old.get("max_side")
                else "read each photo at full size")
        lines.append(
            f"- **The old way** is the replaced worker: for every job it {size}, detected and encoded its faces "
            "with `face_recognition.face_encodings(img, "
            f"num_jitters={old.get('jitters')}, model=\"{old.get('model')}\")` and compared each with the selfie. "
            "Its cost is a sum over independent photos, so the 1,000-photo figure is extrapolated: the selfie's "
            "encode plus 1,000 times the mean per-photo cost of the largest job.")
    lines.append("- **numpy exhaustive** is what a user would write by hand (and what DeepFace's `find` does): the "
                 "same selfie descriptor, then `np.linalg.norm(vectors - q, axis=1)` over the same descriptors.")
    return lines


def _jobs(r: Results) -> str:
    jobs = r.get("jobs", {})
    if "fsw" not in jobs:
        return ""
    worker = r.get("worker", {}).get("sizes", {})
    rows = []
    for size in jobs["sizes"]:
        s = str(size)
        rows.append([f"{size:,}", _ms(jobs["fsw"].get("onnx", {}).get(s)), _ms(jobs["fsw"].get("dlib", {}).get(s)),
                     _ms(worker.get(s, {}).get("latency")) if worker else "not measured",
                     _ms(jobs["numpy"].get(s))])
    out = ["## Per-job latency, ms", "",
           _table(["faces in the gallery", "fsw, ONNX engine (default)", "fsw, dlib engine",
                   "fsw-worker via Redis (ONNX)", "numpy exhaustive"], rows),
           "", _source("jobs.fsw.onnx", "jobs.fsw.dlib", "worker.sizes.*.latency", "jobs.numpy")]
    grow = jobs.get("largest_over_smallest", {})
    if grow.get("onnx"):
        sizes = jobs["sizes"]
        both = jobs.get("interleaved")
        if both:
            st = both["sizes"]
            spread = "-".join(str(x) for x in both.get("ratio_p25_p75", []))
            text = (f"A job at {sizes[-1]:,} faces costs {both['largest_over_smallest']}x what it costs at "
                    f"{sizes[0]:,} through the matcher: the median of {both['rounds']} rounds' ratios, each round one "
                    f"job on each gallery after an untimed one, back to back as a busy worker runs them ({spread} "
                    f"p25-p75; {_ms(st[str(sizes[-1])], 1)} ms against {_ms(st[str(sizes[0])], 1)}, "
                    f"`jobs.interleaved`); the table's sizes, measured one after another, give {grow['onnx']}x")
            pause = both.get("after_pause")
            if pause:
                text += (f". With a {pause['pause_s']} s idle pause before each job the ratio is "
                         f"{pause['largest_over_smallest']}x (`jobs.interleaved.after_pause`): on this virtual "
                         "machine a scan split over both cores runs slower for a while after the cores idled")
        else:
            text = (f"A job at {sizes[-1]:,} faces costs {grow['onnx']}x what it costs at {sizes[0]:,} through the "
                    f"matcher (`jobs.largest_over_smallest`)")
        scan = r.get("search", {}).get("sizes", {}).get(str(sizes[-1]), {}).get("fsw")
        if scan:  # these jobs name no stage: query expansion scans the whole gallery, then the search again
            text += (". A job without a stage whose query is expanded (this selfie's is) scans the whole gallery "
                     "twice (query expansion, then the search; "
                     f"{scan['median_ms']:.1f} ms a scan at {sizes[-1]:,} faces, `search.sizes`) besides the "
                     "selfie's detection and encoding. A job with a stage scans only the stage's faces and costs "
                     "the same at any gallery size (below)")
        out += ["", text + "."]
    return "\n".join(out)


def _old_way(r: Results) -> str:
    old = r.get("old_way", {})
    if not old.get("measured"):
        return ""
    ratios = old.get("ratios", {})
    onnx = next((v for k, v in ratios.items() if "_onnx_" in k), {})
    dlib = next((v for k, v in ratios.items() if "_dlib_" in k), {})
    rows = [[f"{row['photos']:,}", f"{row['latency']['median_ms'] / 1000:,.1f} s ({_runs(row['latency']['n'])})",
             f"{row['per_photo_ms_mean'] / 1000:.2f} s", _x(onnx.get(str(row["photos"]))),
             _x(dlib.get(str(row["photos"])))] for row in old["measured"]]
    ext = old.get("extrapolated_1000", {})
    if ext:
        key = "1000 (extrapolated)"
        rows.append(["1,000 (extrapolated)", f"{ext['median_ms'] / 1000:,.0f} s", "-", _x(onnx.get(key)),
                     _x(dlib.get(key))])
    out = ["## The old way", "", "The replaced worker's job over a stage of n photos, against fsw's job.", "",
           _table(["photos in the stage", "old way", "a photo (mean)", "old way / fsw (ONNX)",
                   "old way / fsw (dlib engine)"], rows),
           "", _source("old_way.measured", "old_way.extrapolated_1000", "old_way.ratios") +
           " Ratios are to fsw's job at the smallest gallery."]
    if not old.get("max_side"):
        out += ["", "This run encoded the old way's photos at full size (`old_way.max_side` is absent), but the "
                "replaced worker scaled them to at most 640 px first, as `bench/jobs.py` now does: these figures "
                "overstate the old way's cost, and the next full run measures it as the worker ran."]
    return "\n".join(out)


def _search(r: Results) -> str:
    search = r.get("search", {})
    if not search.get("sizes"):
        return ""
    bw = search["bandwidth"]["gb_per_s"]
    sizes = _by_size(search["sizes"])
    largest = sizes[-1][1]
    if "fsw_one_core" not in largest:  # a run from before the scan was split over the cores
        return _search_before_split(r)
    stage = largest.get("stage", {})
    if "fsw_float32" not in largest:  # a run from before the codes file
        return _search_float32(r, sizes, largest, stage, bw)
    rows = [[f"{size:,}", _ms(v["fsw"], 2), _ms(v["fsw_float32"], 2), _ms(v["fsw_one_core"], 2),
             _ms(v["fsw_stage"], 2), _ms(v["faiss_range"], 2), _ms(v["numpy_matmul"], 2), f"{v['floor_ms']:.2f}",
             _x(v["fsw_over_floor"]), _x(v.get("fsw_float32_over_floor"))] for size, v in sizes]
    threads = largest.get("threads")
    return "\n".join([
        "## Search alone, ms", "",
        f"One descriptor against the gallery. The floor is the float32 descriptors' bytes (512 a face) read at {bw} "
        "GB/s, the machine's memory bandwidth measured as a 1 GB numpy copy (read + write) on one core: no scan of "
        "the float32 rows can beat it.", "",
        _table(["faces", f"fsw `Gallery.search`, whole gallery, on the codes ({threads} threads)",
                "fsw, float32 rows (all cores)", "fsw, float32 rows, one core",
                f"fsw, a stage (`{stage.get('name')}`, {stage.get('faces') or 0:,} faces at the largest size)",
                "FAISS flat range search (one core)", "numpy matmul, precomputed norms", "floor", "fsw / floor",
                "float32 rows / floor"], rows),
        "", _source("search.sizes", "search.bandwidth"), "",
        f"A whole-gallery search scans the index rows' 8-bit codes (`matcher.coarse`, "
        f"{largest.get('bytes_read', 0) / max(largest.get('codes') or 1, 1):.0f} bytes a face), one share "
        f"per core, then rechecks the rows near the query against the float32 rows in float64: the same answers as "
        f"the float32 scan (`faces_found`), at {int(largest['faces']):,} faces {_ms(largest['fsw'], 1)} ms, "
        f"{_x(largest['fsw_over_floor'])} the float32 floor and {_x(largest.get('fsw_over_read_floor'))} the floor of "
        f"the {largest.get('bytes_read', 0) / 1e6:,.0f} MB it reads. The float32 scan (a gallery without codes, or "
        f"before its first index file) cuts the rows into one slice per core for FAISS's `range_search_L2sqr`: "
        f"{_ms(largest['fsw_float32'], 1)} ms, {_x(largest.get('fsw_float32_over_floor'))} the floor. A job with a "
        "stage scans only the stage's float32 rows, so its search costs the same at every gallery size.",
    ])


def _search_float32(r: Results, sizes: list, largest: dict, stage: dict, bw: float) -> str:
    rows = [[f"{size:,}", _ms(v["fsw"], 2), _ms(v["fsw_one_core"], 2), _ms(v["fsw_stage"], 2),
             _ms(v["faiss_range"], 2), _ms(v["numpy_matmul"], 2), f"{v['floor_ms']:.2f}", _x(v["fsw_over_floor"])]
            for size, v in sizes]
    threads = largest.get("threads")
    return "\n".join([
        "## Search alone, ms", "",
        f"One descriptor against the gallery. The floor is the bytes scanned at {bw} GB/s, the machine's memory "
        "bandwidth measured as a 1 GB numpy copy (read + write) on one core.", "",
        _table(["faces", f"fsw `Gallery.search`, whole gallery ({threads} threads)", "fsw's scan, one core",
                f"fsw, a stage (`{stage.get('name')}`, {stage.get('faces') or 0:,} faces at the largest size)",
                "FAISS flat range search (one core)", "numpy matmul, precomputed norms", "floor", "fsw / floor"], rows),
        "", _source("search.sizes", "search.bandwidth"), "",
        f"A whole-gallery scan is cut into one slice per core, scanned by FAISS's `range_search_L2sqr` in threads "
        f"(`matcher.scan`): at {int(largest['faces']):,} faces {_ms(largest['fsw'], 1)} ms against "
        f"{_ms(largest['fsw_one_core'], 1)} on one core, {_x(largest['fsw_over_floor'])} the one-core floor. A job "
        "with a stage scans only the stage's rows, so its search costs the same at every gallery size.",
    ])


def _search_before_split(r: Results) -> str:
    search = r["search"]
    bw = search["bandwidth"]["gb_per_s"]
    rows = [[f"{size:,}", _ms(v["fsw"], 2), _ms(v["faiss_range"], 2), _ms(v.get("faiss_split_threads"), 2),
             _ms(v["numpy_matmul"], 2), f"{v['floor_ms']:.2f}", _x(v["fsw_over_floor"])]
            for size, v in _by_size(search["sizes"])]
    return "\n".join(["## Search alone, ms", "",
                      f"One descriptor against the gallery. The floor is the bytes scanned at {bw} GB/s.", "",
                      _table(["faces", "fsw `Gallery.search`", "FAISS flat range search",
                              "FAISS, rows split over the cores", "numpy matmul, precomputed norms", "floor",
                              "fsw / floor"], rows), "", _source("search.sizes", "search.bandwidth")])


def _scale(r: Results) -> str:
    sc = r.get("scale", {})
    if "jobs" not in sc:
        return ""
    j, stages = sc["jobs"], sc["stages"]
    real, synthetic = list(stages.items())[:2]
    rows = [
        ["whole gallery", _ms(j["1k_whole"]), _ms(j["10M_whole"]), _x(sc["whole_10m_over_1k"])],
        [f"stage `{real[0]}` ({real[1]:,} faces at 10M)", _ms(j["1k_stage"]), _ms(j["10M_stage"]),
         _x(sc["stage_10m_over_1k"])],
        [f"stage `{synthetic[0]}` ({synthetic[1]:,} synthetic faces)", "-", _ms(j["10M_synthetic_stage"]), "-"],
    ]
    w = sc.get("write_s", {})
    m = sc["memory"]
    start, reload = sc["load_while_serving"]["start"], sc["load_while_serving"]["reload"]
    out = [
        f"## {sc['faces']:,} faces", "",
        f"A gallery of {sc['faces']:,} faces in {sc['photos']:,} photos and {sc['folders']:,} folders (the dev set's "
        f"real photos and synthetic faces, 5 GB of descriptors), on this machine; the query's stage holds its real "
        "photos and 4,000 synthetic faces. Per-job latency, ms, against the same job on a 1,000-face gallery, "
        "interleaved:", "",
        _table(["job", "1,000 faces", f"{sc['faces']:,} faces", "ratio"], rows), "",
        _source("scale.jobs", "scale.stages") + " Answers equal at both sizes: "
        f"{'yes' if all(sc['answers_equal'].values()) else 'no'} (`scale.answers_equal`).", "",
        f"- Search alone over the whole gallery (`scale.search_whole`): {_ms(sc['search_whole'])} ms"
        + (f", {_x(sc.get('search_over_floor'))} the floor of {sc['floor_ms']} ms." if sc.get("floor_ms") else "."),
        f"- Writing it (`scale.write_s`): the row files {w.get('rows', '-')} s, then the final commit, which builds "
        f"the FAISS index from the rows{' and their codes' if m.get('code_bytes') else ''}, {w.get('index', '-')} s"
        f"{'' if w.get('this_run', True) else ' (recorded by the run that wrote the cached gallery'}"
        f"{'' if w.get('this_run', True) else (', ' + w['run'] + ')' if w.get('run') else ')')}.",
        f"- Opening it (`scale.open_s`): {', '.join(f'{s} s' for s in sc['open_s'])} (first, then again).",
        f"- A process that opened it and searched once (`scale.memory`): RSS {m['rss_after_open'] / 2**30:.2f} GiB, "
        f"{sc['bytes_per_face']} bytes a face; of it, {m['mapped_descriptor_bytes'] / 2**30:.2f} GiB are the mapped "
        + (f"index file and {m['code_bytes'] / 2**30:.2f} GiB its mapped codes, both " if m.get("code_bytes") else
           "index file, ")
        + "shared by every worker on the machine; its own memory (PSS of anonymous pages) is "
        f"{sc['private_bytes_per_face']} bytes a face: what each further worker adds.",
        f"- Loading it while serving (`scale.load_while_serving`), in a thread as a worker does: at start it took "
        f"{start['load_s']} s, the event loop's longest lag {start['loop_lag_max_ms']} ms; at a hot reload "
        f"{reload['load_s']} s, during which {reload['jobs_during_load']} staged jobs on the version in hand "
        f"completed at {_ms(reload['during_load'])} ms against {_ms(reload['idle'])} idle "
        f"({_x(reload['during_over_idle'])}), loop lag at most {reload['loop_lag_max_ms']} ms: no job waits for a "
        "load.",
    ]
    return "\n".join(out)


def _gpu(r: Results) -> str:
    """FAISS on a GPU, from `make gpu-check`'s own file (bench/gpu-results.json), which runs on GPU hardware."""
    path = ROOT / "bench" / "gpu-results.json"
    if not path.is_file():
        if "search" not in r:
            return ""
        return ("## FAISS on a GPU\n\n`make gpu-check` (`bench/gpu_check.py`) tests the GPU search and times it "
                "against the CPU at 1M and 10M faces, into `bench/gpu-results.json`. It has not run on GPU "
                "hardware yet: no GPU was available where these figures were measured. The GPU path's logic "
                "(the range search emulated by k-NN, the CPU fallback) is tested on the CPU (`tests/test_gpu.py`).")
    g = json.loads(path.read_text())
    rows = [[f"{int(n):,}", _ms(v["gpu"], 2), _ms(v["cpu"], 2), _x(v["cpu_over_gpu"]), v["same_answers"]]
            for n, v in sorted(g["sizes"].items(), key=lambda kv: int(kv[0]))]
    meta = g.get("meta", {})
    return "\n".join(["## FAISS on a GPU", "",
                      f"`make gpu-check` on {meta.get('gpu')} ({meta.get('date')}, faiss {meta.get('faiss')}); "
                      f"GPU tests passed: {g.get('tests_passed')}. One query, whole gallery, ms:", "",
                      _table(["faces", "GPU", "CPU (every core)", "CPU / GPU", "same answers"], rows), "",
                      "Source: `bench/gpu-results.json`."])


def _stages(r: Results) -> str:
    st = r.get("stages", {})
    if "expansion_on" not in st:
        return ""
    on, off = st["expansion_on"], st["expansion_off"]
    rows = [[name, f"{v['found']}/{v['wanted']}", v["wrong"]]
            for name, v in (("the stage alone (fsw now)", on["stage_alone"]),
                            ("the whole gallery, filtered to the stage (before)", on["whole_filtered"]))]
    return "\n".join([
        "## A stage's answer", "",
        f"A job with a stage scans only the stage's rows, and query expansion draws on the stage's photos, where it "
        f"drew on the whole gallery's. The dev set's {st['photos']} gallery photos laid out in {len(st['stages'])} "
        f"stages, each of its {st['queries']} queries searched in each stage at {st['threshold']}:", "",
        _table(["expansion's evidence", "found / wanted", "wrong photos"], rows), "",
        _source("stages") + f" {on['answers_with_other_photos']} of {st['searches']} answers hold other photos; "
        f"similarities of the photos both find moved by {on['similarity_change_median']} (median, at most "
        f"{on['similarity_change_max']}). Without expansion, {off['answers_equal_to_whole_filtered']} of "
        f"{st['searches']} answers equal the whole gallery's filtered to the stage. `fsw-index eval` searches the "
        "whole gallery, and its figures are unchanged (docs/accuracy.md).",
    ])


def _build(r: Results) -> str:
    b = r.get("build", {})
    if not b.get("tree_builds"):
        return ""
    rows = [[f"fsw, {x['jobs']} process{'es' if x['jobs'] > 1 else ''}", f"{x['photos_per_s']:.2f}",
             f"{x['faces_per_s']:.1f}", f"{x['seconds']:.1f}"] for x in b["tree_builds"]]
    raw = b["raw_onnx"]
    rows.append(["floor: one loop of raw Pillow + dlib calls + an ONNX Runtime session",
                 f"{raw['floor_photos_per_s']:.2f}", f"{raw['faces'] / sum(raw['seconds'].values()):.1f}",
                 f"{sum(raw['seconds'].values()):.1f}"])
    per_photo = ", ".join(f"{k.replace('_', ' ')} {v} ms" for k, v in b["per_photo_ms"].items())
    out = ["## Gallery build", "",
           f"{b['tree_photos']} photos: copies of the dev gallery photos, each cropped by a few pixels and re-encoded "
           "so that every content hash differs, built with `indexer.pipeline.index_photos` (what `fsw-index build` "
           "wraps), ONNX engine.", "",
           _table(["", "photos/s", "faces/s", "s"], rows), "",
           _source("build.tree_builds", "build.raw_onnx"), "",
           f"- {b.get('cores')} processes / 1: {_x(b.get('speedup_2_over_1'))} (`build.speedup_2_over_1`); fsw's "
           f"overhead over the raw loop, 1 process: {100 * b.get('overhead_over_raw', 0):.1f}% in wall time "
           f"(`build.overhead_over_raw`).",
           f"- Where a photo's time goes (`build.per_photo_ms`): {per_photo}."]
    dev = b.get("dev_gallery", {})
    rates = {e: dev[e] for e in ("onnx", "dlib") if e in dev}
    if rates:
        first = next(iter(rates.values()))
        text = ", ".join(f"{e} {v['photos_per_s']['median']} photos/s ({v['photos_per_s']['min']}-"
                         f"{v['photos_per_s']['max']})" for e, v in rates.items())
        out.append(f"- Engines, building the {first['photos']}-photo dev gallery with {first['jobs']} processes "
                   f"(`build.dev_gallery`): {text}; ONNX / dlib {_x(dev.get('onnx_over_dlib'))}.")
        raw_dev = dev.get("raw_per_photo_ms", {})
        if {"detect", "descriptor_onnx", "descriptor_dlib"} <= set(raw_dev):
            rest = sum(v for k, v in raw_dev.items() if not k.startswith("descriptor_"))
            best = (rest + raw_dev["descriptor_dlib"]) / (rest + raw_dev["descriptor_onnx"])
            out.append(f"  Detection takes {raw_dev['detect']:.0f} ms of a photo, the descriptor "
                       f"{raw_dev['descriptor_onnx']:.1f} ms with ONNX and {raw_dev['descriptor_dlib']:.0f} ms with "
                       "dlib (`build.dev_gallery.raw_per_photo_ms`): with detection as it is, the ONNX engine can "
                       f"make a build at most {_x(best)} faster than dlib's.")
    if b.get("add"):
        adds = "; ".join(f"{a['added_photos']} photos onto {a['base_photos']:,}: "
                         f"{a['latency']['median_ms'] / 1000:.2f} s ({a['latency']['p25_ms'] / 1000:.2f}-"
                         f"{a['latency']['p75_ms'] / 1000:.2f})" for a in b["add"])
        out.append(f"- `add` (`build.add`): {adds}; largest base / smallest {_x(b.get('add_largest_over_smallest'))}.")
    return "\n".join(out)


def _memory(r: Results) -> str:
    mem = r.get("memory", {})
    if "processes" not in mem:
        return ""
    rows = [[f"{size:,}", f"{v['rss_after_open'] / 2**20:.0f}", f"{v['peak_rss'] / 2**20:.0f}"]
            for size, v in _by_size(mem["processes"])]
    rows += [[f"{size:,} (fsw-worker)", f"{v['rss_bytes'] / 2**20:.0f}", "-"]
             for size, v in _by_size(r.get("worker", {}).get("sizes", {}))]
    out = ["## Memory", "", "Resident memory of a fresh process that opens the gallery with `Gallery.open`, and of "
           "`fsw-worker` serving it (which also holds dlib's models and ONNX Runtime), MiB:", "",
           _table(["faces", "RSS", "peak RSS"], rows), "", _source("memory.processes", "worker.sizes.*.rss_bytes")]
    largest = _by_size(mem["processes"])[-1][1] if mem.get("processes") else {}
    if "bytes_per_face" in mem and largest.get("code_bytes"):
        out += ["", f"**{mem['bytes_per_face']} bytes a face** (`memory.bytes_per_face`): the 512-byte descriptor, "
                f"its {round(largest['code_bytes'] / largest['faces'])}-byte code (`matcher.coarse`: what a "
                "whole-gallery search scans), "
                f"{mem['metadata_bytes_per_face']} bytes of metadata (photo ids, boxes, the face-to-photo map) and "
                "allocator overhead. The index file's rows and the codes are mapped, not copied: they count in each "
                "process's RSS, but the page cache holds them once for every process on the machine."]
    elif "bytes_per_face" in mem:
        out += ["", f"**{mem['bytes_per_face']} bytes a face** (`memory.bytes_per_face`): the 512-byte descriptor, "
                f"{mem['metadata_bytes_per_face']} bytes of metadata (photo ids, boxes, the face-to-photo map) and "
                "allocator overhead. The index file's rows are mapped, not copied: they count in each process's RSS, "
                "but the page cache holds them once for every process on the machine."]
    sh = mem.get("sharing")
    if sh:
        rows = [[n, *(f"{v[k]:,.0f}" for k in ("rss_mb", "pss_mb", "pss_anon_mb", "pss_file_mb"))]
                for n, v in sorted(sh["processes"].items(), key=lambda kv: int(kv[0]))]
        out += ["", f"Processes that each open the {sh['faces']:,}-face gallery as a worker does and search it once, "
                "all alive at once, summed, MiB (PSS divides each shared page among the processes that map it):", "",
                _table(["processes", "RSS", "PSS", "PSS, own memory", "PSS, mapped files"], rows), "",
                _source("memory.sharing") + f" Four cost {_x(sh['pss_4_over_1'])} what one costs "
                f"(`memory.sharing.pss_4_over_1`); their RSS adds up to {_x(sh['rss_4_over_1'])}, counting the "
                "shared pages four times."]
    return "\n".join(out)


def _encoder(r: Results) -> str:
    enc = r.get("encoder", {})
    out: list[str] = []
    if enc.get("detection_grid"):
        grid = enc["detection_grid"]
        default = (enc["default"]["max_side"], enc["default"]["upsample"])
        rows = [[g["max_side"], g["upsample"], f"{g['faces_found']}/{g['faces_expected']}", g["faces_extra"],
                 f"{g['photos_exact']}/{g['photos']}", g["mean_ms_per_photo"],
                 "default" if (g["max_side"], g["upsample"]) == default else ""] for g in grid]
        out += ["## Detection settings", "",
                f"HOG detection on {grid[0]['photos']} dev gallery photos; the time is detection plus landmarks, chip "
                f"and the ONNX descriptor. {_capital(enc.get('grid_note', ''))}", "",
                _table(["max side", "upsample", "found / listed", "extra", "photos with the listed count",
                        "ms a photo (mean)", ""], rows), "", _source("encoder.detection_grid")]
    d = enc.get("descriptor_engines")
    if d:
        names = {"dlib": "dlib (dlib-bin)", "onnx": "ONNX Runtime (default threads)",
                 "onnx_1_thread": "ONNX Runtime, 1 thread"}
        rows = [[names[e], _ms(d[e]["batch_1_ms_per_face"], 2), _ms(d[e]["batch_16_ms_per_face"], 2)]
                for e in names if e in d]
        gflops = ", ".join(f"{k} {v}" for k, v in d.get("achieved_gflop_per_s", {}).items())
        out += ["", "## Descriptor engines, ms a face", "",
                _table(["engine", "one face per call", "16 faces per call"], rows), "",
                _source("encoder.descriptor_engines"), "",
                f"dlib / ONNX: {_x(d['dlib_over_onnx']['batch_1_ms_per_face'])} at one face a call, "
                f"{_x(d['dlib_over_onnx']['batch_16_ms_per_face'])} at 16. The network is "
                f"{d['network_gflop_per_face']} GFLOP a face; GFLOP/s achieved: {gflops}."]
    return "\n".join(out).strip()


def _targets(r: Results) -> str:
    if not r.get("targets"):
        return ""
    side = r.get("side_sections", {})
    listed = targets.evaluate({**r, **side}) if side else r["targets"]
    met = {True: "met", False: "**missed**", None: "-"}
    rows = [[t["name"], t["target"], t["value"], met[t["met"]]] for t in listed]
    files = " and ".join(f"`bench/{name}.json`" for name in side)
    sources = _source("targets") + " Set in `bench/targets.py`." + (
        f" The {' and '.join(side)} targets are evaluated from {files}, which those sections write when run alone."
        if side else "")
    return "\n".join(["## Targets", "", _table(["target", "wanted", "measured", ""], rows), "", sources])


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _runs(n: int) -> str:
    return "1 run" if n == 1 else f"{n} runs"


def write(results: Results, page: Path, plot: str | None, source: str) -> None:
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(markdown(results, plot, source))


def with_side_sections(results: Results, folder: Path) -> Results:
    """`results` with the sections that run alone and keep their own file beside it (`detection.json`,
    `fleet.json`), where it lacks them, under `side_sections`: their targets are listed with the others."""
    side = {}
    for name in ("detection", "fleet"):
        path = folder / f"{name}.json"
        if name not in results and path.is_file():
            data = json.loads(path.read_text())
            side[name] = data.get(name, data)
    return {**results, "side_sections": side} if side else results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS, help="a run's results.json")
    parser.add_argument("-o", "--out", default=str(PAGE), help="the page to write, or - to print it")
    args = parser.parse_args(argv)
    results = with_side_sections(json.loads(args.results.read_text()), args.results.parent)
    source = source_name(args.results.parent)
    if args.out == "-":
        print(markdown(results, None, source), end="")
        return 0
    page = Path(args.out)
    plot = args.results.with_name("job-latency.png")
    write(results, page, os.path.relpath(plot, page.parent) if plot.exists() else None, source)
    return 0


def source_name(folder: Path) -> str:
    """How the page names a results.json in `folder`: its path in the repository, or just its name."""
    try:
        return (folder.resolve() / "results.json").relative_to(ROOT).as_posix()
    except ValueError:
        return "results.json"


if __name__ == "__main__":
    raise SystemExit(main())
